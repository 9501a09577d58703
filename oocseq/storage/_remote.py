"""Zarr v3 stores in object storage (``s3://``, ``gs://``, ``az://``, ``https://``), read
through zarr-python's :class:`zarr.storage.ObjectStore` (backed by obstore).

Metadata (``zarr.json`` documents, auxiliary arrays) is read through zarr; chunk objects are
fetched as bytes (one bounded range request per chunk: an object larger than the chunk can
be is never downloaded whole), checked for size and decoded by oocseq's own reader, like the
local fast path. The :class:`~oocseq.store.Store` above checks every chunk against its manifest
checksum at every read (each read is a new download).

Read-ahead: :meth:`RemoteZarrReader.advise_chunks` receives the chunks of the windows the plan
reads next and starts fetching them at once, with up to ``max_requests`` requests in flight and
at most ``max_bytes_in_flight`` bytes fetched and not yet read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from ..errors import ArgumentError, CorruptStoreError, NotAStoreError, StoreNotFoundError, StoreReadError
from ..manifest import ATTR_KEY, AUX_GROUP, Compression, FieldSpec
from ..options import RemoteOptions
from ._base import StorageReader
from ._raw import BLOSC_HEADER, BLOSC_MAX_OVERHEAD, blosc_decode_into, blosc_header, serve

__all__ = ["REMOTE_SCHEMES", "RemoteZarrReader", "is_url", "local_path_of", "object_store"]

#: URL schemes read from object storage (``file://`` URLs are local paths).
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss", "http", "https")

#: The process whose obstore runtime runs (None before any store in object storage is opened).
_RUNTIME_PID: int | None = None

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and bool(_URL.match(path))


def local_path_of(url: str) -> Path | None:
    """The local path of a ``file://`` URL, ``None`` for another scheme.

    Raises:
        ArgumentError: a ``file://`` URL naming another host.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        return None
    if parts.netloc not in ("", "localhost"):
        raise ArgumentError(
            f"{url!r}: a file:// URL names a local path (file:///path), not host {parts.netloc!r}"
        )
    from urllib.parse import unquote

    return Path(unquote(parts.path))


def check_scheme(url: str) -> str:
    """The URL's scheme, lower case; ArgumentError for one oocseq cannot read."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in REMOTE_SCHEMES:
        raise ArgumentError(
            f"{url!r}: unsupported URL scheme {scheme!r}; oocseq reads local paths, file://, "
            f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}"
        )
    return scheme


# storage_options as fsspec (s3fs, gcsfs) spells them, which zarr, pandas and xarray pass on:
# translated to obstore's configuration keys. Other keys go to obstore as they are (its own
# names, e.g. "region", "endpoint"), which refuses unknown ones.
_S3_NAMES = {
    "key": "access_key_id",
    "secret": "secret_access_key",
    "token": "session_token",
    "endpoint_url": "endpoint",
    "region_name": "region",
}
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")


def _translate(scheme: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, client_options)`` for obstore from fsspec-style ``storage_options``."""
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise ArgumentError(f"storage_options keys must be str, got {key!r}")
        if scheme in ("s3", "s3a") and key in _S3_NAMES:
            config[_S3_NAMES[key]] = value
        elif scheme in ("s3", "s3a") and key == "client_kwargs":
            if not isinstance(value, Mapping):
                raise ArgumentError(f"storage_options['client_kwargs'] must be a dict, got {value!r}")
            for k, v in value.items():
                if k not in ("endpoint_url", "region_name"):
                    raise ArgumentError(
                        f"storage_options['client_kwargs'][{k!r}] is not supported; "
                        "use endpoint_url or region_name"
                    )
                config[_S3_NAMES[k]] = v
        elif key == "anon":
            if value:
                config["skip_signature"] = True
        elif scheme in ("gs", "gcs") and key == "token":
            if value == "anon":
                config["skip_signature"] = True
            elif isinstance(value, (str, os.PathLike)):
                config["service_account_path"] = os.fspath(value)
            else:
                raise ArgumentError(
                    "storage_options['token'] for gs:// must be a credentials file path or 'anon'"
                )
        elif key == "headers":
            client["default_headers"] = dict(value)
        elif key in ("allow_http", "timeout", "connect_timeout", "proxy_url"):
            client[key] = value
        else:
            config[key] = value
    return config, client


