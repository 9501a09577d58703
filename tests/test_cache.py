"""The window cache's buffers and decode threads (:mod:`oocseq.cache`) and the read buffers
of the fast read path (:mod:`oocseq.storage._raw`): page-aligned, reused rather than
allocated per window or per chunk, and every chunk decoded once however the threads share
the work."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
from conftest import make_store
from hypothesis import given, settings
from hypothesis import strategies as st

from oocseq import ChunkedSequence
from oocseq.batches import ChunkedBatches
from oocseq.cache import WindowCache
from oocseq.manifest import FieldSpec
from oocseq.options import ReadOptions, ShardOptions
from oocseq.storage import _raw
from oocseq.storage._raw import ALIGNMENT, Where, aligned_empty, in_page_cache, read_scratch

CHUNK = 4  # samples per chunk in the caches below
SAMPLE = (64, 64, 3)  # 12288 bytes: whole pages, so every chunk in a window starts on a page


def fill(field: str, c: int, out: np.ndarray, positions: np.ndarray | None = None) -> None:
    """A decoder: chunk ``c`` holds the value ``c + 1`` everywhere."""
    if positions is None:
        out[...] = c + 1
    else:
        out[positions] = c + 1


def new_cache(decode=fill, threads: int = 0, n: int = 40, window: int = 2) -> WindowCache:
    fields = {"x": FieldSpec(SAMPLE, np.dtype(np.uint8))}
    return WindowCache(decode, fields, CHUNK, n, window, threads)


@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (5, *SAMPLE)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int64])
def test_aligned_empty_starts_on_a_page(shape, dtype):
    a = aligned_empty(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous and a.flags.writeable
    assert a.size == 0 or a.ctypes.data % ALIGNMENT == 0
    a[...] = 1  # the whole array is usable memory
    assert a.sum() == a.size


def test_window_buffers_are_aligned_and_reused_across_windows():
    cache = new_cache()
    chunks = np.arange(10)
    seen: set[int] = set()
    for w in range(5):
        key = (0, w)
        ws = chunks[2 * w : 2 * w + 2]
        with cache.hold([key]):
            buf = cache.get(key, ws)["x"]
            assert buf.ctypes.data % ALIGNMENT == 0
            # a chunk of whole pages starts on a page inside the window's buffer
            assert buf[CHUNK:].ctypes.data % ALIGNMENT == 0
            assert np.array_equal(buf[:, 0, 0, 0], np.repeat(ws + 1, CHUNK))
            seen.add(buf.ctypes.data)
            del buf  # (an array still pointing into a buffer keeps it from reuse)
        cache.drop_unheld()
    assert len(seen) == 1  # one window at a time: its buffer came back each time
    assert cache.decodes == 10


def test_read_scratch_is_reused_by_its_thread(tmp_path):
    path = tmp_path / "bytes"
    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        first = read_scratch(fd, 0, 1000, "f")
        addr = np.frombuffer(first, np.uint8).ctypes.data
        assert addr % ALIGNMENT == 0 and bytes(first) == data[:1000].tobytes()
        second = read_scratch(fd, 5000, 3000, "f")
        assert bytes(second) == data[5000:8000].tobytes()
        # a larger read grows the buffer once; smaller ones reuse it
        big = read_scratch(fd, 0, len(data), "f")
        addr = np.frombuffer(big, np.uint8).ctypes.data
        small = read_scratch(fd, 10, 20, "f")
        assert np.frombuffer(small, np.uint8).ctypes.data == addr
        assert bytes(small) == data[10:30].tobytes()
        with ThreadPoolExecutor(1) as pool:  # another thread has a buffer of its own
            other = pool.submit(lambda: np.frombuffer(read_scratch(fd, 10, 20, "f"), np.uint8).ctypes.data)
            assert other.result() != addr
        with pytest.raises(Exception, match="file ends"):
            read_scratch(fd, len(data) - 10, 20, "f")
    finally:
        os.close(fd)


def test_a_place_is_worded_only_when_an_error_names_it(tmp_path):
    worded: list[int] = []

    def words(c: int) -> str:
        worded.append(c)
        return f"chunk {c} of {tmp_path}"

    where = Where(words, 7)
    path = tmp_path / "bytes"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        read_scratch(fd, 0, 100, where)  # a read that succeeds words nothing
        assert worded == []
        with pytest.raises(Exception, match=rf"^chunk 7 of {tmp_path}: file ends"):
            read_scratch(fd, 50, 100, where)
        assert worded == [7]
    finally:
        os.close(fd)


def test_in_page_cache_and_its_fallback(tmp_path, monkeypatch):
    path = tmp_path / "bytes"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 10000, 0)  # now cached
        assert in_page_cache(fd, 0, 10000) is (_raw._NOWAIT is not None)
        assert in_page_cache(fd, 0, 0) is False
        monkeypatch.setattr(_raw, "_NOWAIT", None)  # a system that cannot tell: always advise
        assert in_page_cache(fd, 0, 10000) is False
    finally:
        os.close(fd)


def test_a_waiting_thread_decodes_the_chunks_no_pool_thread_started():
    """The pool's one thread is stuck in chunk 0; the thread that needs the window decodes
    the rest itself, each chunk exactly once."""
    started, release = threading.Event(), threading.Event()
    by: dict[int, str] = {}

    def decode(field: str, c: int, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        by[c] = threading.current_thread().name
        if c == 0:
            started.set()
            assert release.wait(10)
        out[...] = c + 1

    cache = new_cache(decode, threads=1, window=4)
    chunks = np.arange(4)
    cache.prefetch((0, 0), chunks)
    assert started.wait(10)
    result: dict[str, np.ndarray] = {}
    getter = threading.Thread(target=lambda: result.update(cache.get((0, 0), chunks)), name="getter")
    getter.start()
    while len(by) < 4:  # chunks 1-3 decoded by the getter while the pool thread waits
        threading.Event().wait(0.01)
    assert getter.is_alive()  # still waiting for chunk 0
    release.set()
    getter.join(10)
    assert {c: name == "getter" for c, name in by.items()} == {0: False, 1: True, 2: True, 3: True}
    assert np.array_equal(result["x"][:, 0, 0, 0], np.repeat(chunks + 1, CHUNK))
    assert cache.decodes == 4
    cache.close()


def test_a_thread_waiting_for_a_chunk_in_flight_decodes_a_read_ahead_window_meanwhile():
    """Window A's first chunk is in the pool's one thread; the thread that needs A decodes A's
    other chunks, then (instead of idling) the chunks of read-ahead window B, which the pool
    thread would only start after. Each chunk is decoded once; B's failure is B's alone."""
    started, b_done = threading.Event(), threading.Event()
    by: dict[int, str] = {}

    def decode(field: str, c: int, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        by[c] = threading.current_thread().name
        if c == 0:
            started.set()
            b_done.wait(10)  # (without the help: the pool thread does B after this)
        if c == 7:
            raise OSError("bad chunk 7")
        if {4, 5, 6, 7} <= set(by):
            b_done.set()
        out[...] = c + 1

    cache = new_cache(decode, threads=1, window=4)
    a, b = np.arange(4), np.arange(4, 8)
    cache.prefetch("A", a)
    assert started.wait(10)
    cache.prefetch("B", b)
    result: dict[str, np.ndarray] = {}
    getter = threading.Thread(target=lambda: result.update(cache.get("A", a)), name="getter")
    getter.start()
    getter.join(20)
    assert not getter.is_alive()
    assert np.array_equal(result["x"][:, 0, 0, 0], np.repeat(a + 1, CHUNK))
    assert {c: name == "getter" for c, name in sorted(by.items())} == {
        0: False,
        1: True,
        2: True,
        3: True,
        4: True,
        5: True,
        6: True,
        7: True,
    }
    assert cache.decodes == 7  # (chunk 7 failed: it counts no decode)
    with pytest.raises(OSError, match="bad chunk 7"):  # raised to B's reader, when it reads B
        cache.get("B", b)
    cache.close()


def test_a_ctrl_c_while_helping_another_window_stops_the_caller_at_once():
    """A KeyboardInterrupt raised while the waiting thread decodes a read-ahead window's chunk
    reaches that thread now (not a later batch), and the read-ahead window is not kept with
    it: read later, it decodes afresh."""
    started, release = threading.Event(), threading.Event()
    interrupted: list[int] = []

    def decode(field: str, c: int, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        if c == 0:
            started.set()
            release.wait(10)
        if c == 5 and not interrupted:
            interrupted.append(c)
            release.set()
            raise KeyboardInterrupt
        out[...] = c + 1

    cache = new_cache(decode, threads=1, window=1)
    cache.prefetch("A", np.arange(1))
    assert started.wait(10)  # A's chunk is the pool thread's: the caller can only help
    cache.prefetch("B", np.arange(5, 6))
    with pytest.raises(KeyboardInterrupt):
        cache.get("A", np.arange(1))
    assert interrupted == [5]
    assert "B" not in cache
    assert cache.get("B", np.arange(5, 6))["x"][0, 0, 0, 0] == 6
    assert cache.get("A", np.arange(1))["x"][0, 0, 0, 0] == 1
    cache.close()


def test_a_chunk_claimed_by_another_thread_between_the_helpers_look_and_its_claim():
    """The helper picks a read-ahead chunk, but the pool thread claims it first and the
    window is then dropped (it is not held): the helper goes on (it neither waits for that
    chunk nor raises its cancellation), and the held window it asked for is served."""
    a0_started, a0_go, pool_claimed, pool_go, helper_at_gap = (threading.Event() for _ in range(5))

    def decode(field: str, c: int, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        if c == 0:
            a0_started.set()
            a0_go.wait(10)
        out[...] = c + 1

    cache = new_cache(decode, threads=1, window=2)

    class SlowStart(Future):  # the pool thread pauses between its claim and its start
        def set_running_or_notify_cancel(self) -> bool:
            if threading.current_thread().name.startswith("oocseq-decode"):
                pool_claimed.set()
                pool_go.wait(10)
            return super().set_running_or_notify_cancel()

    run = cache._run

    def paused_run(window, j):  # the helper pauses between its look and its claim
        if threading.current_thread().name == "helper" and window is cache._items.get("B"):
            helper_at_gap.set()
            a0_go.set()
            pool_claimed.wait(10)
        return run(window, j)

    cache._run = paused_run
    hold = cache.hold(["A"])
    cache.prefetch("A", np.array([0, 1]))
    assert a0_started.wait(10)  # the pool thread is in A's chunk 0
    cache.prefetch("B", np.array([5]))
    cache._items["B"].futures[0] = SlowStart()
    out: dict[str, object] = {}

    def helper() -> None:
        try:
            out["x"] = cache.get("A", np.array([0, 1]))["x"][:, 0, 0, 0].tolist()
        except BaseException as e:  # (reported below)
            out["error"] = e

    thread = threading.Thread(target=helper, name="helper")
    thread.start()
    assert helper_at_gap.wait(10) and pool_claimed.wait(10)
    thread.join(2)  # with A decoded, the helper is done without waiting for B's chunk
    cache.drop_unheld()  # B goes, its chunk's decode cancelled before it starts
    thread.join(10)
    pool_go.set()
    assert out == {"x": [1] * CHUNK + [2] * CHUNK}
    hold.release()
    cache.close()


def test_a_waiting_thread_helps_only_with_windows_still_wanted():
    """A read-ahead window dropped meanwhile (no hold keeps it) is not decoded by a waiting
    thread: nothing is left in the cache to help with."""
    release = threading.Event()
    seen: list[int] = []

    def decode(field: str, c: int, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        seen.append(c)
        if c == 0:
            release.wait(10)
        out[...] = c + 1

    cache = new_cache(decode, threads=1, window=1)
    with cache.hold(["A"]):
        cache.prefetch("A", np.arange(1))
        cache.prefetch("B", np.arange(5, 6))
        cache.drop_unheld()  # B goes: its decode is cancelled
        threading.Timer(0.2, release.set).start()
        assert cache.get("A", np.arange(1))["x"][0, 0, 0, 0] == 1
    assert seen == [0]
    cache.close()


def test_a_failed_decode_is_raised_and_the_window_decoded_again():
    calls: list[int] = []

    def decode(field: str, c: int, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        calls.append(c)
        if c == 1 and calls.count(1) == 1:
            raise OSError("flaky disk")
        out[...] = c + 1

    for threads in (0, 2):
        calls.clear()
        cache = new_cache(decode, threads=threads, window=3)
        with pytest.raises(OSError, match="flaky"):
            cache.get((0, 0), np.arange(3))
        assert len(cache) == 0  # no half-decoded window kept
        buf = cache.get((0, 0), np.arange(3))["x"]
        assert np.array_equal(buf[:, 0, 0, 0], np.repeat(np.arange(3) + 1, CHUNK))
        if threads == 0:  # in the calling thread: stops at the first failure
            assert calls == [0, 1, 0, 1, 2]
        cache.close()


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["hold", "release", "get", "drop"]), st.integers(0, 5), st.integers(0, 3)),
        max_size=25,
    )
)
def test_dropping_through_a_hold_drops_what_dropping_alone_does(steps):
    """``drop_unheld(hold)`` (the serving path's, with a lock-free early return) leaves the
    same windows as ``drop_unheld()``, whatever holds, windows and releases came before."""
    caches = [new_cache(threads=0, window=1), new_cache(threads=0, window=1)]
    holds: list[list] = [[], []]
    for op, a, b in steps:
        for cache, hs in zip(caches, holds, strict=True):
            if op == "hold":
                hs.append(cache.hold([(0, k) for k in range(a, a + b)]))
            elif op == "release" and hs:
                hs.pop(a % len(hs)).release()
            elif op == "get":
                cache.get((0, a), np.array([a]))
            elif op == "drop" and cache is caches[0]:
                cache.drop_unheld()
            elif op == "drop":
                # through the last hold still held, as ChunkedBatches.get does
                live = [h for h in hs if not h._released]
                cache.drop_unheld(live[-1] if live else None)
        assert set(caches[0]._items) == set(caches[1]._items)
    for cache in caches:
        cache.close()


def test_background_work_runs_in_a_decoding_thread_only():
    """``background`` runs its function in a decoding thread; without threads, or once the
    cache is closed, it runs nothing and raises nothing (the work only warms a cache)."""
    ran: list[str] = []
    done = threading.Event()

    def work(tag: str) -> None:
        ran.append(f"{tag}:{threading.current_thread().name}")
        done.set()

    cache = new_cache(threads=0)
    cache.background(work, "none")
    cache = new_cache(threads=1)
    cache.background(work, "pool")
    assert done.wait(10)
    cache.close()
    cache.background(work, "closed")  # no new pool after close
    cache.prefetch((0, 0), np.arange(2))  # nor for decodes: a late get decodes by itself
    assert np.array_equal(cache.get((0, 0), np.arange(2))["x"][:, 0, 0, 0], np.repeat([1, 2], CHUNK))
    assert len(ran) == 1 and ran[0].startswith("pool:oocseq-decode")
    assert cache._pool is None


@pytest.mark.parametrize("fmt,compression", [("zarr", None), ("hdf5", "lz4")])
def test_epochs_reuse_window_buffers(tmp_path, fmt, compression):
    """Epoch after epoch, the decoded windows live in a bounded set of aligned buffers."""
    suffix = ".zarr" if fmt == "zarr" else ".h5"
    store = make_store(tmp_path / f"s{suffix}", 300, 10, compression=compression)
    seq = ChunkedSequence(store, 16, y=None, window=3)
    cache = seq.core._local.cache
    made: list[int] = []
    original = cache._buffers

    def counted():
        fresh = not cache._free
        bufs = original()
        if fresh:
            made.append(1)
        assert all(b.ctypes.data % ALIGNMENT == 0 for b in bufs.values())
        return bufs

    cache._buffers = counted
    for _ in range(4):
        for _ in seq:  # (a new epoch each time)
            pass
    chunks = store.num_chunks
    # (from the second epoch on, the read-ahead goes on into the next epoch's first window:
    # the fifth epoch's may be decoded too)
    assert 4 * chunks <= seq.stats["chunk_decodes"] <= 4 * chunks + 3
    # the most windows in use at once (two that a batch spans, one read ahead), allocated in
    # the first epoch only: none per window, none per epoch
    assert len(made) <= 3
    seq.close()


@pytest.fixture(scope="module")
def ahead_store(tmp_path_factory: pytest.TempPathFactory):
    store = make_store(tmp_path_factory.mktemp("ahead") / "s.zarr", 157, 5)
    yield store
    store.close()


@settings(max_examples=25, deadline=None)
@given(
    batch_size=st.integers(1, 23),
    window=st.integers(1, 4),
    readahead=st.integers(0, 2),
    shuffle=st.booleans(),
    start=st.integers(0, 40),
)
def test_batches_served_in_order_keep_the_next_windows_decoding(
    ahead_store, batch_size: int, window: int, readahead: int, shuffle: bool, start: int
) -> None:
    """Served in order (from any batch on), each batch leaves the windows after its own being
    decoded ahead (asked for once per window the batches move into, not per batch), and the
    batches are right; served out of order, nothing is read ahead."""

    def new_core() -> ChunkedBatches:
        read = ReadOptions(threads=1, readahead=readahead)
        return ChunkedBatches(
            ahead_store, batch_size, y=None, window=window, shuffle=shuffle, seed=3, read=read
        )

    core = new_core()
    cache = core._local.cache
    plan = core.plan(0)
    x = ahead_store["x"][:]
    try:
        for i in range(min(start, len(core) - 1), len(core)):
            (got,) = core.get(0, i, readahead=True)
            np.testing.assert_array_equal(got, x[core.batch_indices(0, i)])
            last = plan.window_of(min((i + 1) * batch_size, len(plan)) - 1)
            for w in range(last + 1, min(last + 1 + readahead, plan.num_windows)):
                assert (0, w) in cache, (i, w)
        core.close()
        core = new_core()
        cache = core._local.cache
        for i in reversed(range(len(core))):  # out of order: no read-ahead
            core.get(0, i)
            first = plan.window_of(i * batch_size)
            assert all(
                w <= plan.window_of(min((i + 1) * batch_size, len(plan)) - 1) for _, w in cache._items
            ), i
            assert first in {w for _, w in cache._items}
    finally:
        core.close()


@settings(max_examples=40, deadline=None)
@given(
    batch_size=st.integers(1, 40),
    window=st.integers(1, 4),
    readahead=st.integers(1, 3),
    shuffle=st.booleans(),
    shard=st.sampled_from([(0, 1), (1, 3), (2, 3), (4, 6)]),
    drop_remainder=st.booleans(),
)
def test_read_ahead_goes_on_into_the_next_epoch_only_when_asked(
    ahead_store,
    batch_size: int,
    window: int,
    readahead: int,
    shuffle: bool,
    shard: tuple[int, int],
    drop_remainder: bool,
) -> None:
    """With ``next_epoch``, the batches of an epoch served in order read the next epoch's
    first windows ahead as they near its end (also on a padded rank, whose last batches come
    back to the epoch's first windows, and with ``drop_remainder``, whose dropped samples'
    windows are not read), keep them until that epoch begins (by the last batch, as many as
    the read-ahead), and that epoch's batches are right; without it, or within a worker's
    range (``until``), nothing of the next epoch is read ahead."""
    x = ahead_store["x"][:]
    for until, next_epoch in ((None, False), (None, True), (10**6, True)):
        core = ChunkedBatches(
            ahead_store,
            batch_size,
            y=None,
            window=window,
            shuffle=shuffle,
            seed=3,
            drop_remainder=drop_remainder,
            read=ReadOptions(threads=1, readahead=readahead),
            shard=ShardOptions(*shard),
        )
        cache = core._local.cache
        following = core.plan(1)
        try:
            held = 0
            for i in range(len(core)):
                core.get(0, i, readahead=True, until=until, next_epoch=next_epoch)
                ahead = {k for k in cache._items if k[0] == 1}
                if not next_epoch or until is not None:
                    assert ahead == set(), i
                    continue
                # a first run of the next epoch's windows, never fewer than after the batch before
                assert ahead == {(1, w) for w in range(len(ahead))}, i
                assert held <= len(ahead) <= readahead, i
                held = len(ahead)
            if not next_epoch or until is not None or len(core) == 0:
                continue
            assert held == min(readahead, following.num_windows)
            for i in range(len(core)):
                (got,) = core.get(1, i, readahead=True)
                np.testing.assert_array_equal(got, x[core.batch_indices(1, i)])
        finally:
            core.close()


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 3), (2, 3), (0, 2)])
def test_read_ahead_within_a_workers_range_and_on_padded_ranks(
    ahead_store, rank: int, world_size: int
) -> None:
    """A range of batches served in order up to ``until`` (a DataLoader worker's) reads ahead
    up to its end, also on a rank whose last batch wraps round to the epoch's first window."""
    core = ChunkedBatches(
        ahead_store,
        11,
        y=None,
        window=2,
        seed=3,
        read=ReadOptions(threads=1, readahead=1),
        shard=ShardOptions(rank=rank, world_size=world_size),
    )
    plan, n = core.plan(0), len(core)
    x = ahead_store["x"][:]
    try:
        for i in range(n):
            (got,) = core.get(0, i, readahead=True, until=n)
            np.testing.assert_array_equal(got, x[core.batch_indices(0, i)])
            top = max(w for w, _ in plan.window_spans(i * 11, (i + 1) * 11))
            if top + 1 < plan.num_windows:
                assert (0, top + 1) in core._local.cache, (i, top + 1)
    finally:
        core.close()


def test_a_failed_read_ahead_is_asked_for_again(ahead_store) -> None:
    """A read-ahead that raises (a remote store's fetch, say) fails that batch; the next batch
    of the same window asks for it again."""
    core = ChunkedBatches(ahead_store, 3, y=None, window=2, seed=3, read=ReadOptions(threads=1, readahead=1))
    cache = core._local.cache
    failures = [1]

    def prefetch_failing_once(key, chunks, order=None):
        if key == (0, 1) and failures[0]:
            failures[0] -= 1
            raise OSError("read-ahead failed")
        WindowCache.prefetch(cache, key, chunks, order)

    cache.prefetch = prefetch_failing_once
    try:
        with pytest.raises(OSError, match="read-ahead failed"):
            core.get(0, 0, readahead=True)
        core.get(0, 0, readahead=True)
        assert (0, 1) in cache
    finally:
        core.close()


def test_a_threads_next_batch_in_its_window_needs_no_cache_lookup(ahead_store) -> None:
    """A batch in the window of its thread's last batch is gathered from that window's
    buffers without a plan or cache lookup while the cache still holds the window (other
    threads' batches in the same window do not change that); once another thread has moved
    the cache on (dropping the window), it goes through the cache again, and is right."""
    # (no decoding threads: every decode is one a batch asked for, so the counts are exact)
    core = ChunkedBatches(ahead_store, 4, y=None, window=3, seed=5, read=ReadOptions(threads=0))
    cache = core._local.cache
    x = ahead_store["x"][:]
    plan = core.plan(0)
    first = [i for i in range(len(core)) if (i + 1) * 4 <= plan.window_offsets[1]]
    assert len(first) >= 3
    looked_up: list[int] = []
    slow = core._get

    def counting_get(local, request, i):
        looked_up.append(i)
        return slow(local, request, i)

    core._get = counting_get  # type: ignore[method-assign]

    def check(i: int) -> None:
        (got,) = core.get(0, i, readahead=True)
        np.testing.assert_array_equal(got, x[core.batch_indices(0, i)])

    def in_other_thread(batches: list[int]) -> None:
        thread = threading.Thread(target=lambda: [check(i) for i in batches])
        thread.start()
        thread.join()

    try:
        check(first[0])
        in_other_thread(first[:2])  # the same window: nothing dropped
        decodes, hits = cache.decodes, cache.hits
        looked_up.clear()
        for i in first[1:]:
            check(i)
        assert looked_up == [] and cache.decodes == decodes  # from the thread's window
        assert cache.hits == hits + len(first) - 1  # each counted as a window served from memory
        in_other_thread(list(range(len(core) - 3, len(core))))  # the last windows: window 0 dropped
        assert (0, 0) not in cache
        looked_up.clear()
        check(first[0])
        assert looked_up == [first[0]] and cache.decodes > decodes  # through the cache, decoded again
        core.get(1, first[1], readahead=True)  # another epoch: through the cache
        assert looked_up[-1] == first[1]
    finally:
        core.close()


@settings(max_examples=30, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 60), st.booleans()), max_size=40
    ),
    threads=st.integers(0, 1),
)
def test_batches_right_whichever_thread_asks_in_any_order(ahead_store, requests, threads: int) -> None:
    """Two threads take turns asking for batches (any epoch, index and read-ahead): every
    batch is the plan's, whether it is served from the asking thread's last window or through
    the cache."""
    core = ChunkedBatches(
        ahead_store, 6, y=None, window=2, seed=7, read=ReadOptions(threads=threads, readahead=1)
    )
    x = ahead_store["x"][:]
    pools = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]
    try:
        for who, epoch, i, readahead in requests:
            i %= len(core)
            (got,) = pools[who].submit(core.get, epoch, i, readahead=readahead).result()
            np.testing.assert_array_equal(got, x[core.batch_indices(epoch, i)])
    finally:
        for pool in pools:
            pool.shutdown()
        core.close()


@pytest.mark.parametrize("threads", [0, 1])
def test_close_frees_every_decoded_window(ahead_store, threads: int) -> None:
    """After ``close()`` no decoded window's buffers stay alive: not the cached ones, not the
    free ones, not the window a serving thread's last batch came from."""
    import gc
    import weakref

    core = ChunkedBatches(ahead_store, 4, y=None, window=2, seed=1, read=ReadOptions(threads=threads))
    cache = core._local.cache
    for i in range(4):
        core.get(0, i, readahead=True)
    alive = [weakref.ref(w.bases["x"].base) for w in cache._items.values()]
    alive += [weakref.ref(f["x"].base) for f in cache._free]
    assert alive
    core.close()
    for _ in range(50):  # (a decode still running lets go of its window when it ends)
        gc.collect()
        if not any(r() is not None for r in alive):
            break
        threading.Event().wait(0.05)
    assert [r() is not None for r in alive] == [False] * len(alive)
