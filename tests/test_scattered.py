"""Windows decoded in serving order (:mod:`oocseq.cache`): fields of uncompressed samples of a
page or more (and in-memory arrays) are read straight to the positions they are served at,
and a batch is a slice of its window, shared rather than copied. What a user sees must not
change: every batch holds its planned samples and is writable; writing to a batch changes no
other batch, nor the same batch asked for again; a batch kept stays as it was while later
windows are decoded; buffers are reused once no batch points into them; a damaged chunk read
this way is refused, naming it."""

from __future__ import annotations

import itertools
import shutil
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import oocseq
from oocseq import ChunkedSequence, CorruptStoreError, ReadOptions, ShardOptions
from oocseq import cache as cache_module
from oocseq.batches import ChunkedBatches
from oocseq.errors import ArgumentError
from oocseq.storage import _raw
from oocseq.storage._raw import SCATTER_MIN_BYTES, aligned_empty, read_scattered

N, CHUNK = 157, 5
WIDTH = SCATTER_MIN_BYTES // 4  # float32 samples of exactly one page


def x_of(idx: np.ndarray) -> np.ndarray:
    """Sample ``i`` is ``i * WIDTH + 0, 1, ...`` (float32, exact): any misplaced byte shows."""
    return (np.asarray(idx)[:, None] * WIDTH + np.arange(WIDTH)).astype(np.float32)


def fields() -> dict[str, np.ndarray]:
    idx = np.arange(N)
    return {"x": x_of(idx), "y": idx.astype(np.int64)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("scattered")
    out = {
        suffix: oocseq.ingest_arrays(
            root / f"s{suffix}", fields(), chunk_len=CHUNK, compression=None, preshuffle=False
        )
        for suffix in (".zarr", ".h5")
    }
    out["arrays"] = oocseq.ArraySource(fields(), chunk_len=CHUNK)
    yield out
    for s in out.values():
        s.close()


def test_uncompressed_page_sized_fields_are_the_ones_scattered(sources, tmp_path) -> None:
    lz4 = oocseq.ingest_arrays(tmp_path / "c.zarr", fields(), chunk_len=CHUNK, compression="lz4")
    assert sources[".zarr"].scatters("x") and sources[".h5"].scatters("x")
    assert not sources[".zarr"].scatters("y")  # 8-byte labels: gathered
    assert not lz4.scatters("x")
    lz4.close()


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    source=st.sampled_from([".zarr", ".h5", "arrays"]),
    batch_size=st.integers(1, 23),
    window=st.integers(1, 4),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
    threads=st.integers(0, 2),
    rank_world=st.sampled_from([(0, 1), (1, 2), (2, 3)]),
)
def test_shared_batches_hold_their_samples_whatever_is_written_to_others(
    sources, data, source, batch_size, window, shuffle, seed, threads, rank_world
) -> None:
    """Batches asked for in any order, repeats (peeks) included, each checked against the
    plan; every other one is then overwritten in place (as a user's ``x -= mean`` would) and
    the rest kept: the kept ones must come out unchanged at the end, and no batch asked for
    later (the same one again, padding that comes back round) may see what was written."""
    rank, world = rank_world
    core = ChunkedBatches(
        sources[source],
        batch_size,
        window=window,
        shuffle=shuffle,
        seed=seed,
        shard=ShardOptions(rank, world),
        read=ReadOptions(threads=threads, readahead=data.draw(st.integers(0, 2))),
    )
    try:
        n = len(core)
        requests = data.draw(
            st.lists(st.tuples(st.integers(0, 1), st.integers(0, n - 1), st.booleans()), max_size=3 * n)
        )
        in_order = [(e, i, True) for e in (0, 1) for i in range(n)]
        kept = []
        for k, (epoch, i, readahead) in enumerate(requests + in_order):
            x, y = core.get(epoch, i, readahead=readahead)
            idx = core.batch_indices(epoch, i)
            np.testing.assert_array_equal(y, idx)
            np.testing.assert_array_equal(x, x_of(idx))
            assert x.flags.writeable and y.flags.writeable
            if k % 2:
                x[...] = -1.0
                y[...] = -1
            else:
                kept.append((x, y, idx))
        for x, y, idx in kept:
            np.testing.assert_array_equal(x, x_of(idx))
            np.testing.assert_array_equal(y, idx)
    finally:
        core.close()


