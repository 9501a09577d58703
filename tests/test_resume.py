"""Mid-epoch resume: ``state_dict`` / ``load_state_dict`` reproduce the rest of an epoch exactly,
states of other stores or plans are refused, and ``iter(seq)`` moves on to the next epoch.

Stores encode the sample index in their values (see conftest.py).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import ids_of, make_store, w_of, x_of, y_of
from hypothesis import given, settings
from hypothesis import strategies as st

import oocseq
from oocseq import ChunkedSequence, ShardOptions, StateError


def _ids(batch) -> list[int]:
    ids = ids_of(batch[0])
    np.testing.assert_array_equal(batch[1], y_of(ids))
    return ids.tolist()


def _epoch(seq: ChunkedSequence) -> list[list[int]]:
    return [_ids(b) for b in iter(seq)]


def _roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return {
        ".zarr": make_store(root / "a.zarr", 103, 8, weights=True),
        ".h5": make_store(root / "a.h5", 103, 8, weights=True),
        "small": make_store(root / "small.zarr", 37, 3),
    }


@settings(max_examples=60)
@given(
    data=st.data(),
    which=st.sampled_from([".zarr", ".h5", "small"]),
    batch_size=st.integers(1, 40),
    window=st.one_of(st.none(), st.integers(1, 5)),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 4),
    drop_remainder=st.booleans(),
    ranks=st.sampled_from([(0, 1), (0, 2), (1, 2), (2, 3)]),
    before=st.sampled_from(["iter", "getitem"]),
    after=st.sampled_from(["iter", "getitem"]),
)
def test_resume_at_any_position(
    stores, data, which, batch_size, window, seed, epoch, drop_remainder, ranks, before, after
):
    store = stores[which]
    rank, world_size = ranks
    kw = dict(window=window, seed=seed, drop_remainder=drop_remainder, shard=ShardOptions(rank, world_size))

    def fresh() -> ChunkedSequence:
        seq = ChunkedSequence(store, batch_size, **kw)
        seq.set_epoch(epoch)
        return seq

    reference = fresh()
    full = _epoch(reference)
    assert len(full) == len(reference)
    nxt = _epoch(reference)  # iter() again: the next epoch
    k = data.draw(st.integers(0, len(full)), label="stop after k batches")

    # The interrupted run: k batches, then a state saved as JSON.
    first = fresh()
    if before == "iter":
        it = iter(first)
        got = [_ids(next(it)) for _ in range(k)]
        it.close()
    else:  # Keras-style shuffled indices in a pass: the plan's batches in order
        first.on_epoch_begin()
        requests = random.Random(seed).sample(range(len(first)), k)
        got = [_ids(first[i]) for i in requests]
    assert got == full[:k]
    state = _roundtrip(first.state_dict())
    assert state["epoch"] == epoch and state["position"] == k

    # A new process, in effect: a new sequence on the same store resumes.
    second = ChunkedSequence(store.path, batch_size, **kw)
    second.load_state_dict(state)
    assert second.epoch == epoch
    if after == "iter":
        rest = _epoch(second)
        if k == len(full):  # nothing left of the epoch: iter() serves the next one
            assert rest == nxt
        else:
            assert rest == full[k:]
            assert _epoch(second) == nxt
    else:
        second.on_epoch_begin()
        requests = random.Random(seed + 1).sample(range(len(second)), len(full) - k)
        rest = [_ids(second[i]) for i in requests]
        assert rest == full[k:]
        second.on_epoch_end()  # as Keras does: the pass handed out the epoch's last batch
        assert second.epoch == epoch + (1 if full else 0)
        if full:
            assert [_ids(second[i]) for i in range(len(second))] == nxt


@pytest.mark.parametrize("k", [0, 1, 5, 12])
def test_resumed_sequence_moves_on_with_on_epoch_end(stores, k):
    """After a resume, Keras's on_epoch_end moves to the next epoch normally."""
    store = stores[".zarr"]
    ref = ChunkedSequence(store, 8, seed=2, window=2)  # 13 batches
    ref.set_epoch(3)
    full = _epoch(ref)
    after = [_epoch(ref), _epoch(ref)]  # epochs 4 and 5

    seq = ChunkedSequence(store, 8, seed=2, window=2)
    seq.set_epoch(3)
    seq.on_epoch_begin()  # a Keras pass that stopped after k batches
    for i in range(k):
        seq[i]
    state = _roundtrip(seq.state_dict())
    resumed = ChunkedSequence(store, 8, seed=2, window=2)
    resumed.load_state_dict(state)
    resumed.on_epoch_begin()
    rest = [_ids(resumed[i]) for i in range(len(resumed) - k)]
    assert rest == full[k:]
    resumed.on_epoch_end()
    assert resumed.epoch == 4
    assert [_ids(resumed[i]) for i in range(len(resumed))] == after[0]
    resumed.on_epoch_end()
    assert resumed.epoch == 5
    assert _epoch(resumed) == after[1]


