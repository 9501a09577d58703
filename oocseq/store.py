"""``Store``: an opened oocseq store (Zarr v3 directory or HDF5 file), read-only.

A ``Store`` pickles as its path: file handles are opened lazily in each process (keyed by
``os.getpid()``), so it works across fork, spawn and forkserver.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    ArgumentError,
    CorruptStoreError,
    FieldNotFoundError,
    NotAStoreError,
    OutOfRangeError,
    StoreNotFoundError,
)
from .manifest import Manifest
from .storage import StorageReader, open_reader, store_format

__all__ = ["Store", "FieldInfo", "FieldView", "open_store"]


@dataclass(frozen=True)
class FieldInfo:
    """Shape (``(n, *sample_shape)``) and dtype of one field."""

    shape: tuple[int, ...]
    dtype: np.dtype


class Store:
    """An opened store. Open one with :func:`open_store` (or get one from an ingest function).

    Attributes:
        path: the store's path.
        format: ``"zarr"`` or ``"hdf5"``.
        manifest: the validated :class:`~oocseq.manifest.Manifest`.

    Args:
        path: a ``*.zarr`` directory or ``*.h5`` / ``*.hdf5`` file written by oocseq.
        fast: read chunks through oocseq's own reader (chunk bytes + numcodecs, memory maps
            for uncompressed chunks) where the layout allows; ``False`` always reads through
            zarr-python / h5py. Both give equal arrays.

    Raises (when opening):
        StoreNotFoundError: ``path`` does not exist.
        NotAStoreError: ``path`` is not a complete oocseq store.
        CorruptStoreError: the store's metadata or layout is inconsistent.
    """

    def __init__(self, path: str | os.PathLike[str], *, fast: bool = True) -> None:
        self.path = Path(path)
        self.fast = fast
        self.format = store_format(self.path)
        if not self.path.exists():
            raise StoreNotFoundError(f"no store at {str(self.path)!r}")
        self._lock = threading.Lock()
        self._reader: StorageReader | None = None
        self._pid = -1
        reader = self._open()
        self.manifest = Manifest.from_json(reader.manifest_doc(), str(self.path))
        for name, spec in self.manifest.fields.items():
            reader.check_layout(name, self.manifest.n, self.manifest.chunk_len, spec)

    # -- handles: one per process, never pickled ---------------------------------------------
    def _open(self) -> StorageReader:
        reader = self._reader
        if reader is not None and self._pid == os.getpid():
            return reader
        with self._lock:
            if self._reader is None or self._pid != os.getpid():
                try:
                    self._reader = open_reader(self.path, self.format, self.fast)
                except (NotAStoreError, CorruptStoreError):
                    raise
                except Exception as e:
                    raise NotAStoreError(f"{self.path} is not a readable {self.format} store: {e}") from e
                self._pid = os.getpid()
            return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "fast": self.fast, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._reader = None
        self._pid = -1

    def close(self) -> None:
        """Close this process's file handles (they reopen on the next read)."""
        with self._lock:
            if self._reader is not None and self._pid == os.getpid():
                self._reader.close()
            self._reader = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- description ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.n

    @property
    def fields(self) -> dict[str, FieldInfo]:
        """Field name -> :class:`FieldInfo` (full shape ``(n, ...)`` and dtype)."""
        n = self.manifest.n
        return {k: FieldInfo((n, *v.shape), v.dtype) for k, v in self.manifest.fields.items()}

    @property
    def chunk_len(self) -> int:
        """Samples per chunk (the last chunk may be shorter)."""
        return self.manifest.chunk_len

    @property
    def num_chunks(self) -> int:
        return self.manifest.num_chunks

    @property
    def metadata(self) -> dict[str, Any]:
        """User metadata: ``format_version``, ``compression``, and what the ingestion recorded
        (``class_names``, ``feature_names``, ``label_mapping``, ``source``, ``preshuffle`` ...)."""
        comp = self.manifest.compression
        return {
            **self.manifest.attrs,
            "format_version": self.manifest.format_version,
            "compression": None if comp is None else comp.to_json(),
        }

    @property
    def sources(self) -> np.ndarray | None:
        """Where each sample came from (``str`` array of shape ``(n,)``: a file path, or
        ``"file.csv:row"``), or ``None`` if the ingestion recorded none."""
        if "source" not in self.manifest.aux:
            return None
        values = self._open().read_aux("source")  # StringDType from zarr, object from h5py
        return np.array(values.tolist(), dtype=str)

    @property
    def source_index(self) -> np.ndarray | None:
        """int64 array of shape ``(n,)``: the source position (row of the arrays or of the
        concatenated ``.npy`` files) of every stored sample, so ``store["x"][i]`` came from
        ``source[store.source_index[i]]``; the identity for a store written in source order.
        Computed from the pre-shuffle record in the manifest (nothing is stored per sample).
        ``None`` for a store that records its sources per sample instead (image folders and
        DataFrames: :attr:`sources`).

        Raises:
            CorruptStoreError: the manifest's pre-shuffle record is malformed.
        """
        from .ingest._preshuffle import BlockShuffle

        record = self.manifest.attrs.get("preshuffle")
        if not record:
            return np.arange(len(self), dtype=np.int64)
        if "source" in self.manifest.aux:
            return None
        return BlockShuffle.from_json(len(self), record).source_index()

    def stored_nbytes(self, name: str) -> int:
        """Bytes the chunks of field ``name`` take on disk."""
        self._check_field(name)
        return self._open().stored_nbytes(name)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in self.fields.items())
        return f"<oocseq.Store {str(self.path)!r} ({self.format}) n={len(self)} chunk_len={self.chunk_len} {{{fields}}}>"

    # -- reading -------------------------------------------------------------------------------
    def _check_field(self, name: str) -> None:
        if name not in self.manifest.fields:
            raise FieldNotFoundError(
                f"{self.path} has no field {name!r}; its fields are {sorted(self.manifest.fields)}"
            )

    def read_chunk(self, name: str, c: int) -> np.ndarray:
        """Chunk ``c`` of field ``name``, decoded: shape ``(stop - start, *sample_shape)``.

        Raises FieldNotFoundError, IndexError for ``c`` outside ``range(num_chunks)``,
        CorruptStoreError for a missing or undecodable chunk."""
        self._check_field(name)
        if not 0 <= c < self.num_chunks:
            raise OutOfRangeError(f"chunk {c} out of range: {self.path} has {self.num_chunks} chunks")
        start, stop = self.manifest.chunk_bounds(c)
        return self._open().read_chunk(name, c, start, stop)

    def advise_chunks(self, name: str, chunks: np.ndarray) -> None:
        """Hint the kernel to read these chunks of field ``name`` ahead (asynchronous; a no-op
        where unsupported). Used by the read-ahead of :class:`~oocseq.ChunkedSequence`."""
        self._open().advise_chunks(name, chunks)

    def read_chunk_into(self, name: str, c: int, out: np.ndarray) -> None:
        """Decode chunk ``c`` of field ``name`` into ``out`` (C-contiguous, shape of the chunk),
        in place where the format allows. Raises as :meth:`read_chunk`."""
        self._check_field(name)
        if not 0 <= c < self.num_chunks:
            raise OutOfRangeError(f"chunk {c} out of range: {self.path} has {self.num_chunks} chunks")
        start, stop = self.manifest.chunk_bounds(c)
        if out.shape[0] != stop - start:
            raise ArgumentError(f"chunk {c} of {name!r} has {stop - start} samples, out has {out.shape[0]}")
        self._open().read_chunk_into(name, c, start, stop, out)

    def __getitem__(self, name: str) -> FieldView:
        """A read-only view of field ``name`` that slices like an array."""
        self._check_field(name)
        return FieldView(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.manifest.fields

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.fields)

    def verify(self) -> None:
        """Read every chunk of every field and check it against the manifest's CRC-32.

        Raises CorruptStoreError naming the first field and chunk that fails."""
        for name in self.manifest.fields:
            sums = self.manifest.checksums.get(name)
            for c in range(self.num_chunks):
                chunk = self.read_chunk(name, c)
                if sums is not None and zlib.crc32(chunk.tobytes()) != sums[c]:
                    raise CorruptStoreError(
                        f"{self.path}: chunk {c} of field {name!r} fails its checksum; the store "
                        "is damaged. Ingest it again."
                    )


