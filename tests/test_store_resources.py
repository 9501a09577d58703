"""Resources of opened stores: no file handle outlives ``close()`` or garbage collection, memory
stays flat over many open/close cycles, and slicing costs the chunks it touches, not ``n``."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import oocseq

FORMATS = [".zarr", ".h5"]
REPO = Path(__file__).resolve().parents[1]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("closing", ["close", "with", "gc"])
def test_no_handle_outlives_close_or_gc(tmp_path: Path, fmt: str, closing: str) -> None:
    path = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(
        path, {"x": np.arange(400.0).reshape(100, 4)}, chunk_len=16, preshuffle=False
    ).close()
    gc.collect()
    before = _fds()
    for _ in range(30):
        if closing == "with":
            with oocseq.open_store(path) as store:
                store["x"][5:40]
                store.advise_chunks("x", np.arange(3))
            continue
        store = oocseq.open_store(path)
        store["x"][5:40]
        store.advise_chunks("x", np.arange(3))
        pickle_copy = __import__("pickle").loads(__import__("pickle").dumps(store))
        pickle_copy.read_chunk("x", 1)  # opens its own handles
        if closing == "close":
            store.close()
            pickle_copy.close()
        else:
            del store, pickle_copy
            gc.collect()
    gc.collect()
    assert _fds() == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_many_stores_under_a_low_fd_limit(tmp_path: Path, fmt: str) -> None:
    """With ``ulimit -n 64``, hundreds of stores opened and closed (or dropped) in turn work;
    running out of descriptors is a StoreReadError that says so."""
    path = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(
        path, {"x": np.arange(400.0).reshape(100, 4)}, chunk_len=16, preshuffle=False
    ).close()
    code = f"""
import gc, resource, sys
sys.path.insert(0, {str(REPO)!r})
import numpy as np
import oocseq
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
for i in range(300):
    s = oocseq.open_store({str(path)!r})
    s["x"][3:30]
    if i % 2:
        s.close()
    else:
        del s
        gc.collect()
held = []
try:
    for i in range(100):
        held.append(oocseq.open_store({str(path)!r}))
        held[-1].read_chunk("x", 0)
except oocseq.StoreReadError as e:
    assert isinstance(e, OSError) and "too many open files" in str(e), e
    print("limit", len(held))
else:
    print("no limit reached")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("limit"), out.stdout


