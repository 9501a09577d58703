"""The streaming writer every ingestion goes through.

Samples are appended per field, buffered up to one chunk, and written chunk by chunk, so
memory holds at most one chunk per field. The store is built at a hidden temporary path next
to ``dest`` and renamed into place only after the manifest (written last) says it is complete:
an interrupted ingestion never leaves anything at ``dest`` that opens as a store.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ..checksum import chunk_checksum
from ..errors import ArgumentError, FieldLengthError, InvalidSourceError, StoreExistsError
from ..manifest import ALLOWED_DTYPES, Compression, FieldSpec, Manifest, check_field_name
from ..storage import create_writer, store_format
from ..store import Store

#: Target decoded bytes per chunk of the widest field when ``chunk_len`` is not given. DESIGN.md:
#: chunks of 1-8 MiB are the sweet spot (per-chunk overhead vs. window memory).
TARGET_CHUNK_BYTES = 4 << 20


def choose_chunk_len(
    specs: dict[str, FieldSpec], n: int | None = None, target_bytes: int = TARGET_CHUNK_BYTES
) -> int:
    """Samples per chunk so that the widest field's chunk holds about ``target_bytes``, and no
    more than ``n`` (when known: a chunk longer than the data would be padded on disk)."""
    widest = max((s.sample_nbytes for s in specs.values()), default=1)
    chunk_len = max(1, target_bytes // max(widest, 1))
    return max(1, min(chunk_len, n)) if n else chunk_len


def field_spec(name: str, sample_shape: tuple[int, ...], dtype: Any) -> FieldSpec:
    """Validate one field's sample shape and dtype."""
    check_field_name(name)
    dt = np.dtype(dtype)
    if dt.name not in ALLOWED_DTYPES or dt.byteorder == ">":
        raise InvalidSourceError(
            f"field {name!r} has dtype {dt}; oocseq stores native numeric and bool dtypes "
            f"only ({', '.join(sorted(ALLOWED_DTYPES))}). Convert it first, e.g. .astype('float32')."
        )
    if any(int(s) == 0 for s in sample_shape):
        raise InvalidSourceError(f"field {name!r} has an empty sample shape {tuple(sample_shape)}")
    return FieldSpec(tuple(int(s) for s in sample_shape), dt)


