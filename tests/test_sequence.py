"""ChunkedSequence (and Store field views) on real Zarr and HDF5 stores made by ingest_arrays.

Stores encode the sample index in their values (see conftest.py), so every batch is checked
against the indices it should hold.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import FORMATS, ids_of, make_store, w_of, x_of, y_of
from hypothesis import given, settings
from hypothesis import strategies as st

import oocseq
from oocseq import ChunkedSequence, ReadOptions, transforms


def epoch_ids(seq: ChunkedSequence) -> list[np.ndarray]:
    """Sample ids of every batch of the current epoch, served in order 0, 1, 2, ..."""
    out = []
    for batch in iter(seq):
        ids = ids_of(batch[0])
        np.testing.assert_array_equal(batch[1], y_of(ids))
        out.append(ids)
    return out


# -- length and contents -------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "batch_size"), [(103, 10), (103, 103), (103, 200), (96, 8), (1, 1), (1, 5)])
def test_len(store_factory, n, batch_size):
    store = store_factory(n, 8)
    assert len(ChunkedSequence(store, batch_size)) == -(-n // batch_size)
    assert len(ChunkedSequence(store, batch_size, drop_remainder=True)) == n // batch_size


@pytest.mark.parametrize("shuffle", [True, False])
def test_batch_holds_its_indices(store, shuffle):
    seq = ChunkedSequence(store, 10, shuffle=shuffle, seed=7, sample_weight="w")
    seen = []
    for i in range(len(seq)):
        idx = seq.batch_indices(i)
        assert idx.dtype == np.int64
        x, y, w = seq[i]
        assert x.dtype == np.float32 and y.dtype == np.int64 and w.dtype == np.float32
        np.testing.assert_array_equal(x, x_of(idx))
        np.testing.assert_array_equal(y, y_of(idx))
        np.testing.assert_array_equal(w, w_of(idx))
        seen.append(idx)
    served = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(served), np.arange(len(store)))
    if not shuffle:
        np.testing.assert_array_equal(served, np.arange(len(store)))
    else:
        assert not np.array_equal(served, np.arange(len(store)))


@settings(max_examples=25)
@given(
    batch_size=st.integers(1, 130),
    window=st.one_of(st.none(), st.integers(1, 20)),
    seed=st.integers(0, 2**32),
    shuffle=st.booleans(),
    drop_remainder=st.booleans(),
)
def test_epoch_serves_every_sample_once(store, batch_size, window, seed, shuffle, drop_remainder):
    n = len(store)
    seq = ChunkedSequence(
        store, batch_size, window=window, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder
    )
    batches = epoch_ids(seq)
    assert len(batches) == len(seq)
    served = np.concatenate(batches) if batches else np.empty(0, np.int64)
    assert len(np.unique(served)) == len(served)
    if drop_remainder:
        assert all(len(b) == batch_size for b in batches)
        assert len(served) == n - n % batch_size
    else:
        assert all(len(b) == batch_size for b in batches[:-1])
        np.testing.assert_array_equal(np.sort(served), np.arange(n))
    if not shuffle:
        np.testing.assert_array_equal(served, np.arange(len(served)))


@settings(max_examples=15)
@given(batch_size=st.integers(1, 40), seed=st.integers(0, 100), data=st.data())
def test_any_request_order_serves_every_sample_once(store, batch_size, seed, data):
    """Keras asks for batches in a shuffled order of ``i``; the epoch must still hold every
    sample once, and the same batches (as sets) whatever the request order."""
    n = len(store)
    seq = ChunkedSequence(store, batch_size, seed=seed, window=2)
    reference = {
        frozenset(b.tolist()) for b in epoch_ids(ChunkedSequence(store, batch_size, seed=seed, window=2))
    }
    order = data.draw(st.permutations(range(len(seq))))
    got = [ids_of(seq[i][0]) for i in order]
    served = np.concatenate(got)
    np.testing.assert_array_equal(np.sort(served), np.arange(n))
    assert {frozenset(b.tolist()) for b in got} == reference


@settings(max_examples=40)
@given(
    fmt=st.sampled_from(FORMATS),
    n=st.sampled_from([9, 60, 150]),
    chunk_len=st.sampled_from([1, 2, 5, 8]),
    batch_size=st.integers(1, 30),
    window=st.one_of(st.none(), st.integers(1, 4)),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_arrival_order_keeps_locality(store_cache, fmt, n, chunk_len, batch_size, window, seed, data):
    """Requests in any order of ``i`` during a Keras pass (as ``fit`` makes them) are answered
    with the plan's batches in order: each chunk is still decoded once per epoch."""
    store = store_cache(fmt, n, chunk_len)
    seq = ChunkedSequence(store, batch_size, window=window, seed=seed)
    seq.on_epoch_begin()
    order = data.draw(st.permutations(range(len(seq))))
    served = [ids_of(seq[i][0]) for i in order]
    for k, ids in enumerate(served):  # the k-th request got the plan's batch k
        np.testing.assert_array_equal(ids, seq.batch_indices(k))
    assert seq.stats["chunk_decodes"] == store.num_chunks * 2


