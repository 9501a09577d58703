"""The storage contract: what every backend (Zarr v3, HDF5) provides.

Read side: the manifest document, a layout check, ``read_chunk(field, c)`` and auxiliary
arrays. Write side: create fields, write whole chunks, write auxiliary arrays, finalize.
Backends hold open file handles; :class:`oocseq.store.Store` owns one per process and never
pickles it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import Compression, FieldSpec


class StorageReader(ABC):
    """Read-only access to one store on disk.

    ``read_chunk`` takes the fast path (:mod:`oocseq.storage._raw`) where the field's layout
    allows it and ``fast`` is true, else :meth:`read_chunk_library` (zarr / h5py's own read).
    Both return equal arrays; tests check it for every codec and both formats."""

    format: str

    def __init__(self, path: Path, fast: bool = True) -> None:
        self.path = path
        self.fast = fast

    @abstractmethod
    def manifest_doc(self) -> Any:
        """The raw (untrusted) manifest document, or ``None`` if there is none."""

    @abstractmethod
    def check_layout(
        self, name: str, n: int, chunk_len: int, spec: FieldSpec, compression: Compression | None = None
    ) -> None:
        """Raise :class:`~oocseq.errors.CorruptStoreError` unless field ``name`` is stored as
        the manifest says: shape ``(n, *spec.sample_shape)``, ``spec.dtype``, chunks of ``chunk_len``
        along axis 0 only, and exactly the codecs oocseq writes for ``compression``
        (configuration included). Must be called for a field before it is read."""

    def read_chunk(self, name: str, c: int, start: int, stop: int) -> np.ndarray:
        """Samples ``[start, stop)`` of chunk ``c`` of field ``name``, decoded, C-contiguous,
        in memory of its own (never a view of a memory map: a file truncated later cannot
        fault it).

        Raises CorruptStoreError if the chunk is missing (never returns fill values) or does
        not decode to the expected size."""
        if self.fast:
            out = self.read_chunk_fast(name, c, start, stop)
            if out is not None:
                return out
        return self.read_chunk_library(name, c, start, stop)

    def read_chunk_into(self, name: str, c: int, start: int, stop: int, out: np.ndarray) -> None:
        """As :meth:`read_chunk`, written into ``out`` (shape ``(stop - start, ...)``,
        C-contiguous): decoded in place where possible, so a window buffer costs one copy."""
        if self.fast and self.read_chunk_fast(name, c, start, stop, out) is not None:
            return
        out[...] = self.read_chunk_library(name, c, start, stop)

    def read_chunk_scattered(
        self, name: str, c: int, start: int, stop: int, out: np.ndarray, positions: np.ndarray
    ) -> bool:
        """Read an uncompressed chunk's samples straight to ``out[positions[k]]`` (see
        :func:`~oocseq.storage._raw.read_scattered`) and return True, or return False where
        the chunk's layout does not allow it (compressed, small samples, a remote store):
        then the caller decodes it and copies its samples. Raises as :meth:`read_chunk`."""
        return False

    def chunk_location(self, name: str, c: int) -> str:
        """Where chunk ``c`` of field ``name`` is stored (a file path), for error messages."""
        return str(self.path)

    def advise_chunks(self, name: str, chunks: np.ndarray) -> None:  # noqa: B027 (optional hook)
        """Hint the kernel to read these chunks' stored bytes ahead, asynchronously
        (``posix_fadvise(WILLNEED)``): a cold store then reads like a sequential scan. A no-op
        where the backend cannot tell where its chunks lie."""

    @abstractmethod
    def read_chunk_fast(
        self, name: str, c: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        """As :meth:`read_chunk` through the fast path (into ``out`` if given), or ``None``
        where the field's layout has none (then the library's read is used)."""

    @abstractmethod
    def read_chunk_library(self, name: str, c: int, start: int, stop: int) -> np.ndarray:
        """As :meth:`read_chunk`, through zarr-python / h5py."""

    @abstractmethod
    def read_aux(self, name: str) -> np.ndarray:
        """A whole auxiliary array (e.g. per-sample source paths, as ``str``)."""

    @abstractmethod
    def stored_nbytes(self, name: str) -> int:
        """Bytes field ``name`` takes on disk (compressed chunks)."""

    @abstractmethod
    def close(self) -> None: ...


class StorageWriter(ABC):
    """Writes a new store at ``path`` (a temporary path; the caller renames it when done)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @abstractmethod
    def create_field(
        self, name: str, spec: FieldSpec, chunk_len: int, compression: Compression | None
    ) -> None: ...

    def reopen_field(self, name: str) -> None:
        """Open field ``name`` of a partial store opened with ``resume=True`` for more chunks
        (KeyError or OSError if it is not there)."""
        raise NotImplementedError

    def flush(self) -> None:  # noqa: B027 (optional hook)
        """Push what was written to the operating system, so that a killed process leaves a
        partial store that reopens with every chunk written so far."""

    @abstractmethod
    def write_chunk(self, name: str, c: int, chunk_len: int, data: np.ndarray) -> None:
        """Write chunk ``c`` (``len(data) <= chunk_len`` samples), growing the field as needed."""

    def reserve(self, name: str, stop: int) -> None:
        """Grow field ``name`` to at least ``stop`` samples (before its chunks are written)."""
        raise NotImplementedError

    def chunk_path(self, name: str, c: int) -> Path | None:
        """The file that holds chunk ``c`` of field ``name``, where each chunk is a file that
        any process may write (Zarr); ``None`` otherwise (HDF5: one writer)."""
        return None

    def write_encoded(self, name: str, c: int, chunk_len: int, payload: bytes, raw: bool) -> None:
        """Write chunk ``c`` as encoded by :func:`oocseq.ingest._writer.encode_chunk` (``raw``:
        stored without the compression filter)."""
        raise NotImplementedError

    @abstractmethod
    def write_aux(self, name: str, values: np.ndarray) -> None:
        """Write an auxiliary array (numbers, or ``str`` values)."""

    @abstractmethod
    def finalize(self, n: int, manifest_doc: dict[str, Any]) -> None:
        """Trim every field to ``n`` samples, write the manifest last, and close."""

    @abstractmethod
    def close(self) -> None: ...

    def discard(self) -> None:
        """Let go of a store that is about to be deleted (after a failure: never raises)."""
        try:
            self.close()
        except Exception:
            pass
