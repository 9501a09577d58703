"""oocseq.testing: the strategies, assertions, fit recorder and store contract that users get for
their own property-based tests. Each assertion is also shown to fail on a broken sequence."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import oocseq
from oocseq import ChunkedSequence
from oocseq.testing import (
    FitRecorder,
    StoreContract,
    assert_bounded_work,
    assert_deterministic,
    assert_exactly_once,
    assert_matches_source,
    decode_x,
    epoch_ids,
    index_encoding_fields,
    write_index_store,
)
from oocseq.testing import strategies as ost

IDS = {"x": "x", "id": "id"}


# -- the package ---------------------------------------------------------------------------------
def test_importing_oocseq_or_oocseq_testing_imports_no_hypothesis_nor_keras():
    code = (
        "import sys, oocseq, oocseq.testing; from oocseq.testing import assert_exactly_once; "
        "print(sorted(m for m in ('hypothesis', 'keras') if m in sys.modules))"
    )
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout
    assert out.strip() == "[]"


def test_unknown_name_is_an_attribute_error():
    import oocseq.testing

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        oocseq.testing.nope  # noqa: B018


# -- strategies ------------------------------------------------------------------------------------
@settings(max_examples=30)
@given(ost.stores(max_n=30))
def test_stores_hold_what_was_drawn(example):
    for name, a in example.arrays.items():
        got = example.store[name][:]
        assert got.dtype == a.dtype and got.shape == a.shape
        assert np.array_equal(got, a, equal_nan=a.dtype.kind in "fc")
    assert example.store.chunk_len == example.chunk_len or example.chunk_len > len(example.store)


@settings(max_examples=40)
@given(ost.index_stores(max_n=120), st.data())
def test_any_sequence_arguments_serve_every_sample_once_and_equal_to_source(example, data):
    kw = data.draw(ost.sequence_kwargs(example))
    seq = ChunkedSequence(example.store, x=IDS, y="y", **kw)
    assert_exactly_once(seq, data.draw(st.integers(0, 3)), order="keras", seed=data.draw(st.integers(0, 99)))
    assert_matches_source(seq, example.arrays, 1)
    seq.close()


@settings(max_examples=60)
@given(ost.plans(max_n=2000))
def test_plans_are_permutations_or_rank_shares(plan):
    order = plan.indices(0, len(plan))
    if plan.world_size == 1:
        assert np.array_equal(np.sort(order), np.arange(plan.n))
    else:
        assert np.isin(order, np.arange(plan.n)).all()


@settings(max_examples=15)
@given(ost.index_stores(min_n=20, max_n=150), st.data())
def test_thread_workers_serve_every_sample_once(example, data):
    kw = data.draw(ost.sequence_kwargs(example, workers=True, ranks=False))
    seq = ChunkedSequence(example.store, x=IDS, y="y", **kw)
    try:
        assert_exactly_once(seq, 0, order="in order")
    finally:
        seq.close()


def test_decode_x_rejects_rows_that_are_not_whole_samples():
    x = index_encoding_fields(10, sample_shape=(2, 3))["x"]
    assert decode_x(x[[3, 1]]).tolist() == [3, 1]
    bad = x[[3, 1]].copy()
    bad[1, 1, 2] += 1
    with pytest.raises(AssertionError):
        decode_x(bad)


# -- assertions pass on the real thing, fail on broken sequences ------------------------------------
@pytest.fixture
def store(tmp_path, fmt):
    return write_index_store(tmp_path / f"s{fmt}", 103, 8)


class Duplicating(ChunkedSequence):
    """Broken: the 3rd request serves the 2nd's batch again (one batch repeated, one lost)."""

    def __getitem__(self, i):
        self._served = getattr(self, "_served", [])
        batch = self._served[-1] if len(self._served) == 2 else super().__getitem__(i)
        self._served.append(batch)
        return batch


