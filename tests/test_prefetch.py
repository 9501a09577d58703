"""Batches prepared ahead by oocseq's workers (``workers``, ``use_multiprocessing``,
``max_queue_size``; :mod:`oocseq.prefetch`): the same batches, in the same order, as with no
workers, each chunk decoded once per epoch, memory within the documented bound, errors at the
batch that failed, and nothing hangs."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
from conftest import ids_of, make_store
from hypothesis import assume, given
from hypothesis import strategies as st

from oocseq import ArgumentError, ChunkedSequence, ShardOptions, TransformError, WorkerOptions

# Worker processes are started by a fork server: this test process runs JAX's threads (Keras is
# imported by conftest's neighbours), and forking a multithreaded process can deadlock the child.
# Fork itself is covered by test_workers, in fresh processes.
START = "forkserver"


def options(workers: int, processes: bool) -> WorkerOptions:
    return WorkerOptions(workers, processes, start_method=START if processes else None)


def test_worker_options_beside_workers_are_refused(tmp_path):
    store = make_store(tmp_path / "s.zarr", 20, 4)
    with pytest.raises(ArgumentError, match="inside WorkerOptions"):
        ChunkedSequence(store, 4, workers=WorkerOptions(2), max_queue_size=3)


def served(seq: ChunkedSequence, epochs: int = 2) -> list[list[list[int]]]:
    return [[ids_of(b[0]).tolist() for b in seq] for _ in range(epochs)]


def planned(seq: ChunkedSequence, epochs: int = 2) -> list[list[list[int]]]:
    ref = ChunkedSequence(
        seq.store,
        seq.batch_size,
        seed=seq.seed,
        window=seq.window,
        shuffle=seq.shuffle,
        drop_remainder=seq.drop_remainder,
        shard=seq.shard,
    )
    out = []
    for e in range(epochs):
        ref.set_epoch(e)
        out.append([ref.batch_indices(i).tolist() for i in range(len(ref))])
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefetch")
    return {
        (fmt, n, cl): make_store(d / f"s{n}_{cl}{fmt}", n, cl)
        for fmt in (".zarr", ".h5")
        for n in (1, 37, 203)
        for cl in (1, 4, 16)
    }


@given(
    fmt=st.sampled_from([".zarr", ".h5"]),
    n=st.sampled_from([1, 37, 203]),
    chunk_len=st.sampled_from([1, 4, 16]),
    batch_size=st.integers(1, 40),
    window=st.integers(1, 5),
    workers=st.integers(2, 4),
    max_queue_size=st.integers(1, 12),
    seed=st.integers(0, 2**32),
    rank_world=st.sampled_from([(0, 1), (1, 2), (2, 3)]),
)
def test_worker_threads_serve_the_plan_with_each_chunk_decoded_once(
    stores, fmt, n, chunk_len, batch_size, window, workers, max_queue_size, seed, rank_world
):
    rank, world = rank_world
    assume(-(-n // chunk_len) >= world)  # fewer chunks than ranks is refused (test_ranks)
    store = stores[(fmt, n, chunk_len)]
    seq = ChunkedSequence(
        store,
        batch_size,
        window=window,
        seed=seed,
        workers=workers,
        max_queue_size=max_queue_size,
        shard=ShardOptions(rank, world),
    )
    alone = ChunkedSequence(store, batch_size, window=window, seed=seed, shard=ShardOptions(rank, world))
    try:
        assert served(seq) == planned(seq) == served(alone)
        # each chunk of the rank decoded once per epoch and field (x, y), again only where
        # remainder="pad" comes back to it; read-ahead may decode one window past an epoch's end
        low = high = 0
        for e in range(2):
            plan = seq.core.plan(e)
            # (padding comes back to windows already served: their batches may have been
            # written to, so those windows are decoded again)
            runs = []
            for a in range(0, len(plan), plan.own):
                visits = [w for w, _, _, _ in plan.window_slices(a, min(a + plan.own, len(plan)))]
                runs += [w for j, w in enumerate(visits) if j == 0 or visits[j - 1] != w]
            low += len(plan.chunk_order)
            high += sum(len(plan.window_chunks(w)) for w in runs) + seq.read.readahead * window
        # the second epoch follows the first: its read-ahead goes on into the third's first windows
        high += seq.read.readahead * window
        assert 2 * low <= seq.stats["chunk_decodes"] <= 2 * high
        assert 2 * low <= alone.stats["chunk_decodes"] <= 2 * high
        assert seq.stats["peak_resident_chunks"] <= 2 * seq.max_resident_chunks  # 2 fields
    finally:
        seq.close()
        alone.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_multiprocessing", [False, True], ids=["threads", "processes"])
def test_worker_processes_and_threads_serve_the_plan(tmp_path, fmt, use_multiprocessing):
    store = make_store(tmp_path / f"s{fmt}", 203, 8)
    seq = ChunkedSequence(store, 10, seed=3, window=2, workers=options(2, use_multiprocessing))
    try:
        assert served(seq, 3) == planned(seq, 3)
    finally:
        seq.close()


def test_concurrent_callers_get_every_batch_once(tmp_path):
    """Several threads asking at once (as a thread pool would) share the epoch: each plan
    batch is served exactly once."""
    store = make_store(tmp_path / "s.zarr", 997, 8)
    seq = ChunkedSequence(store, 7, seed=1, window=3, workers=3)
    got: list[list[int]] = []
    lock = threading.Lock()

    def ask(indices):
        for i in indices:
            b = ids_of(seq[i][0]).tolist()
            with lock:
                got.append(b)

    threads = [threading.Thread(target=ask, args=(range(t, len(seq), 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(planned(seq, 1)[0])
    seq.close()


def test_epoch_change_drops_what_was_prepared(tmp_path):
    store = make_store(tmp_path / "s.h5", 300, 8)
    seq = ChunkedSequence(store, 10, seed=2, window=2, workers=3, max_queue_size=20)
    it = iter(seq)
    first = [ids_of(next(it)[0]).tolist() for _ in range(4)]
    assert first == planned(seq, 1)[0][:4]
    seq.set_epoch(5)
    ref = ChunkedSequence(store, 10, seed=2, window=2)
    ref.set_epoch(5)
    assert [ids_of(b[0]).tolist() for b in seq] == [ref.batch_indices(i).tolist() for i in range(len(ref))]
    seq.close()


@given(position=st.integers(0, 28), workers=st.integers(1, 3))  # 29 batches
def test_resume_with_workers(stores, position, workers):
    store = stores[(".zarr", 203, 4)]
    a = ChunkedSequence(store, 7, seed=9, window=3, workers=workers)
    a.set_epoch(2)
    it = iter(a)
    for _ in range(position):
        next(it)
    state = a.state_dict()
    rest = [ids_of(b[0]).tolist() for b in it]
    b = ChunkedSequence(store, 7, seed=9, window=3, workers=3)
    b.load_state_dict(state)
    assert [ids_of(x[0]).tolist() for x in b] == rest
    a.close()
    b.close()


class FailOn:
    def __init__(self, sample: int):
        self.sample = sample

    def __call__(self, batch):
        if self.sample in batch["x"][:, 0].astype(np.int64):
            raise ValueError(f"bad sample {self.sample}")
        return batch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("use_multiprocessing", [False, True], ids=["threads", "processes"])
def test_a_failing_batch_raises_when_served_not_before(tmp_path, use_multiprocessing):
    store = make_store(tmp_path / "s.zarr", 200, 8)
    seq = ChunkedSequence(
        store, 10, seed=4, window=2, workers=options(2, use_multiprocessing), transform=FailOn(123)
    )
    bad = next(i for i in range(len(seq)) if 123 in seq.batch_indices(i))
    it = iter(seq)
    for i in range(bad):  # the batches before it are served, though the bad one is prepared already
        assert ids_of(next(it)[0]).tolist() == seq.batch_indices(i).tolist()
    with pytest.raises(TransformError, match="bad sample 123") as info:
        next(it)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert f"plan batch {bad}, epoch 0" in notes and str(store.path) in notes
    seq.close()


class DieOn:
    """Kills the worker process that prepares the batch holding ``sample``."""

    def __init__(self, sample: int, parent: int):
        self.sample, self.parent = sample, parent

    def __call__(self, batch):
        if self.sample in batch["x"][:, 0].astype(np.int64) and os.getpid() != self.parent:
            os._exit(3)
        return batch


@pytest.mark.timeout(120)
def test_a_dead_worker_process_raises_instead_of_hanging(tmp_path):
    store = make_store(tmp_path / "s.h5", 200, 8)
    seq = ChunkedSequence(
        store, 10, seed=4, window=2, workers=options(2, True), transform=DieOn(57, os.getpid())
    )
    with pytest.raises(BrokenProcessPool):
        for _ in seq:
            pass
    seq.close()


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_unpicklable_transform_with_spawn_is_a_clear_error(tmp_path, start_method):
    store = make_store(tmp_path / "s.zarr", 50, 8)
    workers = WorkerOptions(2, use_multiprocessing=True, start_method=start_method)
    seq = ChunkedSequence(store, 10, workers=workers, transform=lambda b: b)
    with pytest.raises(ArgumentError, match="module-level function"):
        seq[0]
    seq.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(workers=-1),
        dict(workers=1.5),
        dict(use_multiprocessing="yes"),
        dict(max_queue_size=0),
        dict(start_method="thread"),
    ],
)
def test_bad_worker_options(kwargs):
    with pytest.raises(ArgumentError):
        WorkerOptions(**kwargs)


def test_worker_options_follow_keras_rule():
    assert not WorkerOptions().parallel
    assert not WorkerOptions(workers=0, use_multiprocessing=True).parallel
    assert WorkerOptions(workers=1, use_multiprocessing=True).parallel
    assert WorkerOptions(workers=2).parallel


@pytest.mark.timeout(60)
def test_set_epoch_while_another_thread_is_served_does_not_deadlock(tmp_path):
    """Prefetcher lock then sequence lock, never the reverse: set_epoch (and on_epoch_end,
    load_state_dict) from one thread while another is served."""
    store = make_store(tmp_path / "s.zarr", 400, 4)
    seq = ChunkedSequence(store, 5, seed=1, window=2, workers=2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def serve():
        try:
            while not stop.is_set():
                for i in range(len(seq)):
                    b = seq[i]
                    assert len(b[0]) == 5
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    for e in range(300):
        seq.set_epoch(e % 7)
    stop.set()
    t.join(30)
    assert not t.is_alive(), "the serving thread is stuck"
    warnings_only = [e for e in errors if not isinstance(e, RuntimeWarning)]
    assert not warnings_only, warnings_only
    seq.close()


def test_changing_workers_mid_epoch_keeps_the_epoch(tmp_path):
    store = make_store(tmp_path / "s.h5", 300, 8)
    seq = ChunkedSequence(store, 10, seed=2, window=2, workers=3)
    it = iter(seq)
    got = [ids_of(next(it)[0]).tolist() for _ in range(5)]
    seq.workers = 1  # the pool stops; the epoch goes on
    got += [ids_of(next(it)[0]).tolist() for _ in range(5)]
    seq.workers = 2
    got += [ids_of(b[0]).tolist() for b in it]
    assert got == planned(seq, 1)[0]
    assert seq.core._local.cache.held == set()  # no window reservation left behind
    seq.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("batch_size", "window", "max_queue_size"), [(32, 4, 10), (100, 8, 10), (7, 2, 30)])
def test_worker_processes_decode_each_window_once_per_run(tmp_path, batch_size, window, max_queue_size):
    """Worker processes get runs of consecutive blocks: a window is decoded twice only where a
    run (``prefetcher.run`` blocks) ends inside it."""
    store = make_store(tmp_path / "s.zarr", 2000, 10)
    seq = ChunkedSequence(
        store,
        batch_size,
        seed=1,
        window=window,
        workers=WorkerOptions(2, True, max_queue_size, start_method=START),
    )
    try:
        assert served(seq, 1) == planned(seq, 1)
        prefetcher = seq._rt.prefetcher
        runs = -(-len(seq) // (prefetcher.block * prefetcher.run))
        deadline = time.monotonic() + 10  # the last block's count arrives with its result
        while seq.stats["worker_chunk_decodes"] < 2 * 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        decodes = seq.stats["worker_chunk_decodes"]
        assert 2 * 200 <= decodes <= 2 * (200 + (runs - 1) * window), (decodes, runs)
        assert seq.stats["chunk_decodes"] == 0  # nothing decoded in this process
    finally:
        seq.close()


class Jitter:
    """Adds each sample's own random draw (keyed by seed, epoch and sample index)."""

    def __call__(self, batch, rng):
        return {**batch, "x": batch["x"] + rng.normal(shape=(3,)).astype(np.float32)}


