"""The fast read path: a chunk's stored bytes, decoded with numcodecs outside h5py and zarr.

h5py holds a global lock and zarr-python costs ~1 ms of event-loop work per call; reading a
chunk's bytes ourselves (a Zarr chunk file; ``os.pread`` at an HDF5 chunk's offset) and
decoding them with numcodecs releases the GIL, so a thread pool decodes chunks in parallel.

Stored bytes are untrusted: sizes are checked against the manifest before anything is read
or decoded (a Blosc frame's header states its decoded size), and decoding writes into a
buffer of exactly the expected size. Bytes are read with ``pread`` into memory oocseq owns,
never handed out as views of a memory map: a file truncated later cannot fault (SIGBUS) an
array already returned.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import stat
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numcodecs.blosc
import numpy as np

from ..errors import ArgumentError, CorruptStoreError, StoreReadError

BLOSC_HEADER = 16
#: Blosc (v1) never stores more than the decoded bytes plus its 16-byte header; a larger file
#: is refused before it is read.
BLOSC_MAX_OVERHEAD = 16


class Where:
    """A place that error messages name (``f"{where}: ..."``), worded only when one is raised:
    wording a chunk's path costs ~15 us, as much as the rest of opening it."""

    __slots__ = ("_args", "_words")

    def __init__(self, words: Callable[..., str], *args: Any) -> None:
        self._words = words
        self._args = args

    def __str__(self) -> str:
        return self._words(*self._args)


#: A place named in an error message: its words, or a :class:`Where` that words it when raised.
Place = str | Where


def blosc_header(raw: bytes | bytearray | memoryview, where: Place) -> tuple[int, int]:
    """``(decoded bytes, stored bytes)`` from a Blosc frame's header."""
    if len(raw) < BLOSC_HEADER:
        raise CorruptStoreError(f"{where}: compressed chunk of {len(raw)} bytes is truncated")
    nbytes, _blocksize, cbytes = struct.unpack_from("<III", raw, 4)
    return nbytes, cbytes


def blosc_decode_into(raw: bytes | bytearray | memoryview, out: np.ndarray, where: Place) -> None:
    """Decode one Blosc frame into ``out`` (C-contiguous), checking its header first."""
    nbytes, cbytes = blosc_header(raw, where)
    if nbytes != out.nbytes or cbytes != len(raw):
        raise CorruptStoreError(
            f"{where}: compressed chunk says {nbytes} bytes decoded / {cbytes} stored, "
            f"expected {out.nbytes} / {len(raw)}"
        )
    try:
        numcodecs.blosc.decompress(raw, out)
    except Exception as e:
        raise CorruptStoreError(f"{where}: cannot decode chunk: {e}") from e


def serve(chunk: np.ndarray, out: np.ndarray | None, count: int) -> np.ndarray:
    """The first ``count`` samples of a decoded whole ``chunk`` (the last chunk is padded on
    disk), copied into ``out`` if given and not already decoded there."""
    if chunk is out:
        return out
    if out is None:
        return chunk[:count]
    np.copyto(out, chunk[:count])
    return out


def read_exactly_into(fd: int, offset: int, out: np.ndarray, where: Place) -> None:
    """``os.preadv`` of ``out.nbytes`` bytes at ``offset`` into C-contiguous ``out``."""
    view = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy arrays are buffers
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise os_error(e, where) from e
        if got <= 0:
            raise CorruptStoreError(f"{where}: file ends {len(view) - done} bytes before the chunk does")
        done += got


def read_exactly(fd: int, offset: int, nbytes: int, where: Place) -> bytearray:
    """``nbytes`` bytes at ``offset`` (a new buffer)."""
    buf = bytearray(nbytes)
    read_exactly_into(fd, offset, np.frombuffer(buf, np.uint8), where)
    return buf


