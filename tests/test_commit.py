"""The commit protocol and the writer's guards, step by step (the crash suite kills real
processes; these check each rule on its own)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import oocseq
from oocseq.ingest import _writer
from oocseq.storage import _commit

FORMATS = [".zarr", ".h5"]


def data(n: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).random((n, 3)).astype(np.float32), "y": np.arange(n)}


def test_overwrite_refuses_what_is_not_an_oocseq_store(tmp_path: Path) -> None:
    thesis = tmp_path / "precious.zarr"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    other = tmp_path / "other.h5"
    other.write_bytes(b"not hdf5 at all")
    import h5py

    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["a"] = np.arange(3)
    for dest in (thesis, other, tmp_path / "plain.h5"):
        with pytest.raises(oocseq.NotAStoreError, match="not an oocseq store"):
            oocseq.ingest_arrays(dest, data(), overwrite=True, preshuffle=False)
    assert (thesis / "thesis.tex").read_text() == "years of work"
    assert other.read_bytes() == b"not hdf5 at all"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.h5", "plain.h5", "precious.zarr"]
    # An empty folder, or an oocseq store (even a damaged one), may be replaced.
    (tmp_path / "empty.zarr").mkdir()
    oocseq.ingest_arrays(tmp_path / "empty.zarr", data(), overwrite=True, preshuffle=False).close()
    oocseq.ingest_arrays(tmp_path / "empty.zarr", data(seed=1), overwrite=True, preshuffle=False).close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunk_len_is_capped(tmp_path: Path, fmt: str) -> None:
    store = oocseq.ingest_arrays(
        tmp_path / f"a{fmt}", {"x": np.zeros(3)}, chunk_len=50_000_000, compression=None, preshuffle=False
    )
    assert store.chunk_len == 3
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 100_000
    with pytest.raises(oocseq.ArgumentError, match="chunk_len"):
        oocseq.ingest_arrays(
            tmp_path / f"b{fmt}", {"x": iter([np.zeros((3, 4))])}, chunk_len=10**9, preshuffle=False
        )
    assert not (tmp_path / f"b{fmt}").exists()


def test_store_write_error_is_both() -> None:
    assert issubclass(oocseq.StoreWriteError, oocseq.OocseqError)
    assert issubclass(oocseq.StoreWriteError, OSError)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fds through /proc")
@pytest.mark.parametrize("fmt", FORMATS)
def test_data_and_folders_are_fsynced_before_the_rename(tmp_path: Path, fmt: str, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:
        events.append(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    dest = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(dest, data(), chunk_len=8, preshuffle=False).close()
    events.clear()
    oocseq.ingest_arrays(dest, data(seed=1), chunk_len=8, overwrite=True, preshuffle=False).close()
    renames = [i for i, e in enumerate(events) if e == ("rename", str(dest))]
    assert renames, events
    before = [p for op, p in events[: renames[-1]] if op == "fsync"]
    after = [p for op, p in events[renames[-1] :] if op == "fsync"]
    partial = [p for p in before if ".partial" in p]
    if fmt == ".zarr":  # every chunk file, and the folders
        assert len({p for p in partial if re.search(r"/x/c/\d+/0$", p)}) == 5
        assert any(p.endswith(".partial") for p in partial)
    else:
        assert any(p.endswith(".partial") for p in partial)
    assert str(tmp_path) in after  # the rename itself is made durable


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_old_store_left_aside_is_recovered_by_open_and_by_ingest(tmp_path: Path, fmt: str) -> None:
    dest = tmp_path / f"s{fmt}"
    old = oocseq.ingest_arrays(dest, data(), chunk_len=8, preshuffle=False)
    expected = old["x"][:]
    old.close()
    aside = _commit.sibling(dest, "abc123", "old")
    os.rename(dest, aside)  # what a crash between the two renames of a commit leaves
    np.testing.assert_array_equal(oocseq.open_store(dest)["x"][:], expected)
    assert not aside.exists()
    os.rename(dest, aside)
    with pytest.raises(oocseq.StoreExistsError):  # the ingestion sees the recovered store
        oocseq.ingest_arrays(dest, data(seed=2), chunk_len=8, preshuffle=False)
    np.testing.assert_array_equal(oocseq.open_store(dest)["x"][:], expected)
    # dest and an old one both there: the old one is what the crash left after the commit.
    (_commit.sibling(dest, "def456", "old")).mkdir()
    oocseq.ingest_arrays(dest, data(seed=3), chunk_len=8, overwrite=True, preshuffle=False).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("native", [True, False])
def test_rename_noreplace(tmp_path: Path, fmt: str, native: bool, monkeypatch) -> None:
    if not native:
        monkeypatch.setattr(_commit, "_renameat2", None)
    a, b = tmp_path / f"a{fmt}", tmp_path / f"b{fmt}"
    oocseq.ingest_arrays(a, data(), preshuffle=False).close()
    oocseq.ingest_arrays(b, data(seed=1), preshuffle=False).close()
    with pytest.raises(FileExistsError):
        _commit.rename_noreplace(a, b)
    assert a.exists() and oocseq.open_store(b)["x"][0, 0] == data(seed=1)["x"][0, 0]
    _commit.rename_noreplace(a, tmp_path / f"c{fmt}")
    assert not a.exists() and (tmp_path / f"c{fmt}").exists()


@contextlib.contextmanager
def interrupted_at(monkeypatch: pytest.MonkeyPatch, k: int) -> Iterator[None]:
    """Inside the block, the ``k``-th ``StoreWriter.checkpoint`` raises KeyboardInterrupt
    (which keeps the partial store and journal for a rerun); the block must be interrupted."""
    real, calls = _writer.StoreWriter.checkpoint, [0]

    def checkpoint(self: _writer.StoreWriter, state: object) -> None:
        calls[0] += 1
        if calls[0] == k:
            raise KeyboardInterrupt
        real(self, state)

    monkeypatch.setattr(_writer.StoreWriter, "checkpoint", checkpoint)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(_writer.StoreWriter, "checkpoint", real)


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_false_and_streams_start_over(tmp_path: Path, fmt: str, monkeypatch) -> None:
    dest = tmp_path / f"s{fmt}"
    with interrupted_at(monkeypatch, 3):
        oocseq.ingest_arrays(dest, data(), chunk_len=8, preshuffle=False)
    assert {p.name.rsplit(".", 1)[1] for p in tmp_path.iterdir()} == {"partial", "journal", "lock"}
    with pytest.warns(UserWarning, match="stream of batches cannot be replayed"):
        store = oocseq.ingest_arrays(
            dest, {"x": iter([data()["x"]]), "y": data()["y"]}, chunk_len=8, preshuffle=False
        )
    np.testing.assert_array_equal(store["x"][:], data()["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


def test_a_live_ingestions_files_are_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "s.zarr"
    lock = _commit.OwnerLock.create(dest, "live01")
    assert _commit.OwnerLock.adopt(lock.path) is None  # held
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        oocseq.ingest_arrays(dest, data(), preshuffle=False).close()
    assert lock.path.exists()
    lock.release(delete=False)
    adopted = _commit.OwnerLock.adopt(lock.path)
    assert adopted is not None
    adopted.release(delete=True)
    assert not lock.path.exists()


def test_a_lock_file_left_under_its_temporary_name_is_cleaned(tmp_path: Path) -> None:
    """A kill between creating the lock file (``.lock-new``) and renaming it leaves the
    temporary name: the next ingestion removes it once no process holds it, and leaves a
    held one alone."""
    dest = tmp_path / "s.zarr"
    dead = tmp_path / ".s.zarr.dead01234567.lock-new"
    dead.write_text("12345\n")
    (tmp_path / ".s.zarr.dead01234567.journal-new").write_text("{}\n")
    live = tmp_path / ".s.zarr.live01234567.lock-new"
    fd = os.open(live, os.O_RDWR | os.O_CREAT, 0o644)
    past = time.time() - 2 * _commit._CREATING_S
    for path in (dead, live):
        os.utime(path, (past, past))
    try:
        assert _commit._flock(fd, blocking=True)
        oocseq.ingest_arrays(dest, data(), preshuffle=False).close()
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "s.zarr"]
    finally:
        os.close(fd)
    oocseq.ingest_arrays(dest, data(), overwrite=True).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_a_lock_file_being_created_is_not_taken(tmp_path: Path) -> None:
    """Between its creation and its flock, a new lock file is unlocked: an open or an
    ingestion in that instant must not take it for a dead owner's and delete it."""
    dest = tmp_path / "s.zarr"
    oocseq.ingest_arrays(dest, data(), preshuffle=False).close()
    creating = tmp_path / ".s.zarr.new012345678.lock-new"
    creating.write_text("")  # created, not yet locked
    oocseq.open_store(dest).close()
    assert _commit.OwnerLock.adopt(creating) is None
    assert creating.exists()
    # Killed after writing its pid (it held the flock then): taken at once, not after a delay.
    creating.write_text("12345\n")
    oocseq.open_store(dest).close()
    assert not creating.exists()