def test_read_ahead_goes_on_into_the_next_epoch_once_epochs_follow_one_another(store):
    """A first pass (an epoch, ``predict``) reads nothing of the epoch after it; once an epoch's
    first batch has followed the last one's in order, its last batches read the next epoch's
    first window ahead; batches served out of order, or an epoch set and served from its
    middle (a resumed one), read nothing of the next."""
    seq = ChunkedSequence(store, 8, window=2, seed=1)
    cache = seq.core._local.cache

    def ahead_of_next_epoch() -> set[tuple[int, ...]]:
        return {k for k in cache._items if k[0] == seq.epoch + 1}

    try:
        for epoch in range(3):
            for i in range(len(seq)):
                seq[i]
            assert ahead_of_next_epoch() == ({(epoch + 1, 0)} if epoch else set()), epoch
            seq.on_epoch_end()
        for i in reversed(range(len(seq))):
            seq[i]
        assert ahead_of_next_epoch() == set()
        seq.on_epoch_end()
        # the epoch after one served out of order: its first batch did not follow a last one
        for i in range(len(seq)):
            seq[i]
        assert ahead_of_next_epoch() == set()
        seq.on_epoch_end()
        for i in range(len(seq)):
            seq[i]
        assert ahead_of_next_epoch() == {(seq.epoch + 1, 0)}
        seq.set_epoch(seq.epoch + 5)  # served from its middle on
        for i in range(3, len(seq)):
            seq[i]
        assert ahead_of_next_epoch() == set()
    finally:
        seq.close()


def test_keras_order_index_answers_by_index(store):
    seq = ChunkedSequence(store, 10, seed=3, read=ReadOptions(keras_order="index"))
    seq.on_epoch_begin()
    order = np.random.default_rng(0).permutation(len(seq))
    served = []
    for i in order:
        ids = ids_of(seq[int(i)][0])
        np.testing.assert_array_equal(ids, seq.batch_indices(int(i)))
        served.append(ids)
    np.testing.assert_array_equal(np.sort(np.concatenate(served)), np.arange(len(store)))
    with pytest.raises(ValueError, match="keras_order"):
        ReadOptions(keras_order="random")
    with pytest.warns(DeprecationWarning, match=r"read=oocseq.ReadOptions\(keras_order='index'\)"):
        assert ChunkedSequence(store, 10, serve="index").keras_order == "index"
    with pytest.warns(DeprecationWarning, match=r"read=oocseq.ReadOptions\(keras_order='index'\)"):
        old = ChunkedSequence(store, 10, keras_order="index", read=ReadOptions(readahead=0))
    assert old.read == ReadOptions(readahead=0, keras_order="index")


def test_batch_is_by_index_whatever_the_requests(store):
    seq = ChunkedSequence(store, 10, seed=3)
    seq[4]
    seq[0]
    for i in (7, 2, 7, len(seq) - 1):
        np.testing.assert_array_equal(ids_of(seq.batch(i)[0]), seq.batch_indices(i))
    with pytest.raises(IndexError):
        seq.batch(len(seq))


def test_requests_outside_a_pass_are_by_index(store):
    """seq[i] from user code is plan batch i, in any order and any number of times: a peek
    moves nothing."""
    seq = ChunkedSequence(store, 10, seed=3)
    for i in [3, 0, 3, len(seq) - 1, 1, 0]:
        np.testing.assert_array_equal(ids_of(seq[i][0]), seq.batch_indices(i))
    assert seq.state_dict()["position"] == 0 and seq.epoch == 0