@pytest.mark.parametrize("source", [".zarr", ".h5", "arrays"])
def test_an_epoch_reads_each_chunk_once_and_reuses_the_buffers(sources, source, monkeypatch) -> None:
    made = []
    monkeypatch.setattr(cache_module, "aligned_empty", lambda *a: made.append(a) or aligned_empty(*a))
    core = ChunkedBatches(sources[source], 8, window=2, seed=1, read=ReadOptions(threads=1, readahead=1))
    try:
        for epoch in range(3):
            for i in range(len(core)):
                x, _ = core.get(epoch, i, readahead=True)
                del x  # (dropped, as a training loop drops its batches)
        chunks = -(-N // CHUNK)
        assert core.stats["chunk_decodes"] == 3 * 2 * chunks  # fields x and y
        # Buffers come back once their window is dropped and no batch points into them:
        # 3 epochs of 16 windows made a handful (a window still being read when the next
        # starts takes a new one), not one each.
        assert 0 < len(made) // 2 <= 3 * chunks // 2 // 4, len(made)  # (a set: 2 fields)
    finally:
        core.close()


def test_a_kept_batch_keeps_its_buffer_from_reuse(sources) -> None:
    seq = ChunkedSequence(sources[".zarr"], 8, window=1, seed=2, read=ReadOptions(threads=1))
    try:
        first, labels = seq[0]
        want = x_of(labels)
        for _ in range(2):  # every later window decoded, twice over
            for i in range(len(seq)):
                seq[i]
            seq.on_epoch_end()
        np.testing.assert_array_equal(first, want)
    finally:
        seq.close()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_chunk_damaged_after_its_checked_read_is_refused(sources, tmp_path, suffix) -> None:
    """Chunks are checked against their checksums at their first read (through a scratch
    buffer); later reads go straight to the window. A chunk file cut short since is refused
    there too, naming the chunk, never served short."""
    path = tmp_path / f"d{suffix}"
    src = sources[suffix].path
    (shutil.copytree if suffix == ".zarr" else shutil.copy)(src, path)
    store = oocseq.Store(path)
    core = ChunkedBatches(store, 8, shuffle=False, window=1, read=ReadOptions(threads=0))
    try:
        for i in range(len(core)):
            core.get(0, i)  # every chunk read and checked once
        if suffix == ".zarr":
            victim = path / "x" / "c" / "2" / "0"
            victim.write_bytes(victim.read_bytes()[:100])
            match = "chunk 2 of field 'x'.*uncompressed chunk file has 100 bytes"
        else:
            with open(path, "r+b") as f:
                f.truncate(f.seek(0, 2) - 3 * CHUNK * SCATTER_MIN_BYTES)
            match = "chunk .* of field 'x'"
        with pytest.raises(CorruptStoreError, match=match):
            for i in range(len(core)):
                core.get(1, i)
    finally:
        core.close()
        store.close()


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(1, 2100),
    size=st.sampled_from([1, 8, 24, 4096]),
    extra=st.integers(0, 50),
    seed=st.integers(0, 2**16),
    libc=st.booleans(),
)
def test_read_scattered_puts_each_sample_at_its_position(
    tmp_path_factory, count, size, extra, seed, libc, monkeypatch_module
) -> None:
    """Any number of segments (more than the kernel takes in one call included), through
    libc's ``preadv`` or Python's."""
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 256, (count, size), dtype=np.uint8)
    path = tmp_path_factory.mktemp("rs") / "f"
    path.write_bytes(b"head" + stored.tobytes())
    out = aligned_empty((count + extra, size), np.uint8)
    out[...] = 0
    positions = rng.permutation(count + extra)[:count]
    monkeypatch_module.setattr(_raw, "_PREADV", _raw._PREADV if libc else None)
    with open(path, "rb") as f:
        read_scattered(f.fileno(), 4, out, positions, "f")
    np.testing.assert_array_equal(out[positions], stored)
    untouched = np.setdiff1d(np.arange(count + extra), positions)
    assert not out[untouched].any()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_read_scattered_refuses_bad_positions_and_short_files(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(10 * 16))
    out = aligned_empty((10, 16), np.uint8)
    with open(path, "rb") as f:
        fd = f.fileno()
        for bad in ([0, 10], [-1, 2]):
            with pytest.raises(ArgumentError, match="outside a buffer of 10 samples"):
                read_scattered(fd, 0, out, np.array(bad), "f")
        frozen = out.copy()
        frozen.flags.writeable = False
        with pytest.raises(ArgumentError, match="writable"):
            read_scattered(fd, 0, frozen, np.arange(2), "f")
        with pytest.raises(CorruptStoreError, match="f: file ends 32 bytes before the chunk does"):
            read_scattered(fd, 16 * 2, out, np.arange(10), "f")