class OffByOne(ChunkedSequence):
    """Broken: ids say sample i, x holds sample i + 1's row."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return {"x": x["x"] + 1, "id": x["id"]}, y


class Unseeded(ChunkedSequence):
    """Broken: a fresh random seed per object."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "seed": random.randrange(2**31)})


def test_assert_exactly_once(store):
    assert_exactly_once(ChunkedSequence(store, 10, x=IDS, seed=3, window=2), order="keras")
    assert_exactly_once(ChunkedSequence(store, 10, x=IDS, drop_remainder=True), 2)
    for rank in range(3):
        assert_exactly_once(ChunkedSequence(store, 7, x=IDS, shard=oocseq.ShardOptions(rank, 3)), 1)
    with pytest.raises(AssertionError, match=r"1 sample\(s\) served too often|served too often"):
        assert_exactly_once(Duplicating(store, 10, x=IDS, seed=3), order="in order")
    with pytest.raises(AssertionError, match="no field 'id'"):
        assert_exactly_once(ChunkedSequence(store, 10))
    # ids may come from a function of the batch: here decoded from the index-encoding x
    assert_exactly_once(ChunkedSequence(store, 10), ids=lambda b: decode_x(b[0]))


def test_assert_matches_source(store):
    source = index_encoding_fields(103)
    assert_matches_source(ChunkedSequence(store, 16, x=IDS, y="y"), source)
    assert_matches_source(ChunkedSequence(store, 16, x=["x", "id"], y="y"), source, ids=lambda b: b[0][1])
    with pytest.raises(AssertionError, match="field 'x' differs from the source"):
        assert_matches_source(OffByOne(store, 16, x=IDS, y="y"), source)
    halved = {**source, "y": source["y"] // 2}
    with pytest.raises(AssertionError, match="field 'y'"):
        assert_matches_source(ChunkedSequence(store, 16, x=IDS, y="y"), halved)
    # a deterministic transform: compare with the source rows after the same transform
    double = lambda b: {**b, "x": b["x"] * 2}  # noqa: E731
    assert_matches_source(
        ChunkedSequence(store, 16, x=IDS, y="y", transform=double), source, transform=double
    )


def test_assert_deterministic(store):
    assert_deterministic(lambda: ChunkedSequence(store, 10, x=IDS, y="y", seed=4), epochs=(0, 1, 5))
    assert_deterministic(lambda: ChunkedSequence(store, 10, x=IDS, y="y", seed=4, workers=2), resume_at=3)
    random.seed(0)
    with pytest.raises(AssertionError, match="served different batches"):
        assert_deterministic(lambda: Unseeded(store, 10, x=IDS, y="y"))


def test_assert_bounded_work(store):
    assert_bounded_work(ChunkedSequence(store, 10, x=IDS, y="y", window=2), order="keras")
    assert_bounded_work(ChunkedSequence(store, 10, x=IDS, y="y", window=2), order="in order")
    # Broken locality: seq[i] always the plan's batch i, asked in a random order, with one
    # window cached at a time: windows are decoded again and again.
    broken = ChunkedSequence(
        store, 4, x=IDS, y="y", window=1, read=oocseq.ReadOptions(readahead=0, keras_order="index")
    )
    with pytest.raises(AssertionError, match="locality lost"):
        assert_bounded_work(broken, order="keras")


def test_epoch_ids_is_the_plan(store):
    seq = ChunkedSequence(store, 10, x=IDS, seed=9)
    want = epoch_ids(seq, 2)
    seq.set_epoch(2)
    got = np.concatenate([seq.batch_indices(i) for i in range(len(seq))])
    assert np.array_equal(got, want) and seq.epoch == 2


# -- the fit recorder ------------------------------------------------------------------------------
def _recorder():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(10)])
    model = FitRecorder(inner)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_fit_recorder_records_fit_evaluate_predict(store):
    n = len(store)
    model = _recorder()
    seq = ChunkedSequence(store, 10, x=IDS, y="y", seed=2, window=2)
    val = ChunkedSequence(store, 32, x=IDS, y="y", shuffle=False)
    random.seed(5)
    model.fit(seq, epochs=3, verbose=0, validation_data=val)
    assert len(model.epochs) == 3
    for batches in model.epochs:
        assert len(batches) == len(seq)
        assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(n))
        # arrival order: the steps trained the batches of one of the plan's epochs, in order
        assert any(np.array_equal(np.concatenate(batches), epoch_ids(seq, k)) for k in range(seq.epoch + 1))
    assert [len(b) for b in model.evaluated] == [len(val)] * 3  # fit's validation passes
    model.evaluate(val, verbose=0)
    model.predict(ChunkedSequence(store, 32, x=IDS, y=None, shuffle=False), verbose=0)
    assert np.array_equal(np.concatenate(model.evaluated[-1]), np.arange(n))
    assert np.array_equal(np.concatenate(model.predicted[0]), np.arange(n))