# -- epochs --------------------------------------------------------------------------------------
def test_same_seed_same_batches_and_epochs_differ(store):
    a = ChunkedSequence(store, 16, seed=3)
    b = ChunkedSequence(store, 16, seed=3)
    ea, eb = epoch_ids(a), epoch_ids(b)
    assert len(ea) == len(eb)
    for p, q in zip(ea, eb, strict=True):
        np.testing.assert_array_equal(p, q)
    a.on_epoch_end()
    assert a.epoch == 1
    e1 = np.concatenate(epoch_ids(a))
    assert not np.array_equal(e1, np.concatenate(ea))
    np.testing.assert_array_equal(np.sort(e1), np.arange(len(store)))
    other_seed = np.concatenate(epoch_ids(ChunkedSequence(store, 16, seed=4)))
    assert not np.array_equal(other_seed, np.concatenate(ea))


def test_set_epoch_reproduces_an_epoch(store):
    seq = ChunkedSequence(store, 12, seed=11)
    epochs = []
    for _ in range(4):
        epochs.append(np.concatenate(epoch_ids(seq)))
        seq.on_epoch_end()
    assert seq.epoch == 4
    assert len({tuple(e.tolist()) for e in epochs}) == 4
    for e in (2, 0, 3, 1):
        seq.set_epoch(e)
        assert seq.epoch == e
        np.testing.assert_array_equal(np.concatenate(epoch_ids(seq)), epochs[e])
    fresh = ChunkedSequence(store, 12, seed=11)
    fresh.set_epoch(3)
    np.testing.assert_array_equal(fresh.batch_indices(0), epochs[3][:12])
    with pytest.raises(ValueError):
        seq.set_epoch(-1)


def test_on_epoch_end_before_serving_does_not_advance(store):
    """Keras calls on_epoch_end when fit/evaluate start, before any batch: no epoch is skipped."""
    seq = ChunkedSequence(store, 10, seed=1)
    first = seq.batch_indices(0)
    seq.on_epoch_end()
    seq.on_epoch_end()
    assert seq.epoch == 0
    np.testing.assert_array_equal(seq.batch_indices(0), first)
    np.testing.assert_array_equal(ids_of(seq[0][0]), first)
    for i in range(1, len(seq)):  # a whole epoch served
        seq[i]
    seq.on_epoch_end()
    assert seq.epoch == 1
    assert not np.array_equal(seq.batch_indices(0), first)
    seq.on_epoch_end()  # nothing served in epoch 1 yet
    assert seq.epoch == 1


def test_on_epoch_end_after_peeks_does_not_advance(store):
    """A few batches read by index (peeks, or Keras reading shapes) do not end an epoch; a
    whole epoch read by index, or one batch handed out by iteration, does."""
    seq = ChunkedSequence(store, 10, seed=1)
    first = seq.batch_indices(0)
    seq[0]
    seq[3]
    seq.on_epoch_end()
    assert seq.epoch == 0
    for i in range(len(seq)):
        seq[i]
    seq.on_epoch_end()
    assert seq.epoch == 1
    assert not np.array_equal(seq.batch_indices(0), first)
    np.testing.assert_array_equal(ids_of(seq[0][0]), seq.batch_indices(0))
    next(iter(seq))
    seq.on_epoch_end()
    assert seq.epoch == 2


# -- batch structure -----------------------------------------------------------------------------
def test_x_and_y_as_lists_give_tuples(store):
    seq = ChunkedSequence(store, 9, x=["x", "w"], y=["y", "x"], seed=2)
    idx = seq.batch_indices(0)
    (x, w), (y, x2) = seq[0]
    np.testing.assert_array_equal(x, x_of(idx))
    np.testing.assert_array_equal(w, w_of(idx))
    np.testing.assert_array_equal(y, y_of(idx))
    np.testing.assert_array_equal(x2, x_of(idx))
    assert isinstance(seq[0][0], tuple) and isinstance(seq[0][1], tuple)