@pytest.mark.parametrize("fmt", [".zarr", ".h5"])
def test_open_tidies_up_after_a_commit_killed_before_its_cleanup(tmp_path: Path, fmt: str) -> None:
    """A kill after the new store took its place but before the old store, journal and lock
    were deleted: the next open deletes them (the owner is gone) and keeps an interrupted
    ingestion's partial store, and a live ingestion's files, for them to carry on."""
    dest = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(dest, data(), preshuffle=False).close()
    old = tmp_path / f".{dest.name}.done01234567.old"
    shutil.copytree(dest, old) if dest.is_dir() else shutil.copy2(dest, old)
    for kind in ("journal", "lock"):
        (tmp_path / f".{dest.name}.done01234567.{kind}").write_text("1\n")
    interrupted = {f".{dest.name}.intr01234567.{k}" for k in ("partial", "journal", "lock")}
    for name in interrupted:
        (tmp_path / name).write_text("1\n")
    live = _commit.OwnerLock.create(dest, "live01234567")
    (tmp_path / f".{dest.name}.live01234567.journal").write_text("1\n")
    try:
        store = oocseq.open_store(dest)
        np.testing.assert_array_equal(store["x"][:], data()["x"])
        store.close()
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {dest.name, live.path.name, f".{dest.name}.live01234567.journal"} | interrupted
    finally:
        live.release(delete=True)