#: Alignment of the buffers chunks are read into. The kernel copies from the page cache ~10x
#: slower into a buffer whose offset in its page is 1-31 bytes past the file offset's (1.4 vs
#: 15-20 GB/s measured for every offset 0-4095 on an AMD EPYC VM, ``rep movsb``; glibc's
#: ``memcpy`` of 12 KiB samples 4x slower), and ``malloc`` puts a large numpy array or
#: ``bytearray`` 16 bytes past a page: window buffers and read buffers are aligned to a page.
ALIGNMENT = 4096


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an :data:`ALIGNMENT` boundary
    (a view into a slightly larger numpy allocation, freed with the view)."""
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    # The address through a ctypes view of the buffer: 0.8 us (``raw.ctypes.data`` 2.2 us,
    # ``raw.__array_interface__`` 3.3 us); a batch array is made for every batch.
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % ALIGNMENT  # type: ignore[arg-type]  # numpy arrays are buffers
    return raw[skip : skip + nbytes].view(dt).reshape(shape)


#: Samples at least this large are read from an uncompressed chunk straight to their
#: positions in a window (one ``preadv`` segment each); smaller ones through a scratch buffer
#: (a segment per sample would cost more than the copy it saves).
SCATTER_MIN_BYTES = 4096


def _libc_preadv() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).preadv
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong)
    fn.restype = ctypes.c_ssize_t
    return fn


# libc's preadv through ctypes (which releases the GIL): the segment list is built by numpy,
# where os.preadv needs a Python memoryview per segment (~0.25 us a sample).
_PREADV = _libc_preadv()
_IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024))


def read_scattered(fd: int, offset: int, out: np.ndarray, positions: np.ndarray, where: Place) -> None:
    """Read ``len(positions)`` samples stored back to back at ``offset`` so that sample ``k``
    lands in ``out[positions[k]]``: one kernel copy per byte, no intermediate buffer.

    ``out``: samples along axis 0, C-contiguous and writable; ``positions``: ints in
    ``range(len(out))``, distinct (a repeated one gets one of its samples), checked by
    :func:`check_positions` (the kernel writes to the addresses they give). Raises
    CorruptStoreError if the file ends early, StoreReadError for a failed read."""
    check_positions(out, positions, len(positions))
    k = len(positions)
    if k == 0:
        return
    size = out.itemsize * math.prod(out.shape[1:])  # (not strides[0]: any for one sample)
    if _PREADV is None:  # no libc preadv: one Python buffer per segment
        flat = memoryview(out.reshape(-1).view(np.uint8))  # type: ignore[arg-type]  # numpy arrays are buffers
        segments = [flat[q * size : (q + 1) * size] for q in positions.tolist()]
        _read_segments(fd, offset, segments, where)
        return
    base = ctypes.addressof(ctypes.c_char.from_buffer(out))  # type: ignore[arg-type]  # numpy arrays are buffers
    iov = np.empty((k, 2), dtype=np.uint64)  # struct iovec {void *iov_base; size_t iov_len}
    iov[:, 0] = positions.astype(np.uint64) * np.uint64(size) + np.uint64(base)
    iov[:, 1] = size
    iov_address = iov.ctypes.data
    i = 0
    while i < k:
        count = min(k - i, _IOV_MAX)
        got = _PREADV(fd, iov_address + 16 * i, count, offset)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:  # (retried, as os.preadv does)
                continue
            raise os_error(OSError(err, os.strerror(err)), where)
        if got == 0:
            missing = int(iov[i:, 1].sum())
            raise CorruptStoreError(f"{where}: file ends {missing} bytes before the chunk does")
        offset += got
        if got == int(iov[i : i + count, 1].sum()):
            i += count
            continue
        while got > 0:  # a short read: move past the segments it filled
            take = min(got, int(iov[i, 1]))
            iov[i, 0] += np.uint64(take)
            iov[i, 1] -= np.uint64(take)
            got -= take
            if iov[i, 1] == 0:
                i += 1


def check_positions(out: np.ndarray, positions: np.ndarray, rows: int) -> None:
    """Raise ArgumentError unless ``out`` is a writable C-contiguous array with a sample axis
    and ``positions`` a 1-D integer array of ``rows`` ints in ``range(len(out))``."""
    if out.ndim == 0 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ArgumentError("samples are scattered into a writable C-contiguous array with a sample axis")
    if not isinstance(positions, np.ndarray) or positions.ndim != 1 or positions.dtype.kind not in "iu":
        raise ArgumentError(f"positions must be a 1-D integer array, got {type(positions).__name__}")
    if len(positions) != rows:
        raise ArgumentError(f"{rows} samples to place, {len(positions)} positions")
    if rows and (int(positions.min()) < 0 or int(positions.max()) >= len(out)):
        raise ArgumentError(
            f"positions {int(positions.min())}..{int(positions.max())} outside a buffer of {len(out)} samples"
        )


def _read_segments(fd: int, offset: int, segments: list[memoryview], where: Place) -> None:
    while segments:
        try:
            got = os.preadv(fd, segments[:_IOV_MAX], offset)
        except OSError as e:
            raise os_error(e, where) from e
        if got <= 0:
            missing = sum(len(s) for s in segments)
            raise CorruptStoreError(f"{where}: file ends {missing} bytes before the chunk does")
        offset += got
        while got > 0:
            take = min(got, len(segments[0]))
            got -= take
            segments[0] = segments[0][take:]
            if not len(segments[0]):
                segments.pop(0)


#: The most bytes a thread keeps in its reusable read buffer (a larger chunk gets a new one).
_SCRATCH_MAX = 16 << 20
_scratch = threading.local()


def read_scratch(fd: int, offset: int, nbytes: int, where: Place) -> memoryview:
    """``nbytes`` bytes at ``offset``, read into this thread's reusable aligned buffer: valid
    until the same thread's next call (for bytes decoded at once, such as a Blosc frame).
    Reusing the buffer saves a fresh allocation (and its page faults) per chunk."""
    buf: np.ndarray | None = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = aligned_empty((max(nbytes, 1),), np.uint8)
        if nbytes <= _SCRATCH_MAX:
            _scratch.buf = buf
    out = buf[:nbytes]
    read_exactly_into(fd, offset, out, where)
    return memoryview(out)  # type: ignore[arg-type]  # numpy arrays are buffers


def scratch_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """This thread's reusable aligned array of ``shape`` and ``dtype`` (contents undefined),
    valid until the same thread's next call: a chunk decoded here is then copied to its
    positions in a window. Separate from :func:`read_scratch`'s buffer (both are in use at
    once)."""
    nbytes = math.prod(shape) * dtype.itemsize
    buf: np.ndarray | None = getattr(_scratch, "decoded", None)
    if buf is None or len(buf) < nbytes:
        buf = aligned_empty((max(nbytes, 1),), np.uint8)
        if nbytes <= _SCRATCH_MAX:
            _scratch.decoded = buf
    return buf[:nbytes].view(dtype).reshape(shape)


_NOWAIT = getattr(os, "RWF_NOWAIT", None)


def in_page_cache(fd: int, offset: int, nbytes: int) -> bool:
    """Whether the last byte of ``nbytes`` at ``offset`` is in the page cache (a read that
    would not wait: ``preadv2`` with ``RWF_NOWAIT``, ~1 us). False where that cannot be asked.

    Read-ahead hints check this first: ``posix_fadvise(WILLNEED)`` costs ~70 us per 4 MiB of
    data even when every page is cached, and the kernel reads a file forwards, so a chunk
    whose last page is cached is almost always cached whole."""
    if _NOWAIT is None or nbytes <= 0:
        return False
    try:
        return os.preadv(fd, [bytearray(1)], offset + nbytes - 1, _NOWAIT) == 1
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: the file system cannot tell
        return False


#: errno values that say the system refused a read (not that the path is no store).
SYSTEM_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EIO, errno.EACCES, errno.EPERM, errno.ENOMEM})


def os_error(e: OSError, where: Place) -> StoreReadError | CorruptStoreError:
    """An OSError met while reading a store, as an oocseq error naming the store."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return CorruptStoreError(f"{where}: missing ({e.strerror}); the store is incomplete or damaged")
    if e.errno == errno.ELOOP:
        return CorruptStoreError(
            f"{where}: is a symbolic link; oocseq reads no links inside a store (a link can lead "
            "outside it). Copy the store with its files (cp -L) or ingest it again."
        )
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return StoreReadError(
            e.errno,
            f"{where}: too many open files; close stores and sequences you no longer use "
            "(store.close(), seq.close()) or raise the limit (ulimit -n)",
        )
    return StoreReadError(e.errno, f"{where}: {e.strerror or e}")