def test_fit_recorder_catches_a_pipeline_that_repeats_batches(store):
    from oocseq.adapters.keras import KerasChunkedSequence

    class KerasDuplicating(Duplicating, KerasChunkedSequence):
        pass

    model = _recorder()
    model.fit(KerasDuplicating(store, 10, x=IDS, y="y"), epochs=1, verbose=0)
    counts = np.bincount(np.concatenate(model.epochs[0]), minlength=len(store))
    assert counts.max() == 2 and (counts == 0).sum() > 0


def test_fit_recorder_needs_the_id_input(store):
    model = _recorder()
    with pytest.raises(oocseq.ArgumentError, match="sample-id input 'id'"):
        model.fit(ChunkedSequence(store, 10, x={"x": "x"}, y="y"), epochs=1, verbose=0)


# -- the store contract, for each format x compression x read path ----------------------------------
class TestZarrLz4(StoreContract):
    suffix, compression, fast = ".zarr", "lz4", True
    max_examples = 15


class TestZarrRawLibraryPath(StoreContract):
    suffix, compression, fast = ".zarr", None, False
    max_examples = 10


class TestHDF5Zstd(StoreContract):
    suffix, compression, fast = ".h5", "zstd", True
    max_examples = 15


class TestHDF5RawLibraryPath(StoreContract):
    suffix, compression, fast = ".h5", None, False
    max_examples = 10


class TestContractWithATransform(StoreContract):
    """A user's transform under the contract: it must keep every sample (here it is the
    identity on ids and y, and assert_matches_source compares the transformed x)."""

    suffix, compression = ".h5", "lz4"
    max_examples = 10

    def sequence(self, store, **kwargs):
        return ChunkedSequence(store, transform=lambda b: dict(b), **kwargs)


def test_the_contract_fails_a_broken_store():
    class DropsLastChunk(StoreContract):
        suffix = ".zarr"
        max_examples = 5

        def write(self, path, fields, chunk_len):
            n = len(next(iter(fields.values())))
            keep = max(1, n - chunk_len) if n > chunk_len else n
            return oocseq.ingest_arrays(
                path, {k: v[:keep] for k, v in fields.items()}, chunk_len=chunk_len, preshuffle=False
            )

    with pytest.raises(AssertionError):
        DropsLastChunk().test_round_trip_any_dtype_and_shape()


# -- the README's example, as written there -----------------------------------------------------------
def my_transform(batch):  # the code under test
    return {**batch, "x": batch["x"] * 2}


@settings(max_examples=20)
@given(ost.index_stores(), st.data())
def test_readme_example_my_pipeline(example, data):
    kw = data.draw(ost.sequence_kwargs(example))  # batch size, window, seed, ranks, ...
    seq = ChunkedSequence(example.store, x={"x": "x", "id": "id"}, y="y", transform=my_transform, **kw)
    assert_exactly_once(seq, order="keras")  # requested as model.fit requests
    assert_matches_source(seq, example.arrays, transform=my_transform)
