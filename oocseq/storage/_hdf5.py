"""HDF5 files, through h5py (Blosc filters from hdf5plugin)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np
from h5py._objects import phil as _h5py_lock  # the lock h5py's own calls take

from ..errors import CorruptStoreError, NotAStoreError
from ..manifest import ATTR_KEY, AUX_GROUP, Compression, FieldSpec
from ._base import StorageReader, StorageWriter
from ._commit import start_writeback
from ._raw import (
    BLOSC_MAX_OVERHEAD,
    SCATTER_MIN_BYTES,
    SYSTEM_ERRNOS,
    Handles,
    aligned_empty,
    blosc_decode_into,
    in_page_cache,
    os_error,
    read_exactly_into,
    read_scattered,
    read_scratch,
    serve,
)

_BLOSC_FILTER = 32001
#: The name netCDF-4 gives a dimension scale that is a dimension only (not a variable).
_NETCDF_DIM_ONLY = "This is a netCDF dimension but not a netCDF variable.%10d"
#: Blosc compressor codes in the filter's parameters (hdf5plugin / c-blosc).
_BLOSC_CODES = {"blosclz": 0, "lz4": 1, "lz4hc": 2, "snappy": 3, "zlib": 4, "zstd": 5}


class HDF5Reader(StorageReader):
    """Reads an HDF5 store.

    The file is opened once, by h5py; the fast path reads chunk bytes with ``pread`` from a
    duplicate of h5py's own file descriptor, so the chunk table and the bytes always come from
    the same file. Fields and auxiliary arrays must be plain datasets of this file: external
    and soft links, virtual datasets and external raw storage are refused."""

    format = "hdf5"

    def __init__(self, path: Path, fast: bool = True) -> None:
        super().__init__(path, fast)
        self._handles = Handles(self)
        try:
            self._file = self._handles.add(h5py.File(path, "r"))
        except OSError as e:
            if e.errno in SYSTEM_ERRNOS:
                raise os_error(e, str(path)) from None
            raise NotAStoreError(f"{path} is not an HDF5 file ({e})") from None
        if self._file.driver != "sec2":
            raise NotAStoreError(f"{path}: HDF5 driver {self._file.driver!r}, expected 'sec2'")
        # Opened now, not lazily: read-ahead hints and decodes come from several threads.
        self._fd = self._handles.add_fd(os.dup(self._file.id.get_vfd_handle()))
        self._size = os.fstat(self._fd).st_size
        self._datasets: dict[str, Any] = {}
        self._chunk_tables: dict[str, _ChunkTable] = {}
        self._lock = threading.Lock()

    def manifest_doc(self) -> Any:
        raw = self._file.attrs.get(ATTR_KEY)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (TypeError, ValueError) as e:
            raise CorruptStoreError(f"{self.path}: manifest is not valid JSON ({e})") from None

    def _dataset(self, name: str) -> Any:
        ds = self._datasets.get(name)
        if ds is None:
            group = self._file
            parts = name.split("/")
            for i, part in enumerate(parts):
                link = group.get(part, getlink=True) if isinstance(group, h5py.Group) else None
                if link is None:
                    raise CorruptStoreError(f"{self.path}: dataset {name!r} is missing")
                if not isinstance(link, h5py.HardLink):
                    raise CorruptStoreError(
                        f"{self.path}: {'/'.join(parts[: i + 1])!r} is a {type(link).__name__}; "
                        "oocseq reads only datasets stored in the file itself"
                    )
                group = group[part]
            ds = group
            if not isinstance(ds, h5py.Dataset):
                raise CorruptStoreError(f"{self.path}: {name!r} is not a dataset")
            if ds.is_virtual or ds.external:
                raise CorruptStoreError(
                    f"{self.path}: dataset {name!r} is {'virtual' if ds.is_virtual else 'stored in external files'}; "
                    "oocseq reads only datasets stored in the file itself"
                )
            self._datasets[name] = ds
        return ds

    def check_layout(
        self, name: str, n: int, chunk_len: int, spec: FieldSpec, compression: Compression | None = None
    ) -> None:
        ds = self._dataset(name)
        where = f"{self.path}: field {name!r}"
        if ds.shape != (n, *spec.sample_shape) or ds.dtype != spec.dtype:
            raise CorruptStoreError(
                f"{where} is {ds.shape} {ds.dtype}, the manifest says {(n, *spec.sample_shape)} {spec.dtype}"
            )
        if (
            ds.chunks != (chunk_len, *spec.sample_shape)
            or ds.id.get_create_plist().get_layout() != h5py.h5d.CHUNKED
        ):
            raise CorruptStoreError(
                f"{where}: chunks {ds.chunks}, expected {(chunk_len, *spec.sample_shape)}"
            )
        if not np.little_endian or ds.dtype.byteorder not in "=|<":
            raise CorruptStoreError(
                f"{where}: oocseq reads little-endian data on little-endian machines only"
            )
        filters = _filters(ds)
        if compression is None:
            if filters:
                raise CorruptStoreError(
                    f"{where}: HDF5 filters {[f[0] for f in filters]}; the manifest says no compression"
                )
            return
        if [f[0] for f in filters] != [_BLOSC_FILTER]:
            raise CorruptStoreError(
                f"{where}: HDF5 filters {[f[0] for f in filters]} are not allowed; oocseq writes "
                f"one Blosc filter ({_BLOSC_FILTER})"
            )
        params = tuple(filters[0][2])
        chunk_bytes = chunk_len * spec.sample_nbytes
        ok = (
            len(params) == 7
            and params[2] == spec.dtype.itemsize
            and params[3] == chunk_bytes
            and params[4] in range(10)
            and params[5] == 1  # byte shuffle
            and params[6] == _BLOSC_CODES[compression.cname]
        )
        if not ok:
            raise CorruptStoreError(
                f"{where}: Blosc filter parameters {params}, expected typesize {spec.dtype.itemsize}, "
                f"{chunk_bytes} bytes, byte shuffle and compressor {compression.cname!r}"
            )

    def _table(self, name: str) -> _ChunkTable:
        table = self._chunk_tables.get(name)
        if table is None:
            with self._lock:  # h5py holds its own lock; this one keeps one table per field
                table = self._chunk_tables.get(name)
                if table is None:
                    table = self._chunk_tables[name] = _ChunkTable(self._dataset(name))
        return table

    def advise_chunks(self, name: str, chunks: np.ndarray) -> None:
        if not self.fast or not hasattr(os, "posix_fadvise"):
            return
        table = self._table(name)
        for c in chunks.tolist():
            offset, size, _ = table.lookup(c * table.chunk_len)
            if offset >= 0 and not in_page_cache(self._fd, offset, size):
                os.posix_fadvise(self._fd, offset, size, os.POSIX_FADV_WILLNEED)

    def read_chunk_fast(
        self, name: str, c: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        table = self._table(name)
        where = f"{self.path}: chunk {c} of field {name!r}"
        offset, size, skipped_filter = table.lookup(start)
        if offset < 0:
            raise CorruptStoreError(
                f"{where} is missing; the store is incomplete or damaged. Ingest it again."
            )
        if offset + size > self._size:
            raise CorruptStoreError(
                f"{where}: chunk at bytes {offset}..{offset + size} lies outside the file"
            )
        shape, nbytes = table.shape, table.nbytes  # HDF5 stores whole chunks, the last one padded
        # Decoded straight into the window buffer when the chunk fills it.
        chunk = out if out is not None and stop - start == shape[0] else aligned_empty(shape, table.dtype)
        if table.blosc and not skipped_filter:
            if size > nbytes + BLOSC_MAX_OVERHEAD:
                raise CorruptStoreError(
                    f"{where}: compressed chunk has {size} bytes, more than the {nbytes} bytes it "
                    "decodes to plus the Blosc header"
                )
            blosc_decode_into(read_scratch(self._fd, offset, size, where), chunk, where)
        else:
            if size != nbytes:
                raise CorruptStoreError(f"{where}: stored chunk has {size} bytes, expected {nbytes}")
            read_exactly_into(self._fd, offset, chunk, where)  # one kernel copy
        return serve(chunk, out, stop - start)

    def read_chunk_scattered(
        self, name: str, c: int, start: int, stop: int, out: np.ndarray, positions: np.ndarray
    ) -> bool:
        if not self.fast:
            return False
        table = self._table(name)
        if table.sample_nbytes < SCATTER_MIN_BYTES:
            return False
        offset, size, skipped_filter = table.lookup(start)
        if offset < 0 or (table.blosc and not skipped_filter):
            return False  # (a missing chunk is reported by the usual read)
        nbytes = table.nbytes  # whole chunks, the last one padded
        where = f"{self.path}: chunk {c} of field {name!r}"
        if size != nbytes:
            raise CorruptStoreError(f"{where}: stored chunk has {size} bytes, expected {nbytes}")
        if offset + size > self._size:
            raise CorruptStoreError(
                f"{where}: chunk at bytes {offset}..{offset + size} lies outside the file"
            )
        read_scattered(self._fd, offset, out, positions, where)
        return True

    def read_chunk_library(self, name: str, c: int, start: int, stop: int) -> np.ndarray:
        ds = self._dataset(name)
        # HDF5 returns the fill value for an unallocated chunk; that is corruption here.
        info = ds.id.get_chunk_info_by_coord((start,) + (0,) * (ds.ndim - 1))
        if info.byte_offset is None:
            raise CorruptStoreError(
                f"{self.path}: chunk {c} of field {name!r} is missing; the store is incomplete "
                "or damaged. Ingest it again."
            )
        out = np.empty((stop - start, *ds.shape[1:]), dtype=ds.dtype)
        try:
            if len(out):
                ds.read_direct(out, np.s_[start:stop])
        except Exception as e:
            raise CorruptStoreError(f"{self.path}: cannot decode chunk {c} of field {name!r}: {e}") from e
        return out

    def read_aux(self, name: str) -> np.ndarray:
        ds = self._dataset(f"{AUX_GROUP}/{name}")
        if ds.id.get_create_plist().get_nfilters():
            raise CorruptStoreError(f"{self.path}: auxiliary array {name!r} has filters; oocseq writes none")
        if h5py.check_string_dtype(ds.dtype) is not None:
            return np.asarray(ds.asstr()[...], dtype=str)
        return np.asarray(ds[...])

    def stored_nbytes(self, name: str) -> int:
        return int(self._dataset(name).id.get_storage_size())

    def close(self) -> None:
        self._datasets.clear()
        self._chunk_tables.clear()
        self._handles.close()


class _ChunkTable:
    """Byte offset, stored size and filter mask of every chunk of a dataset chunked along
    axis 0 only, read once with ``H5Dchunk_iter`` (one pass over the chunk index)."""

    def __init__(self, ds: Any) -> None:
        num = -(-ds.shape[0] // ds.chunks[0]) if ds.shape[0] else 0
        self.chunk_len = ds.chunks[0]
        # A chunk's shape as stored (whole chunks, the last one padded) and its dtype, asked
        # of h5py once: its properties cost ~10 us a call, several a chunk.
        self.shape: tuple[int, ...] = (ds.chunks[0], *ds.shape[1:])
        self.dtype = ds.dtype
        self.sample_nbytes = math.prod(ds.shape[1:]) * ds.dtype.itemsize
        self.nbytes = self.chunk_len * self.sample_nbytes
        self.offsets = np.full(num, -1, dtype=np.int64)
        self.sizes = np.zeros(num, dtype=np.int64)
        self.masks = np.zeros(num, dtype=np.int64)
        self.blosc = _BLOSC_FILTER in [f[0] for f in _filters(ds)]

        def visit(info: Any) -> None:
            c = info.chunk_offset[0] // self.chunk_len
            if 0 <= c < num:
                self.offsets[c], self.sizes[c], self.masks[c] = info.byte_offset, info.size, info.filter_mask

        if num:
            ds.id.chunk_iter(visit)

    def lookup(self, start: int) -> tuple[int, int, bool]:
        """``(offset, size, filter_skipped)`` of the chunk holding sample ``start``; offset -1 if missing."""
        c = start // self.chunk_len
        return int(self.offsets[c]), int(self.sizes[c]), bool(self.masks[c] & 1)


def _filters(ds: Any) -> list[tuple[Any, ...]]:
    plist = ds.id.get_create_plist()
    return [plist.get_filter(i) for i in range(plist.get_nfilters())]


#: Bytes of chunks written between two writeback hints.
_WRITEBACK_BYTES = 16 << 20


class HDF5Writer(StorageWriter):
    def __init__(self, path: Path, resume: bool = False) -> None:
        super().__init__(path)
        self._file = h5py.File(path, "r+" if resume else "w-")
        self._datasets: dict[str, Any] = {}
        # Per field: (chunk offset's trailing zeros, filter mask of a raw chunk), asked of HDF5
        # once (each ask costs a dataspace or property-list round trip).
        self._direct: dict[str, tuple[tuple[int, ...], int]] = {}
        self._unsynced = 0  # bytes written since the last writeback hint

    def reopen_field(self, name: str) -> None:
        ds = self._file[name]
        if not isinstance(ds, h5py.Dataset):
            raise KeyError(name)
        self._datasets[name] = ds

    def flush(self) -> None:
        with self._failing():
            self._file.flush()

    def create_field(
        self, name: str, spec: FieldSpec, chunk_len: int, compression: Compression | None
    ) -> None:
        kwargs: dict[str, Any] = {}
        if compression is not None:
            kwargs.update(
                hdf5plugin.Blosc(
                    cname=compression.cname,  # type: ignore[arg-type]  # checked by Compression
                    clevel=compression.clevel,
                    shuffle=hdf5plugin.Blosc.SHUFFLE,
                )
            )
        self._datasets[name] = self._file.create_dataset(
            name,
            shape=(0, *spec.sample_shape),
            maxshape=(None, *spec.sample_shape),
            chunks=(chunk_len, *spec.sample_shape),
            dtype=spec.dtype,
            **kwargs,
        )

    def write_chunk(self, name: str, c: int, chunk_len: int, data: np.ndarray) -> None:
        ds = self._datasets[name]
        start = c * chunk_len
        stop = start + len(data)
        with self._failing():
            if ds.shape[0] < stop:
                ds.resize(max(stop, 2 * ds.shape[0]), axis=0)
            ds[start:stop] = data

    def reserve(self, name: str, stop: int) -> None:
        ds = self._datasets[name]
        # Grown exactly to the samples written (never past them, trimmed later): shrinking
        # across a chunk written with write_direct_chunk makes HDF5 read it back through the
        # filter, ignoring its filter mask (HDF5 1.14), which fails for an unfiltered chunk.
        with self._failing():
            if ds.shape[0] < stop:
                ds.resize(stop, axis=0)

    def write_encoded(self, name: str, c: int, chunk_len: int, payload: bytes, raw: bool) -> None:
        ds = self._datasets[name]
        if name not in self._direct:
            # Filter mask bit 0: the (only) filter, Blosc, was skipped for a raw chunk.
            self._direct[name] = ((0,) * (ds.ndim - 1), 1 if ds.id.get_create_plist().get_nfilters() else 0)
        tail, raw_mask = self._direct[name]
        # h5py runs this one call without its global lock (its other calls take it): another
        # thread freeing an h5py object meanwhile (the garbage collector in an encoding thread,
        # the user's own threads) would run HDF5, which is not thread-safe, at the same time,
        # and the write fails ("Unspecified error in H5Dwrite_chunk"). Under the lock it waits.
        with _h5py_lock, self._failing():
            ds.id.write_direct_chunk((c * chunk_len, *tail), payload, raw_mask if raw else 0)
        self._unsynced += len(payload)
        if self._unsynced >= _WRITEBACK_BYTES:
            # Chunk data goes to the file as written (HDF5's sec2 driver): start its writeback
            # now, so that the commit's fsync finds it on its way.
            self._unsynced = 0
            with contextlib.suppress(OSError, RuntimeError, ValueError):  # a driver without a descriptor
                start_writeback(self._file.id.get_vfd_handle())

    def write_aux(self, name: str, values: np.ndarray) -> None:
        if f"{AUX_GROUP}/{name}" in self._file:  # a resumed ingestion may have written it before
            del self._file[f"{AUX_GROUP}/{name}"]
        if values.dtype.kind in "US":
            values = np.asarray(values, dtype=object)
            self._file.create_dataset(f"{AUX_GROUP}/{name}", data=values, dtype=h5py.string_dtype())
        else:
            self._file.create_dataset(f"{AUX_GROUP}/{name}", data=values)

    def finalize(self, n: int, manifest_doc: dict[str, Any]) -> None:
        for ds in self._datasets.values():
            if ds.shape[0] != n:
                ds.resize(n, axis=0)
        with self._failing():
            self._attach_dimension_scales(n, manifest_doc)
        self._file.attrs[ATTR_KEY] = json.dumps(manifest_doc)
        with self._failing():
            self._file.flush()

    def _attach_dimension_scales(self, n: int, manifest_doc: dict[str, Any]) -> None:
        """Name every axis of every field with a netCDF-4 dimension (an empty dimension-scale
        dataset at the root, named after the dimension), so that xarray opens the file with
        ``engine="h5netcdf"``. No data is written for them (no storage is allocated)."""
        for name, spec in manifest_doc["fields"].items():
            dims = spec.get("dims")
            if not dims:
                continue
            ds = self._file[name]
            for axis, (dim, size) in enumerate(zip(dims, [n, *spec["shape"]], strict=True)):
                scale = self._file.get(dim)  # a resumed ingestion may have made it before
                if scale is not None and not (
                    isinstance(scale, h5py.Dataset)
                    and h5py.h5ds.is_scale(scale.id)
                    and scale.shape == (size,)
                ):
                    del self._file[dim]  # made by a run killed halfway through
                    scale = None
                if scale is None:
                    scale = self._file.create_dataset(dim, shape=(size,), dtype="f4")
                    scale.make_scale(_NETCDF_DIM_ONLY % size)
                if not h5py.h5ds.is_attached(ds.id, scale.id, axis):
                    ds.dims[axis].attach_scale(scale)

    def close(self) -> None:
        self._datasets.clear()
        with self._failing():
            self._file.close()

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """Raise a failed write as OSError (h5py reports a full disk while flushing as
        RuntimeError), after emptying the file: once a write failed, the store is discarded,
        and h5py can neither flush nor close it until there is space again (and forcing its
        id closed crashes the interpreter: h5py 3.14, HDF5 1.14)."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)
            if isinstance(e, OSError):
                raise
            m = re.search(r"errno = (\d+)", str(e))
            code = int(m.group(1)) if m else errno.EIO
            raise OSError(code, f"{os.strerror(code)} ({str(e).splitlines()[0]})") from e

    def discard(self) -> None:
        # After ENOSPC, h5py can neither flush nor close the file, and forcing its id closed
        # crashes the interpreter (h5py 3.14, HDF5 1.14). Emptying the file first frees its
        # space, after which the close's flush succeeds.
        self._datasets.clear()
        with contextlib.suppress(OSError):
            os.truncate(self.path, 0)
        with contextlib.suppress(Exception):
            self._file.close()