@pytest.mark.parametrize("fmt", FORMATS)
def test_memory_flat_over_open_close_cycles(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(
        path, {"x": np.random.rand(2000, 64).astype("f4")}, chunk_len=256, preshuffle=False
    ).close()

    def cycle(k: int) -> None:
        for _ in range(k):
            with oocseq.open_store(path) as store:
                store["x"][100:900]
        gc.collect()

    cycle(20)  # warm: imports, caches of zarr / h5py
    fds, rss = _fds(), _rss_anon_kib()
    cycle(150)
    assert _fds() == fds
    assert _rss_anon_kib() - rss < 8 << 10  # KiB: under 8 MiB of growth over 150 cycles


@pytest.mark.parametrize("fmt", FORMATS)
def test_slice_costs_the_chunks_it_touches(tmp_path: Path, fmt: str) -> None:
    """``store["x"][5:10]`` of a long store allocates about one chunk, not O(n)."""
    n, chunk_len = 4_000_000, 1 << 14
    path = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(
        path, {"x": np.zeros(n, np.uint8)}, chunk_len=chunk_len, compression="lz4", preshuffle=False
    ).close()
    store = oocseq.open_store(path)
    store["x"][0:1]  # warm up
    reads: list[int] = []
    real = store.read_chunk

    def counted(name: str, c: int) -> np.ndarray:
        reads.append(c)
        return real(name, c)

    store.read_chunk = counted  # type: ignore[method-assign]
    tracemalloc.start()
    try:
        got = store["x"][5:10]
        got2 = store["x"][n - 3 : n : 2]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.shape == (5,) and got2.shape == (2,)
    assert reads == [0, (n - 1) // chunk_len]
    assert peak < 8 * chunk_len + (1 << 20)  # a chunk or so, not 8 * n bytes of indices


@pytest.mark.parametrize("fmt", [".zarr", ".h5"])
def test_sequence_close_releases_a_store_it_opened(tmp_path: Path, fmt: str) -> None:
    """``ChunkedSequence(path).close()`` closes the store it opened (no garbage collection
    needed), and the sequence still serves afterwards (the handles reopen)."""
    path = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(path, {"x": np.arange(400.0).reshape(100, 4)}, chunk_len=10).close()
    gc.collect()
    before = _fds()
    seqs = [oocseq.ChunkedSequence(path, 8, y=None, read=oocseq.ReadOptions(threads=0)) for _ in range(20)]
    for seq in seqs:
        seq[0]
    assert _fds() > before
    for seq in seqs:
        seq.close()
    assert _fds() == before  # gc not run: close() released every handle
    assert len(seqs[0][1][0]) == 8
    seqs[0].close()


def test_zarr_open_refused_by_the_system_is_a_store_read_error(tmp_path: Path, monkeypatch) -> None:
    """Running out of descriptors inside zarr's own open is the system's refusal
    (StoreReadError), not a damaged store (NotAStoreError), and leaks no descriptor."""
    import errno

    import zarr

    path = tmp_path / "s.zarr"
    oocseq.ingest_arrays(path, {"x": np.arange(10.0)}, preshuffle=False).close()

    def refuse(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files", str(path / ".zmetadata"))

    monkeypatch.setattr(zarr, "open_group", refuse)
    gc.collect()
    before = _fds()
    with pytest.raises(oocseq.StoreReadError, match="too many open files"):
        oocseq.open_store(path)
    assert _fds() == before


def test_zarr_chunk_files_opened_once_each_and_few_kept_open(tmp_path: Path, monkeypatch) -> None:
    """A read-ahead hint opens a Zarr chunk file and keeps it for the read that follows (one
    open per chunk, in one ``openat2`` call where the kernel has it); however many chunks are
    hinted, at most a few windows' worth of files stay open, and reading them, or closing the
    store, closes them."""
    from oocseq.storage import _raw, _zarr

    path = tmp_path / "s.zarr"
    x = np.arange(300 * 4, dtype=np.float32).reshape(300, 4)
    oocseq.ingest_arrays(path, {"x": x}, chunk_len=2, preshuffle=False).close()
    opened: list[list[str]] = []
    walk = _zarr.open_sized_beneath

    def counting(dir_fd: int, parts: list[str], where: object) -> tuple[int, int]:
        opened.append(parts)
        return walk(dir_fd, parts, where)

    monkeypatch.setattr(_zarr, "open_sized_beneath", counting)
    real = _raw._OPENAT2[0]
    if real is not None:
        calls: list[bytes] = []
        monkeypatch.setattr(_raw, "_OPENAT2", [lambda dir_fd, p: calls.append(p) or real(dir_fd, p)])
    gc.collect()
    start = _fds()
    with oocseq.open_store(path) as store:
        store.read_chunk("x", 0)  # (opens the store's own directories first)
        before, opened[:] = _fds(), []
        chunks = np.arange(1, store.num_chunks)
        store.advise_chunks("x", chunks)  # more than are kept open
        assert _fds() - before == _zarr._ADVISED_FILES < len(chunks)
        for c in chunks.tolist():
            np.testing.assert_array_equal(store.read_chunk("x", c), x[2 * c : 2 * c + 2])
        assert _fds() == before
        opened[:] = []
        if real is not None:
            calls[:] = []
        for window in np.array_split(chunks, 20):  # hinted a window ahead, as the batches do
            store.advise_chunks("x", window)
            for c in window.tolist():
                np.testing.assert_array_equal(store.read_chunk("x", c), x[2 * c : 2 * c + 2])
        assert len(opened) == len(chunks)  # one open per chunk
        assert _fds() == before
        if real is not None:
            assert len(calls) == len(chunks)  # each in one system call
        store.advise_chunks("x", chunks[:10])
        assert _fds() == before + 10
    assert _fds() == start


def test_zarr_hint_in_flight_when_the_store_closes_leaks_no_file(tmp_path: Path, monkeypatch) -> None:
    """A read-ahead hint that opened a chunk file while another thread closed the store
    closes that file itself: no descriptor outlives the store."""
    import threading

    from oocseq.storage import _zarr

    path = tmp_path / "s.zarr"
    oocseq.ingest_arrays(path, {"x": np.arange(64, dtype=np.float32).reshape(32, 2)}, chunk_len=2).close()
    gc.collect()
    start = _fds()
    store = oocseq.open_store(path)
    store.read_chunk("x", 0)
    opened, closed = threading.Event(), threading.Event()
    real = _zarr.in_page_cache

    def slow(fd: int, offset: int, nbytes: int) -> bool:  # the hint, between its open and its keep
        opened.set()
        closed.wait(10)
        return real(fd, offset, nbytes)

    monkeypatch.setattr(_zarr, "in_page_cache", slow)
    hint = threading.Thread(target=store.advise_chunks, args=("x", np.arange(1, 4)))
    hint.start()
    assert opened.wait(10)
    store.close()
    closed.set()
    hint.join(10)
    del store
    gc.collect()
    assert _fds() == start


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_zarr_forked_while_a_thread_holds_the_kept_files_lock(tmp_path: Path) -> None:
    """A process forked while another thread of its parent was inside the kept-files map
    (its lock held) reads the store with handles of its own, and neither hangs nor touches the
    parent's map."""
    path = tmp_path / "s.zarr"
    x = np.arange(64, dtype=np.float32).reshape(32, 2)
    oocseq.ingest_arrays(path, {"x": x}, chunk_len=2, preshuffle=False).close()
    store = oocseq.open_store(path)
    store.read_chunk("x", 0)
    store.advise_chunks("x", np.arange(1, 3))
    kept = store._open_handles()[0]._advised
    kept._lock.acquire()  # (as if a decoding thread were in take() at the fork)
    try:
        pid = os.fork()
        if pid == 0:  # the child: its first read opens handles of its own, dropping the parent's
            status = 1
            try:
                import faulthandler

                faulthandler.dump_traceback_later(20, exit=True)
                ok = np.array_equal(store.read_chunk("x", 1), x[2:4])
                gc.collect()
                status = 0 if ok else 2
            finally:
                os._exit(status)
    finally:
        kept._lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    np.testing.assert_array_equal(store.read_chunk("x", 2), x[4:6])  # (the parent's kept file)
    store.close()
