"""Zarr v3 directory stores, through zarr-python 3."""

from __future__ import annotations

import errno
import math
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ..errors import CorruptStoreError, NotAStoreError
from ..manifest import ATTR_KEY, AUX_GROUP, Compression, FieldSpec
from ._base import StorageReader, StorageWriter
from ._commit import start_writeback
from ._raw import (
    BLOSC_HEADER,
    BLOSC_MAX_OVERHEAD,
    SCATTER_MIN_BYTES,
    SYSTEM_ERRNOS,
    Handles,
    OpenFiles,
    Where,
    aligned_empty,
    blosc_decode_into,
    blosc_header,
    in_page_cache,
    open_beneath,
    open_sized_beneath,
    os_error,
    read_exactly,
    read_exactly_into,
    read_scattered,
    read_scratch,
    serve,
)

#: Codecs of auxiliary arrays (per-sample sources: variable-length strings, zstd as zarr
#: writes them). Fields allow exactly what oocseq writes: see :func:`_check_field_codecs`.
_AUX_CODECS = (["vlen-utf8", "zstd"], ["vlen-utf8"], ["bytes", "zstd"], ["bytes"])


#: Chunk files advise_chunks keeps open for their reads, at most (the oldest closed first):
#: several windows' worth.
_ADVISED_FILES = 64

#: Bytes one auxiliary string (a source path) may take, decoded, with its length prefix.
_MAX_AUX_STR_BYTES = 4 + 65536