def object_store(url: str, storage_options: Mapping[str, Any] | None, options: RemoteOptions) -> Any:
    """A zarr :class:`~zarr.storage.ObjectStore` (read-only) for the store at ``url``.

    Credentials and endpoints come from the standard environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``; ``GOOGLE_*``; ``AZURE_*``)
    and from ``storage_options`` (which win).

    Raises:
        ArgumentError: an unsupported scheme or a storage option obstore does not know.
        MissingDependencyError: obstore is not installed.
    """
    from .._optional import require

    global _RUNTIME_PID
    scheme = check_scheme(url)
    if _RUNTIME_PID is not None and _RUNTIME_PID != os.getpid():
        # obstore's (tokio) runtime does not survive fork: its requests would never finish
        raise StoreReadError(
            f"{url}: this process was forked from one that had read object storage, and obstore "
            "cannot work after such a fork (it would hang). Start worker processes with 'spawn' or "
            "'forkserver' (DataLoader(multiprocessing_context='spawn'), "
            "WorkerOptions(start_method='spawn')), or open the store only in the workers."
        )
    _RUNTIME_PID = os.getpid()
    obstore_store = require("obstore.store", "reading a store in object storage")
    from zarr.storage import ObjectStore

    config, client = _translate(scheme, storage_options or {})
    endpoint = str(
        config.get("endpoint") or next((os.environ[e] for e in _ENDPOINT_ENV if e in os.environ), "")
    )
    if scheme == "http" or endpoint.startswith("http://"):
        client.setdefault("allow_http", True)  # a plain-HTTP endpoint (a local test server) named by the user
    client.setdefault("timeout", timedelta(seconds=options.timeout))
    client.setdefault("connect_timeout", timedelta(seconds=min(options.timeout, 10.0)))
    retry = {
        "max_retries": options.retries,
        "retry_timeout": timedelta(seconds=options.retry_timeout),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=5),
            "base": 2,
        },
    }
    if scheme in ("s3", "s3a") and "region" not in config and not os.environ.get("AWS_REGION"):
        config["region"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    try:
        store = obstore_store.from_url(url, config=config or None, client_options=client, retry_config=retry)
    except Exception as e:
        raise ArgumentError(
            f"{url}: cannot set up access to object storage: {e}. storage_options take s3fs/gcsfs "
            "names (key, secret, token, endpoint_url, client_kwargs, anon) or obstore's own keys"
        ) from None
    return ObjectStore(store, read_only=True)


def _shape_nbytes(arr: Any) -> tuple[tuple[int, ...], int]:
    shape = (arr.chunks[0], *arr.shape[1:])  # objects hold whole chunks, the last one padded
    return shape, math.prod(shape) * arr.dtype.itemsize


class _Ticket:
    """A request's place in line (:class:`_Loop`)."""

    __slots__ = ("running_urgent", "urgent", "waiter")

    def __init__(self, urgent: bool) -> None:
        self.urgent = urgent
        self.running_urgent = False
        self.waiter: asyncio.Future[None] | None = None


class _Loop:
    """One asyncio event loop on a daemon thread of this process: requests run there
    concurrently, up to ``max_requests`` at a time, in the order they were submitted; an
    *urgent* request (a chunk the reader waits for now) starts at once, whatever the others
    fetched ahead: they must not delay the chunks needed first. While urgent requests run, at
    most a quarter of the places go to requests fetching ahead (they share the bandwidth)."""

    def __init__(self, max_requests: int) -> None:
        self.loop = asyncio.new_event_loop()
        self._max = max_requests
        self._active = 0
        self._urgent = 0
        self._line: deque[_Ticket] = deque()
        self._thread = threading.Thread(target=self.loop.run_forever, name="oocseq-fetch", daemon=True)
        self._thread.start()

    def _full(self) -> bool:
        ahead = self._active - self._urgent
        return self._active >= self._max or (self._urgent > 0 and ahead >= max(1, self._max // 4))

    async def _acquire(self, ticket: _Ticket) -> None:
        if not ticket.urgent and (self._full() or self._line):
            ticket.waiter = self.loop.create_future()
            self._line.append(ticket)
            try:
                await ticket.waiter
            except BaseException:
                if ticket in self._line:
                    self._line.remove(ticket)
                elif ticket.waiter.done() and not ticket.waiter.cancelled():
                    self._release(ticket)  # given a place, then cancelled: pass it on
                raise
            return  # the place was handed over by _release
        self._active += 1
        if ticket.urgent:
            ticket.running_urgent = True
            self._urgent += 1

    def _release(self, ticket: _Ticket | None = None) -> None:
        self._active -= 1
        if ticket is not None and ticket.running_urgent:
            ticket.running_urgent = False
            self._urgent -= 1
        while self._line and not self._full():
            waiting = self._line.popleft()
            if waiting.waiter is not None and not waiting.waiter.done():
                self._active += 1
                waiting.waiter.set_result(None)  # the place goes to it

    def _hurry(self, ticket: _Ticket) -> None:
        ticket.urgent = True
        if ticket in self._line and ticket.waiter is not None and not ticket.waiter.done():
            self._line.remove(ticket)
            self._active += 1
            self._urgent += 1
            ticket.running_urgent = True
            ticket.waiter.set_result(None)

    def submit(self, make: Callable[[], Awaitable[Any]], urgent: bool = False) -> Future[Any]:
        ticket = _Ticket(urgent)

        async def bounded() -> Any:
            await self._acquire(ticket)
            try:
                return await make()
            finally:
                self._release(ticket)

        fut = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        fut.ticket = ticket  # type: ignore[attr-defined]
        return fut

    def hurry(self, fut: Future[Any]) -> None:
        """Start the request ``fut`` (from :meth:`submit`) now if it waits for a place."""
        ticket = getattr(fut, "ticket", None)
        if ticket is not None and not fut.done() and not ticket.urgent:
            with contextlib.suppress(RuntimeError):  # a closed loop
                self.loop.call_soon_threadsafe(self._hurry, ticket)

    def close(self) -> None:
        """Stop the loop and its thread (requests still running are abandoned)."""
        loop = self.loop
        if loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is self._thread:
            return  # closed by the garbage collector on the loop's own thread
        self._thread.join(timeout=10)
        if not loop.is_running():
            loop.close()


class Fetcher:
    """Chunk objects fetched ahead, bounded by bytes, and on demand.

    ``advise`` queues keys; they start as the byte budget allows (each reserves its upper
    size until its answer shows the real one) and wait for :meth:`take`, which hands a fetched
    object over (or fetches it now). A key taken while the budget is full of objects fetched
    ahead that nobody took (the reader moved on) evicts the oldest of those.

    Args:
        get: ``await get(key, limit)``: the object's first ``limit`` bytes, or ``None``.
        max_requests / max_bytes: see :class:`~oocseq.options.RemoteOptions`.
        wait: seconds :meth:`take` waits for one answer at most (beyond the retry budget).
    """

    def __init__(
        self,
        get: Callable[[str, int], Awaitable[Any]],
        max_requests: int,
        max_bytes: int,
        wait: float,
    ) -> None:
        self._get = get
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._wait = wait
        self._loop: _Loop | None = None
        self._lock = threading.Lock()
        self._ahead: OrderedDict[str, tuple[Future[Any], int]] = OrderedDict()
        self._pending: deque[tuple[str, int]] = deque()
        self._queued: set[str] = set()
        self._reserved = 0
        self.requests = 0
        self.bytes = 0
        self.peak_reserved = 0

    def loop(self) -> _Loop:
        """This fetcher's event loop (started on first use)."""
        if self._loop is None:
            self._loop = _Loop(self._max_requests)
            # a store dropped without close: its loop's thread ends with it
            weakref.finalize(self, self._loop.close)
        return self._loop

    def _submit(self, key: str, limit: int, urgent: bool = False) -> Future[Any]:
        loop = self.loop()

        async def one() -> Any:
            data = await self._get(key, limit)
            with self._lock:
                self.requests += 1
                self.bytes += 0 if data is None else len(data)
            return data

        return loop.submit(one, urgent)

    def advise(self, items: list[tuple[str, int]]) -> None:
        with self._lock:
            for key, limit in items:
                if key not in self._ahead and key not in self._queued:
                    self._pending.append((key, limit))
                    self._queued.add(key)
            self._pump()

    def _pump(self) -> None:
        """Start queued fetches while the budget allows (lock held)."""
        while self._pending and (self._reserved + self._pending[0][1] <= self._max_bytes or not self._ahead):
            key, limit = self._pending.popleft()
            self._queued.discard(key)
            fut = self._submit(key, limit)
            self._ahead[key] = (fut, limit)
            self._reserved += limit
            self.peak_reserved = max(self.peak_reserved, self._reserved)
            fut.add_done_callback(functools.partial(self._settled, key, limit))

    def _settled(self, key: str, limit: int, fut: Future[Any]) -> None:
        """An answer arrived: reserve its real size instead of its upper bound."""
        try:
            data = fut.result()
            size = 0 if data is None else len(data)
        except BaseException:
            size = 0
        with self._lock:
            entry = self._ahead.get(key)
            if entry is not None and entry[0] is fut:
                self._ahead[key] = (fut, size)
                self._reserved -= limit - size
                self._pump()

    def take(self, key: str, limit: int, where: str) -> Any:
        """The object ``key`` (its first ``limit`` bytes), or ``None`` if it does not exist."""
        with self._lock:
            entry = self._ahead.pop(key, None)
            if entry is not None:
                self._reserved -= entry[1]
            else:
                if key in self._queued:
                    self._queued.discard(key)
                    self._pending = deque(p for p in self._pending if p[0] != key)
                elif self._pending and self._reserved + self._pending[0][1] > self._max_bytes:
                    # fetched ahead, never read: the plan moved on (another epoch, a restart)
                    for stale in [k for k, (f, _) in self._ahead.items() if f.done()]:
                        if self._reserved + self._pending[0][1] <= self._max_bytes:
                            break
                        self._reserved -= self._ahead.pop(stale)[1]
            self._pump()
            fut = entry[0] if entry is not None else self._submit(key, limit, urgent=True)
        if entry is not None and self._loop is not None:
            self._loop.hurry(fut)  # fetched ahead but still waiting behind later chunks
        try:
            return fut.result(timeout=self._wait)
        except FutureTimeout:
            fut.cancel()
            raise StoreReadError(
                f"{where}: no answer within {self._wait:.0f} s; is the network or the server gone?"
            ) from None

    def close(self) -> None:
        with self._lock:
            for fut, _ in self._ahead.values():
                fut.cancel()
            self._ahead.clear()
            self._pending.clear()
            self._queued.clear()
            self._reserved = 0
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.close()


class DiskCache:
    """Chunk objects kept in a local folder, at most ``limit`` bytes (least recently read
    deleted first). Files are written under a temporary name and renamed, so a reader (this
    process or another) never sees half a file; what it reads is checked by the store anyway.
    """

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)
        entries = []
        for p in root.iterdir():
            if p.is_file() and not p.name.startswith(".tmp"):
                st = p.stat()
                entries.append((st.st_atime, p.name, st.st_size))
        self._files: OrderedDict[str, int] = OrderedDict((n, size) for _, n, size in sorted(entries))
        self.total = sum(self._files.values())
        self.hits = 0

    @staticmethod
    def _name(key: str) -> str:
        return quote(key, safe="")

    def path(self, key: str) -> Path:
        return self.root / self._name(key)

    def __contains__(self, key: str) -> bool:
        return self._name(key) in self._files

    def forget(self, key: str) -> None:
        with self._lock:
            self.total -= self._files.pop(self._name(key), 0)

    def get(self, key: str) -> np.ndarray | None:
        name = self._name(key)
        try:
            data = np.fromfile(self.root / name, dtype=np.uint8)
        except OSError:  # deleted by another process sharing the folder
            self.forget(key)
            return None
        with self._lock:
            if name in self._files:
                self._files.move_to_end(name)
            self.hits += 1
        return data

    def put(self, key: str, data: Any) -> None:
        size = len(data)
        if size > self.limit:
            return
        name = self._name(key)
        tmp = self.root / f".tmp-{os.getpid()}-{threading.get_ident()}-{name}"
        try:
            np.asarray(data, dtype=np.uint8).tofile(tmp)
            os.replace(tmp, self.root / name)
        except OSError:  # a full or read-only disk: the cache is an optimisation only
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self.total += size - self._files.pop(name, 0)
            self._files[name] = size
            while self.total > self.limit and self._files:
                old, old_size = self._files.popitem(last=False)
                self.total -= old_size
                (self.root / old).unlink(missing_ok=True)


class RemoteZarrReader(StorageReader):
    """Reads a Zarr v3 store in object storage (see the module's docstring).

    Attributes:
        url: the store's URL.
        fetcher: the chunk fetcher; ``fetcher.requests`` / ``fetcher.bytes`` count the chunk
            requests answered and the bytes they brought, in this process.
    """

    format = "zarr"
    #: every read downloads the chunk again: the store checks each one
    refetches = True

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        options: RemoteOptions | None = None,
        fast: bool = True,
    ) -> None:
        super().__init__(Path(urlsplit(url).path or "/"), fast)
        import zarr

        self.url = url.rstrip("/")
        self.options = options or RemoteOptions()
        self._zstore = object_store(self.url, storage_options, self.options)
        o = self.options
        wait = o.retry_timeout + o.timeout * (o.retries + 2) + 10.0
        self.fetcher = Fetcher(self._get, o.max_requests, o.max_bytes_in_flight, wait)
        try:
            self._group = zarr.open_group(store=self._zstore, mode="r")
        except Exception as e:
            self.fetcher.close()
            raise self._open_error(e) from None
        self._arrays: dict[str, Any] = {}
        self._kinds: dict[str, str] = {}
        #: the local disk cache (``RemoteOptions.cache_dir``), set up once the manifest is read
        self.cache: DiskCache | None = None
        self._unverified: dict[tuple[str, int], Any] = {}
        self._cached_reads: set[tuple[str, int]] = set()

    def _open_error(self, e: BaseException) -> Exception:
        text = f"{type(e).__name__}: {e}"
        if (
            isinstance(e, FileNotFoundError)
            or "NotFound" in type(e).__name__
            or "not found" in str(e).lower()
        ):
            return StoreNotFoundError(
                f"no store at {self.url!r} (no zarr.json there); check the URL, or ingest the store first"
            )
        if _is_network(e):
            return StoreReadError(f"{self.url}: cannot read the store's metadata: {text}")
        return NotAStoreError(f"{self.url} is not a readable zarr store: {text}")

    async def _get(self, key: str, limit: int) -> Any:
        """The first ``limit`` bytes of object ``key`` (uint8 array), ``None`` if missing."""
        from zarr.abc.store import RangeByteRequest
        from zarr.core.buffer import default_buffer_prototype

        try:
            buf = await self._zstore.get(key, default_buffer_prototype(), RangeByteRequest(0, limit))
        except Exception as e:
            if _is_range_on_empty(e):  # a zero-byte object: no range of it exists
                return np.empty(0, np.uint8)
            raise StoreReadError(
                f"{self.url}/{key}: fetch failed after up to {self.options.retries} retries "
                f"({self.options.retry_timeout:g} s): {type(e).__name__}: {str(e).strip()[:500]}"
            ) from None
        return None if buf is None else buf.as_numpy_array()

    def _run(self, coro: Callable[[], Awaitable[Any]]) -> Any:
        """Run a zarr store call on the fetch loop and wait for it."""
        return self.fetcher.loop().submit(coro).result(timeout=self.fetcher._wait)

    def manifest_doc(self) -> Any:
        try:
            doc = self._group.attrs.asdict().get(ATTR_KEY)
        except Exception as e:
            raise self._open_error(e) from None
        if self.options.cache_dir is not None and isinstance(doc, dict):
            # one folder per store and content: a store replaced at the same URL gets another
            ident = json.dumps([self.url, doc.get("checksums")], sort_keys=True, default=str)
            folder = hashlib.sha256(ident.encode()).hexdigest()[:24]
            try:
                self.cache = DiskCache(Path(self.options.cache_dir) / folder, self.options.cache_limit)
            except OSError as e:
                raise ArgumentError(f"cache_dir {self.options.cache_dir!r} cannot be used: {e}") from None
        return doc

    def _array(self, name: str) -> Any:
        import zarr

        from ._zarr import _AUX_CODECS

        arr = self._arrays.get(name)
        if arr is None:
            try:
                arr = self._group[name]
            except KeyError:
                raise CorruptStoreError(f"{self.url}: array {name!r} is missing") from None
            except Exception as e:
                if _is_network(e):
                    raise StoreReadError(f"{self.url}: cannot read array {name!r}'s metadata: {e}") from None
                raise CorruptStoreError(
                    f"{self.url}: array {name!r} has invalid or unsupported metadata: {e}"
                ) from None
            if not isinstance(arr, zarr.Array):
                raise CorruptStoreError(f"{self.url}: {name!r} is not an array")
            if getattr(arr.metadata, "zarr_format", 3) != 3:
                raise CorruptStoreError(f"{self.url}/{name}: not a Zarr v3 array")
            if name.startswith(AUX_GROUP + "/"):
                codecs = [c.to_dict()["name"] for c in getattr(arr.metadata, "codecs", ())]
                if codecs not in _AUX_CODECS:
                    raise CorruptStoreError(f"{self.url}/{name}: codecs {codecs} are not allowed")
            self._arrays[name] = arr
        return arr

    def check_layout(
        self, name: str, n: int, chunk_len: int, spec: FieldSpec, compression: Compression | None = None
    ) -> None:
        from ._zarr import check_field_layout

        where = f"{self.url}: field {name!r}"
        self._kinds[name] = check_field_layout(self._array(name), n, chunk_len, spec, compression, where)

    def _key(self, name: str, c: int) -> str:
        return f"{name}/c/" + "/".join([str(c)] + ["0"] * (self._array(name).ndim - 1))

    def _limit(self, name: str) -> int:
        """The most bytes chunk objects of ``name`` may hold, plus one (to see a larger one)."""
        _, nbytes = _shape_nbytes(self._array(name))
        return nbytes + (BLOSC_MAX_OVERHEAD if self._kinds[name] == "blosc" else 0) + 1

    def chunk_location(self, name: str, c: int) -> str:
        key = self._key(name, c)
        if self.cache is not None and (name, c) in self._cached_reads:
            return f"{self.url}/{key}, read from its cached copy {self.cache.path(key)}"
        return f"{self.url}/{key}"

    def advise_chunks(self, name: str, chunks: np.ndarray) -> None:
        if name not in self._kinds:
            return
        limit = self._limit(name)
        keys = [self._key(name, int(c)) for c in chunks.tolist()]
        if self.cache is not None:
            keys = [k for k in keys if k not in self.cache]
        self.fetcher.advise([(k, limit) for k in keys])

    def _chunk_bytes(self, name: str, c: int) -> tuple[Any, str]:
        key = self._key(name, c)
        where = f"{self.url}: chunk {c} of field {name!r} ({self.url}/{key})"
        if self.cache is not None:
            data = self.cache.get(key) if key in self.cache else None
            if data is not None:
                self._cached_reads.add((name, c))
                return data, f"{where} (cached copy {self.cache.path(key)})"
            self._cached_reads.discard((name, c))
        data = self.fetcher.take(key, self._limit(name), where)
        if data is None:
            raise CorruptStoreError(
                f"{where} is missing; the store is incomplete or damaged. Ingest it again."
            )
        if self.cache is not None:  # kept once the store has checked it (chunk_verified)
            self._unverified[(name, c)] = data
            if len(self._unverified) > 64:  # never checked (verify_checksums=False): let go
                self._unverified.pop(next(iter(self._unverified)), None)
        return data, where

    def chunk_verified(self, name: str, c: int) -> None:
        """The store checked chunk ``c`` of ``name`` against its checksum: keep it in the disk
        cache."""
        data = self._unverified.pop((name, c), None)
        if data is not None and self.cache is not None:
            self.cache.put(self._key(name, c), data)

    def chunk_failed(self, name: str, c: int) -> None:
        """Chunk ``c`` of ``name`` failed its checksum: forget it, and delete its cached copy."""
        self._unverified.pop((name, c), None)
        if self.cache is not None and (name, c) in self._cached_reads:
            self.cache.path(self._key(name, c)).unlink(missing_ok=True)
            self.cache.forget(self._key(name, c))

    def read_chunk_fast(
        self, name: str, c: int, start: int, stop: int, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        arr = self._array(name)
        shape, nbytes = _shape_nbytes(arr)
        chunk = out if out is not None and stop - start == shape[0] else np.empty(shape, dtype=arr.dtype)
        data, where = self._chunk_bytes(name, c)
        size = len(data)
        if self._kinds[name] == "raw":
            if size != nbytes:
                more = " or more" if size > nbytes else ""
                raise CorruptStoreError(
                    f"{where}: uncompressed chunk object has {size}{more} bytes, expected {nbytes}"
                )
            chunk.reshape(-1).view(np.uint8)[...] = data
        else:
            if size > nbytes + BLOSC_MAX_OVERHEAD:
                raise CorruptStoreError(
                    f"{where}: compressed chunk object has more than {nbytes + BLOSC_MAX_OVERHEAD} bytes, "
                    f"the {nbytes} bytes it decodes to plus the Blosc header"
                )
            blosc_decode_into(memoryview(data), chunk, where)
        return serve(chunk, out, stop - start)

    def read_chunk_library(self, name: str, c: int, start: int, stop: int) -> np.ndarray:
        arr = self._array(name)
        data, where = self._chunk_bytes(name, c)  # missing -> error (zarr would serve fill values)
        if self._kinds[name] == "blosc":
            _, nbytes = _shape_nbytes(arr)
            said, _ = blosc_header(memoryview(data[:BLOSC_HEADER]), where)
            if said != nbytes:
                raise CorruptStoreError(
                    f"{where}: compressed chunk says {said} bytes decoded, expected {nbytes}"
                )
        try:
            return np.ascontiguousarray(arr[start:stop])
        except Exception as e:
            if _is_network(e):
                raise StoreReadError(f"{where}: {e}") from None
            raise CorruptStoreError(f"{where}: cannot decode chunk: {e}") from e

    def read_aux(self, name: str) -> np.ndarray:
        from ._zarr import _MAX_AUX_STR_BYTES, zstd_content_size

        key = f"{AUX_GROUP}/{name}"
        arr = self._array(key)
        if arr.ndim != 1:
            raise CorruptStoreError(
                f"{self.url}: auxiliary array {name!r} has shape {arr.shape}, expected 1-D"
            )
        codecs = [c.to_dict()["name"] for c in arr.metadata.codecs]
        if "zstd" in codecs:  # check decoded sizes before zarr decodes
            per_item = _MAX_AUX_STR_BYTES if codecs[0] == "vlen-utf8" else arr.dtype.itemsize
            limit = arr.chunks[0] * per_item
            for c in range(-(-arr.shape[0] // arr.chunks[0])):
                where = f"{self.url}: chunk {c} of auxiliary array {name!r}"
                head = self.fetcher.take(f"{key}/c/{c}", 18, where)
                if head is None:
                    raise CorruptStoreError(f"{where} is missing; ingest the store again")
                size = zstd_content_size(bytes(head))
                if size is None or size > limit:
                    raise CorruptStoreError(
                        f"{where}: zstd frame of {'unstated' if size is None else size} decoded bytes, "
                        f"at most {limit} expected"
                    )
        try:
            return np.asarray(arr[...])
        except Exception as e:
            raise CorruptStoreError(f"{self.url}: cannot decode auxiliary array {name!r}: {e}") from None

    def stored_nbytes(self, name: str) -> int:
        prefix = f"{name}/c/"
        return int(self._run(lambda: self._zstore.getsize_prefix(prefix)))

    def close(self) -> None:
        self._arrays.clear()
        self.fetcher.close()


def _is_network(e: BaseException) -> bool:
    """Whether ``e`` is a transport failure (as opposed to bad content)."""
    if isinstance(e, (StoreReadError, ConnectionError, TimeoutError)):
        return True
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("connect", "timed out", "timeout", "dns", "network", "retry", "retries"))


def _is_range_on_empty(e: BaseException) -> bool:
    text = str(e).lower()
    return "416" in text or "range not satisfiable" in text or "invalid range" in text


def exists(url: str, storage_options: Mapping[str, Any] | None, options: RemoteOptions) -> bool:
    """Whether a Zarr store (its root ``zarr.json``) is at ``url``."""
    import obstore

    store = object_store(url, storage_options, options).store
    try:
        obstore.head(store, "zarr.json")
    except FileNotFoundError:
        return False
    except Exception as e:
        raise StoreReadError(f"{url}: cannot tell whether a store is there: {e}") from None
    return True


def upload(
    local: Path,
    url: str,
    storage_options: Mapping[str, Any] | None,
    options: RemoteOptions,
    sent: frozenset[str] | set[str] = frozenset(),
) -> int:
    """Copy the committed local Zarr store ``local`` to ``url``; returns the bytes sent.
    ``sent``: keys of objects of the new store already sent (the chunks an ingestion streamed),
    which are kept.

    What is atomic: each object (one PUT replaces it whole). The store's root ``zarr.json``,
    which holds the manifest, is deleted first (a store being replaced stops being visible)
    and written last, so no reader opens a store whose chunks are not all there. Objects under
    ``url`` that the new store does not have (chunks of a larger old store) are deleted after
    the manifest lands. A reader that opened the old store before sees chunks of the new one
    fail their checksums: an error, never mixed data.

    Raises:
        StoreWriteError: a request failed past the retry budget.
    """
    import obstore

    from ..errors import StoreWriteError

    store = object_store(url, storage_options, options).store
    files = sorted(p for p in local.rglob("*") if p.is_file())
    keys = {p: p.relative_to(local).as_posix() for p in files}
    keep = set(keys.values()) | set(sent)
    loop = _Loop(options.max_requests)
    total = 0
    try:

        def put(path: Path) -> Future[Any]:
            data = path.read_bytes()
            return loop.submit(lambda: obstore.put_async(store, keys[path], data))

        try:
            with contextlib.suppress(FileNotFoundError):
                loop.submit(lambda: obstore.delete_async(store, "zarr.json")).result()
            root = local / "zarr.json"
            futures = [put(p) for p in files if p != root]
            for f in futures:
                f.result()
            total = sum(p.stat().st_size for p in files)
            put(root).result()  # the manifest, last
            stale = [m["path"] for batch in obstore.list(store) for m in batch if m["path"] not in keep]
            if stale:
                loop.submit(lambda: obstore.delete_async(store, stale)).result()
        except Exception as e:
            raise StoreWriteError(f"cannot write the store to {url}: {type(e).__name__}: {e}") from None
    finally:
        loop.close()
    return total


class ChunkUploader:
    """Chunk objects sent to a store in object storage as an ingestion makes them: one PUT per
    chunk (atomic: a reader never sees part of an object), up to ``options.max_requests``
    at once and at most ``options.max_bytes_in_flight`` bytes handed over and not yet sent
    (:meth:`put` waits for room, so the writer's memory stays bounded).

    A failed PUT (after obstore's retries) is raised, as StoreWriteError naming the object, by
    the next :meth:`put` or by :meth:`wait`.

    Attributes:
        keys: the keys sent (or being sent).
        bytes: bytes sent.
        peak_bytes: the most bytes in flight at once.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None, options: RemoteOptions) -> None:
        self.url = url
        self.store = object_store(url, storage_options, options).store
        self._max_bytes = options.max_bytes_in_flight
        self._loop = _Loop(options.max_requests)
        self._cond = threading.Condition()
        self._in_flight = 0
        self._futures: set[Future[Any]] = set()
        self._error: BaseException | None = None
        self._failed = ""
        self._retries = options.retries
        self.keys: set[str] = set()
        self.bytes = 0
        self.peak_bytes = 0
        self._acked: dict[str, set[int]] = {}  # chunks acknowledged past the prefix, per field
        self._prefix: dict[str, int] = {}  # chunks 0..prefix-1 of the field all acknowledged
        self.before: dict[str, int] = {}  # chunks sent by an interrupted run, per field

    def sent_before(self, name: str, count: int) -> None:
        """Chunks ``0..count-1`` of field ``name`` were sent (and acknowledged) by an
        interrupted run whose ingestion this one resumes."""
        with self._cond:
            self.before[name] = count
            self._prefix[name] = max(self._prefix.get(name, 0), count)

    def acknowledged(self, name: str) -> int:
        """How many chunks of field ``name``, from the first on, the bucket acknowledged."""
        with self._cond:
            return self._prefix.get(name, 0)

    def check_present(self, keys: list[str]) -> None:
        """StoreWriteError unless every object ``keys`` names is in the bucket (one listing)."""
        import obstore

        from ..errors import StoreWriteError

        try:
            have = {m["path"] for batch in obstore.list(self.store) for m in batch}
        except Exception as e:
            raise StoreWriteError(f"cannot list {self.url}: {type(e).__name__}: {e}") from None
        missing = [k for k in keys if k not in have]
        if missing:
            raise StoreWriteError(
                f"{len(missing)} chunk objects sent by the interrupted ingestion into {self.url} are "
                f"gone (e.g. {self.url}/{missing[0]}); run the ingestion again with resume=False"
            )

    def _raise(self) -> None:
        if self._error is not None:
            from ..errors import StoreWriteError

            e = self._error
            first = (str(e).strip().splitlines() or [""])[0][:500]  # (obstore appends a debug dump)
            raise StoreWriteError(
                f"cannot write {self.url}/{self._failed} (after {self._retries} retries): "
                f"{type(e).__name__}: {first}. Nothing at {self.url} "
                "opens as a store; "
                "run the ingestion again"
            ) from None

    def delete(self, keys: list[str]) -> None:
        """Delete objects (missing ones are no error)."""
        import obstore

        if keys:
            self._loop.submit(lambda: obstore.delete_async(self.store, keys)).result()

    def put(self, key: str, data: bytes, chunk: tuple[str, int] | None = None) -> None:
        """Start sending ``data`` as object ``key`` (``chunk``: its field and chunk number,
        counted by :meth:`acknowledged`); waits while the bytes in flight are at their bound."""
        import obstore

        size = len(data)
        with self._cond:
            while self._in_flight and self._in_flight + size > self._max_bytes and self._error is None:
                self._cond.wait()
            self._raise()
            self._in_flight += size
            self.peak_bytes = max(self.peak_bytes, self._in_flight)
            self.keys.add(key)

        fut = self._loop.submit(lambda: obstore.put_async(self.store, key, data, use_multipart=False))
        with self._cond:
            self._futures.add(fut)
        fut.add_done_callback(functools.partial(self._done, key, size, chunk))

    def _done(self, key: str, size: int, chunk: tuple[str, int] | None, fut: Future[Any]) -> None:
        with self._cond:
            self._futures.discard(fut)
            self._in_flight -= size
            if not fut.cancelled():
                e = fut.exception()
                if e is None:
                    self.bytes += size
                    if chunk is not None:
                        name, c = chunk
                        acked = self._acked.setdefault(name, set())
                        acked.add(c)
                        prefix = self._prefix.get(name, 0)
                        while prefix in acked:
                            acked.discard(prefix)
                            prefix += 1
                        self._prefix[name] = prefix
                elif self._error is None:
                    self._error = e
                    self._failed = key
            self._cond.notify_all()

    def wait(self) -> None:
        """Wait until every object handed over is sent; raise the first failure."""
        with self._cond:
            while self._futures:
                self._cond.wait()
            self._raise()

    def cancel(self) -> None:
        """Stop sending (objects already sent stay) and wait for the requests running."""
        with self._cond:
            futures = list(self._futures)
        for f in futures:
            f.cancel()
        for f in futures:
            with contextlib.suppress(BaseException):
                f.result(timeout=60)

    def close(self) -> None:
        self._loop.close()