def test_resume_with_sample_weight_and_transform(stores):
    """A state restores the plan position; the transform and weights follow the samples."""
    store = stores[".h5"]

    def scale(batch):
        return {**batch, "w": batch["w"] * 2}

    kw = dict(seed=9, window=3, sample_weight="w", transform=scale)
    ref = ChunkedSequence(store, 10, **kw)
    full = [b for b in iter(ref)]
    seq = ChunkedSequence(store, 10, **kw)
    it = iter(seq)
    for _ in range(4):
        next(it)
    resumed = ChunkedSequence(store, 10, **kw)
    resumed.load_state_dict(_roundtrip(seq.state_dict()))
    rest = list(resumed)
    assert len(rest) == len(full) - 4
    for got, want in zip(rest, full[4:], strict=True):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got[2], 2 * w_of(ids_of(got[0])))


# -- refused states ------------------------------------------------------------------------------
def _state_after(seq: ChunkedSequence, k: int) -> dict:
    for i in range(k):
        seq[i]
    return _roundtrip(seq.state_dict())


def test_state_of_another_store_is_refused(tmp_path, fmt):
    a = make_store(tmp_path / f"a{fmt}", 103, 8)
    # same shape (n, chunk_len, fields, dtypes), different data
    idx = np.arange(103)
    b = oocseq.ingest_arrays(
        tmp_path / f"b{fmt}",
        {"x": x_of(idx) + 1, "y": (idx % 10).astype(np.int64)},
        chunk_len=8,
        preshuffle=False,
    )
    assert len(a) == len(b) and a.chunk_len == b.chunk_len
    state = _state_after(ChunkedSequence(a, 10, seed=1), 3)
    with pytest.raises(StateError, match="store"):
        ChunkedSequence(b, 10, seed=1).load_state_dict(state)
    # the same store reopened is fine
    ChunkedSequence(str(a.path), 10, seed=1).load_state_dict(state)


@pytest.mark.parametrize(
    ("other", "named"),
    [
        ({"seed": 2}, "seed"),
        ({"batch_size": 11}, "batch_size"),
        ({"window": 3}, "window"),
        ({"shard": ShardOptions(0, 2)}, "world_size"),
        ({"shard": ShardOptions(1, 2)}, "rank"),
        ({"shuffle": False}, "shuffle"),
        ({"drop_remainder": True}, "drop_remainder"),
        ({"shard": ShardOptions(0, 2, "drop")}, "remainder"),
    ],
)
def test_state_of_another_plan_is_refused(stores, other, named):
    store = stores[".zarr"]
    base = dict(batch_size=10, seed=1, window=2, shard=ShardOptions(0, 1))
    if "remainder" in other:
        base.update(shard=ShardOptions(0, 2))
    state = _state_after(ChunkedSequence(store, **base), 2)
    seq = ChunkedSequence(store, **{**base, **other})
    with pytest.raises(StateError, match=named):
        seq.load_state_dict(state)
    # refused states change nothing
    assert seq.epoch == 0
    np.testing.assert_array_equal(ids_of(seq[0][0]), seq.batch_indices(0))


@pytest.mark.parametrize(
    "garbage",
    [
        {},
        {"epoch": 0, "position": 3},
        [1, 2, 3],
        "state",
        None,
        {"format": "oocseq.ChunkedSequence", "version": 99},
    ],
)
def test_garbage_state_is_refused(stores, garbage):
    seq = ChunkedSequence(stores[".zarr"], 10)
    with pytest.raises(StateError):
        seq.load_state_dict(garbage)


@pytest.mark.parametrize(
    "change",
    [
        {"position": -1},
        {"position": 999},
        {"position": "3"},
        {"position": 2.0},
        {"epoch": -1},
        {"epoch": None},
        {"plan": None},
        {"plan": "seed=1"},
        {"store": 0},
    ],
)
def test_tampered_state_is_refused(stores, change):
    seq = ChunkedSequence(stores[".zarr"], 10, seed=1)
    state = {**_state_after(seq, 2), **change}
    fresh = ChunkedSequence(stores[".zarr"], 10, seed=1)
    with pytest.raises(StateError):
        fresh.load_state_dict(state)


def test_state_size(stores):
    seq = ChunkedSequence(stores[".zarr"], 10, seed=1)
    state = seq.state_dict()
    assert len(json.dumps(state)) < 2000
    assert _roundtrip(state) == state


# -- iter(seq) moves on --------------------------------------------------------------------------
def test_iter_twice_gives_two_epochs(stores, fmt):
    store = stores[fmt]
    seq = ChunkedSequence(store, 10, seed=4, window=2)
    one, two = _epoch(seq), _epoch(seq)
    assert seq.epoch == 1
    assert one != two
    for served in (one, two):
        assert sorted(i for b in served for i in b) == list(range(len(store)))
    ref = ChunkedSequence(store, 10, seed=4, window=2)
    ref.set_epoch(1)
    assert two == [seq_ids.tolist() for seq_ids in (ref.batch_indices(i) for i in range(len(ref)))]


def test_iter_after_a_partial_epoch_continues_it(stores):
    store = stores[".zarr"]
    seq = ChunkedSequence(store, 10, seed=4, window=2)
    full = _epoch(ChunkedSequence(store, 10, seed=4, window=2))
    it = iter(seq)
    head = [_ids(next(it)) for _ in range(3)]
    it.close()
    tail = _epoch(seq)
    assert head + tail == full
    assert seq.epoch == 0
    assert _epoch(seq) != full and seq.epoch == 1