class StoreWriter:
    """Write a new store at ``dest`` from appended samples; use as a context manager.

    Args:
        dest: ``*.zarr`` or ``*.h5``/``*.hdf5``.
        specs: field name -> :class:`FieldSpec`.
        chunk_len: samples per chunk; ``None`` picks about 4 MiB for the widest field, or
            fewer: as many as there are samples, when the data ends before filling one chunk
            (for streams of unknown length).
        compression: ``None``, ``"lz4"``, ``"zstd"``, ``"zlib"`` or a Compression.
        overwrite: replace an existing ``dest``.

    On leaving the ``with`` block normally, :meth:`close` finishes the store (then
    ``writer.store`` is the opened :class:`Store`); on an exception, nothing is left behind.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        specs: dict[str, FieldSpec],
        *,
        chunk_len: int | None = None,
        compression: str | Compression | None = "lz4",
        overwrite: bool = False,
    ) -> None:
        self.dest = Path(dest)
        self.format = store_format(self.dest)
        if not specs:
            raise InvalidSourceError("nothing to ingest: no fields given")
        if self.dest.exists() and not overwrite:
            raise StoreExistsError(f"{self.dest} already exists; pass overwrite=True to replace it")
        self._shrinkable = chunk_len is None  # the fields are created at the first full chunk
        if chunk_len is None:
            chunk_len = choose_chunk_len(specs)
        if not isinstance(chunk_len, int) or isinstance(chunk_len, bool) or chunk_len < 1:
            raise ArgumentError(f"chunk_len must be a positive int, got {chunk_len!r}")
        self.specs = specs
        self.chunk_len = chunk_len
        self.compression = Compression.parse(compression)
        self.overwrite = overwrite
        self.attrs: dict[str, Any] = {}
        self.store: Store | None = None
        self._aux: dict[str, np.ndarray] = {}
        self._tmp = self.dest.with_name(f".{self.dest.name}.{uuid.uuid4().hex[:8]}.partial")
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._backend = create_writer(self._tmp, self.format)
        self._buffers: dict[str, list[np.ndarray]] = {k: [] for k in specs}
        self._buffered = dict.fromkeys(specs, 0)
        self._chunks_done = dict.fromkeys(specs, 0)
        self._checksums: dict[str, list[int]] = {k: [] for k in specs}
        self._created = False
        if not self._shrinkable:
            self._create_fields()

    def _create_fields(self) -> None:
        if not self._created:
            for name, spec in self.specs.items():
                self._backend.create_field(name, spec, self.chunk_len, self.compression)
            self._created = True

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def samples_written(self, name: str) -> int:
        return self._chunks_done[name] * self.chunk_len + self._buffered[name]

    def append(self, name: str, data: Any) -> None:
        """Append samples (an array of shape ``(k, *sample_shape)``) to field ``name``.

        Samples of a dtype that casts safely to the field's (e.g. int16 into int64) are cast;
        raises InvalidSourceError if the shape differs or the dtype does not cast safely."""
        spec = self.specs[name]
        arr = np.asarray(data)
        if arr.ndim == 0:
            raise InvalidSourceError(
                f"field {name!r}: got a scalar batch after {self.samples_written(name)} samples; "
                "batches need a sample axis"
            )
        if arr.shape[1:] != spec.shape:
            raise InvalidSourceError(
                f"field {name!r}: got samples of shape {arr.shape[1:]} after "
                f"{self.samples_written(name)} samples of shape {spec.shape}"
            )
        if arr.dtype != spec.dtype:
            if not np.can_cast(arr.dtype, spec.dtype, "safe"):
                raise InvalidSourceError(
                    f"field {name!r}: got dtype {arr.dtype} after {self.samples_written(name)} "
                    f"samples of dtype {spec.dtype}; give every batch the same dtype"
                )
            arr = arr.astype(spec.dtype)
        while len(arr):
            take = min(len(arr), self.chunk_len - self._buffered[name])
            self._buffers[name].append(np.array(arr[:take], copy=True, order="C"))
            self._buffered[name] += take
            arr = arr[take:]
            if self._buffered[name] == self.chunk_len:
                self._flush(name)

    def _flush(self, name: str) -> None:
        parts = self._buffers[name]
        if not parts:
            return
        self._create_fields()
        chunk = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._backend.write_chunk(name, self._chunks_done[name], self.chunk_len, chunk)
        self._checksums[name].append(chunk_checksum(chunk))
        self._chunks_done[name] += 1
        self._buffers[name] = []
        self._buffered[name] = 0

    def set_aux(self, name: str, values: np.ndarray) -> None:
        """Record a per-sample auxiliary array (e.g. ``"source"``: where each sample came from)."""
        self._aux[name] = np.asarray(values)

    def close(self) -> Store:
        """Flush, check that every field has the same length, write the manifest, rename the
        store into place and open it. Raises FieldLengthError (and removes the partial store)."""
        if self.store is not None:
            return self.store
        try:
            lengths = {k: self.samples_written(k) for k in self.specs}
            if len(set(lengths.values())) > 1:
                raise FieldLengthError(
                    "fields have different numbers of samples: "
                    + ", ".join(f"{k}={v}" for k, v in lengths.items())
                    + "; every field needs one entry per sample"
                )
            n = next(iter(lengths.values()))
            for name, values in self._aux.items():
                if len(values) != n:
                    raise FieldLengthError(
                        f"auxiliary array {name!r} has {len(values)} entries for {n} samples"
                    )
            if not self._created and n < self.chunk_len:
                # A stream shorter than one chunk: one chunk of exactly its samples (a smaller
                # store, and one that world_size ranks can share when n >= world_size).
                self.chunk_len = max(1, n)
            self._create_fields()
            for name in self.specs:
                self._flush(name)
            for name, values in self._aux.items():
                self._backend.write_aux(name, values)
            manifest = Manifest(
                n=n,
                chunk_len=self.chunk_len,
                fields=self.specs,
                compression=self.compression,
                checksums=self._checksums,
                attrs=_jsonable(self.attrs),
                aux=tuple(self._aux),
            )
            self._backend.finalize(n, manifest.to_json())
            self._backend.close()
            if self.dest.exists():  # overwrite=True was checked in __init__
                _remove(self.dest)
            os.replace(self._tmp, self.dest)
        except BaseException:
            self.abort()
            raise
        self.store = Store(self.dest)
        return self.store

    def abort(self) -> None:
        """Drop the partial store."""
        try:
            self._backend.close()
        except Exception:
            pass
        _remove(self._tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays in metadata to plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
