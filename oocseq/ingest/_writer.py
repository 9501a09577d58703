"""The streaming writer every ingestion goes through.

Samples are appended per field, buffered up to one chunk, and written chunk by chunk, so
memory holds at most one chunk per field. The store is built at a hidden temporary path next
to ``dest`` and put in place by the commit protocol of :mod:`oocseq.storage._commit` only after
the manifest (written last) says it is complete: an interrupted ingestion never leaves anything
at ``dest`` that opens as a store, and never loses the store it was replacing.

Resumable ingestion: a source that can replay its samples passes a ``job`` (what identifies
its input and arguments) and calls :meth:`StoreWriter.checkpoint` before each block it
appends. After every chunk written to all fields, one line goes to the progress journal
``.NAME.<id>.journal``: the chunk's checksums and the last checkpoint before the chunk's first
sample. A later ingestion with the same job into the same ``dest`` whose owner is gone takes
over the partial store, re-derives the last journaled chunk from the source (its checksums
must match the journal's, else the source changed and the ingestion stops, discarding the
partial store) and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import numpy as np

from ..checksum import chunk_checksum
from ..errors import (
    ArgumentError,
    FieldLengthError,
    InvalidSourceError,
    OocseqError,
    StoreExistsError,
    StoreWriteError,
)
from ..manifest import ALLOWED_DTYPES, Compression, FieldSpec, Manifest, check_field_name, with_dims
from ..options import RemoteOptions
from ..storage import create_writer, store_format
from ..storage._commit import (
    OwnerLock,
    check_replaceable,
    commit,
    new_job_id,
    recover,
    remove,
    sibling,
    siblings,
)
from ..storage._zarr import write_chunk_file
from ..store import Store
from ._parallel import Executor, make_executor

#: Target decoded bytes per chunk of the widest field when ``chunk_len`` is not given. DESIGN.md:
#: chunks of 1-8 MiB are the sweet spot (per-chunk overhead vs. window memory).
TARGET_CHUNK_BYTES = 4 << 20
#: The largest chunk (decoded bytes of one field) oocseq writes: under Blosc's 2 GiB limit.
MAX_CHUNK_BYTES = (1 << 31) - 1 - 16
JOURNAL_VERSION = 1

_P = ParamSpec("_P")
_R = TypeVar("_R")
#: ``storage_options`` of the ``ingest_*`` call running in this thread (see :func:`url_options`)
_STORAGE_OPTIONS: ContextVar[Mapping[str, Any] | None] = ContextVar("oocseq_storage_options", default=None)


def url_options(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorate an ingestion function with a keyword argument ``storage_options``: every
    :class:`StoreWriter` it creates (in the calling thread) writes with those options, so
    they need not be passed down through its helpers."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        options = kwargs.get("storage_options")
        token = None if options is None else _STORAGE_OPTIONS.set(options)  # type: ignore[arg-type]
        try:
            try:
                return fn(*args, **kwargs)
            except _ResumeDamaged as e:
                # The damaged partial store is gone (the failed writer discarded it): the
                # same call again starts over, and writes the same store.
                warnings.warn(e.strerror or str(e), stacklevel=2)
                return fn(*args, **kwargs)
        finally:
            if token is not None:
                _STORAGE_OPTIONS.reset(token)

    return wrapper


class _ResumeDamaged(StoreWriteError):
    """The partial store taken over from an interrupted run failed a write the format's
    library reports as internal (HDF5 metadata left half-flushed by a killed process): the
    ingestion starts over. Caught by :func:`url_options`; never reaches the user."""


def choose_chunk_len(
    specs: dict[str, FieldSpec], n: int | None = None, target_bytes: int = TARGET_CHUNK_BYTES
) -> int:
    """Samples per chunk so that the widest field's chunk holds about ``target_bytes``, and no
    more than ``n`` (when known: a chunk longer than the data would be padded on disk)."""
    widest = max((s.sample_nbytes for s in specs.values()), default=1)
    chunk_len = max(1, target_bytes // max(widest, 1))
    return max(1, min(chunk_len, n)) if n else chunk_len


def field_spec(
    name: str, sample_shape: tuple[int, ...], dtype: Any, dims: tuple[str, ...] | None = None
) -> FieldSpec:
    """Validate one field's sample shape and dtype; ``dims``: names of the sample axes (e.g.
    ``("height", "width", "channel")``; default ``"<name>_dim1"`` ...), see
    :func:`oocseq.manifest.with_dims`."""
    check_field_name(name)
    dt = np.dtype(dtype)
    if dt.name not in ALLOWED_DTYPES or dt.byteorder == ">":
        raise InvalidSourceError(
            f"field {name!r} has dtype {dt}; oocseq stores native numeric and bool dtypes "
            f"only ({', '.join(sorted(ALLOWED_DTYPES))}). Convert it first, e.g. .astype('float32')."
        )
    if any(int(s) == 0 for s in sample_shape):
        raise InvalidSourceError(f"field {name!r} has an empty sample shape {tuple(sample_shape)}")
    return FieldSpec(tuple(int(s) for s in sample_shape), dt, dims=dims)


class StoreWriter:
    """Write a new store at ``dest`` from appended samples; use as a context manager.

    Args:
        dest: ``*.zarr`` or ``*.h5``/``*.hdf5``.
        specs: field name -> :class:`FieldSpec`.
        chunk_len: samples per chunk; ``None`` picks about 4 MiB for the widest field, or
            fewer: as many as there are samples, when the data ends before filling one chunk
            (for streams of unknown length). Capped at ``n`` when ``n`` is given; a chunk of
            the widest field may hold at most :data:`MAX_CHUNK_BYTES`.
        compression: ``None``, ``"lz4"``, ``"zstd"``, ``"zlib"`` or a Compression.
        overwrite: replace an existing ``dest`` (only an oocseq store: anything else raises
            NotAStoreError).
        n: the number of samples, when the source knows it (an upper bound will do).
        job: JSON-able identity of a replayable source and its arguments (``None``: a stream
            that cannot be replayed). Enables the progress journal and resuming.
        resume: take over the partial store of an interrupted ingestion of the same ``job``
            into ``dest`` (default); ``False`` discards it and starts over.
        executor: where chunks are encoded (checksum, padding, compression; for Zarr also
            written to their files): ``None`` in this process, or an
            :class:`~oocseq.ingest._parallel.Executor` (threads, processes, a Dask cluster
            whose workers see ``dest``'s folder). Chunks are written in order and encoded by
            :func:`encode_chunk` alone, so the store's bytes do not depend on it. The caller
            owns (and closes) the executor.
        storage_options: for a destination in object storage (``s3://bucket/x.zarr``...):
            credentials and endpoint, as for :func:`oocseq.open_store` (default: the
            environment's). ``ArgumentError`` for a local ``dest``.
        remote: :class:`~oocseq.RemoteOptions` for a destination in object storage: chunks are
            sent as they are made, ``max_requests`` at once, at most ``max_bytes_in_flight``
            bytes waiting to be sent; only the store's metadata is staged on local disk, and
            the manifest is sent last. Resuming works as for a local ``dest`` (the journal
            and the metadata are kept in ``<tempdir>/oocseq-upload-<hash of the URL>``): only
            chunks the bucket acknowledged are journaled, they are not sent again, and
            before the manifest lands one listing checks that they are all still there.

    After construction, ``resume_state`` is ``None`` for a fresh start, or the state the
    source passed to :meth:`checkpoint` from which it must now replay; ``resumed_chunks`` is
    the number of chunks taken over. On leaving the ``with`` block normally, :meth:`close`
    finishes the store (then ``writer.store`` is the opened :class:`Store`); on an error,
    nothing is left behind. On KeyboardInterrupt or SystemExit, a resumable ingestion keeps
    its partial store and journal for the next run.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        specs: dict[str, FieldSpec],
        *,
        chunk_len: int | None = None,
        compression: str | Compression | None = "lz4",
        overwrite: bool = False,
        n: int | None = None,
        job: Any = None,
        resume: bool = True,
        executor: Executor | None = None,
        storage_options: Mapping[str, Any] | None = None,
        remote: RemoteOptions | None = None,
    ) -> None:
        self._uploader: Any = None
        if storage_options is None:
            storage_options = _STORAGE_OPTIONS.get()
        self._storage_options = _check_storage_options(dest, storage_options)
        self._remote = remote if remote is not None else RemoteOptions()
        self.url, dest = _staging_for(dest, overwrite, self._storage_options, self._remote)
        self.dest = Path(dest)
        self.format = store_format(self.dest)
        if not specs:
            raise InvalidSourceError("nothing to ingest: no fields given")
        for name, value in (("overwrite", overwrite), ("resume", resume)):
            if not isinstance(value, bool):
                raise ArgumentError(f"{name} must be True or False, got {value!r}")
        recover(self.dest)  # a crash during an earlier commit may have moved the old store aside
        if os.path.lexists(self.dest):
            if not overwrite:
                raise StoreExistsError(f"{self.dest} already exists; pass overwrite=True to replace it")
            check_replaceable(self.dest)
        self._shrinkable = chunk_len is None  # the fields are created at the first full chunk
        if chunk_len is None:
            chunk_len = choose_chunk_len(specs, n)
        if not isinstance(chunk_len, (int, np.integer)) or isinstance(chunk_len, bool) or chunk_len < 1:
            raise ArgumentError(f"chunk_len must be a positive int, got {chunk_len!r}")
        chunk_len = int(chunk_len)
        if n:  # a chunk longer than the data would be padded on disk
            chunk_len = min(chunk_len, int(n))
        widest = max(s.sample_nbytes for s in specs.values())
        if chunk_len * widest > MAX_CHUNK_BYTES:
            raise ArgumentError(
                f"chunk_len={chunk_len} makes chunks of {chunk_len * widest} bytes; at most "
                f"{MAX_CHUNK_BYTES // max(widest, 1)} samples of {widest} bytes fit in one chunk "
                "(choose 1-8 MiB per chunk, or leave chunk_len=None)"
            )
        self.specs = with_dims(specs)  # every axis named, for xarray
        self.chunk_len = chunk_len
        self._n = int(n) if n else None
        self.compression = Compression.parse(compression)
        self.overwrite = overwrite
        self.attrs: dict[str, Any] = {}
        self.store: Store | None = None
        self.resume_state: Any = None
        self.resumed_chunks = 0
        self._aux: dict[str, np.ndarray] = {}
        self._buffers: dict[str, list[np.ndarray]] = {k: [] for k in specs}
        self._buffered = dict.fromkeys(specs, 0)
        self._chunks_done = dict.fromkeys(specs, 0)
        self._checksums: dict[str, list[int]] = {k: [] for k in specs}
        self._pos = dict.fromkeys(specs, 0)  # samples the source has appended (replayed ones too)
        self._drop_until = 0  # on resume: samples already in the partial store are dropped
        self._verify: tuple[int, dict[str, int]] | None = None  # (chunk, checksums) to re-derive
        self._checkpoints: list[tuple[Any, dict[str, int]]] = []
        self._journaled = 0
        self._journal: Any = None
        self._created = False
        self._backend: Any = None
        self._lock: OwnerLock | None = None
        self._fingerprint = None if job is None else self._fingerprint_of(job)
        self._executor = executor if executor is not None else Executor()
        # Chunks handed to the executor and not yet written: (field, chunk, samples, handle).
        self._pending: deque[tuple[str, int, int, Any]] = deque()
        # In this process a chunk is encoded on the spot: nothing to overlap, so nothing waits.
        self._in_flight = 0 if type(self._executor) is Executor else 2 * self._executor.workers
        self._written = dict.fromkeys(specs, 0)  # chunks written, per field (journaled ones count)
        self._tail = dict.fromkeys(specs, 0)  # samples of a short last chunk given encoded
        #: Called once every chunk is written, before the commit (e.g. delete a spool, so that
        #: a process killed after its commit leaves nothing behind).
        self.before_commit: list[Callable[[], None]] = []
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            taken = self._claim(resume, job is not None)
            if taken is None or not self._take_over(*taken):
                self._start()
            if self.url is not None:
                self._uploader = _stream_to(self.url, overwrite, self._storage_options, self._remote)
                for name in self.specs:  # chunks journaled by the interrupted run are in the bucket
                    self._uploader.sent_before(name, self._written[name])
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and not isinstance(e, OocseqError):
                raise StoreWriteError(e.errno, f"cannot create a store next to {self.dest}: {_why(e)}") from e
            raise

    # -- claiming the destination ------------------------------------------------------------
    def _fingerprint_of(self, job: Any) -> str:
        doc = {
            "version": JOURNAL_VERSION,
            "format": self.format,
            "job": _jsonable(job),
            "chunk_len": self.chunk_len,
            "compression": repr(self.compression),
            "fields": {k: [list(s.sample_shape), s.dtype.str] for k, s in self.specs.items()},
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def _claim(self, resume: bool, replayable: bool) -> tuple[str, OwnerLock, dict[str, Any]] | None:
        """Clean up the leftovers of ingestions into ``dest`` whose owners are gone, and return
        ``(id, lock, journal)`` of the one to resume, if any. Leftovers of live ingestions are
        left alone."""
        best: tuple[str, OwnerLock, dict[str, Any]] | None = None
        for job_id, parts in siblings(self.dest).items():
            if set(parts) == {"old"}:
                continue  # recover() handles those
            # A lock still under its temporary name: its owner was killed while creating it, or
            # is creating it now (then it holds the flock and the lock is not adopted).
            lock_path = parts.get("lock") or parts.get("lock-new")
            lock = OwnerLock.adopt(lock_path) if lock_path is not None else None
            if lock_path is not None and lock is None:
                continue  # its owner still runs
            journal = None
            if lock is not None and "partial" in parts:  # an interrupted ingestion's store
                if resume and self._fingerprint is not None and "journal" in parts:
                    journal = _read_journal(parts["journal"], self._fingerprint)
                if journal is None:
                    why = (
                        "resume=False"
                        if not resume
                        else "a stream of batches cannot be replayed"
                        if not replayable
                        else "its source or arguments differ from this call's"
                    )
                    warnings.warn(
                        f"discarding the partial store of an interrupted ingestion into {self.dest} "
                        f"({why}); this ingestion starts over",
                        stacklevel=4,
                    )
            if journal is not None and (best is None or journal["k"] > best[2]["k"]):
                if best is not None:
                    _discard(self.dest, best[0], best[1])
                best = (job_id, lock, journal)  # type: ignore[assignment]
            else:
                _discard(self.dest, job_id, lock)
        return best

    def _start(self) -> None:
        self._id = new_job_id()
        self._lock = OwnerLock.create(self.dest, self._id)
        self._tmp = sibling(self.dest, self._id, "partial")
        self._backend = create_writer(self._tmp, self.format)
        self._backend.expected_n = self._n
        if self._fingerprint is not None:
            self._open_journal([])
        if not self._shrinkable:
            self._create_fields()

    def _take_over(self, job_id: str, lock: OwnerLock, journal: dict[str, Any]) -> bool:
        """Reopen an interrupted ingestion's partial store; False (and it is discarded) if it
        cannot be reopened."""
        self._id, self._lock = job_id, lock
        self._tmp = sibling(self.dest, job_id, "partial")
        k = journal["k"]
        try:
            self._backend = create_writer(self._tmp, self.format, resume=True)
            self._backend.expected_n = self._n
            for name in self.specs:
                self._backend.reopen_field(name)
        except Exception as e:
            warnings.warn(
                f"cannot reopen the partial store of an interrupted ingestion into {self.dest} "
                f"({type(e).__name__}: {e}); this ingestion starts over",
                stacklevel=4,
            )
            self.abort()
            self.store = None
            return False
        self._created = True
        entries = journal["entries"]
        for name in self.specs:
            self._chunks_done[name] = k - 1
            self._written[name] = k - 1
            self._checksums[name] = [e["crc"][name] for e in entries[: k - 1]]
        self._verify = (k - 1, entries[k - 1]["crc"])
        state, counts = journal["checkpoint"]
        self._pos = {name: int(counts[name]) for name in self.specs}
        self._drop_until = (k - 1) * self.chunk_len
        self._journaled = k
        self.resume_state = state
        self.resumed_chunks = k
        self._open_journal(entries)
        return True

    def _open_journal(self, entries: list[dict[str, Any]]) -> None:
        """(Re)write the journal: its header and ``entries``, then keep it open to append."""
        path = sibling(self.dest, self._id, "journal")
        tmp = path.with_name(path.name + "-new")
        with open(tmp, "w") as f:
            f.write(json.dumps({"oocseq_journal": JOURNAL_VERSION, "fingerprint": self._fingerprint}) + "\n")
            for e in entries:
                f.write(json.dumps(e) + "\n")
        os.replace(tmp, path)
        self._journal = open(path, "a")

    # -- writing -------------------------------------------------------------------------------
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
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)) and self._journal is not None:
            self._suspend()
        else:
            self.abort()

    def samples_written(self, name: str) -> int:
        return self._chunks_done[name] * self.chunk_len + self._buffered[name] + self._tail[name]

    def checkpoint(self, state: Any) -> None:
        """Mark a point the source can replay from: the samples appended after this call are
        those the source yields when it restarts from ``state`` (JSON-able: e.g. a row or
        block number). Call it before each block; it costs nothing without a journal."""
        if self._journal is not None:
            self._checkpoints.append((_jsonable(state), dict(self._pos)))

    def _check_open(self, name: str) -> None:
        if self._tail[name]:
            raise InvalidSourceError(
                f"field {name!r}: samples appended after its short last chunk; only the last chunk "
                "may hold fewer than chunk_len samples"
            )

    def append(self, name: str, data: Any, *, copy: bool = True) -> None:
        """Append samples (an array of shape ``(k, *sample_shape)``) to field ``name``.

        Samples of a dtype that casts safely to the field's (e.g. int16 into int64) are cast;
        raises InvalidSourceError if the shape differs or the dtype does not cast safely.
        ``copy=False``: ``data`` is a new array nobody else writes to, kept as it is (no copy)
        until its chunk is written."""
        arr = conform(name, self.specs[name], data, self.samples_written(name))
        if len(arr):
            self._check_open(name)
        if self._pos[name] < self._drop_until:  # replayed samples already in the partial store
            drop = min(len(arr), self._drop_until - self._pos[name])
            self._pos[name] += drop
            arr = arr[drop:]
        self._pos[name] += len(arr)
        while len(arr):
            take = min(len(arr), self.chunk_len - self._buffered[name])
            self._buffers[name].append(np.array(arr[:take], copy=copy or None, order="C"))
            self._buffered[name] += take
            arr = arr[take:]
            if self._buffered[name] == self.chunk_len:
                self._flush(name)

    def append_made(self, name: str, count: int, make: Callable[..., Any], *args: Any) -> None:
        """Append the ``count`` samples that ``make(*args)`` returns (an array, as for
        :meth:`append`, that nobody writes to afterwards) to field ``name``.

        Where the next sample starts a chunk, ``count`` fills one (or ends the field) and the
        executor shares this process's memory, the executor makes, checks and encodes them
        (so ``make`` may read a memory map, and the calling thread goes on); otherwise they
        are made here and appended. Either way the store gets the same bytes, and a bad
        array raises InvalidSourceError (from the executor: when its chunk is written)."""
        spec = self.specs[name]
        if not (self._executor.shares_memory and self.aligned(name) and 0 < count <= self.chunk_len):
            self.append(name, make(*args), copy=False)
            return
        at = self.samples_written(name)
        c = self._claim_chunk(name, count)
        if c is not None:  # (claimed, and its space reserved, before any thread works on it)
            args_ = self.encode_args(name, c)
            handle = self._executor.submit(_make_encode, make, args, name, spec, count, at, args_)
            self._pending.append((name, c, count, handle))
            self._drain(self._in_flight)

    def aligned(self, name: str) -> bool:
        """Whether the next sample of field ``name`` starts a chunk (then
        :meth:`append_encoded` takes a whole chunk)."""
        return self._buffered[name] == 0 and not self._tail[name] and not self._shrinkable_pending()

    def _shrinkable_pending(self) -> bool:
        return self._shrinkable and not self._created

    def append_encoded(self, name: str, count: int, encoded: Any) -> None:
        """Append one whole chunk of field ``name`` encoded elsewhere: ``count`` samples
        (``chunk_len``, or fewer for the field's last chunk) and ``encoded``, the result of
        :func:`encode_chunk` for them (or a future of it) with this writer's
        :meth:`encode_args`. Only where :meth:`aligned` is true."""
        c = self._claim_chunk(name, count)
        if c is not None:
            self._pending.append((name, c, count, encoded))
            self._drain(self._in_flight)

    def _claim_chunk(self, name: str, count: int) -> int | None:
        """Count ``count`` samples of field ``name`` as one whole chunk and reserve its space:
        its number, or None if the partial store being resumed holds it already."""
        if not self.aligned(name) or not 0 < count <= self.chunk_len:
            raise InvalidSourceError(f"field {name!r}: an encoded chunk must start a chunk and fit in one")
        if self._pos[name] + count <= self._drop_until:  # already in the partial store
            self._pos[name] += count
            return None
        if self._pos[name] != self._drop_until and self._pos[name] < self._drop_until:
            raise InvalidSourceError(f"field {name!r}: an encoded chunk straddles the resumed position")
        self._pos[name] += count
        self._create_fields()
        c = self._chunks_done[name]
        self._reserve(name, c, count)
        if count < self.chunk_len:
            self._tail[name] = count
        else:
            self._chunks_done[name] += 1
        return c

    def encode_args(self, name: str, c: int) -> tuple[int, Compression | None, str, str | None]:
        """``(chunk_len, compression, format, target)`` for :func:`encode_chunk` of chunk ``c``
        of field ``name``: ``target`` is the chunk's file in the partial store where the
        encoder writes it itself (Zarr), else ``None`` (the encoded bytes come back: HDF5, and a
        URL destination, whose staging folder other machines do not see)."""
        self._create_fields()
        local_zarr = self.format == "zarr" and self.url is None
        target = self._backend.chunk_path(name, c) if local_zarr else None
        return self.chunk_len, self.compression, self.format, None if target is None else str(target)

    def _reserve(self, name: str, c: int, count: int) -> None:
        try:
            self._backend.reserve(name, c * self.chunk_len + count)
        except OSError as e:
            raise self._write_error(e, f"grow field {name!r} of {self.dest}") from e

    def _write_error(self, e: OSError, doing: str) -> StoreWriteError:
        """The error to raise for ``e``, met trying to ``doing`` (e.g. "write chunk 3 of ..."):
        in a resumed run, one the format's library raises itself (no system errno: HDF5
        metadata a killed process left half-flushed) means the partial store is damaged, and
        the ingestion starts over (:func:`url_options`); else a StoreWriteError."""
        if self.resumed_chunks and e.errno is None:
            return _ResumeDamaged(
                None,
                f"the partial store of an interrupted ingestion into {self.dest} is damaged "
                f"(cannot {doing}: {_why(e)}); this ingestion starts over",
            )
        return StoreWriteError(e.errno, f"cannot {doing}: {_why(e)}")

    def _flush(self, name: str) -> None:
        parts = self._buffers[name]
        if not parts:
            return
        self._create_fields()
        chunk = parts[0] if len(parts) == 1 else np.concatenate(parts)
        c = self._chunks_done[name]
        self._reserve(name, c, len(chunk))
        self._pending.append(
            (name, c, len(chunk), self._executor.submit(encode_chunk, chunk, *self.encode_args(name, c)))
        )
        self._chunks_done[name] += 1
        self._buffers[name] = []
        self._buffered[name] = 0
        self._drain(self._in_flight)

    def _drain(self, limit: int) -> None:
        """Write encoded chunks, in order, until at most ``limit`` are in flight."""
        while len(self._pending) > limit:
            name, c, _count, handle = self._pending[0]
            try:
                crc, payload, raw = handle.result() if hasattr(handle, "result") else handle
            except OSError as e:
                if isinstance(e, OocseqError):
                    raise
                raise StoreWriteError(
                    e.errno, f"cannot write chunk {c} of field {name!r} of {self.dest}: {_why(e)}"
                ) from e
            self._pending.popleft()
            if self._verify is not None and c == self._verify[0] and crc != self._verify[1][name]:
                raise InvalidSourceError(
                    f"cannot resume the interrupted ingestion into {self.dest}: chunk {c} of field "
                    f"{name!r} comes out differently from the source now than it did then (the source "
                    "changed). The partial store is discarded: run the ingestion again to start over"
                )
            if payload is not None and self._uploader is not None:  # straight to the bucket
                key = self._backend.chunk_path(name, c).relative_to(self._tmp).as_posix()
                self._uploader.put(key, payload, (name, c))
            elif payload is not None:
                try:
                    self._backend.write_encoded(name, c, self.chunk_len, payload, raw)
                except OSError as e:
                    raise self._write_error(e, f"write chunk {c} of field {name!r} of {self.dest}") from e
            self._checksums[name].append(crc)
            self._written[name] += 1
            if self._journal is not None:
                self._journal_progress()

    def _cancel_pending(self) -> None:
        """Cancel the chunks in flight, and wait for those already running (they may be
        writing into the partial store that is about to be removed or handed on)."""
        pending, self._pending = list(self._pending), deque()
        for *_, handle in pending:
            if hasattr(handle, "cancel"):
                with contextlib.suppress(Exception):
                    handle.cancel()
        for *_, handle in pending:
            if hasattr(handle, "result"):
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    handle.result()

    def _journal_progress(self) -> None:
        done = min(self._written.values())
        if self._uploader is not None:  # journal only the chunks the bucket acknowledged
            done = min(done, *(self._uploader.acknowledged(name) for name in self.specs))
        if done <= self._journaled:
            return
        try:
            self._backend.flush()
        except OSError as e:
            raise self._write_error(e, f"write {self.dest}") from e
        lines = []
        for k in range(self._journaled + 1, done + 1):
            bound = (k - 1) * self.chunk_len  # replay must start at or before chunk k-1
            while len(self._checkpoints) > 1 and all(v <= bound for v in self._checkpoints[1][1].values()):
                self._checkpoints.pop(0)
            cp = self._checkpoints[0] if self._checkpoints else None
            if cp is None or any(v > bound for v in cp[1].values()):
                cp = None
            lines.append(
                json.dumps(
                    {
                        "k": k,
                        "crc": {f: self._checksums[f][k - 1] for f in self.specs},
                        "checkpoint": None if cp is None else [cp[0], cp[1]],
                    }
                )
            )
        self._journal.write("".join(line + "\n" for line in lines))
        self._journal.flush()  # to the OS: it survives a killed process
        self._journaled = done

    def set_aux(self, name: str, values: np.ndarray) -> None:
        """Record a per-sample auxiliary array (e.g. ``"source"``: where each sample came from)."""
        self._aux[name] = np.asarray(values)

    def close(self) -> Store:
        """Flush, check that every field has the same length, write the manifest, commit the
        store into place and open it. Raises FieldLengthError (and removes the partial store),
        StoreExistsError if another ingestion committed to ``dest`` first (``overwrite``
        false), StoreWriteError if the system refuses a write (disk full ...)."""
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
            self._drain(0)
            chunk_keys: set[str] = set()
            if self._uploader is not None:
                self._uploader.wait()
                chunk_keys = {self._chunk_key(f, c) for f in self.specs for c in range(self._written[f])}
                if self.resumed_chunks:  # sent by the interrupted run: still all there?
                    self._uploader.check_present(sorted(chunk_keys))
            manifest = Manifest(
                n=n,
                chunk_len=self.chunk_len,
                fields=self.specs,
                compression=self.compression,
                checksums=self._checksums,
                attrs=_jsonable(self.attrs),
                aux=tuple(self._aux),
            )
            try:
                for name, values in self._aux.items():
                    self._backend.write_aux(name, values)
                self._backend.finalize(n, manifest.to_json())
                self._backend.close()
                for fn in self.before_commit:
                    fn()
                store = commit(self._tmp, self.dest, self.overwrite, self._id, lambda: Store(self.dest))
            except OSError as e:
                if isinstance(e, OocseqError):
                    raise
                raise StoreWriteError(e.errno, f"cannot write {self.dest}: {_why(e)}") from e
        except BaseException:
            self.abort()
            raise
        self._finish()
        if self.url is not None:
            # From here on the chunks sent belong to a store whose manifest may have landed.
            uploader, self._uploader = self._uploader, None
            try:
                store = _publish(store, self.url, self._storage_options, self._remote, chunk_keys)
            finally:
                uploader.close()
        self.store = store
        return self.store

    def _finish(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        remove(sibling(self.dest, self._id, "journal"))
        if self._lock is not None:
            self._lock.release(delete=True)

    def _chunk_key(self, name: str, c: int) -> str:
        return self._backend.chunk_path(name, c).relative_to(self._tmp).as_posix()

    def _suspend(self) -> None:
        """Keep the partial store and journal for a later run; let go of them."""
        self._cancel_pending()
        uploader, self._uploader = self._uploader, None
        if uploader is not None:  # the chunks sent stay for the next run
            uploader.cancel()
            uploader.close()
        with contextlib.suppress(Exception):
            self._backend.close()
        with contextlib.suppress(Exception):
            self._journal.close()
        self._journal = None
        if self._lock is not None:
            self._lock.release(delete=False)

    def _drop_uploaded(self) -> None:
        """Stop streaming chunks to the bucket and delete those sent (best effort: the store
        is not visible anyway, its manifest never having landed)."""
        uploader, self._uploader = self._uploader, None
        if uploader is not None:
            uploader.cancel()
            keys = set(uploader.keys)
            with contextlib.suppress(Exception):  # and those the interrupted run sent
                keys.update(self._chunk_key(f, c) for f, k in uploader.before.items() for c in range(k))
            with contextlib.suppress(Exception):
                uploader.delete(sorted(keys))
            uploader.close()

    def abort(self) -> None:
        """Drop the partial store (and its journal and lock)."""
        self._cancel_pending()
        self._drop_uploaded()
        if self._backend is not None:
            self._backend.discard()
        if self._journal is not None:
            with contextlib.suppress(Exception):
                self._journal.close()
            self._journal = None
        if getattr(self, "_id", None) is not None:
            _discard(self.dest, self._id, self._lock)
            self._lock = None
        if self.url is not None:  # the staging folder, unless another ingestion uses it
            with contextlib.suppress(OSError):
                self.dest.parent.rmdir()


@contextlib.contextmanager
def open_writer(
    dest: str | os.PathLike[str],
    specs: dict[str, FieldSpec],
    *,
    workers: int | None,
    client: Any = None,
    **writer_args: Any,
) -> Iterator[StoreWriter]:
    """A :class:`StoreWriter` (``writer_args``: its keyword arguments but ``executor``) whose
    chunks are encoded by ``workers`` local threads or a Dask ``client``'s workers (see
    :func:`~oocseq.ingest._parallel.make_executor`). On leaving the block the writer finishes
    (or discards, or suspends) the store first, then the executor stops."""
    with (
        make_executor(workers, client) as executor,
        StoreWriter(dest, specs, executor=executor, **writer_args) as w,
    ):
        yield w


def encode_chunk(
    chunk: np.ndarray,
    chunk_len: int,
    compression: Compression | None,
    fmt: str,
    target: str | None = None,
) -> tuple[int, Any, bool]:
    """Encode one chunk as the store keeps it: ``(checksum, payload, raw)``.

    The checksum covers ``chunk``'s samples (``len(chunk) <= chunk_len``); the payload is the
    chunk padded with zeros to ``chunk_len`` samples (stores keep whole chunks), as
    little-endian bytes, Blosc-compressed (byte shuffle, the dtype's size, automatic block
    size: what zarr's Blosc codec and HDF5's Blosc filter write). ``raw`` is true for HDF5
    when compression does not make the chunk smaller: the filter then stores it unfiltered.
    With ``target`` (a Zarr chunk file) the payload is written there and ``None`` returned.
    A pure function of its arguments: whoever runs it, the bytes are the same."""
    import numcodecs

    chunk = np.ascontiguousarray(chunk)
    crc = chunk_checksum(chunk)
    if len(chunk) == chunk_len:
        padded = chunk
    else:
        padded = np.zeros((chunk_len, *chunk.shape[1:]), dtype=chunk.dtype)
        padded[: len(chunk)] = chunk
    if padded.dtype.byteorder == ">":
        padded = padded.astype(padded.dtype.newbyteorder("<"))
    raw = compression is None
    payload: Any = padded.reshape(-1).view(np.uint8).data
    if compression is not None:
        codec = numcodecs.Blosc(
            cname=compression.cname, clevel=compression.clevel, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=0
        )
        encoded = codec.encode(padded)
        if fmt == "hdf5" and len(encoded) > padded.nbytes:
            raw = True  # HDF5's Blosc filter gives up on a chunk it cannot shrink
        else:
            payload = encoded
    if target is None:
        return crc, bytes(payload), raw
    write_chunk_file(target, payload)
    return crc, None, raw


def conform(name: str, spec: FieldSpec, data: Any, written: int) -> np.ndarray:
    """``data`` as an array of samples of field ``name``, laid out as ``spec`` says (cast to
    its dtype where that is safe). Raises InvalidSourceError, naming the field and the
    ``written`` samples before it, for no sample axis, another sample shape, or a dtype that
    does not cast safely."""
    arr = np.asarray(data)
    if arr.ndim == 0:
        raise InvalidSourceError(
            f"field {name!r}: got a scalar batch after {written} samples; batches need a sample axis"
        )
    if arr.shape[1:] != spec.sample_shape:
        raise InvalidSourceError(
            f"field {name!r}: got samples of shape {arr.shape[1:]} after {written} samples of "
            f"shape {spec.sample_shape}"
        )
    if arr.dtype != spec.dtype:
        if not np.can_cast(arr.dtype, spec.dtype, "safe"):
            raise InvalidSourceError(
                f"field {name!r}: got dtype {arr.dtype} after {written} samples of dtype "
                f"{spec.dtype}; give every batch the same dtype"
            )
        arr = arr.astype(spec.dtype)
    return arr


def _make_encode(
    make: Callable[..., Any],
    args: tuple[Any, ...],
    name: str,
    spec: FieldSpec,
    count: int,
    written: int,
    encode_args: tuple[Any, ...],
) -> tuple[int, Any, bool]:
    """``make(*args)``, checked against ``spec`` and ``count``, then :func:`encode_chunk`."""
    chunk = conform(name, spec, make(*args), written)
    if len(chunk) != count:
        raise InvalidSourceError(
            f"field {name!r}: got {len(chunk)} samples after {written} where {count} were announced"
        )
    return encode_chunk(chunk, *encode_args)


def _why(e: OSError) -> str:
    return f"{e.strerror} ({e.filename})" if e.strerror and e.filename else e.strerror or str(e)


def _discard(dest: Path, job_id: str, lock: OwnerLock | None) -> None:
    """Delete an ingestion's partial store and journal, then its lock file (last: while it
    exists, nobody else takes the others)."""
    remove(sibling(dest, job_id, "partial"))
    remove(sibling(dest, job_id, "journal"))
    remove(sibling(dest, job_id, "journal-new"))
    if lock is not None:
        lock.release(delete=True)
    else:
        remove(sibling(dest, job_id, "lock"))
        remove(sibling(dest, job_id, "lock-new"))


def _read_journal(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """``{"k", "entries", "checkpoint"}`` of the last resumable point of a journal of the job
    ``fingerprint``; ``None`` if it belongs to another job or holds no resumable point. A torn
    last line (the process died while writing it) is ignored."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except OSError:
        return None
    try:
        head = json.loads(lines[0])
    except ValueError:
        return None
    if not isinstance(head, dict) or head.get("fingerprint") != fingerprint:
        return None
    entries: list[dict[str, Any]] = []
    best = None
    for line in lines[1:]:
        try:
            e = json.loads(line)
        except ValueError:
            break
        if not isinstance(e, dict) or e.get("k") != len(entries) + 1:
            break
        entries.append(e)
        if e.get("checkpoint") is not None:
            best = {"k": e["k"], "entries": list(entries), "checkpoint": e["checkpoint"]}
    return best


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


def _check_storage_options(
    dest: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    from ..storage._remote import is_url, local_path_of

    if storage_options is None:
        return None
    if not isinstance(storage_options, Mapping):
        raise ArgumentError(f"storage_options must be a dict, got {type(storage_options).__name__}")
    if not storage_options:
        return None
    if not is_url(dest) or local_path_of(str(dest)) is not None:
        raise ArgumentError(
            f"storage_options apply to destinations in object storage (s3://, gs://, ...), not {dest}"
        )
    return dict(storage_options)


def _staging_for(
    dest: str | os.PathLike[str],
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
    options: RemoteOptions,
) -> tuple[str | None, str | os.PathLike[str]]:
    """``(url, local dest)``: for a destination in object storage, the URL and a new local
    staging path where the store's metadata is written (its chunks go to the bucket as they
    are made; :func:`_publish` sends the rest, the manifest last)."""
    from ..storage._remote import check_scheme, exists, is_url, local_path_of

    if not is_url(dest):
        return None, dest
    local = local_path_of(str(dest))
    if local is not None:
        return None, local
    url = str(dest).rstrip("/")
    check_scheme(url)
    name = Path(urlsplit(url).path).name
    if store_format(name) != "zarr":
        raise ArgumentError(f"{url}: stores in object storage are Zarr stores; name it *.zarr")
    if exists(url, storage_options, options) and not overwrite:
        raise StoreExistsError(f"{url} already exists; pass overwrite=True to replace it")
    # One folder per URL, so that an interrupted ingestion's journal is found again.
    digest = hashlib.sha256(url.encode()).hexdigest()[:20]
    return url, Path(tempfile.gettempdir()) / f"oocseq-upload-{digest}" / name


def _stream_to(
    url: str, overwrite: bool, storage_options: Mapping[str, Any] | None, options: RemoteOptions
) -> Any:
    """A :class:`~oocseq.storage._remote.ChunkUploader` for ``url``; a store being replaced
    there stops being visible first (its manifest deleted), before any of its chunks is."""
    from ..storage._remote import ChunkUploader

    uploader = ChunkUploader(url, storage_options, options)
    if overwrite:
        try:
            uploader.delete(["zarr.json"])
        except Exception as e:
            uploader.close()
            raise StoreWriteError(f"cannot replace the store at {url}: {type(e).__name__}: {e}") from None
    return uploader


def _publish(
    store: Store,
    url: str,
    storage_options: Mapping[str, Any] | None,
    options: RemoteOptions,
    sent: set[str],
) -> Store:
    """Send the committed local ``store``'s files (metadata: its chunks were streamed) to
    ``url``, the manifest last; drop the local copy, and open the uploaded store."""
    from ..storage._remote import upload

    try:
        store.close()
        upload(store.path, url, storage_options, options, sent)
    finally:
        shutil.rmtree(store.path, ignore_errors=True)
        with contextlib.suppress(OSError):  # unless another ingestion uses it
            store.path.parent.rmdir()
    return Store(url, storage_options=storage_options)