def open_beneath(dir_fd: int, parts: list[str], where: Place) -> int:
    """Open the regular file ``dir_fd/parts[0]/.../parts[-1]`` read-only, refusing symbolic
    links at every step and anything that is not a regular file (a FIFO cannot block: it is
    opened non-blocking, then refused). Returns a new fd; raises CorruptStoreError."""
    return open_sized_beneath(dir_fd, parts, where)[0]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _libc_openat2() -> Any:
    """Linux's ``openat2`` system call through ctypes (which releases the GIL), or None where
    there is none (other systems, other architectures)."""
    number = {"x86_64": 437, "aarch64": 437}.get(os.uname().machine) if hasattr(os, "uname") else None
    if number is None or not hasattr(os, "O_NOFOLLOW"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
    fn.restype = ctypes.c_long
    # RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH: no link of any kind, and
    # nothing outside ``dir_fd`` (linux/openat2.h).
    how = _OpenHow(os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0, 0x02 | 0x04 | 0x08)
    return lambda dir_fd, path: fn(number, dir_fd, path, ctypes.addressof(how), ctypes.sizeof(how))


# One system call opens a chunk file below its field's directory, where the walk of
# open_sized_beneath makes one per path component and closes each (a Zarr chunk's key
# "c/5/0/0/0" is 4 opens and 3 closes: ~5% of an lz4 epoch's CPU on 2 cores). Cleared if the
# kernel refuses it (older than 5.6, or a sandbox that filters it).
_OPENAT2 = [_libc_openat2()]


def open_sized_beneath(dir_fd: int, parts: list[str], where: Place) -> tuple[int, int]:
    """:func:`open_beneath`, and the file's size in bytes: ``(fd, size)``."""
    openat2 = _OPENAT2[0]
    if openat2 is not None:
        fd = openat2(dir_fd, "/".join(parts).encode())
        if fd >= 0:
            return _sized_regular(fd, where)
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _OPENAT2[0] = None
        # Any refusal (a link, a missing file, ...) is worded by the walk below, which meets it too.
    fds: list[int] = []
    try:
        cur = dir_fd
        for part in parts[:-1]:
            cur = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
            fds.append(cur)
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=cur)
    except OSError as e:
        raise os_error(e, where) from None
    finally:
        for d in fds:
            os.close(d)
    return _sized_regular(fd, where)