def test_two_threads_asking_again_for_one_batch_get_memory_of_their_own(sources, monkeypatch) -> None:
    """Both threads find the batch handed out before (a peek) and decode its window again:
    each must end with its own copy, however their claims interleave."""
    core = ChunkedBatches(sources[".zarr"], 4, window=2, seed=1, read=ReadOptions(threads=0))
    try:
        core.get(0, 0)  # the peek
        claim = cache_module.WindowCache._hand_out
        both_refused = threading.Barrier(2, timeout=10)
        seen = threading.local()

        def hand_out(self, window, rows, shared):
            ok = claim(self, window, rows, shared)
            if not getattr(seen, "once", False):  # each thread's first claim: refused
                seen.once = True
                both_refused.wait()
            return ok

        monkeypatch.setattr(cache_module.WindowCache, "_hand_out", hand_out)
        got: list = [None, None]
        threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, core.get(0, 0))) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        (a, _), (b, _) = got
        assert not np.shares_memory(a, b)
        want = x_of(core.batch_indices(0, 0))
        a[...] = -1
        np.testing.assert_array_equal(b, want)
    finally:
        core.close()


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_placing_a_chunk_checks_out_and_positions(tmp_path, suffix) -> None:
    """``Store.read_chunk_into`` with ``positions``, at a chunk's first (checked) read and
    after it: bad positions or buffers are refused alike both times, and a one-sample buffer
    with any stride (C-contiguous by numpy's flags) gets its one sample only."""
    n = 2 * CHUNK + 1  # the last chunk holds one sample
    idx = np.arange(n)
    store = oocseq.ingest_arrays(
        tmp_path / f"s{suffix}",
        {"x": x_of(idx), "y": idx},
        chunk_len=CHUNK,
        compression=None,
        preshuffle=False,
    )
    last = store.num_chunks - 1
    try:
        for _ in range(2):
            buf = np.zeros((12, WIDTH), np.float32)
            bad = [
                (np.array([0, 1, 12, 2, 3]), "outside a buffer of 12 samples"),
                (np.array([-1, 0, 1, 2, 3]), "outside a buffer"),
                (np.arange(5.0), "1-D integer array"),
                (np.array([0, 1, 2]), "5 samples to place, 3 positions"),
            ]
            for positions, match in bad:
                with pytest.raises(ArgumentError, match=match):
                    store.read_chunk_into("x", 0, buf, positions)
            with pytest.raises(ArgumentError, match="samples"):
                store.read_chunk_into("x", 0, np.zeros((12, 7), np.float32), np.arange(5))
            frozen = np.zeros((12, WIDTH), np.float32)
            frozen.flags.writeable = False
            with pytest.raises(ArgumentError, match="writable"):
                store.read_chunk_into("x", 0, frozen, np.arange(5))
            assert not buf.any()
            store.read_chunk_into("x", 0, buf, np.array([11, 0, 5, 6, 3]))
            np.testing.assert_array_equal(buf[[11, 0, 5, 6, 3]], x_of(np.arange(5)))
            big = np.zeros((12, WIDTH), np.float32)
            single = big[::6][:1]
            store.read_chunk_into("x", last, single, np.array([0]))
            np.testing.assert_array_equal(big[0], x_of(np.array([n - 1]))[0])
            assert not big[1:].any()
    finally:
        store.close()


OPS = st.one_of(
    st.tuples(st.just("peek"), st.integers(0, 1000)),
    st.tuples(st.just("iter"), st.integers(0, 12)),
    st.tuples(st.just("keras_pass"), st.booleans()),  # Keras's shuffle of the indices it asks
    st.tuples(st.just("resume"), st.integers(0, 12)),
)


@settings(max_examples=30, deadline=None)
@given(
    source=st.sampled_from([".zarr", ".h5"]),
    shuffle=st.booleans(),
    seed=st.integers(0, 100),
    workers=st.sampled_from([1, oocseq.WorkerOptions(2)]),
    ops=st.lists(OPS, min_size=1, max_size=6),
)
def test_the_cursor_serves_shared_batches_exactly_once_in_any_order_of_calls(
    sources, source, shuffle, seed, workers, ops
) -> None:
    """The orders of calls users make, on a store whose batches share their window: peeks,
    iteration, Keras passes (in order, as ``predict`` asks, or shuffled, as ``fit`` does) and a
    resume from ``state_dict`` in a new sequence, every batch written to once checked. A pass
    serves each sample once; iteration and a resume go on exactly where the cursor stood."""
    store = sources[source]

    def new_seq() -> ChunkedSequence:
        return ChunkedSequence(store, 8, window=2, shuffle=shuffle, seed=seed, workers=workers)

    def checked(batch) -> list[int]:
        x, y = batch
        np.testing.assert_array_equal(x, x_of(y))
        ids = y.tolist()
        x[...] = -1.0  # the user's in-place work: no later batch may see it
        y[...] = -1
        return ids

    seq = new_seq()
    try:
        served: list[int] = []  # by iteration, within the current epoch
        for op, arg in ops:
            if op == "peek":
                i = arg % len(seq)
                assert checked(seq[i]) == seq.batch_indices(i).tolist()
            elif op == "keras_pass":
                seq.on_epoch_begin()
                order = np.random.default_rng(seed).permutation(len(seq)) if arg else range(len(seq))
                got = [i for k in order for i in checked(seq[int(k)])]
                seq.on_epoch_end()
                assert sorted(got) == list(range(N))
                if not shuffle and not arg:
                    assert got == list(range(N))  # predict's rows, in store order
                served = []
            else:  # iteration, or iteration then a resume in a new sequence
                if seq.state_dict()["position"] == len(seq):
                    served = []  # (a new iteration moves on to the next epoch)
                for batch in itertools.islice(seq, arg):  # (stops at the epoch's end)
                    served += checked(batch)
                if op == "resume":
                    state = seq.state_dict()
                    if state["position"] == len(seq):
                        served = []  # (the epoch was done: the resumed one serves the next)
                    seq.close()
                    seq = new_seq()
                    seq.load_state_dict(state)
                    rest = [i for b in seq for i in checked(b)]
                    assert sorted(served + rest) == list(range(N))
                    served = []
    finally:
        seq.close()
