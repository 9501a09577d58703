"""The commit protocol: how a finished store takes the place of whatever is at its destination.

Every name an ingestion into ``DIR/NAME`` uses lies next to it, hidden:

- ``.NAME.<id>.lock``: its owner's lock file (``flock``-ed for as long as the owner lives;
  the kernel drops the lock when the process dies, whatever kills it) holding the owner's pid;
- ``.NAME.<id>.partial``: the store being built;
- ``.NAME.<id>.journal``: the progress journal (see :mod:`oocseq.ingest._writer`);
- ``.NAME.<id>.old``: the store that was at ``NAME``, moved aside during a commit.

A commit (under an exclusive ``flock`` on ``DIR`` itself, which serialises the commits of
every oocseq process into ``DIR``) fsyncs the partial store's files and folders and ``DIR``,
then either renames the partial store to ``NAME`` without replacing anything (``overwrite``
false: ``renameat2(RENAME_NOREPLACE)``, or a check and rename under the lock where the kernel
lacks it) or moves the old store aside to ``.NAME.<id>.old``, renames the partial store to
``NAME``, fsyncs ``DIR`` and deletes the old store. At every instant a complete store is at
``NAME`` or at ``.NAME.<id>.old``; :func:`recover` (called by the next open or ingestion)
moves an old store back if ``NAME`` is missing, and deletes it once ``NAME`` is there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..errors import NotAStoreError, StoreExistsError

# "-new": a lock file or journal being created under a temporary name (a kill can leave it).
KINDS = ("partial", "journal", "lock", "old", "lock-new", "journal-new")
# How old an empty "lock-new" must be before it is taken for a killed owner's (seconds).
_CREATING_S = 10.0


T = TypeVar("T")


def sibling(dest: Path, job_id: str, kind: str) -> Path:
    """``DIR/.NAME.<id>.<kind>``: a hidden name next to ``dest``."""
    return dest.with_name(f".{dest.name}.{job_id}.{kind}")


def siblings(dest: Path) -> dict[str, dict[str, Path]]:
    """Job id -> {kind: path} of every hidden leftover of ingestions into ``dest``."""
    prefix = f".{dest.name}."
    out: dict[str, dict[str, Path]] = {}
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return out
    for name in names:
        if not name.startswith(prefix):
            continue
        job_id, _, kind = name[len(prefix) :].rpartition(".")
        if kind in KINDS and job_id and "." not in job_id:
            out.setdefault(job_id, {})[kind] = dest.parent / name
    return out


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def remove(path: Path) -> None:
    """Delete a file, symlink or folder tree; a missing path is no error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


# -- durability ---------------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync one file or folder (folders: where the platform allows opening them)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        if sys.platform == "win32":  # folders cannot be opened there
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = None
if sys.platform.startswith("linux"):
    try:
        import ctypes

        _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
        _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _sync_file_range.restype = ctypes.c_int
    except (OSError, AttributeError):
        _sync_file_range = None


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages to disk now, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere nothing). A hint, not
    durability: the commit still fsyncs every file. But the fsyncs then find the data on its
    way, instead of each one writing its file alone while the disk's queue is otherwise empty
    (a store of many chunk files is made durable about as fast as one file of the same size)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # errors (e.g. unsupported) ignored


def fsync_tree(path: Path) -> None:
    """fsync every file of ``path`` (a file or a folder tree), then every folder, bottom up."""
    if not path.is_dir():
        fsync_path(path)
        return
    for dirpath, _dirnames, filenames in os.walk(path, topdown=False):
        for f in filenames:
            fsync_path(Path(dirpath, f))
        fsync_path(Path(dirpath))


# -- locks --------------------------------------------------------------------------------------


def _flock(fd: int, blocking: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # no advisory locks: rely on the no-replace rename alone
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):  # no locks on this file system
            return True
        raise
    return True


