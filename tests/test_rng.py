"""Per-sample random numbers (``oocseq.rng.SampleRandom``) and transforms that use them:
a sample's draws depend on ``(seed, epoch, sample index)`` only, never on the batch, batch size,
window, rank layout, serving mode or worker that serves it.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ids_of
from hypothesis import given, settings
from hypothesis import strategies as st

import oocseq
from oocseq import ChunkedSequence, ShardOptions, TransformError
from oocseq.rng import SampleRandom

seeds = st.integers(0, 2**63)
epochs = st.integers(0, 10**6)
index_sets = st.lists(st.integers(0, 10**9), min_size=1, max_size=30, unique=True)
shapes = st.one_of(st.just(()), st.integers(1, 4), st.tuples(st.integers(1, 3), st.integers(1, 3)))

#: the calls a transform makes, in order: (method, args)
CALLS = [
    ("random", ((2,),)),
    ("integers", (-3, 7, (3,))),
    ("normal", (1.0, 2.0, ())),
    ("uniform", (-1.0, 1.0, (2, 2))),
]


def draws(rng: SampleRandom) -> list[np.ndarray]:
    return [getattr(rng, name)(*args) for name, args in CALLS]


def per_sample(indices, seed, epoch) -> dict[int, list[np.ndarray]]:
    rng = SampleRandom(seed, epoch, np.asarray(indices, dtype=np.int64))
    out = draws(rng)
    return {int(i): [d[k] for d in out] for k, i in enumerate(indices)}


def assert_same_draws(a: dict, b: dict) -> None:
    common = a.keys() & b.keys()
    assert common
    for i in common:
        for p, q in zip(a[i], b[i], strict=True):
            np.testing.assert_array_equal(p, q, err_msg=f"sample {i}")


# -- SampleRandom itself -------------------------------------------------------------------------
@settings(max_examples=200)
@given(seed=seeds, epoch=epochs, indices=index_sets, data=st.data())
def test_draws_depend_on_the_sample_only(seed, epoch, indices, data):
    """The same sample gets the same draws in any batch: any subset, order or batch size."""
    whole = per_sample(indices, seed, epoch)
    subset = data.draw(st.lists(st.sampled_from(indices), min_size=1, unique=True), label="subset")
    assert_same_draws(whole, per_sample(subset, seed, epoch))
    shuffled = data.draw(st.permutations(indices), label="order")
    assert_same_draws(whole, per_sample(shuffled, seed, epoch))
    for i in indices[:3]:
        assert_same_draws(whole, per_sample([i], seed, epoch))


@settings(max_examples=100)
@given(
    seed=seeds, epoch=epochs, indices=st.lists(st.integers(0, 10**9), min_size=2, max_size=30, unique=True)
)
def test_different_samples_epochs_seeds_differ(seed, epoch, indices):
    rng = SampleRandom(seed, epoch, np.asarray(indices))
    u = rng.random(4)  # 4 x 53 bits per sample: collisions are impossible in practice
    assert len({tuple(row) for row in u.tolist()}) == len(indices)
    other_epoch = SampleRandom(seed, epoch + 1, np.asarray(indices)).random(4)
    other_seed = SampleRandom(seed + 1, epoch, np.asarray(indices)).random(4)
    for k in range(len(indices)):
        assert not np.array_equal(u[k], other_epoch[k])
        assert not np.array_equal(u[k], other_seed[k])


@settings(max_examples=100)
@given(seed=seeds, epoch=epochs, indices=index_sets, shape=shapes)
def test_random_in_unit_interval(seed, epoch, indices, shape):
    rng = SampleRandom(seed, epoch, np.asarray(indices))
    u = rng.random(shape)
    dims = (shape,) if isinstance(shape, int) else shape
    assert u.shape == (len(indices), *dims) and u.dtype == np.float64
    assert np.all((u >= 0) & (u < 1))
    v = rng.random(shape)
    assert not np.array_equal(u, v)  # successive calls draw new numbers
    assert len(rng) == len(indices)


@settings(max_examples=200)
@given(
    seed=seeds, epoch=epochs, indices=index_sets, low=st.integers(-(2**50), 2**50), span=st.integers(1, 2**50)
)
def test_integers_in_range(seed, epoch, indices, low, span):
    rng = SampleRandom(seed, epoch, np.asarray(indices))
    k = rng.integers(low, low + span, 5)
    assert k.shape == (len(indices), 5) and k.dtype == np.int64
    assert np.all(k >= low) and np.all(k < low + span)


def test_integers_cover_the_range_uniformly():
    rng = SampleRandom(0, 0, np.arange(20000))
    k = rng.integers(3, 9)
    counts = np.bincount(k - 3, minlength=6)
    assert len(counts) == 6
    assert np.all(np.abs(counts - 20000 / 6) < 0.08 * 20000 / 6), counts
    with pytest.raises(ValueError):
        rng.integers(5, 5)


def test_uniform_and_normal_statistics():
    rng = SampleRandom(7, 3, np.arange(40000))
    u = rng.random()
    hist = np.bincount((u * 10).astype(int), minlength=10)
    assert np.all(np.abs(hist - 4000) < 300), hist
    a = rng.uniform(-2.0, 5.0)
    assert a.min() >= -2.0 and a.max() < 5.0 and abs(a.mean() - 1.5) < 0.05
    z = rng.normal()
    assert z.dtype == np.float64 and np.all(np.isfinite(z))
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    assert 0.30 < np.mean(np.abs(z) > 1) < 0.34  # ~0.3173 for a standard normal
    z2 = rng.normal(10.0, 0.5, (2,))
    assert z2.shape == (40000, 2)
    assert abs(z2.mean() - 10) < 0.02 and abs(z2.std() - 0.5) < 0.02
    # the two normal draws are not correlated
    assert abs(np.corrcoef(z, z2[:, 0])[0, 1]) < 0.03


def test_generators_are_deterministic():
    idx = np.array([5, 17, 3])
    a = SampleRandom(1, 2, idx).generators()
    b = SampleRandom(1, 2, idx).generators()
    assert len(a) == 3 and all(isinstance(g, np.random.Generator) for g in a)
    va = [g.random(4) for g in a]
    vb = [g.random(4) for g in b]
    for p, q in zip(va, vb, strict=True):
        np.testing.assert_array_equal(p, q)
    assert not np.array_equal(va[0], va[1])
    # a sample's generator does not depend on its batch
    single = SampleRandom(1, 2, np.array([17])).generators()[0].random(4)
    np.testing.assert_array_equal(single, va[1])
    # another epoch, another generator
    assert not np.array_equal(SampleRandom(1, 3, idx).generators()[0].random(4), va[0])
    # generators() takes one draw of each stream: the calls after it are the same as after any draw
    r1 = SampleRandom(1, 2, idx)
    r1.generators()
    r2 = SampleRandom(1, 2, idx)
    r2.random()
    np.testing.assert_array_equal(r1.random(3), r2.random(3))


# -- through ChunkedSequence: the layout never changes a sample's draws ----------------------------
class Recording:
    """A transform that draws random numbers and records them per sample id; it also puts the
    first draw into x[:, 1] so that it can be checked on the served batch."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], list[np.ndarray]] = {}
        self.epoch = 0  # the epoch being served (set by the caller)

    def __call__(self, batch, rng):
        ids = batch["x"][:, 0].astype(np.int64)
        out = draws(rng)
        for k, i in enumerate(ids.tolist()):
            values = [d[k] for d in out]
            key = (self.epoch, i)
            if key in self.seen:  # a sample served twice (rank padding): the same draws
                for p, q in zip(self.seen[key], values, strict=True):
                    np.testing.assert_array_equal(p, q)
            self.seen[key] = values
        x = batch["x"].astype(np.float64)
        x[:, 1] = out[0][:, 0]
        return {**batch, "x": x}