def zstd_content_size(head: bytes) -> int | None:
    """The decoded size a zstd frame's header states (``None`` if it states none or ``head``
    is no zstd frame): read before decompressing, so that a small frame cannot inflate to an
    unbounded size."""
    if len(head) < 5 or head[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = head[4]
    fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(head) < pos + width:
        return None
    value = int.from_bytes(head[pos : pos + width], "little")
    return value + 256 if width == 2 else value


class ZarrReader(StorageReader):
    """Reads a Zarr v3 directory store.

    The store's directory is opened once; zarr reads its metadata through that open directory
    (``/proc/self/fd/N`` where there is one) and chunk files are opened relative to it without
    following links (one ``openat2`` call where the kernel has it, else one path component at a
    time with ``O_NOFOLLOW``): a symbolic link anywhere below the store's root is refused, and a
    store replaced on disk after it was opened is never mixed with this one. A chunk file
    opened for a read-ahead hint is kept open for the read that follows, which then reads the
    file as it was when the hint opened it (checked then: no link, a regular file; its size
    then), not whatever has taken its name since."""

    format = "zarr"

    def __init__(self, path: Path, fast: bool = True) -> None:
        super().__init__(path, fast)
        self._handles = Handles(self)
        try:
            self._root = self._handles.add_fd(os.open(path, os.O_RDONLY | os.O_DIRECTORY))
        except OSError as e:
            if e.errno in SYSTEM_ERRNOS:
                raise os_error(e, str(path)) from None
            raise NotAStoreError(f"{path} is not a Zarr store directory ({e.strerror})") from None
        pinned = f"/proc/self/fd/{self._root}"
        try:
            # Each array's own zarr.json is read, never the copy consolidated into the root's
            # (written for xarray): one description of each array, checked below.
            self._group = zarr.open_group(
                pinned if os.path.isdir(pinned) else str(path), mode="r", use_consolidated=False
            )
        except Exception as e:
            self._handles.close()
            system = _system_error(e)
            if system is not None:  # e.g. too many open files: the system's refusal, not the store's
                raise os_error(system, str(path)) from None
            raise NotAStoreError(f"{path} is not a readable zarr store: {e}") from None
        self._arrays: dict[str, Any] = {}
        self._chunk_dirs: dict[str, int] = {}
        self._kinds: dict[str, str] = {}
        self._ndims: dict[str, int] = {}
        self._chunk_layouts: dict[str, tuple[tuple[int, ...], int, np.dtype[Any]]] = {}
        self._lock = threading.Lock()
        #: Chunk files opened by advise_chunks, for the reads that follow.
        self._advised = self._handles.add(OpenFiles(_ADVISED_FILES))

    def manifest_doc(self) -> Any:
        self._no_link("zarr.json", missing=f"{self.path}: not a Zarr v3 store (no zarr.json)")
        return self._group.attrs.asdict().get(ATTR_KEY)

    def _no_link(self, *parts: str, missing: str) -> None:
        """Refuse a metadata file reached through a symbolic link below the store's root;
        ``missing``: the message if it does not exist."""
        try:
            fd = open_beneath(self._root, list(parts), f"{self.path}/{'/'.join(parts)}")
        except CorruptStoreError as e:
            if isinstance(e.__context__, OSError) and e.__context__.errno in (errno.ENOENT, errno.ENOTDIR):
                raise CorruptStoreError(missing) from None
            raise
        os.close(fd)

    def _array(self, name: str) -> Any:
        arr = self._arrays.get(name)
        if arr is None:
            self._no_link(*name.split("/"), "zarr.json", missing=f"{self.path}: array {name!r} is missing")
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
            if getattr(arr.metadata, "zarr_format", 3) != 3:
                raise CorruptStoreError(f"{self.path}/{name}: not a Zarr v3 array")
            if name.startswith(AUX_GROUP + "/"):
                codecs = [c.to_dict()["name"] for c in getattr(arr.metadata, "codecs", ())]
                if codecs not in _AUX_CODECS:
                    raise CorruptStoreError(f"{self.path}/{name}: codecs {codecs} are not allowed")
            self._arrays[name] = arr
        return arr

    def check_layout(
        self, name: str, n: int, chunk_len: int, spec: FieldSpec, compression: Compression | None = None
    ) -> None:
        where = f"{self.path}: field {name!r}"
        self._kinds[name] = check_field_layout(self._array(name), n, chunk_len, spec, compression, where)

    def _chunk_dir(self, name: str) -> int:
        """An open fd of the field's ``c`` directory (links refused)."""
        fd = self._chunk_dirs.get(name)
        if fd is None:
            with self._lock:
                fd = self._chunk_dirs.get(name)
                if fd is None:
                    where = f"{self.path}: chunks of field {name!r} ({self.path / name / 'c'})"
                    fd = self._open_dir(self._root, [*name.split("/"), "c"], where)
                    self._chunk_dirs[name] = self._handles.add_fd(fd)
        return fd

    @staticmethod
    def _open_dir(dir_fd: int, parts: list[str], where: str) -> int:
        cur = dir_fd
        try:
            for part in parts:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
                if cur != dir_fd:
                    os.close(cur)
                cur = nxt
        except OSError as e:
            if cur != dir_fd:
                os.close(cur)
            raise os_error(e, where) from None
        return cur

    def chunk_location(self, name: str, c: int) -> str:
        return str(self.path / name / "c" / "/".join(self._chunk_parts(name, c)))

    def _chunk_parts(self, name: str, c: int) -> list[str]:
        """Chunk ``c``'s file, as path components below the field's ``c`` directory."""
        ndim = self._ndims.get(name)
        if ndim is None:
            ndim = self._ndims[name] = self._array(name).ndim
        return [str(c)] + ["0"] * (ndim - 1)

    def _chunk_words(self, name: str, c: int) -> str:
        return f"{self.path}: chunk {c} of field {name!r} ({self.chunk_location(name, c)})"

    def _open_chunk(self, name: str, c: int) -> tuple[int, int, Where]:
        """``(fd, size, where)`` of chunk ``c``'s file, opened without following links (or
        by :meth:`advise_chunks` before). A missing chunk file is corruption (zarr would serve
        the fill value)."""
        where = Where(self._chunk_words, name, c)
        opened = self._advised.take((name, c))
        if opened is not None:
            return opened[0], opened[1], where
        try:
            fd, size = open_sized_beneath(self._chunk_dir(name), self._chunk_parts(name, c), where)
        except CorruptStoreError as e:
            if "missing" in str(e):
                raise CorruptStoreError(
                    f"{where} is missing; the store is incomplete or damaged. Ingest it again."
                ) from None
            raise
        return fd, size, where

    def advise_chunks(self, name: str, chunks: np.ndarray) -> None:
        if not self.fast or not hasattr(os, "posix_fadvise"):
            return
        for c in chunks.tolist():
            if (name, c) in self._advised:
                continue
            try:
                fd, size = open_sized_beneath(self._chunk_dir(name), self._chunk_parts(name, c), "")
            except Exception:
                continue  # a missing or refused chunk is reported when it is read
            try:
                if not in_page_cache(fd, 0, size):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            except BaseException:
                os.close(fd)
                raise
            # Kept open for the read that follows (one open a chunk, not two).
            self._advised.put((name, c), (fd, size))

    def _chunk_layout(self, name: str) -> tuple[tuple[int, ...], int, np.dtype[Any]]:
        """``(shape, nbytes, dtype)`` of a chunk file's decoded contents (whole chunks, the
        last one padded), asked of zarr's metadata once: its properties cost several us a
        call, every chunk."""
        layout = self._chunk_layouts.get(name)
        if layout is None:
            arr = self._array(name)
            shape = (arr.chunks[0], *arr.shape[1:])
            layout = self._chunk_layouts[name] = (shape, math.prod(shape) * arr.dtype.itemsize, arr.dtype)
        return layout

    def read_chunk_fast(
        self, name: str, c: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        kind = self._kinds[name]
        shape, nbytes, dtype = self._chunk_layout(name)
        # Decoded straight into the window buffer when the chunk fills it.
        chunk = out if out is not None and stop - start == shape[0] else aligned_empty(shape, dtype)
        fd, size, where = self._open_chunk(name, c)
        try:
            if kind == "raw":
                if size != nbytes:
                    raise CorruptStoreError(
                        f"{where}: uncompressed chunk file has {size} bytes, expected {nbytes}"
                    )
                read_exactly_into(fd, 0, chunk, where)  # one kernel copy, into the window buffer
            else:
                if size > nbytes + BLOSC_MAX_OVERHEAD:
                    raise CorruptStoreError(
                        f"{where}: compressed chunk file has {size} bytes, more than the {nbytes} "
                        "bytes it decodes to plus the Blosc header"
                    )
                blosc_decode_into(read_scratch(fd, 0, size, where), chunk, where)
        finally:
            os.close(fd)
        return serve(chunk, out, stop - start)

    def read_chunk_scattered(
        self, name: str, c: int, start: int, stop: int, out: np.ndarray, positions: np.ndarray
    ) -> bool:
        if not self.fast or self._kinds.get(name) != "raw":  # (known once the layout was checked)
            return False
        shape, nbytes, _ = self._chunk_layout(name)  # files hold whole chunks, the last one padded
        if nbytes // shape[0] < SCATTER_MIN_BYTES:
            return False
        fd, size, where = self._open_chunk(name, c)
        try:
            if size != nbytes:
                raise CorruptStoreError(
                    f"{where}: uncompressed chunk file has {size} bytes, expected {nbytes}"
                )
            read_scattered(fd, 0, out, positions, where)
        finally:
            os.close(fd)
        return True

    def read_chunk_library(self, name: str, c: int, start: int, stop: int) -> np.ndarray:
        arr = self._array(name)
        fd, size, where = self._open_chunk(name, c)
        try:
            if self._kinds[name] == "blosc":  # its decoded size, before zarr decodes it
                shape = (arr.chunks[0], *arr.shape[1:])
                nbytes = math.prod(shape) * arr.dtype.itemsize
                said, _ = blosc_header(read_exactly(fd, 0, min(BLOSC_HEADER, size), where), where)
                if said != nbytes:
                    raise CorruptStoreError(
                        f"{where}: compressed chunk says {said} bytes decoded, expected {nbytes}"
                    )
        finally:
            os.close(fd)
        try:
            return np.ascontiguousarray(arr[start:stop])
        except Exception as e:  # a decoding failure is a damaged chunk file
            raise CorruptStoreError(f"{where}: cannot decode chunk: {e}") from e

    def read_aux(self, name: str) -> np.ndarray:
        key = f"{AUX_GROUP}/{name}"
        arr = self._array(key)
        if arr.ndim != 1:
            raise CorruptStoreError(
                f"{self.path}: auxiliary array {name!r} has shape {arr.shape}, expected 1-D"
            )
        codecs = [c.to_dict()["name"] for c in arr.metadata.codecs]
        if "zstd" in codecs:  # zarr's default for these arrays: check decoded sizes first
            per_item = _MAX_AUX_STR_BYTES if codecs[0] == "vlen-utf8" else arr.dtype.itemsize
            limit = arr.chunks[0] * per_item
            for c in range(-(-arr.shape[0] // arr.chunks[0])):
                where = f"{self.path}: chunk {c} of auxiliary array {name!r}"
                try:
                    fd = open_beneath(self._root, [*key.split("/"), "c", str(c)], where)
                except CorruptStoreError as e:
                    if isinstance(e.__context__, OSError) and e.__context__.errno == errno.ENOENT:
                        raise CorruptStoreError(f"{where} is missing; ingest the store again") from None
                    raise
                try:
                    head = read_exactly(fd, 0, min(os.fstat(fd).st_size, 18), where)
                finally:
                    os.close(fd)
                size = zstd_content_size(bytes(head))
                if size is None or size > limit:
                    raise CorruptStoreError(
                        f"{where}: zstd frame of {'unstated' if size is None else size} decoded bytes, "
                        f"at most {limit} expected"
                    )
        try:
            return np.asarray(arr[...])
        except Exception as e:
            raise CorruptStoreError(f"{self.path}: cannot decode auxiliary array {name!r}: {e}") from None

    def stored_nbytes(self, name: str) -> int:
        root = self.path / name / "c"
        return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0

    def close(self) -> None:
        self._arrays.clear()
        self._chunk_dirs.clear()
        self._handles.close()  # (closes the advised files too)


def _system_error(e: BaseException) -> OSError | None:
    """The OSError with a system errno (too many open files, I/O error, ...) that ``e`` is or
    was raised from (zarr wraps some), if any."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in SYSTEM_ERRNOS:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _check_field_codecs(arr: Any, spec: FieldSpec, compression: Compression | None, where: str) -> str:
    """``"raw"`` or ``"blosc"``: the field's codecs must be exactly what oocseq writes, with the
    configuration it writes (little-endian bytes; Blosc with the manifest's compressor,
    byte shuffle and the dtype's size), else CorruptStoreError."""
    codecs = [c.to_dict() for c in arr.metadata.codecs]
    names = [c["name"] for c in codecs]
    expected = ["bytes"] if compression is None else ["bytes", "blosc"]
    if names != expected:
        raise CorruptStoreError(
            f"{where}: codecs {names}, expected {expected} (the manifest says "
            f"{'no compression' if compression is None else compression.to_json()}); oocseq reads "
            "only the codecs it writes"
        )
    endian = (codecs[0].get("configuration") or {}).get("endian")
    if endian not in (None, "little") or (endian is None and spec.dtype.itemsize > 1):
        raise CorruptStoreError(f"{where}: bytes codec with endian {endian!r}; oocseq writes little-endian")
    if not np.little_endian:  # the fast path reads little-endian bytes as native values
        raise CorruptStoreError(f"{where}: oocseq reads stores on little-endian machines only")
    if compression is None:
        return "raw"
    conf = codecs[1].get("configuration") or {}
    want = {"typesize": spec.dtype.itemsize, "cname": compression.cname, "shuffle": "shuffle", "blocksize": 0}
    got = {k: conf.get(k) for k in want}
    if got != want or conf.get("clevel") not in range(10) or set(conf) - {*want, "clevel"}:
        raise CorruptStoreError(f"{where}: Blosc configuration {conf}, expected {want} and a clevel in 0..9")
    return "blosc"


def write_chunk_file(target: str, payload: Any) -> None:
    """Write a chunk file under a temporary name and rename it into place (a killed process
    leaves a ``*.partial`` file, removed when the store is finished, never a torn chunk). The
    field's ``c`` folder must exist: after a failed ingestion removed the partial store, a late
    unit finds it gone and writes nothing."""
    path = Path(target)
    cdir = next((p for p in path.parents if p.name == "c"), None)
    if cdir is None or not cdir.is_dir():
        raise FileNotFoundError(2, "the partial store is gone", str(cdir or path.parent))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        start_writeback(f.fileno())  # the commit's fsync then waits less
    os.replace(tmp, path)


class ZarrWriter(StorageWriter):
    def __init__(self, path: Path, resume: bool = False) -> None:
        super().__init__(path)
        self._group = zarr.open_group(str(path), mode="r+" if resume else "w-")
        self._arrays: dict[str, Any] = {}
        #: The number of samples, when known: a field grows to it at once (each resize
        #: rewrites the array's metadata).
        self.expected_n: int | None = None

    def reopen_field(self, name: str) -> None:
        arr = self._group[name]
        if not isinstance(arr, zarr.Array):
            raise KeyError(name)
        # As at creation: every chunk is written, also one equal to the fill value.
        self._arrays[name] = arr.with_config({"write_empty_chunks": True})
        (self.path / name / "c").mkdir(exist_ok=True)

    def create_field(
        self, name: str, spec: FieldSpec, chunk_len: int, compression: Compression | None
    ) -> None:
        compressors = (
            None
            if compression is None
            else BloscCodec(cname=compression.cname, clevel=compression.clevel, shuffle="shuffle")  # type: ignore[arg-type]
        )
        self._arrays[name] = self._group.create_array(
            name,
            shape=(0, *spec.sample_shape),
            chunks=(chunk_len, *spec.sample_shape),
            dtype=spec.dtype,
            compressors=compressors,
            fill_value=0,
            dimension_names=spec.dims,  # what xarray needs to open the store
            # zarr skips chunks equal to the fill value by default; oocseq treats a missing
            # chunk as corruption, so every chunk is written.
            config={"write_empty_chunks": True},
        )
        (self.path / name / "c").mkdir(exist_ok=True)  # chunk files are written by encoders

    def write_chunk(self, name: str, c: int, chunk_len: int, data: np.ndarray) -> None:
        arr = self._arrays[name]
        start = c * chunk_len
        stop = start + len(data)
        if arr.shape[0] < stop:
            arr.resize((max(stop, 2 * arr.shape[0]), *arr.shape[1:]))
        arr[start:stop] = data

    def reserve(self, name: str, stop: int) -> None:
        arr = self._arrays[name]
        if arr.shape[0] < stop:
            arr.resize((max(stop, 2 * arr.shape[0], self.expected_n or 0), *arr.shape[1:]))
        (self.path / name / "c").mkdir(exist_ok=True)

    def chunk_path(self, name: str, c: int) -> Path:
        ndim = len(self._arrays[name].shape)
        return self.path.joinpath(name, "c", str(c), *(["0"] * (ndim - 1)))

    def write_encoded(self, name: str, c: int, chunk_len: int, payload: bytes, raw: bool) -> None:
        write_chunk_file(str(self.chunk_path(name, c)), payload)

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
        # zarr writes each file under a temporary name and renames it: a process killed in
        # between (in an earlier run of a resumed ingestion) leaves that temporary file.
        for leftover in self.path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
        self._group.attrs[ATTR_KEY] = manifest_doc
        # Consolidated metadata lets xarray.open_zarr open the store without trying each
        # array (and without warning that it had to); oocseq itself never reads it.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(str(self.path))

    def close(self) -> None:
        self._arrays.clear()


def check_field_layout(
    arr: Any, n: int, chunk_len: int, spec: FieldSpec, compression: Compression | None, where: str
) -> Any:
    """CorruptStoreError unless the Zarr array ``arr`` holds what the manifest says (shape,
    dtype, chunks, chunk keys, codecs); returns its codec kind (:func:`_check_field_codecs`).
    Shared by the local and the remote reader."""
    if arr.shape != (n, *spec.sample_shape) or arr.dtype != spec.dtype:
        raise CorruptStoreError(
            f"{where} is {arr.shape} {arr.dtype}, the manifest says {(n, *spec.sample_shape)} {spec.dtype}"
        )
    if tuple(arr.chunks) != (chunk_len, *spec.sample_shape) and not (n == 0 or 0 in spec.sample_shape):
        raise CorruptStoreError(f"{where}: chunks {arr.chunks}, expected {(chunk_len, *spec.sample_shape)}")
    enc = arr.metadata.chunk_key_encoding
    if getattr(enc, "name", None) != "default" or getattr(enc, "separator", None) != "/":
        raise CorruptStoreError(f"{where}: unsupported chunk key encoding {enc!r}")
    return _check_field_codecs(arr, spec, compression, where)