class OwnerLock:
    """The lock file ``.NAME.<id>.lock`` of one ingestion, held while its owner lives."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def create(cls, dest: Path, job_id: str) -> OwnerLock:
        """A new, held lock. It is locked under a temporary name and then renamed, so that no
        other process ever sees it unlocked."""
        path = sibling(dest, job_id, "lock")
        tmp = path.with_name(path.name + "-new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _flock(fd, blocking=True)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.replace(tmp, path)
        except BaseException:
            os.close(fd)
            remove(tmp)
            raise
        return cls(path, fd)

    @classmethod
    def adopt(cls, path: Path) -> OwnerLock | None:
        """The lock of an ingestion whose owner is gone, now held by this process; ``None`` if
        its owner still runs (or someone else took it, or it vanished)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            # A lock under its temporary name exists unlocked, and empty, for the instant between
            # its creation and its flock in create(): taking it then would break a live
            # ingestion. Once it holds a pid its creator had the flock, so a free one is dead.
            st = os.fstat(fd)
            if path.name.endswith("-new") and st.st_size == 0 and time.time() - st.st_mtime < _CREATING_S:
                os.close(fd)
                return None
            if not _flock(fd, blocking=False):
                os.close(fd)
                return None
            # It may have been deleted (by another process cleaning up) between open and flock.
            st, cur = os.fstat(fd), os.stat(path)
            if (st.st_ino, st.st_dev) != (cur.st_ino, cur.st_dev):
                os.close(fd)
                return None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            os.close(fd)
            return None
        return cls(path, fd)

    def release(self, delete: bool) -> None:
        """Unlock (deleting the lock file first if ``delete``)."""
        if self.fd < 0:
            return
        if delete:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive ``flock`` on a folder: serialises commits (and recoveries) within it.
    Reentrant within a thread (a commit opens the store it committed, and opening recovers)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows: folders cannot be opened
        yield
        return
    held: set[tuple[int, int]] = _held.__dict__.setdefault("folders", set())
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in held:  # this thread holds it already: a second flock would wait on itself
            yield
            return
        _flock(fd, blocking=True)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)  # closing drops the lock


_held = threading.local()


