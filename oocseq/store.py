"""``Store``: an opened oocseq store (Zarr v3 directory or HDF5 file), read-only.

A ``Store`` pickles as its path: file handles are opened lazily in each process (keyed by
``os.getpid()``), so it works across fork, spawn and forkserver.

Every chunk is checked against its manifest checksum before it is served, once per chunk per
process (a committed store is immutable) or at every read (``verify_checksums="always"``).
The record of checked chunks belongs to one set of open handles: a store reopened (in a new
process, after :meth:`Store.close`) is checked again, and one that was replaced on disk since
it was opened is refused.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .checksum import chunk_checksum
from .errors import (
    ArgumentError,
    CorruptStoreError,
    FieldNotFoundError,
    NotAStoreError,
    OocseqError,
    OutOfRangeError,
    StoreNotFoundError,
)
from .manifest import FieldSpec, Manifest
from .options import RemoteOptions
from .storage import StorageReader, _commit, open_reader, store_format
from .storage._raw import SCATTER_MIN_BYTES, SYSTEM_ERRNOS, check_positions, os_error, scratch_array
from .storage._remote import check_scheme, is_url, local_path_of

__all__ = ["FieldInfo", "FieldSpec", "FieldView", "Store", "open_store"]


#: The name earlier versions gave :class:`~oocseq.manifest.FieldSpec` in ``Store.fields``.
FieldInfo = FieldSpec


class Store:
    """An opened store. Open one with :func:`open_store` (or get one from an ingest function).

    Attributes:
        path: the store's path.
        format: ``"zarr"`` or ``"hdf5"``.
        manifest: the validated :class:`~oocseq.manifest.Manifest`.

    Args:
        path: a ``*.zarr`` directory or ``*.h5`` / ``*.hdf5`` file written by oocseq, or a URL
            (see :func:`open_store`).
        fast: read chunks through oocseq's own reader (chunk bytes + numcodecs) where the
            layout allows; ``False`` always reads through zarr-python / h5py. Both give equal
            arrays.
        verify_checksums: ``True`` (default): check each chunk against its manifest checksum
            the first time this process reads it (through these handles); ``"always"``: at
            every read; ``False``: never, which also opens a store whose manifest has no
            checksums (oocseq always writes them: their absence means damage). A store in
            object storage is checked at every read (each read downloads the chunk again).
        storage_options, remote: for a store in object storage, see :func:`open_store`.

    Raises (when opening):
        StoreNotFoundError: ``path`` does not exist.
        NotAStoreError: ``path`` is not a complete oocseq store.
        CorruptStoreError: the store's metadata or layout is inconsistent, its codecs are not
            exactly those oocseq writes, sizes are implausible, a field is a link to another
            file or a symbolic link leaves the store, or checksums are missing.
        StoreReadError: the system refused the read (e.g. too many open files).

    Reads raise CorruptStoreError, naming the field, the chunk and the file, for a chunk that
    is missing, does not decode, or fails its checksum: no damaged sample is ever served.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fast: bool = True,
        verify_checksums: bool | str = True,
        storage_options: Mapping[str, Any] | None = None,
        remote: RemoteOptions | None = None,
    ) -> None:
        if verify_checksums not in (True, False, "always"):
            raise ArgumentError(f"verify_checksums must be True, False or 'always', not {verify_checksums!r}")
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise ArgumentError(f"storage_options must be a dict, got {type(storage_options).__name__}")
        if remote is not None and not isinstance(remote, RemoteOptions):
            raise ArgumentError(f"remote must be an oocseq.RemoteOptions, got {type(remote).__name__}")
        self.fast = fast
        self.verify_checksums = verify_checksums
        self.storage_options = dict(storage_options or {})
        self.remote = remote
        #: the URL of a store in object storage, else None (then ``path`` is a local path)
        self.url: str | None = None
        local = local_path_of(str(path)) if is_url(path) else None
        if is_url(path) and local is None:
            url = str(path).rstrip("/")
            check_scheme(url)
            self.url = url
            self.path = Path(urlsplit(url).path or "/")
            self.format = store_format(self.path)
            if self.format != "zarr":
                raise ArgumentError(
                    f"{url}: HDF5 files are read from local disk only; convert it to Zarr for object "
                    f"storage: oocseq convert STORE.h5 STORE.zarr, then upload the .zarr folder "
                    "(or convert straight to the bucket's URL once written there)"
                )
            self._init_handles()
            return
        if self.storage_options or remote is not None:
            raise ArgumentError(
                f"storage_options and remote apply to stores in object storage (s3://, gs://, "
                f"https:// ...), not to the local path {str(path)!r}"
            )
        self.path = local if local is not None else Path(path)
        self.format = store_format(self.path)
        # Finishes (or tidies up after) a commit a crash interrupted; cheap when nothing is left.
        if _commit.siblings(self.path):
            _commit.recover(self.path)
        if not self.path.exists():
            raise StoreNotFoundError(f"no store at {str(self.path)!r}")
        self._init_handles()

    def _init_handles(self) -> None:
        self._lock = threading.Lock()
        # This process's handles and the record of chunks checked through them: one tuple,
        # swapped whole, so a check is never recorded against other handles.
        self._handles: tuple[StorageReader, dict[str, np.ndarray]] | None = None
        self._pid = -1
        self._open()

    @property
    def location(self) -> str:
        """Where the store is: its URL (object storage) or its local path, as text."""
        return self.url if self.url is not None else str(self.path)

    # -- handles: one per process, never pickled ---------------------------------------------
    def _open(self) -> StorageReader:
        return self._open_handles()[0]

    def _open_handles(self) -> tuple[StorageReader, dict[str, np.ndarray]]:
        handles = self._handles
        if handles is not None and self._pid == os.getpid():
            return handles
        with self._lock:
            if self._handles is None or self._pid != os.getpid():
                reader = self._new_reader()
                # Chunks are checked again through new handles: they may see another file.
                verified = {name: np.zeros(self.num_chunks, bool) for name in self.manifest.fields}
                self._handles = (reader, verified)
                self._pid = os.getpid()
            return self._handles

    def _new_reader(self) -> StorageReader:
        """Open the store's files, read and check its manifest and layout. A reopened store
        (another process, after ``close``) must still hold the manifest it was opened with."""
        reader: StorageReader
        try:
            if self.url is not None:
                from .storage._remote import RemoteZarrReader

                reader = RemoteZarrReader(self.url, self.storage_options, self.remote, self.fast)
            else:
                reader = open_reader(self.path, self.format, self.fast)
        except OocseqError:
            raise
        except OSError as e:
            if e.errno in SYSTEM_ERRNOS:
                raise os_error(e, self.location) from e
            raise NotAStoreError(f"{self.location} is not a readable {self.format} store: {e}") from e
        except Exception as e:
            raise NotAStoreError(f"{self.location} is not a readable {self.format} store: {e}") from e
        try:
            opened = getattr(self, "manifest", None)
            doc = reader.manifest_doc()
            manifest = Manifest.from_json(
                doc, self.location, require_checksums=self.verify_checksums is not False
            )
            if opened is not None and manifest != opened:
                raise CorruptStoreError(
                    f"{self.location} was replaced or changed since it was opened (its manifest "
                    "differs); open it again to read the new store"
                )
            for name, spec in manifest.fields.items():
                reader.check_layout(name, manifest.n, manifest.chunk_len, spec, manifest.compression)
        except BaseException:
            reader.close()
            raise
        self.manifest = manifest
        return reader

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "fast": self.fast,
            "verify_checksums": self.verify_checksums,
            "manifest": self.manifest,
            "url": self.url,
            "storage_options": self.storage_options,
            "remote": self.remote,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("verify_checksums", True)
        state.setdefault("url", None)
        state.setdefault("storage_options", {})
        state.setdefault("remote", None)
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._handles = None
        self._pid = -1

    def close(self) -> None:
        """Close this process's file handles (they reopen on the next read; chunks read then
        are checked again). Handles of a store dropped without ``close`` are closed by the
        garbage collector."""
        with self._lock:
            if self._handles is not None and self._pid == os.getpid():
                self._handles[0].close()
            self._handles = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- description ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.manifest.n

    @property
    def fields(self) -> dict[str, FieldSpec]:
        """Field name -> :class:`~oocseq.manifest.FieldSpec` with ``n``: ``.shape`` is the full
        shape ``(n, *sample_shape)``, ``.dtype`` the dtype."""
        n = self.manifest.n
        return {k: dataclasses.replace(v, n=n) for k, v in self.manifest.fields.items()}

    @property
    def chunk_len(self) -> int:
        """Samples per chunk (the last chunk may be shorter)."""
        return self.manifest.chunk_len

    @property
    def num_chunks(self) -> int:
        return self.manifest.num_chunks

    @property
    def metadata(self) -> dict[str, Any]:
        """User metadata: ``format_version``, ``compression``, ``checksum`` (the per-chunk
        checksum algorithm: ``"crc32c"``, or ``"crc32"`` for format version 1) and what the
        ingestion recorded (``class_names``, ``feature_names``, ``label_mapping``, ``source``,
        ``preshuffle`` ...)."""
        comp = self.manifest.compression
        return {
            **self.manifest.attrs,
            "format_version": self.manifest.format_version,
            "compression": None if comp is None else comp.to_json(),
            "checksum": self.manifest.checksum,
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
    def dataframe_index(self) -> np.ndarray | None:
        """The index label of the DataFrame row of every sample (shape ``(n,)``: int64 for an
        integer index, else ``str``), for a store written by ``ingest_dataframe``; else
        ``None``. ``df.loc[store.dataframe_index]`` gives the rows in stored order."""
        if "dataframe_index" not in self.manifest.aux:
            return None
        values = self._open().read_aux("dataframe_index")
        if values.dtype.kind in "iu":
            return values.astype(np.int64, copy=False)
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
        return f"<oocseq.Store {self.location!r} ({self.format}) n={len(self)} chunk_len={self.chunk_len} {{{fields}}}>"

    # -- reading -------------------------------------------------------------------------------
    def _check_field(self, name: str) -> None:
        if name not in self.manifest.fields:
            raise FieldNotFoundError(
                f"{self.location} has no field {name!r}; its fields are {sorted(self.manifest.fields)}"
            )

    def read_chunk(self, name: str, c: int) -> np.ndarray:
        """Chunk ``c`` of field ``name``, decoded and checked: a new C-contiguous array of shape
        ``(stop - start, *sample_shape)`` (memory of its own, never a view of a file).

        Raises FieldNotFoundError, IndexError for ``c`` outside ``range(num_chunks)``,
        CorruptStoreError for a missing or undecodable chunk or one that fails its checksum."""
        self._check_field(name)
        if not 0 <= c < self.num_chunks:
            raise OutOfRangeError(f"chunk {c} out of range: {self.location} has {self.num_chunks} chunks")
        start, stop = self.manifest.chunk_bounds(c)
        reader, verified = self._open_handles()
        chunk = reader.read_chunk(name, c, start, stop)
        self._check_sum(reader, verified, name, c, chunk)
        return chunk

    def _must_check(
        self, reader: StorageReader, verified: dict[str, np.ndarray], name: str, c: int, force: bool = False
    ) -> bool:
        """Whether reading chunk ``c`` of ``name`` checks its checksum (see :meth:`_check_sum`)."""
        if self.verify_checksums is False and not force:
            return False
        done = verified.get(name)
        # A store in object storage downloads the chunk again at every read: check each one.
        again = self.verify_checksums == "always" or getattr(reader, "refetches", False)
        return done is None or not done[c] or again or force

    def _check_sum(
        self,
        reader: StorageReader,
        verified: dict[str, np.ndarray],
        name: str,
        c: int,
        chunk: np.ndarray,
        force: bool = False,
    ) -> None:
        """Raise CorruptStoreError unless ``chunk`` matches its manifest checksum. Skipped
        with ``verify_checksums=False``, and for a chunk already checked through the same
        handles (unless ``"always"`` or ``force``)."""
        if not self._must_check(reader, verified, name, c, force):
            return
        done = verified.get(name)
        if done is None:  # handles reopened since; check against the record of this read
            done = np.zeros(self.num_chunks, bool)
        sums = self.manifest.checksums.get(name)
        if sums is None:
            raise CorruptStoreError(f"{self.location}: the manifest has no checksums for field {name!r}")
        if chunk_checksum(chunk, self.manifest.checksum) != sums[c]:
            error = CorruptStoreError(
                f"{self.location}: chunk {c} of field {name!r} ({reader.chunk_location(name, c)}) fails "
                f"its {self.manifest.checksum} checksum; the store is damaged (or was changed after "
                "it was written). Ingest it again."
            )
            failed = getattr(reader, "chunk_failed", None)
            if failed is not None:  # e.g. a remote reader deletes a damaged cached copy
                failed(name, c)
            raise error
        done[c] = True
        passed = getattr(reader, "chunk_verified", None)
        if passed is not None:  # e.g. a remote reader keeps the checked chunk in its disk cache
            passed(name, c)

    def scatters(self, name: str) -> bool:
        """Whether chunks of field ``name`` are best read straight to the positions their
        samples are served at (``read_chunk_into`` with ``positions``): uncompressed, in a
        local file, and samples of at least a page (one ``preadv`` segment each). Other
        fields are decoded in chunk order and their batches gathered."""
        spec = self.manifest.fields[name]
        return (
            self.url is None and self.manifest.compression is None and spec.sample_nbytes >= SCATTER_MIN_BYTES
        )

    def advise_chunks(self, name: str, chunks: np.ndarray) -> None:
        """Hint the kernel to read these chunks of field ``name`` ahead (asynchronous; a no-op
        where unsupported). Used by the read-ahead of :class:`~oocseq.ChunkedSequence`."""
        self._open().advise_chunks(name, chunks)

    def read_chunk_into(
        self, name: str, c: int, out: np.ndarray, positions: np.ndarray | None = None
    ) -> None:
        """Decode chunk ``c`` of field ``name`` into ``out`` (C-contiguous, shape of the chunk),
        in place where the format allows. With ``positions`` (int64, one per sample of the
        chunk, distinct, in ``range(len(out))``), sample ``k`` goes to ``out[positions[k]]``
        instead (``out`` of any length): an uncompressed chunk whose checksum was checked
        before is then read straight to those positions. Raises as :meth:`read_chunk`, and
        ArgumentError for an ``out`` or ``positions`` of the wrong length."""
        self._check_field(name)
        if not 0 <= c < self.num_chunks:
            raise OutOfRangeError(f"chunk {c} out of range: {self.location} has {self.num_chunks} chunks")
        start, stop = self.manifest.chunk_bounds(c)
        if positions is None and out.shape[0] != stop - start:
            raise ArgumentError(f"chunk {c} of {name!r} has {stop - start} samples, out has {out.shape[0]}")
        if positions is not None:
            spec = self.manifest.fields[name]
            if out.dtype != spec.dtype or out.shape[1:] != spec.sample_shape:
                raise ArgumentError(
                    f"field {name!r} has samples {spec.sample_shape} {spec.dtype}, out has {out.shape[1:]} {out.dtype}"
                )
            check_positions(out, positions, stop - start)
        reader, verified = self._open_handles()
        if positions is None:
            reader.read_chunk_into(name, c, start, stop, out)
            self._check_sum(reader, verified, name, c, out)
            return
        if not self._must_check(reader, verified, name, c) and reader.read_chunk_scattered(
            name, c, start, stop, out, positions
        ):
            return
        chunk = scratch_array((stop - start, *out.shape[1:]), out.dtype)
        reader.read_chunk_into(name, c, start, stop, chunk)
        self._check_sum(reader, verified, name, c, chunk)
        out[positions] = chunk

    def __getitem__(self, name: str) -> FieldView:
        """A read-only view of field ``name`` that slices like an array."""
        self._check_field(name)
        return FieldView(self, name)

    def __contains__(self, name: object) -> bool:
        return name in self.manifest.fields

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.fields)

    def verify(self) -> int:
        """Read every chunk of every field and check it against its manifest checksum (even
        chunks checked before). Returns the number of chunks checked.

        Raises CorruptStoreError naming the first field and chunk that fails, or when the
        manifest has no checksums to check (a store opened with ``verify_checksums=False``):
        it never reports success having checked nothing."""
        missing = [name for name in self.manifest.fields if name not in self.manifest.checksums]
        if missing:
            raise CorruptStoreError(
                f"{self.location}: cannot verify: the manifest has no checksums for field(s) {missing}; "
                "the store is damaged or was not written by oocseq. Ingest it again."
            )
        checked = 0
        for name in self.manifest.fields:
            # read ahead (a store in object storage fetches many chunks at once)
            self._open().advise_chunks(name, np.arange(self.num_chunks))
            for c in range(self.num_chunks):
                start, stop = self.manifest.chunk_bounds(c)
                reader, verified = self._open_handles()
                chunk = reader.read_chunk(name, c, start, stop)
                self._check_sum(reader, verified, name, c, chunk, force=True)
                checked += 1
        return checked


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
            r = range(n)[key]  # lazy: O(samples selected), not O(n)
            out = self._gather(np.arange(r.start, r.stop, r.step, dtype=np.int64))
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
        if self.store.url is not None and len(idx):  # fetch the chunks concurrently
            self.store.advise_chunks(self.name, np.unique(idx // self.store.chunk_len))
        gather(idx, self.store.chunk_len, lambda c: self.store.read_chunk(self.name, c), out)
        return out


def open_store(
    path: str | os.PathLike[str],
    *,
    verify_checksums: bool | str = True,
    storage_options: Mapping[str, Any] | None = None,
    remote: RemoteOptions | None = None,
) -> Store:
    """Open the oocseq store at ``path``: a ``*.zarr`` directory or ``*.h5``/``*.hdf5`` file,
    a ``file://`` URL, or the URL of a Zarr store in object storage (``s3://bucket/x.zarr``,
    ``gs://``, ``az://``, ``https://``).

    ``verify_checksums``: as for :class:`Store` (default ``True``: every chunk is checked the
    first time it is read, and every time for a store in object storage; ``False`` also opens
    a store whose manifest lacks checksums). ``storage_options`` (object storage only):
    credentials and endpoint with the names zarr, pandas and xarray pass to s3fs / gcsfs
    (``key``, ``secret``, ``token``, ``endpoint_url``, ``client_kwargs={"region_name": ...}``,
    ``anon``) or obstore's own; by default they come from the environment
    (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
    ``GOOGLE_APPLICATION_CREDENTIALS``...). ``remote``: :class:`~oocseq.RemoteOptions`
    (concurrency, bytes in flight, retries, timeouts).

    Raises StoreNotFoundError, NotAStoreError (not a complete oocseq store, e.g. an interrupted
    ingestion), CorruptStoreError (inconsistent metadata or layout, disallowed codecs, missing
    checksums, implausible sizes, links out of the store), StoreReadError (the network or the
    server failed past the retry budget), ArgumentError (an HDF5 file in object storage: convert
    it with ``oocseq convert``; storage options for a local path)."""
    return Store(path, verify_checksums=verify_checksums, storage_options=storage_options, remote=remote)