def test_x_and_y_as_dicts_give_dicts(store):
    seq = ChunkedSequence(store, 9, x={"in_a": "x", "in_b": "w"}, y={"out": "y"}, seed=2)
    idx = seq.batch_indices(0)
    xs, ys = seq[0]
    assert set(xs) == {"in_a", "in_b"} and set(ys) == {"out"}
    np.testing.assert_array_equal(xs["in_a"], x_of(idx))
    np.testing.assert_array_equal(xs["in_b"], w_of(idx))
    np.testing.assert_array_equal(ys["out"], y_of(idx))


def test_y_none_gives_x_only(store):
    seq = ChunkedSequence(store, 9, y=None, seed=2)
    batch = seq[0]
    assert isinstance(batch, tuple) and len(batch) == 1
    np.testing.assert_array_equal(batch[0], x_of(seq.batch_indices(0)))


def test_sample_weight_field_is_third(store):
    seq = ChunkedSequence(store, 9, sample_weight="w", seed=2)
    idx = seq.batch_indices(0)
    batch = seq[0]
    assert len(batch) == 3
    np.testing.assert_array_equal(batch[2], w_of(idx))


def test_class_weight_is_third(store):
    cw = {c: 1 + c / 10 for c in range(10)}
    seq = ChunkedSequence(store, 9, transform=transforms.class_weights(cw), seed=2)
    for i in range(len(seq)):
        idx = seq.batch_indices(i)
        x, y, w = seq[i]
        np.testing.assert_allclose(w, 1 + y_of(idx) / 10, rtol=1e-6)
        np.testing.assert_array_equal(y, y_of(idx))
        np.testing.assert_array_equal(x, x_of(idx))


def test_class_weight_unknown_label_raises(store):
    cw = {c: 1.0 for c in range(9)}  # no weight for label 9
    seq = ChunkedSequence(store, 5, transform=transforms.class_weights(cw), shuffle=False)
    assert len(seq[0]) == 3  # samples 0..4: labels 0..4 all weighted
    with pytest.raises(ValueError, match=r"\b9\b"):  # samples 5..9: sample 9 has label 9
        seq[1]


def test_sample_weight_and_class_weight_together_rejected(store):
    with pytest.raises(ValueError, match="not both"):
        ChunkedSequence(store, 5, sample_weight="w", transform=transforms.class_weights({0: 1.0}))


def test_num_classes_one_hot(store):
    seq = ChunkedSequence(store, 11, transform=transforms.one_hot(10), seed=5)
    for i in range(len(seq)):
        idx = seq.batch_indices(i)
        x, y = seq[i]
        assert y.dtype == np.float32 and y.shape == (len(idx), 10)
        np.testing.assert_array_equal(y, np.eye(10, dtype=np.float32)[y_of(idx)])
        np.testing.assert_array_equal(x, x_of(idx))


def test_num_classes_too_small_names_the_sample(store):
    seq = ChunkedSequence(store, 5, transform=transforms.one_hot(5), shuffle=False)
    assert seq[0][1].shape == (5, 5)  # samples 0..4 have labels 0..4
    with pytest.raises(ValueError, match=r"sample 5\b"):  # sample 5 has label 5
        seq[1]
    shuffled = ChunkedSequence(store, 5, transform=transforms.one_hot(5), seed=3)
    for i in range(len(shuffled)):  # served in order: batch i holds batch_indices(i)
        idx = shuffled.batch_indices(i)
        if not (y_of(idx) >= 5).any():
            assert shuffled[i][1].shape == (len(idx), 5)
            continue
        with pytest.raises(ValueError, match=r"sample (\d+)") as err:
            shuffled[i]
        named = int(str(err.value).split("sample ")[1].split()[0])
        assert named in idx.tolist() and y_of(np.array([named]))[0] >= 5
        break
    else:
        pytest.fail("no batch with a label >= 5")


def test_transform_is_applied(store):
    def scale(batch):
        return {**batch, "x": batch["x"] * 2, "y": batch["y"] + 100}

    seq = ChunkedSequence(store, 9, transform=scale, seed=2)
    idx = seq.batch_indices(0)
    x, y = seq[0]
    np.testing.assert_array_equal(x, 2 * x_of(idx))
    np.testing.assert_array_equal(y, y_of(idx) + 100)