# -- renames ------------------------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _renameat2 = _libc.renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):
        _renameat2 = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, atomically where the
    kernel and file system offer ``RENAME_NOREPLACE`` (Linux), else checked first (callers
    hold :func:`folder_lock`, so no other oocseq commit can slip in between)."""
    if _renameat2 is not None:
        import ctypes

        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src))
    if src.is_file() and not src.is_symlink():
        try:
            os.link(src, dst)  # atomic and never replaces
        except OSError as e:
            if isinstance(e, FileExistsError):
                raise
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


# -- what counts as a store ---------------------------------------------------------------------


def store_kind_problem(path: Path) -> str | None:
    """Why ``path`` does not look like an oocseq store (``None`` if it does, or if it is an
    empty folder). Damaged stores whose manifest is still there count as stores."""
    from ..manifest import ATTR_KEY

    if path.is_dir():
        entries = os.listdir(path)
        if not entries:
            return None
        meta = path / "zarr.json"
        if not meta.is_file():
            return f"a folder without zarr.json (it holds {sorted(entries)[:5]})"
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError) as e:
            return f"its zarr.json is unreadable ({e})"
        if not isinstance(doc, dict) or ATTR_KEY not in (doc.get("attributes") or {}):
            return "a Zarr store without an oocseq manifest"
        return None
    if path.is_file():
        try:
            with open(path, "rb") as f:
                sig = f.read(8)
        except OSError as e:
            return f"unreadable ({e})"
        if sig != b"\x89HDF\r\n\x1a\n":
            return "not an HDF5 file"
        try:
            import h5py

            with h5py.File(path, "r") as h:
                if ATTR_KEY not in h.attrs:
                    return "an HDF5 file without an oocseq manifest"
        except Exception as e:  # a damaged file: h5py raises OSError and others
            return f"an HDF5 file h5py cannot open ({e})"
        return None
    return "not a regular file or folder"


def check_replaceable(dest: Path) -> None:
    """NotAStoreError unless whatever is at ``dest`` may be deleted by ``overwrite=True``."""
    if not os.path.lexists(dest):
        return
    problem = store_kind_problem(dest)
    if problem is not None:
        raise NotAStoreError(
            f"refusing to overwrite {str(dest)!r}: it is not an oocseq store ({problem}). "
            "overwrite=True only replaces oocseq stores; delete it yourself or choose another dest"
        )


# -- commit and recovery ------------------------------------------------------------------------


def _looks_complete(old: Path) -> bool:
    return (old / "zarr.json").is_file() if old.is_dir() else old.is_file() and old.stat().st_size > 0


def recover(dest: Path) -> bool:
    """Finish what a crash during a commit into ``dest`` left: move the old store back to
    ``dest`` if ``dest`` is missing, delete moved-aside old stores once ``dest`` is there, and
    the journal and lock of ingestions that committed but were killed before cleaning up.
    Returns whether something is at ``dest`` now (it may also have been put there by a
    concurrent commit, which this waits for). Never raises for a folder it cannot write."""
    olds = [p["old"] for p in siblings(dest).values() if "old" in p]
    try:
        with folder_lock(dest.parent):  # waits for a commit in progress
            olds = [p for p in olds if os.path.lexists(p)]
            if not os.path.lexists(dest):
                candidates = sorted((p for p in olds if _looks_complete(p)), key=lambda p: p.stat().st_mtime)
                if candidates:
                    os.rename(candidates[-1], dest)
                    fsync_path(dest.parent)
                    olds.remove(candidates[-1])
            if os.path.lexists(dest):
                for p in olds:
                    remove(p)
                _tidy_finished(dest)
    except OSError:
        pass
    return os.path.lexists(dest)


def _tidy_finished(dest: Path) -> None:
    """Delete the journal and lock of ingestions into ``dest`` that have no partial store (they
    committed, and were killed before cleaning up) and whose owners are gone. Leftovers with a
    partial store are an interrupted ingestion's, kept for it to resume."""
    for parts in siblings(dest).values():
        if "partial" in parts or "old" in parts:
            continue
        lock_path = parts.get("lock") or parts.get("lock-new")
        lock = OwnerLock.adopt(lock_path) if lock_path is not None else None
        if lock_path is not None and lock is None:
            continue  # its owner still runs
        for kind in ("journal", "journal-new"):
            if kind in parts:
                remove(parts[kind])
        if lock is not None:
            lock.release(delete=True)
        for kind in ("lock", "lock-new"):
            if kind in parts:
                remove(parts[kind])


def commit(tmp: Path, dest: Path, overwrite: bool, job_id: str, opener: Callable[[], T]) -> T:
    """Put the finished store ``tmp`` at ``dest`` (the protocol in the module docstring) and
    return ``opener()``, called under the folder lock: the store opened is the one this call
    committed, even if a concurrent ingestion replaces it right after.

    Raises StoreExistsError (``dest`` appeared and ``overwrite`` is false) or NotAStoreError
    (``overwrite`` is true and ``dest`` is not an oocseq store); ``tmp`` is left in place."""
    fsync_tree(tmp)
    old = sibling(dest, job_id, "old")
    moved = False
    with folder_lock(dest.parent):
        if not overwrite:
            try:
                rename_noreplace(tmp, dest)
            except FileExistsError:
                raise StoreExistsError(
                    f"{dest} already exists (another ingestion committed there first); pass "
                    "overwrite=True to replace it"
                ) from None
            fsync_path(dest.parent)
        else:
            if os.path.lexists(dest):
                check_replaceable(dest)
                os.rename(dest, old)
                moved = True
                fsync_path(dest.parent)
            os.rename(tmp, dest)
            fsync_path(dest.parent)
        opened = opener()
    if moved:
        remove(old)
    return opened