def test_zarr_chunk_files_start_their_writeback_as_they_are_written(tmp_path: Path, monkeypatch) -> None:
    """Each chunk file asks the kernel to start writing it out (the commit's fsyncs then wait
    less); the commit still fsyncs every file (test above). A refused hint is no error."""
    if _commit._sync_file_range is None:
        pytest.skip("no sync_file_range here (not Linux)")
    real = _commit._sync_file_range
    asked: list[str] = []

    def spy(fd: int, offset: int, nbytes: int, flags: int) -> int:
        asked.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(_commit, "_sync_file_range", spy)
    oocseq.ingest_arrays(tmp_path / "s.zarr", data(), chunk_len=8, preshuffle=False, workers=2).close()
    chunk_files = {re.sub(r"\.[^./]*\.partial$", "", p.split(".partial/")[-1]) for p in asked}
    assert {f"x/c/{c}/0" for c in range(5)} <= chunk_files
    monkeypatch.setattr(_commit, "_sync_file_range", real)
    r, w = os.pipe()
    try:
        _commit.start_writeback(r)  # a pipe: refused (ESPIPE), ignored
    finally:
        os.close(r)
        os.close(w)
    _commit.start_writeback(-1)  # a bad descriptor: ignored


def test_a_resumed_hdf5_store_left_half_flushed_starts_over(tmp_path: Path, monkeypatch) -> None:
    """A process killed inside an HDF5 flush can leave the file's end-of-allocation address
    (in the superblock) short of a chunk its index already records. Resuming then fails the
    first rewrite inside HDF5 ("addr overflow"). The ingestion must warn, start over and
    write the same store as an uninterrupted run, not fail."""
    import json
    import struct

    import h5py

    x = np.arange(200 * 64, dtype=np.float32).reshape(200, 64)
    kw = {"chunk_len": 20, "compression": None, "preshuffle": False}
    want = oocseq.ingest_arrays(tmp_path / "ref" / "s.h5", {"x": x}, **kw)
    want_x = want["x"][:]
    want.close()
    dest = tmp_path / "s.h5"
    with interrupted_at(monkeypatch, 6):
        oocseq.ingest_arrays(dest, {"x": x}, **kw)
    (partial,) = tmp_path.glob(".s.h5.*.partial")
    (journal,) = tmp_path.glob(".s.h5.*.journal")
    k = [json.loads(line) for line in journal.read_text().splitlines()][-1]["k"]
    with h5py.File(partial, "r") as f:
        ds = f["x"].id
        infos = [ds.get_chunk_info(i) for i in range(ds.get_num_chunks())]
    redone = next(i for i in infos if i.chunk_offset[0] == (k - 1) * 20)  # rewritten on resume
    raw = bytearray(partial.read_bytes())
    assert raw[8] == 0  # superblock version 0: the end-of-allocation address is at byte 40
    raw[40:48] = struct.pack("<Q", redone.byte_offset)
    partial.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="is damaged .*starts over"):
        store = oocseq.ingest_arrays(dest, {"x": x}, **kw)
    np.testing.assert_array_equal(store["x"][:], want_x)
    assert store.verify() and sorted(p.name for p in tmp_path.iterdir()) == ["ref", "s.h5"]
