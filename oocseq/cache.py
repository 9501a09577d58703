"""A bounded cache of decoded chunks, with counters that tests use to bound the work done."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np


class ChunkCache:
    """Least-recently-used cache of decoded chunks, holding at most ``capacity`` of them.

    Counters: ``decodes`` (chunks read and decoded: misses), ``hits``, ``peak_resident``
    (largest number of chunks held at once). Thread-safe; a miss is decoded under the lock, so
    two threads never decode the same chunk twice.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 chunk, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.RLock()
        self.decodes = 0
        self.hits = 0
        self.peak_resident = 0

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The chunk for ``key``, calling ``load()`` on a miss."""
        with self._lock:
            chunk = self._items.get(key)
            if chunk is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return chunk
            chunk = load()
            self.decodes += 1
            self._items[key] = chunk
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            self.peak_resident = max(self.peak_resident, len(self._items))
            return chunk

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def reset_counters(self) -> None:
        with self._lock:
            self.decodes = self.hits = 0
            self.peak_resident = len(self._items)