def test_transform_returning_a_non_dict_raises(store):
    seq = ChunkedSequence(store, 9, transform=lambda b: (b["x"], b["y"]))
    with pytest.raises(oocseq.TransformError, match="dict"):
        seq[0]


@pytest.mark.parametrize(
    ("transform", "match"),
    [
        (lambda b: {**b, "x": b["x"][:3]}, r"field 'x' of shape \(3, 3\) for a batch of 9"),
        (lambda b: {**b, "extra": np.float32(1.0)}, "field 'extra' of shape"),
        (lambda b: {"x": b["x"]}, "no field 'y'"),
    ],
)
def test_transform_output_is_checked(store, transform, match):
    """Every field a transform returns keeps the batch's leading length; x/y stay present."""
    seq = ChunkedSequence(store, 9, transform=transform)
    with pytest.raises(oocseq.TransformError, match=match):
        seq[0]


def test_window_is_capped_at_the_number_of_chunks(store):
    seq = ChunkedSequence(store, 10, window=10**9)
    assert seq.window == store.num_chunks
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch_ids(seq))), np.arange(len(store)))


# -- errors --------------------------------------------------------------------------------------
def test_out_of_range_index(store):
    seq = ChunkedSequence(store, 10)
    n_batches = len(seq)
    for i in (n_batches, n_batches + 7, -n_batches - 1):
        with pytest.raises(IndexError) as err:
            seq[i]
        assert isinstance(err.value, oocseq.BatchIndexError)
        assert isinstance(err.value, oocseq.OocseqError)
        assert str(i) in str(err.value) and str(n_batches) in str(err.value)
    with pytest.raises(oocseq.BatchIndexError):
        seq.batch_indices(n_batches)


@pytest.mark.parametrize("where", ["x", "y", "sample_weight", "x_list", "y_dict"])
def test_unknown_field(store, where):
    kwargs = {
        "x": {"x": "nope"},
        "y": {"y": "nope"},
        "sample_weight": {"sample_weight": "nope"},
        "x_list": {"x": ["x", "nope"]},
        "y_dict": {"y": {"out": "nope"}},
    }[where]
    with pytest.raises(oocseq.FieldNotFoundError) as err:
        ChunkedSequence(store, 4, **kwargs)
    assert isinstance(err.value, KeyError)
    msg = str(err.value)
    assert "nope" in msg
    for field in ("x", "y", "w"):
        assert repr(field) in msg


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"batch_size": -3}, {"seed": -1}, {"window": 0}])
def test_invalid_arguments(store, bad):
    kwargs = {"batch_size": 4, **bad}
    with pytest.raises(ValueError):
        ChunkedSequence(store, **kwargs)


def test_opens_a_path(store):
    for path in (str(store.path), Path(store.path)):
        seq = ChunkedSequence(path, 10, seed=4)
        ref = ChunkedSequence(store, 10, seed=4)
        for i in range(len(seq)):
            np.testing.assert_array_equal(seq[i][0], ref[i][0])


def test_missing_store_path(tmp_path, fmt):
    with pytest.raises(FileNotFoundError):
        ChunkedSequence(str(tmp_path / f"missing{fmt}"), 4)


# -- pickling ------------------------------------------------------------------------------------
def test_pickle_round_trip(store):
    seq = ChunkedSequence(store, 10, seed=9, sample_weight="w")
    for batch in seq:  # a whole epoch: opens the store's file handles
        ids_of(batch[0])
    seq.on_epoch_end()
    seq[0]
    data = pickle.dumps(seq)
    assert len(data) < 10_000, f"pickled sequence is {len(data)} bytes: handles or data got pickled"
    clone = pickle.loads(data)
    assert clone.epoch == seq.epoch == 1
    assert len(clone) == len(seq)
    for s in (seq, clone):
        s.set_epoch(1)  # serve epoch 1 from its first batch
    for i in range(len(seq)):
        for p, q in zip(clone[i], seq[i], strict=True):
            np.testing.assert_array_equal(p, q)
    # The clone keeps working for later epochs too.
    clone.on_epoch_end()
    seq.on_epoch_end()
    assert clone.epoch == seq.epoch == 2
    np.testing.assert_array_equal(clone[0][0], seq[0][0])
    np.testing.assert_array_equal(ids_of(clone[1][0]), seq.batch_indices(1))