class FieldView:
    """Read-only array view of one field: ``view[i]``, ``view[a:b]``, ``view[[i, j, ...]]``,
    ``np.asarray(view)`` (reads the whole field). Reads whole chunks."""

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name
        info = store.fields[name]
        self.shape = info.shape
        self.dtype = info.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<oocseq.FieldView {self.name!r} {self.shape} {self.dtype}>"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if key and key[0] is Ellipsis:  # view[..., k] is view[:, ..., k]
            key = (slice(None), *key) if len(key) > 1 else (slice(None),)
        key, rest = (key[0], key[1:]) if key else (slice(None), ())
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -n <= i < n:
                raise OutOfRangeError(f"index {i} out of range for field {self.name!r} of {n} samples")
            out = self._gather(np.array([i % n], dtype=np.int64))[0]
        elif isinstance(key, slice):
            out = self._gather(np.arange(n, dtype=np.int64)[key])
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise OutOfRangeError(
                        f"boolean index of shape {idx.shape}, field {self.name!r} has {n} samples"
                    )
                idx = np.flatnonzero(idx)
            if idx.size == 0:  # np.asarray([]) is float64
                idx = idx.astype(np.int64)
            if idx.dtype.kind not in "iu":
                raise OutOfRangeError(f"cannot index field {self.name!r} with {key!r}")
            idx = idx.astype(np.int64)
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise OutOfRangeError(f"indices out of range for field {self.name!r} of {n} samples")
            out = self._gather(idx % max(n, 1))
        if not rest:
            return out
        # the sample axis is gone after an int key, kept after a slice / index array
        return out[rest] if isinstance(key, (int, np.integer)) else out[(slice(None), *rest)]

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        from ._gather import gather

        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        gather(idx, self.store.chunk_len, lambda c: self.store.read_chunk(self.name, c), out)
        return out


def open_store(path: str | os.PathLike[str]) -> Store:
    """Open the oocseq store at ``path`` (``*.zarr`` directory or ``*.h5``/``*.hdf5`` file).

    Raises StoreNotFoundError, NotAStoreError (not a complete oocseq store, e.g. an interrupted
    ingestion), CorruptStoreError (inconsistent metadata or layout, disallowed codecs)."""
    return Store(path)
