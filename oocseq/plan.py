"""The epoch plan: which sample each position of an epoch serves. Pure functions of integers.

Algorithm (chunk-aligned shuffle):

1. Permute the chunk ids ``0..num_chunks-1``.
2. Group the permuted chunks into *windows* of ``window`` consecutive chunks.
3. Shuffle the samples inside each window.

The epoch order is the concatenation of the shuffled windows. A batch is ``batch_size``
consecutive positions of it, so it touches at most ``2 * window + batch_size // chunk_len + 1``
distinct chunks (two partial windows at its ends, whole windows between them, plus the short
last chunk), against about ``batch_size`` for a global shuffle.

Randomness comes from the counter-based hash of :mod:`oocseq.rng` (a permutation is ``argsort``
of hashed keys), so the order is the same across numpy versions, platforms and processes; the
tests pin it.

Nothing here materialises the whole order unless asked (:func:`epoch_order`): an
:class:`EpochPlan` holds ``O(num_chunks)`` integers and shuffles one window on demand.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import OrderedDict

import numpy as np

from .errors import ArgumentError
from .rng import STREAMS, hash_keys, permutation, shuffled

__all__ = [
    "EpochPlan",
    "epoch_order",
    "permutation",
    "rank_length",
    "rank_orders",
    "REMAINDER_POLICIES",
    "num_batches",
    "default_window",
    "DEFAULT_MIN_WINDOW",
]

#: Chunks per window when none is given (at least; see :func:`default_window`).
DEFAULT_MIN_WINDOW = 8


def default_window(chunk_len: int, batch_size: int) -> int:
    """Chunks per window when the user gives none: at least :data:`DEFAULT_MIN_WINDOW`, and
    enough to hold two batches, so that a batch mixes samples from many chunks."""
    return max(DEFAULT_MIN_WINDOW, math.ceil(2 * batch_size / chunk_len))


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches in an epoch of ``n`` samples."""
    return n // batch_size if drop_remainder else -(-n // batch_size)