# -- work bound ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_cache(tmp_path_factory):
    """Stores shared by the examples of a hypothesis test, made on first use."""
    root = tmp_path_factory.mktemp("stores")
    made: dict[tuple[str, int, int], oocseq.Store] = {}

    def get(fmt: str, n: int, chunk_len: int) -> oocseq.Store:
        key = (fmt, n, chunk_len)
        if key not in made:
            made[key] = make_store(root / f"n{n}-c{chunk_len}{fmt}", n, chunk_len)
        return made[key]

    return get


@settings(max_examples=80)
@given(
    fmt=st.sampled_from(FORMATS),
    n=st.sampled_from([1, 9, 60, 150]),
    chunk_len=st.sampled_from([1, 2, 3, 5, 8, 13]),
    batch_size=st.one_of(st.integers(1, 12), st.integers(1, 60)),
    window=st.one_of(st.none(), st.integers(1, 6)),
    shuffle=st.booleans(),
    labels=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_epoch_decodes_every_chunk_once(
    store_cache, fmt, n, chunk_len, batch_size, window, shuffle, labels, seed
):
    """Served in order 0..len-1, an epoch reads and decodes each chunk of each field it uses
    exactly once, holding a bounded number of decoded chunks. The first epoch reads nothing
    of the next; once one epoch has followed another, the read-ahead goes on into the next
    epoch's first window(s), and those are not decoded again when that epoch serves them."""
    store = store_cache(fmt, n, chunk_len)
    seq = ChunkedSequence(
        store, batch_size, window=window, shuffle=shuffle, seed=seed, y="y" if labels else None
    )
    fields = 2 if labels else 1
    chunks = store.num_chunks

    def early(epoch: int) -> int:
        """Chunks in the windows of ``epoch`` that the epoch before it reads ahead."""
        plan = seq.core.plan(epoch)
        return sum(len(plan.window_chunks(w)) for w in range(min(seq.read.readahead, plan.num_windows)))

    for epoch in range(3):
        start = seq.stats["chunk_decodes"]
        for i in range(len(seq)):
            np.testing.assert_array_equal(ids_of(seq[i][0]), seq.batch_indices(i))
        decodes = seq.stats["chunk_decodes"] - start
        if epoch == 0:
            assert decodes == chunks * fields
        else:  # (decodes read ahead may still be under way: they count in the next epoch)
            assert decodes <= (chunks + early(epoch + 1)) * fields, f"epoch {epoch}"
        seq.on_epoch_end()
    # no chunk decoded twice: three epochs, and what the third read ahead of the fourth
    assert seq.stats["chunk_decodes"] <= (3 * chunks + early(3)) * fields
    assert seq.stats["peak_resident_chunks"] <= seq.max_resident_chunks * fields


def test_resident_chunks_do_not_grow_with_the_store(tmp_path, fmt):
    peaks = []
    for n in (400, 2400):
        store = make_store(tmp_path / f"s{n}{fmt}", n, 4)
        seq = ChunkedSequence(store, 8, window=2, seed=0)
        for i in range(len(seq)):
            seq[i]
        peaks.append(seq.stats["peak_resident_chunks"])
        assert store.num_chunks * 2 > 4 * peaks[-1]  # far from holding the store
    assert peaks[1] <= seq.max_resident_chunks * 2
    assert peaks[1] <= peaks[0] + 4


# -- Store field views ---------------------------------------------------------------------------
def test_field_view_indexing(store):
    n = len(store)
    view = store["x"]
    full = x_of(np.arange(n))
    assert view.shape == (n, 3) and view.dtype == np.float32 and len(view) == n
    np.testing.assert_array_equal(view[5], full[5])
    np.testing.assert_array_equal(view[np.int64(7)], full[7])
    np.testing.assert_array_equal(view[-1], full[-1])
    np.testing.assert_array_equal(view[-n], full[0])
    np.testing.assert_array_equal(view[3:90:7], full[3:90:7])
    np.testing.assert_array_equal(view[::-5], full[::-5])
    np.testing.assert_array_equal(view[[50, 3, 3, -1, 0]], full[[50, 3, 3, -1, 0]])
    mask = np.arange(n) % 3 == 1
    np.testing.assert_array_equal(view[mask], full[mask])
    np.testing.assert_array_equal(np.asarray(view), full)
    for bad in (n, -n - 1, [0, n], [-n - 1]):
        with pytest.raises(IndexError):
            view[bad]
    with pytest.raises(IndexError):
        view[np.ones(n - 1, dtype=bool)]
    with pytest.raises(oocseq.FieldNotFoundError):
        store["nope"]


@settings(max_examples=40)
@given(data=st.data())
def test_field_view_matches_numpy(store, data):
    n = len(store)
    full = x_of(np.arange(n))
    key = data.draw(
        st.one_of(
            st.integers(-n, n - 1),
            st.slices(n),
            st.lists(st.integers(-n, n - 1), max_size=30),
            st.lists(st.booleans(), min_size=n, max_size=n).map(np.array),
        )
    )
    np.testing.assert_array_equal(store["x"][key], full[key])


@pytest.mark.parametrize(
    "key",
    [
        (slice(1, 4), 0),
        (4, 1),
        (slice(None), 1, 2),
        (-2, slice(None), 0),
        ([0, 5], 1),
        (slice(2, 9, 3), 1, slice(1, 3)),
    ],
    ids=str,
)
def test_field_view_tuple_keys_index_the_right_axes(tmp_path, fmt, key):
    n = 10
    arr = np.arange(n * 2 * 3, dtype=np.int32).reshape(n, 2, 3)
    store = oocseq.ingest_arrays(tmp_path / f"img{fmt}", {"img": arr}, chunk_len=3, preshuffle=False)
    got = store["img"][key]
    assert got.shape == arr[key].shape
    np.testing.assert_array_equal(got, arr[key])


# -- in-memory arrays ----------------------------------------------------------------------------
@settings(max_examples=20)
@given(
    n=st.integers(1, 120),
    chunk_len=st.one_of(st.none(), st.integers(1, 16)),
    batch_size=st.integers(1, 40),
    seed=st.integers(0, 100),
    shuffle=st.booleans(),
)
def test_in_memory_arrays_are_served_like_a_store(n, chunk_len, batch_size, seed, shuffle):
    """A dict of arrays gets the same plan as a store of the same n and chunk_len."""
    idx = np.arange(n)
    arrays = {"x": x_of(idx), "y": y_of(idx)}
    source = oocseq.ArraySource(arrays, chunk_len)
    seq = ChunkedSequence(source, batch_size, seed=seed, shuffle=shuffle)
    assert isinstance(ChunkedSequence(arrays, batch_size).store, oocseq.ArraySource)
    batches = epoch_ids(seq)
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), idx)
    plan = oocseq.EpochPlan(n, source.chunk_len, seq.window, seed, 0, shuffle)
    np.testing.assert_array_equal(np.concatenate(batches), plan.indices(0, n))
    state = seq.state_dict()
    again = ChunkedSequence(oocseq.ArraySource(arrays, chunk_len), batch_size, seed=seed, shuffle=shuffle)
    again.load_state_dict(state)  # same layout: accepted
    assert again.epoch == seq.epoch


def test_in_memory_arrays_are_checked():
    with pytest.raises(oocseq.FieldLengthError, match="differ in length"):
        ChunkedSequence({"x": np.zeros((5, 2)), "y": np.zeros(4)}, 2)
    with pytest.raises(oocseq.ArgumentError, match="numeric"):
        ChunkedSequence({"x": np.array(["a", "b"]), "y": np.zeros(2)}, 2)
    with pytest.raises(oocseq.FieldNotFoundError):
        ChunkedSequence({"x": np.zeros((5, 2))}, 2)  # y="y" by default
    with pytest.raises(oocseq.ArgumentTypeError):
        ChunkedSequence(42, 2)


def test_constructor_stays_small():
    """Policies go into option objects (ReadOptions, WorkerOptions, ShardOptions) and
    transforms, not new keywords: store, batch_size and 11 keywords."""
    import inspect

    params = inspect.signature(ChunkedSequence.__init__).parameters
    named = [p for p in params.values() if p.name != "self" and p.kind is not p.VAR_KEYWORD]
    assert len(named) <= 13, [p.name for p in named]
    assert [p.name for p in named[:2]] == ["store", "batch_size"]
    assert all(p.kind is p.KEYWORD_ONLY for p in named[2:])