@pytest.mark.timeout(120)
def test_augmentation_draws_do_not_depend_on_workers(tmp_path):
    store = make_store(tmp_path / "s.h5", 150, 8)
    results = []
    for workers, processes in [(1, False), (3, False), (2, True)]:
        seq = ChunkedSequence(
            store, 16, seed=7, window=2, transform=Jitter(), workers=options(workers, processes)
        )
        results.append([b[0] for _ in range(2) for b in seq])  # two epochs
        seq.close()
    for other in results[1:]:
        assert len(other) == len(results[0])
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    # and the draws are real: x moved off its exact values (multiples of 0.25)
    assert np.abs(results[0][0] - np.round(results[0][0] * 4) / 4).max() > 0


@pytest.mark.timeout(120)
def test_workers_killed_between_requests_are_replaced(tmp_path):
    import signal

    store = make_store(tmp_path / "s.zarr", 400, 8)
    seq = ChunkedSequence(store, 10, seed=4, window=2, workers=options(2, True))
    plan = planned(seq, 1)[0]
    it = iter(seq)
    assert ids_of(next(it)[0]).tolist() == plan[0]
    for pool in seq._rt.prefetcher._pools.values():  # the OOM killer, say
        for pid in list(pool._processes):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    failures, served_ok = 0, []
    for i in range(1, len(seq)):
        try:
            served_ok.append((i, ids_of(seq[i][0]).tolist()))
        except BrokenProcessPool:
            failures += 1
            assert not served_ok, "a failure after the workers had recovered"
    assert failures <= 4 and len(served_ok) >= len(seq) - 5  # reported, then new processes serve
    k = len(seq) - len(served_ok)  # requests that failed consumed their plan batch
    assert [b for _, b in served_ok] == plan[k:]
    seq.close()
