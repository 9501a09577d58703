"""The fast read path: a chunk's stored bytes, decoded with numcodecs outside h5py and zarr.

h5py holds a global lock and zarr-python costs ~1 ms of event-loop work per call; reading a
chunk's bytes ourselves (a Zarr chunk file; ``os.pread`` at an HDF5 chunk's offset) and
decoding them with numcodecs releases the GIL, so a thread pool decodes chunks in parallel.
Uncompressed chunks are not copied at all: they are views of a read-only memory map.

Stored bytes are untrusted: sizes are checked against the manifest before decoding, and
decoding writes into a buffer of exactly the expected size.
"""

from __future__ import annotations

import mmap
import os
import struct

import numcodecs.blosc
import numpy as np

from ..errors import CorruptStoreError

_BLOSC_HEADER = 16


def blosc_decode_into(raw: bytes | memoryview, out: np.ndarray, where: str) -> None:
    """Decode one Blosc frame into ``out`` (C-contiguous), checking its header first."""
    if len(raw) < _BLOSC_HEADER:
        raise CorruptStoreError(f"{where}: compressed chunk of {len(raw)} bytes is truncated")
    nbytes, _blocksize, cbytes = struct.unpack_from("<III", raw, 4)
    if nbytes != out.nbytes or cbytes != len(raw):
        raise CorruptStoreError(
            f"{where}: compressed chunk says {nbytes} bytes decoded / {cbytes} stored, "
            f"expected {out.nbytes} / {len(raw)}"
        )
    try:
        numcodecs.blosc.decompress(raw, out)
    except Exception as e:
        raise CorruptStoreError(f"{where}: cannot decode chunk: {e}") from e


class MappedFile:
    """A read-only memory map of a whole file, opened once per process (by its reader)."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.map = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ) if self.size else None
        if self.map is not None and hasattr(mmap, "MADV_RANDOM"):
            # Chunks are read whole but in shuffled order: no kernel read-ahead past a chunk.
            self.map.madvise(mmap.MADV_RANDOM)

    def view(self, offset: int, nbytes: int, where: str) -> memoryview:
        """Bytes ``[offset, offset + nbytes)`` without copying (asks the kernel to read them)."""
        if offset < 0 or offset + nbytes > self.size or self.map is None:
            raise CorruptStoreError(
                f"{where}: chunk at bytes {offset}..{offset + nbytes} lies outside the file"
            )
        if nbytes and hasattr(mmap, "MADV_WILLNEED"):
            page = offset - offset % mmap.PAGESIZE
            self.map.madvise(mmap.MADV_WILLNEED, page, offset + nbytes - page)
        return memoryview(self.map)[offset : offset + nbytes]

    def pread(self, offset: int, nbytes: int) -> bytes:
        return os.pread(self.fd, nbytes, offset)

    def pread_into(self, offset: int, out: np.ndarray, where: str) -> None:
        """Read ``out.nbytes`` bytes at ``offset`` straight into ``out`` (one kernel copy, no
        page faults on a mapping)."""
        read_exactly_into(self.fd, offset, out, where)

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # views still in use keep the map alive; the GC closes it
                pass
        os.close(self.fd)


def _into(chunk: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``chunk`` copied into ``out`` if given (then ``out``), else ``chunk`` itself."""
    if out is None:
        return chunk
    np.copyto(out, chunk)
    return out


def read_exactly_into(fd: int, offset: int, out: np.ndarray, where: str) -> None:
    """``os.preadv`` of ``out.nbytes`` bytes at ``offset`` into C-contiguous ``out``."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CorruptStoreError(f"{where}: file ends {len(view) - done} bytes before the chunk does")
        done += got


def read_file_into(path: os.PathLike[str] | str, out: np.ndarray, where: str) -> None:
    """Read a file that must hold exactly ``out.nbytes`` bytes into ``out``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != out.nbytes:
            raise CorruptStoreError(
                f"{where}: uncompressed chunk file has {size} bytes, expected {out.nbytes}"
            )
        read_exactly_into(fd, 0, out, where)
    finally:
        os.close(fd)


def read_whole_file(path: os.PathLike[str] | str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read()


def map_whole_file(path: os.PathLike[str] | str, nbytes: int, where: str) -> memoryview:
    """A read-only memory map of a file that must hold exactly ``nbytes`` bytes."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size != nbytes:
            raise CorruptStoreError(f"{where}: uncompressed chunk file has {size} bytes, expected {nbytes}")
        m = mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ)
    return memoryview(m)
