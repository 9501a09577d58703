"""The window cache: decoded windows, read ahead by a thread pool.

A window's chunks are decoded into one buffer per field by the pool's threads (numcodecs,
memcpy and ``preadv`` release the GIL, so they run in parallel with the thread that serves
batches). For a *scattered* field (uncompressed samples of a page or more, see
:meth:`oocseq.Store.scatters`) each sample goes straight to the position it is served at
(:meth:`EpochPlan.window_positions <oocseq.plan.EpochPlan.window_positions>`): the buffer holds
the window in serving order, a batch is a slice of it, and the kernel reads a chunk from the
page cache to those positions: one copy per sample, as many as numpy's own ``x[idx]``. Other
fields hold their chunks' samples back to back and a batch is gathered from them (``np.take``).

A batch shares its window's buffer, so the cache never hands out the same positions twice
(:meth:`WindowCache.get` with ``rows``: positions asked for again are decoded again, into a new
buffer, since the caller may have written to the first batch) and never reuses a buffer while
any array still points into it (its reference count tells): memory stays bounded as long as
batches are dropped after use, as a training loop does; a batch kept keeps its window's
buffer.

Batches in flight *hold* the windows they use (:meth:`WindowCache.hold`, a context manager);
:meth:`WindowCache.drop_unheld` drops every other window, so memory is bounded by the windows
in use plus the read-ahead, never by the store's size. Counters bound the work done, for tests: ``decodes`` (chunks of
one field read and decoded), ``hits`` (window requests served from the cache),
``peak_resident`` (most chunks, over all fields, held at once).
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .manifest import FieldSpec
from .storage._raw import aligned_empty

#: ``decode(field, chunk, out, positions)`` writes chunk ``chunk`` of ``field`` into ``out``
#: (positions None: ``out`` has the chunk's length) or its sample ``k`` into ``out[positions[k]]``.
Decoder = Callable[[str, int, np.ndarray, "np.ndarray | None"], None]
#: ``order()``: where each row of a window's chunks is served (see :class:`WindowCache`), or
#: None for the chunks' own order; called by the thread that decodes the window.
Order = Callable[[], "np.ndarray | None"]


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

    def __init__(
        self, bases: dict[str, np.ndarray], chunks: np.ndarray, sizes: list[int], order: Order | None
    ) -> None:
        # (Python ints for the few chunks of a window: small numpy arrays cost more per call.)
        self.offsets = [0, *itertools.accumulate(sizes)]
        total = self.offsets[-1]
        self.bases = bases  # full-size buffers, returned to the pool when the window is dropped
        self.buffers = {f: b[:total] for f, b in bases.items()}
        self.chunks = chunks.tolist()
        self.order = order
        self.positions: np.ndarray | None = None  # order(), once a decoding thread asked
        self.futures: list[Future[None]] = [Future() for _ in sizes]
        self.claimed = [False] * len(sizes)
        self.ready = False  # every decode done and checked by a get()
        self.served: np.ndarray | None = None  # positions handed out in batches (made when asked)


def _in_use(bases: dict[str, np.ndarray]) -> bool:
    """Whether any array other than ``bases`` points into their memory. Every view of a
    buffer (a batch, a tensor made from one, a window's slice) holds a reference to the array
    that owns the memory (numpy points a view's ``base`` at the owner), so the owner's
    reference count is 2 (the buffer's ``base`` and the call's argument) exactly when none is
    left."""
    return any(sys.getrefcount(b.base) > 2 for b in bases.values())


class WindowCache:
    """Decoded windows keyed by any hashable (the batch core uses ``(epoch, window)``, and
    ``(epoch, window, lap)`` for a padded rank's second reading of a window).

    Args:
        decode: writes one chunk of one field into a buffer (see :data:`Decoder`).
        fields: field name -> layout of one sample.
        chunk_len: samples per chunk; ``n`` samples in all (the last chunk may be short).
        window: chunks per window (sizes the reusable buffers).
        threads: decoding threads; 0 decodes in the calling thread.
        advise: ``advise(field, chunks)`` hints the kernel to read chunks ahead (optional).
        scattered: fields whose buffers hold a window in serving order (each chunk's samples
            written to their positions, see :meth:`get`'s ``order``); the others hold the
            chunks' samples back to back.
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
        scattered: Iterable[str] = (),
    ) -> None:
        self._decode = decode
        self._scattered = frozenset(scattered)
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
        c = window.chunks[j]
        a, b = window.offsets[j], window.offsets[j + 1]
        order = window.order  # (read once: another thread may set it to None meanwhile)
        if window.positions is None and order is not None and self._scattered:
            window.positions = order()  # (two threads may both ask: the same array)
            window.order = None  # (asked once: None means the chunks' own order)
        positions = window.positions
        for name, buf in window.buffers.items():
            if positions is None or name not in self._scattered:
                self._decode(name, c, buf[a:b], None)
            else:
                self._decode(name, c, buf, positions[a:b])
            with self._lock:
                self.decodes += 1

    def _start(self, key: Hashable, chunks: np.ndarray, order: Order | None) -> tuple[_Window, bool]:
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
            cl, n = self._chunk_len, self._n
            sizes = [min(cl, n - c * cl) for c in chunks.tolist()]
            window = _Window(self._buffers(), chunks, sizes, order)
            self._items[key] = window
            self.peak_resident = max(self.peak_resident, self._resident_chunks())
            self._peak_windows = max(self._peak_windows, len(self._items))
            pool = self._get_pool()
            if pool is not None:
                # One task per decoding thread (not per chunk: a pool task and its future cost
                # ~20 us each on the serving thread), each decoding the chunks no thread has
                # claimed, from the first up.
                for _ in range(min(self._threads, len(sizes))):
                    pool.submit(self._run_window, window)
            return window, True

    def _get_pool(self) -> ThreadPoolExecutor | None:
        """The decoding threads (started on first use); None without threads. Call with the
        lock held."""
        if self._threads > 0 and self._pool is None and not self._closed:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="oocseq-decode")
        return self._pool

    def _run_window(self, window: _Window) -> None:
        """A decoding thread's task: decode the chunks of ``window`` that no thread has
        claimed, from the first up (the serving thread claims from the last down)."""
        while True:
            with self._lock:
                if False not in window.claimed:
                    return
                j = window.claimed.index(False)
                window.claimed[j] = True
            self._execute(window, j)

    def _run(self, window: _Window, j: int) -> bool:
        """Decode chunk ``j`` of ``window`` unless another thread claimed it or the window was
        dropped first; the outcome goes to ``window.futures[j]``. Returns whether this call
        ran the decode."""
        with self._lock:
            if window.claimed[j]:
                return False
            window.claimed[j] = True
        return self._execute(window, j)

    def _execute(self, window: _Window, j: int) -> bool:
        """Decode chunk ``j`` of ``window``, claimed by the caller, unless the window was
        dropped first; the outcome goes to ``window.futures[j]``. Returns whether it ran."""
        fut = window.futures[j]
        if not fut.set_running_or_notify_cancel():
            return False  # the window was dropped before its decode started
        try:
            self._decode_chunk(window, j)
        except BaseException as e:
            fut.set_exception(e)
        else:
            fut.set_result(None)
        return True

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

    def prefetch(self, key: Hashable, chunks: np.ndarray, order: Order | None = None) -> None:
        """Start decoding a window in the background (no-op without threads or if cached);
        ``order`` as for :meth:`get`."""
        if self._threads > 0 and key not in self._items:  # (a dict lookup is atomic: no lock)
            self._start(key, chunks, order)

    def background(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` in a decoding thread; nothing without threads or once closed.
        Its result and any exception are dropped: for work that only warms a cache (such as
        a window's serving order), which the caller would otherwise do when it needs it."""
        with self._lock:
            pool = self._get_pool()
            if pool is not None:  # (under the lock: close() shuts the pool down under it too)
                pool.submit(fn, *args)

    def get(
        self,
        key: Hashable,
        chunks: np.ndarray,
        order: Order | None = None,
        rows: tuple[int, int] | None = None,
        shared: bool = True,
    ) -> dict[str, np.ndarray]:
        """The decoded buffers (field -> array) of the window made of ``chunks``. Decodes the
        window's chunks that no thread has started in the calling thread, and waits for the
        others.

        Args:
            order: where each of the chunks' samples goes in the buffers (their serving
                positions), asked for by the decoding thread; None: the chunks' own order.
            rows: positions ``a:b`` the caller reads: if any was handed out before, the
                window is decoded again, into new buffers (the batch it went out in may have
                been written to).
            shared: the caller hands ``rows`` out as views of the buffers (a batch), rather
                than copying them.
        """
        window = self._items.get(key)  # (a dict lookup is atomic: no lock)
        created = False
        if window is None or not window.ready:
            window, created = self._start(key, chunks, order)
        while rows is not None and not self._hand_out(window, rows, shared):
            # The caller may have written to them: decode them again (other threads may be
            # reading or waiting for the window now: its decodes are left to run). Again
            # until this thread's claim holds: another may claim the new window's first.
            self._forget(key, window, cancel=False)
            window, created = self._start(key, chunks, order)
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
            # While a chunk of this window decodes in another thread, decode one of a
            # read-ahead window's instead of idling (its decode would otherwise wait for a
            # free decoding thread: on 2 cores the wait here was 5-10% of an lz4 epoch).
            while not fut.done() and self._help(window):
                pass
            try:
                fut.result()
            except BaseException:
                self._forget(key, window)  # do not keep a half-decoded window
                raise
        window.ready = True
        return window.buffers

    def entry(self, key: Hashable) -> object:
        """A token for window ``key`` as it is cached now, for :meth:`still`. A weak
        reference: a token kept does not keep a dropped window's buffers."""
        window = self._items.get(key)
        return None if window is None else weakref.ref(window)

    def still(self, key: Hashable, entry: object) -> dict[str, np.ndarray] | None:
        """The buffers of window ``key`` if it is still the decoded window that ``entry``
        (from :meth:`entry`) stands for, counted as a hit; else None (it was dropped, or is
        being decoded again). The caller's reference to the returned dict keeps the buffers
        from reuse (see :func:`_in_use`) however long it reads them."""
        window = entry() if isinstance(entry, weakref.ref) else None
        if not isinstance(window, _Window):
            return None
        # (Taken first: a window leaves _items before it gives its buffers up.)
        buffers: dict[str, np.ndarray] = window.buffers
        if self._items.get(key) is not window or not window.ready:
            return None
        with self._lock:
            self.hits += 1
        return buffers

    def _help(self, busy: _Window) -> bool:
        """Decode, in the calling thread, one chunk of a window other than ``busy`` that no
        thread has started (the earliest such window, its last such chunk; the decoding
        threads take chunks from the first up). False if there is none."""
        found = None
        with self._lock:
            for key, window in self._items.items():
                if window is not busy and not all(window.claimed):
                    j = len(window.claimed) - 1 - window.claimed[::-1].index(False)
                    found = key, window, j
                    break
        if found is None:
            return False
        key, window, j = found
        if not self._run(window, j):
            return True  # another thread claimed it first, or the window was dropped
        error = window.futures[j].exception()
        if error is not None and not isinstance(error, Exception):
            # A Ctrl-C (or exit) that came while this thread decoded another window's chunk
            # is this thread's, now; that window is dropped rather than kept to raise it again
            # (a thread already waiting for it sees the same exception, as for a window this
            # thread needed itself).
            self._forget(key, window)
            raise error
        return True

    def _hand_out(self, window: _Window, rows: tuple[int, int], shared: bool) -> bool:
        """False if any of positions ``rows`` of ``window`` was handed out before; else True,
        and with ``shared`` they are recorded as handed out."""
        a, b = rows
        with self._lock:
            if window.served is None:
                window.served = np.zeros(window.offsets[-1], dtype=bool)
            if window.served[a:b].any():
                return False
            if shared:
                window.served[a:b] = True
            return True

    def _buffers(self) -> dict[str, np.ndarray]:
        """A set of full-window buffers, from the pool if one is free (dropped, and no batch
        points into it). Call with the lock held."""
        for k in range(len(self._free) - 1, -1, -1):
            if not _in_use(self._free[k]):
                return self._free.pop(k)
        rows = self._window_rows
        # Page-aligned, as are the chunks in them (whole pages each, for the usual sample
        # sizes): the kernel copies a chunk's bytes into them several times faster.
        return {f: aligned_empty((rows, *lay.sample_shape), lay.dtype) for f, lay in self._fields.items()}

    def _recycle(self, window: _Window, cancel: bool = True) -> None:
        """Return a dropped window's buffers to the pool once no decode writes to them.

        ``cancel``: no thread reads the window any more (it was dropped unheld, or failed):
        its decodes not started yet are cancelled and it lets go of its buffers (work queued
        for it may keep the window object a while). Else its decodes run and it keeps them (a
        thread may still be reading or waiting for it); they are reused once it is gone."""
        pending = [f for f in window.futures if not (cancel and f.cancel()) and not f.done()]
        bases = window.bases
        # (Not the window itself when it keeps its buffers: its futures would hold it, and
        # so its buffers, in a reference cycle until the garbage collector runs.)
        emptied = window if cancel else None

        def release() -> None:  # (with the lock held)
            if emptied is not None:
                emptied.bases, emptied.buffers = {}, {}
            self._add_free(bases)

        if not pending:
            with self._lock:
                release()
            return
        left = [len(pending)]

        def one_done(_: Future[None]) -> None:
            with self._lock:
                left[0] -= 1
                if left[0] == 0:
                    release()

        for f in pending:
            f.add_done_callback(one_done)

    def _add_free(self, bases: dict[str, np.ndarray]) -> None:
        """Keep a dropped window's buffers for reuse (if the pool has room, or in place of a
        set a batch still points into). Call with the lock held."""
        free = len(self._free)
        if free < self._max_free or free + len(self._items) < self._peak_windows:
            self._free.append(bases)
            return
        for k, other in enumerate(self._free):
            if _in_use(other):  # freed once no batch points into it
                self._free[k] = bases
                return

    def _forget(self, key: Hashable, window: _Window, cancel: bool = True) -> None:
        with self._lock:
            if self._items.get(key) is not window:
                return
            del self._items[key]
        self._recycle(window, cancel)

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
