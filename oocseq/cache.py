"""The decoded-chunk cache: chunks of the windows in use, decoded ahead by a thread pool.

Entries are futures, so a chunk being decoded by the read-ahead pool is waited for, never
decoded twice. The sequence tells the cache which chunks it still needs (:meth:`retain`);
everything else is dropped, so the number of resident chunks is bounded by what the current
batches and the read-ahead need, never by the store's size. Counters let tests bound the
work done: ``decodes`` (chunks read and decoded), ``hits``, ``peak_resident``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

Loader = Callable[[Hashable], np.ndarray]


class ChunkCache:
    """Futures of decoded chunks keyed by ``(field, chunk)``, decoded by ``load(key)``.

    Args:
        load: reads and decodes one chunk; runs in the pool's threads (it must release the
            GIL to run in parallel: numcodecs and memcpy do).
        threads: read-ahead decoding threads; 0 decodes in the calling thread only.
    """

    def __init__(self, load: Loader, threads: int) -> None:
        self._load = load
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._items: dict[Hashable, Future[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.decodes = 0
        self.hits = 0
        self.peak_resident = 0

    def _run(self, key: Hashable) -> np.ndarray:
        chunk = self._load(key)
        with self._lock:
            self.decodes += 1
        return chunk

    def _entry(self, key: Hashable, background: bool) -> tuple[Future[np.ndarray], bool]:
        """The entry for ``key`` and whether this call created it (caller must then fill it)."""
        with self._lock:
            fut = self._items.get(key)
            if fut is not None:
                return fut, False
            if background and self._threads > 0:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="oocseq-readahead")
                fut = self._pool.submit(self._run, key)
                created = False
            else:
                fut = Future()
                created = True
            self._items[key] = fut
            self.peak_resident = max(self.peak_resident, len(self._items))
            return fut, created

    def prefetch(self, keys: Iterable[Hashable]) -> None:
        """Start decoding ``keys`` that are not cached yet, in the background."""
        for key in keys:
            self._entry(key, background=True)

    def get(self, key: Hashable) -> np.ndarray:
        """The decoded chunk, decoding it in this thread if nobody has started it."""
        fut, created = self._entry(key, background=False)
        if created:
            try:
                fut.set_result(self._run(key))
            except BaseException as e:
                fut.set_exception(e)
                with self._lock:  # do not cache the failure: a retry reads again
                    if self._items.get(key) is fut:
                        del self._items[key]
        else:
            with self._lock:
                self.hits += 1
        return fut.result()

    def retain(self, keys: set[Hashable]) -> None:
        """Drop every entry not in ``keys`` (running decodes finish and are discarded)."""
        with self._lock:
            for key in [k for k in self._items if k not in keys]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        with self._lock:
            self._items.clear()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def default_threads() -> int:
    """Read-ahead threads when none are given: the cores, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))