def _serve(store, epochs, **kw) -> dict:
    rec = Recording()
    seq = ChunkedSequence(store, transform=rec, **kw)
    for e in epochs:
        seq.set_epoch(e)
        rec.epoch = e
        for i in range(len(seq)):
            x = seq[i][0]
            ids = x[:, 0].astype(np.int64)
            np.testing.assert_array_equal(x[:, 1], [rec.seen[(e, j)][0][0] for j in ids])
    return rec.seen


LAYOUTS = [
    dict(batch_size=7, window=2),
    dict(batch_size=32, window=5),
    dict(batch_size=1, window=1, read=oocseq.ReadOptions(keras_order="index")),
    dict(batch_size=10, window=3, shuffle=False),
    dict(batch_size=9, window=2, shard=ShardOptions(0, 3)),
    dict(batch_size=9, window=2, shard=ShardOptions(1, 3)),
    dict(batch_size=9, window=2, shard=ShardOptions(2, 3)),
    dict(batch_size=5, window=2, shard=ShardOptions(1, 4, "drop")),
]


def test_transform_draws_are_the_same_in_every_layout(store_factory):
    store = store_factory(61, 4)  # 16 chunks, the last one short
    runs = [_serve(store, [0, 2], seed=13, **layout) for layout in LAYOUTS]
    merged: dict = {}
    for run in runs:
        for key, values in run.items():
            if key in merged:
                for p, q in zip(merged[key], values, strict=True):
                    np.testing.assert_array_equal(p, q, err_msg=f"(epoch, sample) {key}")
            else:
                merged[key] = values
    # the one-rank layouts saw every sample, in both epochs
    assert {k for k in runs[0]} == {(e, i) for e in (0, 2) for i in range(61)}
    # the three ranks of world_size=3 together saw every sample
    assert set(runs[4]) | set(runs[5]) | set(runs[6]) == set(runs[0])
    # and the draws are those of SampleRandom for (seed, epoch, sample)
    for (e, i), values in list(merged.items())[:50]:
        want = per_sample([i], 13, e)[i]
        for p, q in zip(values, want, strict=True):
            np.testing.assert_array_equal(p, q)
    # epochs differ, samples differ
    assert not np.array_equal(merged[(0, 5)][0], merged[(2, 5)][0])
    assert not np.array_equal(merged[(0, 5)][0], merged[(0, 6)][0])


def test_transform_draws_do_not_depend_on_the_seed_of_another_sequence(store_factory):
    store = store_factory(40, 4)
    a = _serve(store, [0], seed=1, batch_size=8)
    b = _serve(store, [0], seed=2, batch_size=8)
    assert not any(np.array_equal(a[k][0], b[k][0]) for k in a)


def test_transform_without_rng_still_works(store_factory):
    store = store_factory(20, 4)
    seq = ChunkedSequence(store, 6, transform=lambda b: {**b, "x": b["x"] * 2})
    x, _ = seq[0]
    np.testing.assert_array_equal(ids_of(x / 2), seq.batch_indices(0))


def test_transform_error_names_the_samples_and_store(store_factory):
    store = store_factory(20, 4)

    def bad(batch, rng):
        rng.integers(3, 1)  # ValueError: low >= high
        return batch

    seq = ChunkedSequence(store, 6, transform=bad, seed=1)
    with pytest.raises(TransformError) as info:
        seq[0]
    text = str(info.value) + "\n".join(getattr(info.value, "__notes__", []))
    assert str(store.path) in text
    assert str(seq.batch_indices(0).tolist()[0]) in text
    assert isinstance(info.value.__cause__, ValueError)