def _check(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ArgumentError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class EpochPlan:
    """The order of one epoch (of one rank), computed lazily.

    Args:
        n: samples in the store (>= 0).
        chunk_len: samples per chunk (>= 1).
        window: chunks per window (>= 1).
        seed: any int >= 0.
        epoch: epoch number (>= 0).
        shuffle: ``False`` serves ``0, 1, ..., n-1``.
        rank, world_size: data-parallel shard. The permuted chunks are dealt round-robin to the
            ranks, so ranks hold disjoint, chunk-aligned shares of every epoch.
        remainder: how ranks are evened out, since their shares differ by up to a chunk:
            ``"pad"`` (default) deals every chunk (the short last chunk to a rank that gets one
            chunk more than others) and repeats a rank's own samples from the start of its
            order up to ``ceil(num_chunks / world_size) * chunk_len`` positions: at most one
            chunk's worth per rank;
            ``"drop"`` leaves out the short last chunk and the ``num_full_chunks % world_size``
            full chunks that do not go round (others each epoch), so each rank serves
            ``floor(num_full_chunks / world_size) * chunk_len`` samples, none repeated. Every
            rank serves the same number of positions in every epoch (:func:`rank_length`).
            With one rank nothing is padded or dropped.

    ``plan.indices(start, stop)`` is ``epoch_order(...)[start:stop]`` as int64.
    """

    #: Windows whose serving order (:meth:`window_rows`) a plan keeps, most recent first.
    CACHED_WINDOWS = 8

    def __init__(
        self,
        n: int,
        chunk_len: int,
        window: int,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        remainder: str = "pad",
    ) -> None:
        self.n = _check("n", n, 0)
        self.chunk_len = _check("chunk_len", chunk_len, 1)
        self.window = _check("window", window, 1)
        self.seed = _check("seed", seed, 0)
        self.epoch = _check("epoch", epoch, 0)
        self.shuffle = bool(shuffle)
        self.world_size = _check("world_size", world_size, 1)
        self.rank = _check("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ArgumentError(f"rank must be in [0, world_size={self.world_size}), got {rank}")
        if remainder not in REMAINDER_POLICIES:
            raise ArgumentError(f"remainder must be one of {REMAINDER_POLICIES}, got {remainder!r}")
        self.remainder = remainder
        num_chunks = -(-self.n // self.chunk_len)
        if 0 < num_chunks < self.world_size:
            raise ArgumentError(
                f"the store has {num_chunks} chunk(s) for world_size={self.world_size} ranks: every rank "
                "needs a chunk of its own. Ingest with a smaller chunk_len or use fewer ranks."
            )
        chunk_ids = np.arange(num_chunks, dtype=np.int64)
        order = shuffled(self.seed, self.epoch, STREAMS["chunks"], chunk_ids) if self.shuffle else chunk_ids
        if self.world_size > 1 and remainder == "drop":
            # Leave out the short last chunk, then the full chunks that do not go round evenly.
            full = order[order != self.n // self.chunk_len] if self.n % self.chunk_len else order
            if len(full) < self.world_size:
                raise ArgumentError(
                    f"the store has {len(full)} full chunk(s) for world_size={self.world_size} ranks with "
                    "remainder='drop'; use remainder='pad', a smaller chunk_len or fewer ranks"
                )
            order = full[: len(full) // self.world_size * self.world_size]
        elif self.world_size > 1 and self.n % self.chunk_len and num_chunks % self.world_size:
            # Deal the short last chunk to a rank that gets one chunk more than others (the last
            # position's rank): then no rank pads more than one chunk's worth of positions.
            rem = num_chunks % self.world_size
            p = int(np.flatnonzero(order == num_chunks - 1)[0])
            if p % self.world_size >= rem:
                order = order.copy()
                order[p], order[-1] = order[-1], order[p]
        # Ranks deal the permuted chunks round-robin: disjoint, chunk-aligned shares.
        self.chunk_order = order[self.rank :: self.world_size]
        sizes = (
            np.minimum((self.chunk_order + 1) * self.chunk_len, self.n) - self.chunk_order * self.chunk_len
        )
        #: Samples in this rank's own chunks this epoch.
        self.own = int(sizes.sum())
        #: Positions this rank serves each epoch: the same for every rank and every epoch.
        self.length = rank_length(self.n, self.chunk_len, self.world_size, self.remainder)
        # Sample offset of every window in the epoch order.
        num_own = len(self.chunk_order)
        per_window = np.add.reduceat(sizes, np.arange(0, num_own, self.window)) if num_own else sizes
        self.window_offsets = np.r_[0, np.cumsum(per_window)].astype(np.int64)
        # The same as Python ints: a bisect of a list is several times quicker than a
        # searchsorted of an array for the one position a batch asks about.
        self._offsets = self.window_offsets.tolist()
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def num_windows(self) -> int:
        return len(self.window_offsets) - 1

    def __len__(self) -> int:
        """Positions served this epoch (``n`` with one rank)."""
        return self.length

    def window_chunks(self, w: int) -> np.ndarray:
        """Chunk ids of window ``w``, in epoch order."""
        return self.chunk_order[w * self.window : (w + 1) * self.window]

    def window_rows(self, w: int) -> np.ndarray:
        """The serving order of window ``w`` as rows of its chunks' samples (int64, read-only).

        Row ``r`` of window ``w`` is sample ``window_samples(w)[r]`` (its chunks' samples back
        to back, in :meth:`window_chunks` order). Served position ``j`` of the window is row
        ``window_rows(w)[j]``."""
        return self._window_order(w)[0]

    def window_positions(self, w: int) -> np.ndarray | None:
        """Where each row of window ``w`` is served (int64, read-only): the inverse of
        :meth:`window_rows`, so row ``r`` is served at position ``window_positions(w)[r]`` of
        the window. None for a plan that does not shuffle (row ``r`` is served at ``r``).

        A decoded window holds its samples in serving order: each chunk's rows are written to
        their positions, and a batch is then a slice of the window."""
        return self._window_order(w)[1]

    def _window_order(self, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            cached = self._cache.get(w)
            if cached is not None:
                self._cache.move_to_end(w)
                return cached
        samples = self.window_samples(w)
        positions: np.ndarray | None = None
        if self.shuffle:
            rows = np.argsort(hash_keys(self.seed, self.epoch, STREAMS["samples"], samples), kind="stable")
            positions = np.empty_like(rows)
            positions[rows] = np.arange(len(rows), dtype=np.int64)
            positions.flags.writeable = False
        else:
            rows = np.arange(len(samples), dtype=np.int64)
        rows.flags.writeable = False
        order = (rows, positions)
        with self._lock:
            self._cache[w] = order
            if len(self._cache) > self.CACHED_WINDOWS:
                self._cache.popitem(last=False)
        return order

    def window_samples(self, w: int) -> np.ndarray:
        """Sample indices of window ``w`` in buffer order: its chunks' ranges back to back."""
        chunks = self.window_chunks(w)
        samples: np.ndarray = (chunks[:, None] * self.chunk_len + np.arange(self.chunk_len)).reshape(-1)
        if len(chunks) and (int(chunks.max()) + 1) * self.chunk_len > self.n:
            samples = samples[samples < self.n]  # the short last chunk is in this window
        return samples

    def window_indices(self, w: int) -> np.ndarray:
        """Sample indices of window ``w`` in the order they are served (int64)."""
        out: np.ndarray = self.window_samples(w)[self.window_rows(w)]
        return out

    def window_of(self, position: int) -> int:
        """The window that serves epoch position ``position``."""
        return bisect.bisect_right(self._offsets, position) - 1

    def indices(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at epoch positions ``[start, stop)`` (clipped to ``[0, n)``), int64."""
        return self.span_indices(self.window_spans(start, stop))

    def span_indices(self, spans: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """Sample indices of :meth:`window_spans` pieces (int64), in order."""
        parts = [self.window_samples(w)[rows] for w, rows in spans]
        if not parts:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def window_spans(self, start: int, stop: int) -> list[tuple[int, np.ndarray]]:
        """Epoch positions ``[start, stop)`` as ``(window, rows)`` pieces, in order: the rows
        of each window (:meth:`window_rows`) that those positions serve."""
        return [(w, self.window_rows(w)[a:b]) for w, a, b, _ in self.window_slices(start, stop)]

    def window_slices(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """Epoch positions ``[start, stop)`` as ``(window, a, b, lap)`` pieces, in order:
        served positions ``a:b`` of each window; ``lap`` is 0 for this rank's own positions
        and counts the times padding has come back round to the start of its order."""
        start, stop = max(0, start), min(stop, self.length)
        if start < stop <= self.own:  # the usual batch: in one window, no padding
            w = self.window_of(start)
            off, end = self._offsets[w], self._offsets[w + 1]
            if stop <= end:
                return [(w, start - off, stop - off, 0)]
        pieces: list[tuple[int, int, int, int]] = []
        # Positions past this rank's own samples (padding) repeat its order from the start.
        while start < stop:
            lap, a = divmod(start, self.own)
            b = min(stop - lap * self.own, self.own)
            for w in range(self.window_of(a), self.window_of(b - 1) + 1):
                off, end = self._offsets[w], self._offsets[w + 1]
                pieces.append((w, max(a - off, 0), min(b, end) - off, lap))
            start = lap * self.own + b
        return pieces


REMAINDER_POLICIES = ("pad", "drop")


def rank_length(n: int, chunk_len: int, world_size: int, remainder: str) -> int:
    """Positions every rank serves per epoch: ``n`` for one rank; else the largest (``"pad"``)
    or smallest (``"drop"``) share a rank can hold in any epoch, so that it never varies."""
    if world_size == 1:
        return n
    if remainder == "pad":
        num_chunks = -(-n // chunk_len)
        return -(-num_chunks // world_size) * chunk_len
    return (n // chunk_len) // world_size * chunk_len


def epoch_order(
    n: int, chunk_len: int, window: int, seed: int, epoch: int, shuffle: bool = True
) -> np.ndarray:
    """The whole order of an epoch (int64 array of shape ``(n,)``): a permutation of
    ``range(n)``. Materialises ``n`` integers; :class:`EpochPlan` does not."""
    return EpochPlan(n, chunk_len, window, seed, epoch, shuffle).indices(0, n)


def rank_orders(
    n: int,
    chunk_len: int,
    window: int,
    seed: int,
    epoch: int,
    world_size: int,
    remainder: str = "pad",
    shuffle: bool = True,
) -> list[np.ndarray]:
    """The epoch order of every rank (a list of ``world_size`` int64 arrays of equal length)."""
    plans = [
        EpochPlan(n, chunk_len, window, seed, epoch, shuffle, r, world_size, remainder)
        for r in range(world_size)
    ]
    return [plan.indices(0, len(plan)) for plan in plans]
