"""Zarr v3 directory stores, through zarr-python 3."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..errors import CorruptStoreError
from ..manifest import ATTR_KEY, AUX_GROUP, Compression, FieldSpec
from ._base import StorageReader, StorageWriter
from ._raw import _into, blosc_decode_into, map_whole_file, read_file_into, read_whole_file

# Codecs a store may use. Anything else (notably numcodecs.pickle, which runs arbitrary code
# when decoding) is refused before zarr ever decodes a chunk.
_ALLOWED_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "vlen-utf8"})


class ZarrReader(StorageReader):
    format = "zarr"

    def __init__(self, path: Path, fast: bool = True) -> None:
        super().__init__(path, fast)
        self._group = zarr.open_group(str(path), mode="r")
        self._arrays: dict[str, Any] = {}
        self._fast_kind: dict[str, str | None] = {}

    def manifest_doc(self) -> Any:
        return self._group.attrs.asdict().get(ATTR_KEY)

    def _array(self, name: str) -> Any:
        arr = self._arrays.get(name)
        if arr is None:
            try:
                arr = self._group[name]
            except KeyError:
                raise CorruptStoreError(f"{self.path}: array {name!r} is missing") from None
            except Exception as e:  # unknown codec / data type, malformed zarr.json ...
                raise CorruptStoreError(
                    f"{self.path}: array {name!r} has invalid or unsupported metadata: {e}"
                ) from None
            if not isinstance(arr, zarr.Array):
                raise CorruptStoreError(f"{self.path}: {name!r} is not an array")
            _check_codecs(arr, f"{self.path}/{name}")
            self._arrays[name] = arr
        return arr

    def check_layout(self, name: str, n: int, chunk_len: int, spec: FieldSpec) -> None:
        arr = self._array(name)
        where = f"{self.path}: field {name!r}"
        if arr.shape != (n, *spec.shape) or arr.dtype != spec.dtype:
            raise CorruptStoreError(
                f"{where} is {arr.shape} {arr.dtype}, the manifest says {(n, *spec.shape)} {spec.dtype}"
            )
        if tuple(arr.chunks) != (chunk_len, *spec.shape) and not (n == 0 or 0 in spec.shape):
            raise CorruptStoreError(f"{where}: chunks {arr.chunks}, expected {(chunk_len, *spec.shape)}")
        enc = arr.metadata.chunk_key_encoding
        if getattr(enc, "name", None) != "default" or getattr(enc, "separator", None) != "/":
            raise CorruptStoreError(f"{where}: unsupported chunk key encoding {enc!r}")

    def _chunk_file(self, name: str, c: int, ndim: int) -> Path:
        # zarr returns the fill value for a missing chunk file; a missing chunk is corruption.
        key = self.path / name / "c" / str(c)
        for _ in range(ndim - 1):
            key = key / "0"
        if not key.is_file():
            raise CorruptStoreError(
                f"{self.path}: chunk {c} of field {name!r} is missing ({key}); the store is "
                "incomplete or damaged. Ingest it again."
            )
        return key

    def _kind(self, name: str) -> str | None:
        """``"blosc"`` or ``"raw"`` when the chunk files hold a Blosc frame or the plain
        little-endian bytes of a whole chunk; ``None`` for anything else."""
        if name not in self._fast_kind:
            arr = self._array(name)
            codecs = [c.to_dict() for c in arr.metadata.codecs]
            kind: str | None = None
            if codecs and codecs[0]["name"] == "bytes" and arr.dtype.byteorder in "=|<":
                endian = (codecs[0].get("configuration") or {}).get("endian", "little")
                rest = [c["name"] for c in codecs[1:]]
                if endian == "little" and np.little_endian:
                    kind = "raw" if not rest else "blosc" if rest == ["blosc"] else None
            self._fast_kind[name] = kind
        return self._fast_kind[name]

    def advise_chunks(self, name: str, chunks: np.ndarray) -> None:
        if not self.fast or not hasattr(os, "posix_fadvise"):
            return
        ndim = self._array(name).ndim
        for c in chunks.tolist():
            try:
                fd = os.open(self._chunk_file(name, c, ndim), os.O_RDONLY)
            except (OSError, CorruptStoreError):
                continue  # a missing chunk is reported when it is read
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read_chunk_fast(
        self, name: str, c: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        kind = self._kind(name)
        if kind is None:
            return None
        arr = self._array(name)
        path = self._chunk_file(name, c, arr.ndim)
        shape = (arr.chunks[0], *arr.shape[1:])  # files hold whole chunks, the last one padded
        where = f"{self.path}: chunk {c} of field {name!r} ({path})"
        if kind == "raw" and out is not None and stop - start == shape[0]:
            read_file_into(path, out, where)  # one kernel copy into the window buffer
            return out
        if kind == "raw":
            nbytes = int(np.prod(shape)) * arr.dtype.itemsize
            chunk = np.frombuffer(map_whole_file(path, nbytes, where), dtype=arr.dtype).reshape(shape)
            return _into(chunk[: stop - start], out)
        if out is not None and stop - start == shape[0]:
            blosc_decode_into(read_whole_file(path), out, where)  # straight into the window buffer
            return out
        chunk = np.empty(shape, dtype=arr.dtype)
        blosc_decode_into(read_whole_file(path), chunk, where)
        return _into(chunk[: stop - start], out)

    def read_chunk_library(self, name: str, c: int, start: int, stop: int) -> np.ndarray:
        arr = self._array(name)
        key = self._chunk_file(name, c, arr.ndim)
        try:
            return np.ascontiguousarray(arr[start:stop])
        except Exception as e:  # a decoding failure is a damaged chunk file
            raise CorruptStoreError(
                f"{self.path}: cannot decode chunk {c} of field {name!r} ({key}): {e}"
            ) from e

    def read_aux(self, name: str) -> np.ndarray:
        return np.asarray(self._array(f"{AUX_GROUP}/{name}")[...])

    def stored_nbytes(self, name: str) -> int:
        root = self.path / name / "c"
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0

    def close(self) -> None:
        self._arrays.clear()


def _check_codecs(arr: Any, where: str) -> None:
    meta = arr.metadata
    codecs = [c.to_dict()["name"] for c in getattr(meta, "codecs", ())]
    if getattr(meta, "zarr_format", 3) != 3:
        raise CorruptStoreError(f"{where}: not a Zarr v3 array")
    bad = [c for c in codecs if c not in _ALLOWED_CODECS]
    if bad:
        raise CorruptStoreError(f"{where}: codecs {bad} are not allowed (allowed: {sorted(_ALLOWED_CODECS)})")


class ZarrWriter(StorageWriter):
    def __init__(self, path: Path, resume: bool = False) -> None:
        super().__init__(path)
        self._group = zarr.open_group(str(path), mode="r+" if resume else "w-")
        self._arrays: dict[str, Any] = {}

    def reopen_field(self, name: str) -> None:
        arr = self._group[name]
        if not isinstance(arr, zarr.Array):
            raise KeyError(name)
        # As at creation: every chunk is written, also one equal to the fill value.
        self._arrays[name] = arr.with_config({"write_empty_chunks": True})

    def create_field(
        self, name: str, spec: FieldSpec, chunk_len: int, compression: Compression | None
    ) -> None:
        compressors = (
            None
            if compression is None
            else zarr.codecs.BloscCodec(cname=compression.cname, clevel=compression.clevel, shuffle="shuffle")
        )
        self._arrays[name] = self._group.create_array(
            name,
            shape=(0, *spec.shape),
            chunks=(chunk_len, *spec.shape),
            dtype=spec.dtype,
            compressors=compressors,
            fill_value=0,
            # zarr skips chunks equal to the fill value by default; oocseq treats a missing
            # chunk as corruption, so every chunk is written.
            config={"write_empty_chunks": True},
        )

    def write_chunk(self, name: str, c: int, chunk_len: int, data: np.ndarray) -> None:
        arr = self._arrays[name]
        start = c * chunk_len
        stop = start + len(data)
        if arr.shape[0] < stop:
            arr.resize((max(stop, 2 * arr.shape[0]), *arr.shape[1:]))
        arr[start:stop] = data

    def write_aux(self, name: str, values: np.ndarray) -> None:
        dtype: Any = str if values.dtype.kind in "US" else values.dtype
        chunks = (max(1, min(len(values), 65536)),)
        arr = self._group.create_array(
            f"{AUX_GROUP}/{name}",
            shape=values.shape,
            chunks=chunks,
            dtype=dtype,
            config={"write_empty_chunks": True},
            overwrite=True,  # a resumed ingestion may have written it before
        )
        if len(values):
            arr[...] = values

    def finalize(self, n: int, manifest_doc: dict[str, Any]) -> None:
        for name, arr in self._arrays.items():
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
            # A process killed inside an earlier finalize of a resumed ingestion may have left
            # chunks past the end (resize writes the shape before deleting them).
            num = -(-n // arr.chunks[0])
            chunk_dir = self.path / name / "c"
            if chunk_dir.is_dir():
                for entry in os.listdir(chunk_dir):
                    if entry.isdigit() and int(entry) >= num:
                        shutil.rmtree(chunk_dir / entry, ignore_errors=True)
        self._group.attrs[ATTR_KEY] = manifest_doc

    def close(self) -> None:
        self._arrays.clear()
