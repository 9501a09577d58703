"""The window cache: decoded windows, read ahead by a thread pool.

A window's chunks are decoded straight into one buffer per field, back to back, by the pool's
threads (numcodecs and memcpy release the GIL, so they run in parallel with the thread that
serves batches). A batch is then one ``np.take`` per window it spans: one copy per sample.

Batches in flight *hold* the windows they use (:meth:`WindowCache.hold`, a context manager);
:meth:`WindowCache.drop_unheld` drops every other window, so memory is bounded by the windows
in use plus the read-ahead, never by the store's size. Counters bound the work done, for tests: ``decodes`` (chunks of
one field read and decoded), ``hits`` (window requests served from the cache),
``peak_resident`` (most chunks, over all fields, held at once).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .manifest import FieldSpec
from .storage._raw import aligned_empty

#: ``decode(field, chunk, out)`` writes chunk ``chunk`` of ``field`` into ``out``.
Decoder = Callable[[str, int, np.ndarray], None]


class Hold:
    """Windows kept in a :class:`WindowCache` until :meth:`release` (or the end of a ``with``
    block). Releasing twice is harmless."""

    def __init__(self, cache: WindowCache, keys: list[Hashable]) -> None:
        self._cache = cache
        self.keys = keys
        self._released = False

    def release(self) -> None:
        with self._cache._lock:
            if not self._released:
                self._released = True
                self._cache._holds.pop(id(self), None)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Window:
    """The decoded buffers of one window and one future per chunk decode.

    A chunk's decode is run once, by whichever thread claims it first: a pool thread, or a
    thread that needs the window now and would otherwise wait (it decodes the chunks no pool
    thread has started, so no core idles while the window it waits for has work left)."""

    def __init__(self, bases: dict[str, np.ndarray], chunks: np.ndarray, sizes: np.ndarray) -> None:
        total = int(sizes.sum())
        self.bases = bases  # full-size buffers, returned to the pool when the window is dropped
        self.buffers = {f: b[:total] for f, b in bases.items()}
        self.chunks = chunks
        self.offsets = np.r_[0, np.cumsum(sizes)]
        self.futures: list[Future[None]] = [Future() for _ in range(len(chunks))]
        self.claimed = [False] * len(chunks)
        self.ready = False  # every decode done and checked by a get()


class WindowCache:
    """Decoded windows keyed by any hashable (the sequence uses ``(epoch, window)``).

    Args:
        decode: writes one chunk of one field into a buffer (see :data:`Decoder`).
        fields: field name -> layout of one sample.
        chunk_len: samples per chunk; ``n`` samples in all (the last chunk may be short).
        window: chunks per window (sizes the reusable buffers).
        threads: decoding threads; 0 decodes in the calling thread.
        advise: ``advise(field, chunks)`` hints the kernel to read chunks ahead (optional).
    """

    def __init__(
        self,
        decode: Decoder,
        fields: dict[str, FieldSpec],
        chunk_len: int,
        n: int,
        window: int,
        threads: int,
        advise: Callable[[str, np.ndarray], None] | None = None,
    ) -> None:
        self._decode = decode
        self._advise = advise
        self._advised: OrderedDict[Hashable, None] = OrderedDict()
        self._fields = fields
        self._chunk_len = chunk_len
        self._n = n
        self._window_rows = window * chunk_len
        self._threads = threads
        # Buffers of dropped windows, reused: no fresh pages (and page faults) per window, and
        # a resident size that stays flat. Holds _max_free sets (windows), or more while fewer
        # windows are in use than at the most so far (between epochs): buffers in use and free
        # never exceed that most plus _max_free.
        self._free: list[dict[str, np.ndarray]] = []
        self._max_free = 2
        self._peak_windows = 0
        self._pool: ThreadPoolExecutor | None = None
        self._items: dict[Hashable, _Window] = {}
        self._lock = threading.Lock()
        self._holds: dict[int, Hold] = {}
        self._closed = False  # no new pool once closed (a thread still serving decodes itself)
        self.decodes = 0
        self.hits = 0
        self.peak_resident = 0

    def _resident_chunks(self) -> int:
        return sum(len(w.chunks) for w in self._items.values()) * len(self._fields)

    def _decode_chunk(self, window: _Window, j: int) -> None:
        c = int(window.chunks[j])
        a, b = int(window.offsets[j]), int(window.offsets[j + 1])
        for name, buf in window.buffers.items():
            self._decode(name, c, buf[a:b])
            with self._lock:
                self.decodes += 1

    def _start(self, key: Hashable, chunks: np.ndarray) -> tuple[_Window, bool]:
        """The window for ``key``, creating it (and queuing its decodes) if absent."""
        with self._lock:
            window = self._items.get(key)
            if window is not None:
                return window, False
        # a window not announced ahead (random access, the first one): its chunks are read
        # ahead together (concurrent requests for a store in object storage)
        self.advise(key, chunks)
        with self._lock:
            window = self._items.get(key)
            if window is not None:
                return window, False
            starts = chunks * self._chunk_len
            sizes = np.minimum(starts + self._chunk_len, self._n) - starts
            window = _Window(self._buffers(), chunks, sizes)
            self._items[key] = window
            self.peak_resident = max(self.peak_resident, self._resident_chunks())
            self._peak_windows = max(self._peak_windows, len(self._items))
            pool = self._get_pool()
            if pool is not None:
                for j in range(len(chunks)):
                    pool.submit(self._run, window, j)
            return window, True

    def _get_pool(self) -> ThreadPoolExecutor | None:
        """The decoding threads (started on first use); None without threads. Call with the
        lock held."""
        if self._threads > 0 and self._pool is None and not self._closed:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="oocseq-decode")
        return self._pool

    def _run(self, window: _Window, j: int) -> None:
        """Decode chunk ``j`` of ``window`` unless another thread claimed it or the window was
        dropped first; the outcome goes to ``window.futures[j]``."""
        with self._lock:
            if window.claimed[j]:
                return
            window.claimed[j] = True
        fut = window.futures[j]
        if not fut.set_running_or_notify_cancel():
            return  # the window was dropped before its decode started
        try:
            self._decode_chunk(window, j)
        except BaseException as e:
            fut.set_exception(e)
        else:
            fut.set_result(None)

    def advise(self, key: Hashable, chunks: np.ndarray) -> None:
        """Tell the kernel that a window's chunks will be read soon (asynchronous read-ahead
        from disk; a no-op for data in the page cache), once per window."""
        if self._advise is None or key in self._advised:  # (atomic lookup, checked again below)
            return
        with self._lock:
            if key in self._advised:
                return
            self._advised[key] = None
            if len(self._advised) > 64:
                self._advised.popitem(last=False)
        for name in self._fields:
            self._advise(name, chunks)

    def prefetch(self, key: Hashable, chunks: np.ndarray) -> None:
        """Start decoding a window in the background (no-op without threads or if cached)."""
        if self._threads > 0 and key not in self._items:  # (a dict lookup is atomic: no lock)
            self._start(key, chunks)

    def background(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` in a decoding thread; nothing without threads or once closed.
        Its result and any exception are dropped: for work that only warms a cache (such as
        a window's serving order), which the caller would otherwise do when it needs it."""
        with self._lock:
            pool = self._get_pool()
            if pool is not None:  # (under the lock: close() shuts the pool down under it too)
                pool.submit(fn, *args)

    def get(self, key: Hashable, chunks: np.ndarray) -> dict[str, np.ndarray]:
        """The decoded buffers (field -> array) of the window made of ``chunks``. Decodes the
        window's chunks that no thread has started in the calling thread, and waits for the
        others."""
        window = self._items.get(key)  # (a dict lookup is atomic: no lock)
        created = False
        if window is None or not window.ready:
            window, created = self._start(key, chunks)
        if window.ready:
            with self._lock:
                self.hits += 1
            return window.buffers
        if not created:
            with self._lock:
                self.hits += 1
        if self._threads == 0:
            for j, fut in enumerate(window.futures):
                self._run(window, j)
                if fut.done() and fut.exception() is not None:
                    break  # (reported below)
        else:  # from the last chunk down: the pool's threads take them from the first one up
            for j in range(len(window.futures) - 1, -1, -1):
                if not window.claimed[j]:
                    self._run(window, j)
        for fut in window.futures:
            try:
                fut.result()
            except BaseException:
                self._forget(key, window)  # do not keep a half-decoded window
                raise
        window.ready = True
        return window.buffers

    def _buffers(self) -> dict[str, np.ndarray]:
        """A set of full-window buffers, from the pool if one is free. Call with the lock held."""
        if self._free:
            return self._free.pop()
        rows = self._window_rows
        # Page-aligned, as are the chunks in them (whole pages each, for the usual sample
        # sizes): the kernel copies a chunk's bytes into them several times faster.
        return {f: aligned_empty((rows, *lay.sample_shape), lay.dtype) for f, lay in self._fields.items()}

    def _recycle(self, window: _Window) -> None:
        """Return a dropped window's buffers to the pool once no decode writes to them."""
        pending = [f for f in window.futures if not f.cancel() and not f.done()]
        if not pending:
            with self._lock:
                if self._keep_free():
                    self._free.append(window.bases)
            return
        left = [len(pending)]

        def one_done(_: Future[None]) -> None:
            with self._lock:
                left[0] -= 1
                if left[0] == 0 and self._keep_free():
                    self._free.append(window.bases)

        for f in pending:
            f.add_done_callback(one_done)

    def _keep_free(self) -> bool:
        """Whether one more set of buffers may join the free ones. Call with the lock held."""
        free = len(self._free)
        return free < self._max_free or free + len(self._items) < self._peak_windows

    def _forget(self, key: Hashable, window: _Window) -> None:
        with self._lock:
            if self._items.get(key) is not window:
                return
            del self._items[key]
        self._recycle(window)

    def hold(self, keys: Iterable[Hashable]) -> Hold:
        """Keep the windows ``keys`` (decoded now or later) until the returned :class:`Hold` is
        released: ``with cache.hold(keys): ...``, or ``h = cache.hold(keys)`` ... ``h.release()``
        for windows held across calls (batches queued for workers)."""
        h = Hold(self, list(keys))
        with self._lock:
            self._holds[id(h)] = h
        return h

    @property
    def held(self) -> set[Hashable]:
        """The keys held now (by any unreleased :class:`Hold`)."""
        with self._lock:
            return {k for h in self._holds.values() for k in h.keys}

    def drop_unheld(self, hold: Hold | None = None) -> None:
        """Drop every window no :class:`Hold` keeps (decodes already running finish, then their
        buffers are reused). ``hold``: one of the holds not yet released, whose windows are
        likely all there is (then nothing is dropped, found without taking the lock)."""
        if hold is not None and all(k in hold.keys for k in list(self._items)):
            return
        with self._lock:
            keep = {k for h in self._holds.values() for k in h.keys}
            dropped = [self._items.pop(k) for k in [k for k in self._items if k not in keep]]
        for window in dropped:
            self._recycle(window)

    def retain(self, keys: Iterable[Hashable]) -> None:
        """Drop every window not in ``keys`` (decodes already running finish, then their
        buffers are reused)."""
        keep = set(keys)
        with self._lock:
            dropped = [self._items.pop(k) for k in [k for k in self._items if k not in keep]]
        for window in dropped:
            self._recycle(window)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        """Whether window ``key`` is cached or being decoded (no lock: a dict lookup is atomic)."""
        return key in self._items

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._holds.clear()
            items = list(self._items.values())
            self._items.clear()
            self._free.clear()
            pool, self._pool = self._pool, None
        for window in items:  # a thread waiting for a decode that will not run is told
            for fut in window.futures:
                fut.cancel()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def default_threads() -> int:
    """Decoding threads when none are given: the cores less one, 1 to 4 (the thread that
    serves batches has the last core, and decodes on it the chunks no decoding thread has
    started whenever it would wait for them). Measured on 2 cores (``benchmarks/README.md``):
    1 thread served uncompressed stores 8-28% faster than 2, and lz4 stores 7-10% faster."""
    cores = os.cpu_count() or 1
    return max(1, min(4, cores - 1))