def _sized_regular(fd: int, where: Place) -> tuple[int, int]:
    """``(fd, size)`` of a regular file; else ``fd`` is closed and CorruptStoreError raised."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        os.close(fd)
        raise os_error(e, where) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptStoreError(f"{where}: not a regular file; the store is damaged")
    return fd, st.st_size


class OpenFiles:
    """Open files kept for a later read, by key: ``(fd, size)``. At most ``limit`` (the oldest
    closed first); :meth:`take` hands one over to the caller, who closes it. Thread-safe; once
    closed, a file put is closed at once. In a process forked from the one that made it, it
    hands nothing out and takes no lock (another thread may have held it at the fork): it only
    closes that process's copies of the files."""

    def __init__(self, limit: int) -> None:
        self._files: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    def __contains__(self, key: Hashable) -> bool:
        return key in self._files  # (a dict lookup is atomic: no lock)

    def put(self, key: Hashable, file: tuple[int, int]) -> None:
        if self._pid != os.getpid():
            os.close(file[0])
            return
        with self._lock:
            if self._closed:
                dropped = [file]
            else:
                old = self._files.pop(key, None)
                self._files[key] = file
                dropped = [self._files.popitem(last=False)[1] for _ in range(len(self._files) - self._limit)]
                if old is not None:
                    dropped.append(old)
        for fd, _ in dropped:
            os.close(fd)

    def take(self, key: Hashable) -> tuple[int, int] | None:
        if key not in self._files or self._pid != os.getpid():  # (the usual miss, without the lock)
            return None
        with self._lock:
            return self._files.pop(key, None)

    def close(self) -> None:
        if self._pid != os.getpid():
            files = list(self._files.values())  # (this process's copies; the lock may be stuck)
        else:
            with self._lock:
                self._closed = True
                files = list(self._files.values())
        self._files.clear()
        for fd, _ in files:
            try:
                os.close(fd)
            except OSError:
                pass


class Handles:
    """File descriptors (and other closables) that a reader owns, closed by :meth:`close` or,
    if the reader is dropped without closing, by the garbage collector."""

    def __init__(self, owner: object) -> None:
        self.fds: list[int] = []
        self.objects: list[Any] = []
        self._finalizer = weakref.finalize(owner, Handles._close_all, self.fds, self.objects)

    def add_fd(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def add(self, obj: Any) -> Any:
        self.objects.append(obj)
        return obj

    def close(self) -> None:
        self._finalizer()

    @staticmethod
    def _close_all(fds: list[int], objects: list[Any]) -> None:
        while fds:
            try:
                os.close(fds.pop())
            except OSError:
                pass
        while objects:
            try:
                objects.pop().close()
            except Exception:  # closing after the interpreter started shutting down
                pass
