"""The stateless batch core: batch ``i`` of epoch ``e`` of a chunked source.

:class:`ChunkedBatches` computes ``(epoch, i) -> batch``: epoch plan (:mod:`oocseq.plan`) ->
the windows batch ``i`` spans, from a bounded cache of decoded windows (:mod:`oocseq.cache`)
-> the batch's arrays (a slice of the window for a field decoded in serving order, else
gathered into new arrays) -> ``transform`` -> ``(x, y[, sample_weight])``. It holds no
cursor: the same call gives the same batch in any thread, worker process, DataLoader worker or
rank. Its per-process state (the cache, its threads, a lock) is rebuilt after a fork or
unpickling, so it pickles as its arguments and the store's path.

:class:`~oocseq.ChunkedSequence` is the stateful cursor on top of it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from .cache import Hold, WindowCache, default_threads
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    BatchIndexError,
    FieldNotFoundError,
    InvalidSourceError,
    TransformError,
)
from .manifest import FieldSpec
from .memory import ArraySource
from .options import ReadOptions, ShardOptions
from .plan import EpochPlan, default_window, num_batches, rank_length
from .prefetch import Failed
from .rng import SampleRandom
from .storage._raw import aligned_empty
from .store import Store

__all__ = ["Batch", "ChunkedBatches", "FieldSelection"]

#: How ``x`` / ``y`` name fields: one name (an array), a list of names (a tuple of arrays, for
#: multi-input models), or a dict ``{input_name: field}`` (a dict of arrays), or None (``y`` only).
FieldSelection = str | Sequence[str] | Mapping[str, str] | None
Batch = dict[str, np.ndarray]

_PLANS_KEPT = 3  # plans of recent epochs kept per process (current, next, a late request's)
#: Windows ahead whose serving order is worked out in a decoding thread (fewer than a plan
#: keeps, so that none is dropped before it is served).
_ROWS_AHEAD = EpochPlan.CACHED_WINDOWS // 2


def open_source(source: Any) -> Store | ArraySource:
    """A store, a store path or a dict of arrays, as something batches are read from."""
    if isinstance(source, (Store, ArraySource)):
        return source
    if isinstance(source, Mapping):
        return ArraySource(source)
    if isinstance(source, (str, os.PathLike)):
        return Store(source)
    raise ArgumentTypeError(
        "a ChunkedSequence reads from an oocseq.Store, a store path or a dict {field: array}, "
        f"got {type(source).__name__}"
    )


def takes_two_args(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts a second positional argument (the per-sample random numbers)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: call with the batch only
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind is p.VAR_POSITIONAL for p in params) or len(positional) >= 2


def field_names(sel: FieldSelection, what: str) -> list[str]:
    """The field names a selection refers to, in order."""
    if sel is None:
        return []
    if isinstance(sel, str):
        return [sel]
    if isinstance(sel, Mapping):
        values = list(sel.values())
    elif isinstance(sel, Sequence):
        values = list(sel)
    else:
        raise ArgumentTypeError(
            f"{what} must be a field name, a list of names or a dict, got {type(sel).__name__}"
        )
    if not values or not all(isinstance(v, str) for v in values):
        raise ArgumentTypeError(f"{what} must name at least one field by its name (str), got {sel!r}")
    return values


def _key(epoch: int, w: int, lap: int, local: _Local) -> tuple[int, ...]:
    """The cache key of window ``w`` of ``epoch``. Where batches share their window's memory
    (fields decoded in serving order), padding that comes back round to a window (``lap`` >
    0) reads a copy of its own: the rank's own batches, which may have been written to, are
    never read again."""
    return (epoch, w) if lap == 0 or not local.scattered else (epoch, w, lap)


def _select(sel: FieldSelection, batch: Batch) -> Any:
    if isinstance(sel, str):
        return batch[sel]
    if isinstance(sel, Mapping):
        return {k: batch[v] for k, v in sel.items()}
    return tuple(batch[v] for v in sel)  # type: ignore[union-attr]


class _Local:
    """One process's state of a :class:`ChunkedBatches` (never pickled)."""

    def __init__(self, core: ChunkedBatches) -> None:
        src = core.source
        threads = core.read.threads
        if threads is None:
            threads = default_threads()
        fields = src.fields
        self.layouts = {f: fields[f] for f in core.fields}
        #: Fields decoded in serving order (their batches are slices of the window).
        self.scattered = frozenset(f for f in core.fields if src.scatters(f))
        self.cache = WindowCache(
            src.read_chunk_into,
            self.layouts,
            src.chunk_len,
            len(src),
            core.window,
            threads,
            src.advise_chunks,
            self.scattered,
        )
        self.lock = threading.Lock()
        self.plans: OrderedDict[int, EpochPlan] = OrderedDict()
        self.latest = -1  # the epoch of the plan used last (the last of ``plans``)
        #: ``(epoch, first window, windows read ahead as (epoch, window), how many of them
        #: decoded, readahead)`` of the last batch whose read-ahead was asked for.
        self.setup: tuple[int, int, tuple[tuple[int, int], ...], int, bool] | None = None
        #: ``.current``: the window the thread's last batch came from (a :class:`_Current`).
        self.thread = threading.local()


#: ``(epoch, readahead, until, next_epoch)`` of :meth:`ChunkedBatches.get`.
_Request = tuple[int, bool, int | None, bool]


class _Current:
    """The decoded window that one thread's last batch came from: positions ``lo:hi`` of the
    epoch plan, the cache's window (key and entry) and its serving order (rows). A batch that
    lies inside it, asked for with the same read-ahead while the cache still holds that window,
    needs no plan lookup, hold, read-ahead request or cache lookup: the batch before it made
    them (about 20 of 21 batches of an in-order epoch)."""

    __slots__ = ("entry", "hi", "key", "lo", "request", "rows")

    def __init__(
        self,
        request: _Request,
        key: tuple[int, ...],
        entry: object,
        lo: int,
        hi: int,
        rows: np.ndarray,
    ) -> None:
        self.request = request  # the read-ahead asked for with it
        self.key, self.entry = key, entry
        self.lo, self.hi = lo, hi
        self.rows = rows


class ChunkedBatches:
    """Batch ``i`` of epoch ``e`` of a chunked store or of in-memory arrays: a pure function
    of ``(epoch, i)`` and the arguments (see :class:`~oocseq.ChunkedSequence` for them).

    Unlike the sequence, ``shard`` defaults to one rank (no detection from the environment).

    ``get(epoch, i)`` returns ``(x, y)``, ``(x, y, sample_weight)`` or ``(x,)``; arrays keep
    the source's dtypes unless ``transform`` converts them. Thread-safe; picklable (file
    handles, threads and decoded windows stay behind and are rebuilt where it is unpickled).

    Raises:
        FieldNotFoundError: ``x``/``y``/``sample_weight`` names a field the source lacks.
        ArgumentError: a bad argument (batch_size < 1, two sources of sample weights, ...).
    """

    def __init__(
        self,
        source: Store | ArraySource | str | os.PathLike[str] | Mapping[str, Any],
        batch_size: int,
        *,
        x: FieldSelection = "x",
        y: FieldSelection = "y",
        sample_weight: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        window: int | None = None,
        drop_remainder: bool = False,
        transform: Callable[..., Batch] | None = None,
        shard: ShardOptions | None = None,
        read: ReadOptions | None = None,
    ) -> None:
        self.source = open_source(source)
        # A store this core opened from a path is its own to close; a Store passed in is the caller's.
        self._owns_source = isinstance(source, (str, os.PathLike))
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ArgumentError(f"seed must be an int >= 0, got {seed!r}")
        if x is None:
            raise ArgumentError("x must name at least one field")
        if transform is not None and not callable(transform):
            raise ArgumentTypeError(f"transform must be callable, got {type(transform).__name__}")
        if read is not None and not isinstance(read, ReadOptions):
            raise ArgumentTypeError(f"read must be a ReadOptions, got {type(read).__name__}")
        if shard is not None and not isinstance(shard, ShardOptions):
            raise ArgumentTypeError(f"shard must be a ShardOptions, got {type(shard).__name__}")
        self.batch_size = batch_size
        self.x, self.y = x, y
        self.sample_weight = sample_weight
        self.shuffle = bool(shuffle)
        self.seed = seed
        src = self.source
        num_chunks = -(-len(src) // src.chunk_len)
        if window is None:
            window = default_window(src.chunk_len, batch_size)
        elif not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ArgumentError(f"window must be a positive int (chunks), got {window!r}")
        # More chunks per window than the source holds changes nothing but the buffers' size.
        self.window = min(window, max(1, num_chunks))
        self.drop_remainder = bool(drop_remainder)
        self.transform = transform
        self._transform_takes_rng = transform is not None and takes_two_args(transform)
        self.shard = shard if shard is not None else ShardOptions()
        self.read = read if read is not None else ReadOptions()
        made = getattr(transform, "sample_weight_key", None)  # (oocseq.transforms.class_weights)
        if made is not None and sample_weight is not None:
            raise ArgumentError(
                f"give sample_weight={sample_weight!r} or a transform that makes sample weights "
                f"({type(transform).__name__}), not both"
            )
        if made is not None and y is None:
            raise ArgumentError(
                "a transform that makes sample weights needs y (batches (x, y, sample_weight))"
            )
        # The batch key served as the third element: a stored field, or one the transform adds.
        self.weight_key: str | None = sample_weight if sample_weight is not None else made
        self.fields = list(
            dict.fromkeys(
                field_names(x, "x") + field_names(y, "y") + field_names(sample_weight, "sample_weight")
            )
        )
        for name in getattr(transform, "fields_read", ()):  # (oocseq.transforms declare them)
            if name not in self.fields:
                raise ArgumentError(
                    f"{transform!r} reads field {name!r}, which the batches do not hold (they hold "
                    f"{self.fields}, named by x/y/sample_weight); name the label field with field=..."
                )
        for name in self.fields:
            if name not in src:
                raise FieldNotFoundError(
                    f"{src.path} has no field {name!r}; its fields are {sorted(src.fields)}"
                )
        self._local_pid = -1
        self.plan(0)  # checks the ranks against the source now, not at the first batch
        self._length = rank_length(len(src), src.chunk_len, self.shard.world_size, self.shard.balance)
        self._num_batches = num_batches(self._length, self.batch_size, self.drop_remainder)

    # -- per-process state --------------------------------------------------------------------
    @property
    def _local(self) -> _Local:
        """This process's state, created on first use after construction, unpickling or a fork
        (threads and locks do not survive a fork)."""
        if self._local_pid != os.getpid():
            self._local_state = _Local(self)
            self._local_pid = os.getpid()
        return self._local_state

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_local_state", None)
        state["_local_pid"] = -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_num_batches" not in state:  # (pickled by a version that did not keep it)
            self._num_batches = num_batches(self._length, self.batch_size, self.drop_remainder)

    def for_processes(self) -> ChunkedBatches:
        """A copy for worker processes: no read-ahead (a process decodes only the windows of
        the batches it is given; the next ones may go to another process)."""
        copy = object.__new__(ChunkedBatches)
        copy.__setstate__(self.__getstate__())
        copy.read = dataclasses.replace(self.read, readahead=0)
        return copy

    def close(self) -> None:
        """Stop this process's decode threads, drop its decoded windows and, for a store it
        opened from a path, close the store's file handles (a later batch reopens them)."""
        if self._local_pid == os.getpid():
            self._local_state.cache.close()
            self._local_pid = -1
        if self._owns_source:
            self.source.close()

    # -- the plan -----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch (of this rank; the same on every rank)."""
        return self._num_batches

    @property
    def samples_per_epoch(self) -> int:
        """Positions this rank serves per epoch (before ``drop_remainder``)."""
        return self._length

    def plan(self, epoch: int) -> EpochPlan:
        """The :class:`~oocseq.plan.EpochPlan` of ``epoch`` (a few recent ones are kept)."""
        local = self._local
        plan = local.plans.get(epoch)  # (a dict lookup is atomic: no lock)
        if plan is not None and local.latest == epoch:
            return plan  # the most recently used already
        with local.lock:
            plan = local.plans.get(epoch)
            if plan is not None:
                local.plans.move_to_end(epoch)
                local.latest = epoch
                return plan
        src = self.source
        plan = EpochPlan(
            len(src),
            src.chunk_len,
            self.window,
            self.seed,
            epoch,
            self.shuffle,
            self.shard.rank,
            self.shard.world_size,
            self.shard.balance,
        )
        with local.lock:
            local.plans[epoch] = plan
            local.latest = epoch
            while len(local.plans) > _PLANS_KEPT:
                local.plans.popitem(last=False)
        return plan

    def check_index(self, i: Any) -> int:
        """``i`` as an int in ``range(len(self))``.

        Raises:
            ArgumentTypeError: ``i`` is not an int.
            BatchIndexError: ``i`` is out of range.
        """
        if type(i) is not int and (not isinstance(i, (int, np.integer)) or isinstance(i, bool)):
            raise ArgumentTypeError(f"batch index must be an int, got {type(i).__name__}")
        n = self._num_batches
        if not 0 <= i < n:
            raise BatchIndexError(f"batch index {i} out of range: this sequence has {n} batches (len(seq))")
        return int(i)

    def batch_indices(self, epoch: int, i: int) -> np.ndarray:
        """Sample indices (int64) of batch ``i`` of ``epoch``."""
        start = self.check_index(i) * self.batch_size
        return self.plan(epoch).indices(start, start + self.batch_size)

    def windows(self, epoch: int, start: int, stop: int, readahead: int = 0) -> list[tuple[int, ...]]:
        """Cache keys (``(epoch, window)``, see :func:`_key`) of batches ``start:stop`` of ``epoch``, and of
        ``readahead`` windows after them."""
        plan = self.plan(epoch)
        pieces = plan.window_slices(start * self.batch_size, stop * self.batch_size)
        local = self._local
        keys = [_key(epoch, w, lap, local) for w, _, _, lap in pieces]
        if pieces:
            last = max(w for w, _, _, _ in pieces)
            keys += [(epoch, w) for w in range(last + 1, min(last + 1 + readahead, plan.num_windows))]
        return keys

    def hold(self, epoch: int, start: int, stop: int) -> Hold:
        """Keep the windows of batches ``start:stop`` of ``epoch`` (and the read-ahead beyond
        them) decoded until the returned hold is released: for batches queued for workers."""
        return self._local.cache.hold(self.windows(epoch, start, stop, self.read.readahead))

    # -- batches ------------------------------------------------------------------------------
    def get(
        self,
        epoch: int,
        i: int,
        *,
        readahead: bool = False,
        until: int | None = None,
        next_epoch: bool = False,
    ) -> tuple[Any, ...]:
        """Batch ``i`` of ``epoch``: ``(x, y)``, ``(x, y, sample_weight)`` or ``(x,)``.

        Args:
            readahead: also decode (and ask the kernel to read) the windows after this batch's,
                for a caller that goes on in order.
            until: the caller's batches end before batch ``until`` (a DataLoader worker's
                range): read ahead no window past that batch's.
            next_epoch: with ``readahead`` and no ``until``, the read-ahead goes on into the
                first windows of ``epoch + 1`` where this epoch's run out, for a caller that
                goes on to the next epoch (its first batch then does not wait for a window
                decoded from scratch).

        Raises:
            BatchIndexError: ``i`` outside ``range(len(self))``.
            TransformError: ``transform`` raised or returned a bad batch.
            InvalidSourceError: raised by ``transform`` (a bad label in
                :mod:`oocseq.transforms`), as it is.
        """
        local = self._local
        request = (epoch, readahead, until, next_epoch)
        batch = self._from_current(local, request, i)
        n = self.batch_size
        if batch is None:
            batch, n = self._get(local, request, i)
        if self.transform is not None:
            # Sample indices only where they are used: ~40 us a batch.
            start = i * self.batch_size
            indices = self.plan(epoch).indices(start, start + self.batch_size)
            batch = self._apply_transform(batch, indices, epoch, n)
        return self._assemble(batch)

    def _from_current(self, local: _Local, request: _Request, i: Any) -> Batch | None:
        """Batch ``i`` gathered from the window this thread's last batch came from (see
        :class:`_Current`), or None if it does not lie wholly inside it or the cache no longer
        holds that window."""
        current: _Current | None = getattr(local.thread, "current", None)
        if (
            current is None
            or type(i) is not int
            or current.request != request
            or not current.lo <= i * self.batch_size
            or (i + 1) * self.batch_size > current.hi
        ):
            return None
        buffers = local.cache.still(current.key, current.entry)
        if buffers is None:
            return None
        a = i * self.batch_size - current.lo
        rows = current.rows[a : a + self.batch_size]
        return {name: self._gather(buffers[name], rows, local.layouts[name]) for name in self.fields}

    def _get(self, local: _Local, request: _Request, i: int) -> tuple[Batch, int]:
        """Batch ``i`` of ``request``'s epoch through the plan and the cache: ``(batch before
        the transform, its length)``."""
        epoch, readahead, until, next_epoch = request
        self.check_index(i)
        plan = self.plan(epoch)
        start = i * self.batch_size
        cache = local.cache
        pieces = plan.window_slices(start, start + self.batch_size)
        # The highest window, not the last piece's: a padded rank's last batch wraps round to
        # the epoch's first window.
        last = max(w for w, _, _, _ in pieces)
        # Read ahead no window past the last one served: the caller's (a DataLoader worker's
        # range ends before batch ``until``), or the epoch's (``drop_remainder`` drops the rest).
        end = self._num_batches * self.batch_size
        if until is not None and until > i:
            end = min(end, until * self.batch_size)
        end = min(end, len(plan))
        # (past its own samples, a padded rank serves every window)
        horizon = plan.window_of(end - 1) + 1 if end <= plan.own else plan.num_windows
        depth = self.read.readahead if readahead else 0
        # The windows to decode ahead, then one more for the kernel to read ahead: (plan,
        # epoch, window, windows from this batch's last).
        ahead: list[tuple[EpochPlan, int, int, int]] = []
        onward = next_epoch and depth > 0 and until is None
        # A padded rank's batches past its own samples come back to the epoch's first
        # windows; going on to the next epoch, what follows them is that epoch's.
        padding = start >= plan.own
        if readahead and not (onward and padding):
            ahead = [(plan, epoch, w, w - last) for w in range(last + 1, min(last + 2 + depth, horizon))]
        if onward and len(ahead) <= depth:
            following = self.plan(epoch + 1)
            gone = 0 if padding else horizon - last - 1
            ahead += [
                (following, epoch + 1, w, gone + w + 1)
                for w in range(min(depth + 1 - len(ahead), following.num_windows))
            ]
        decode = ahead[:depth]
        keys = [_key(epoch, w, lap, local) for w, _, _, lap in pieces] + [(e, w) for _, e, w, _ in decode]
        with cache.hold(keys) as hold:
            cache.drop_unheld(hold)
            # Read-ahead is asked for once per window the batches move into, not per batch
            # (another thread's new window asks again; a window no thread asked for is
            # decoded when a batch needs it).
            setup = (epoch, pieces[0][0], tuple((e, w) for _, e, w, _ in ahead), len(decode), readahead)
            if setup != local.setup:
                # This batch's windows first: their decodes start before the hints below are made.
                for w, _, _, lap in pieces:
                    cache.prefetch(
                        _key(epoch, w, lap, local), plan.window_chunks(w), partial(plan.window_positions, w)
                    )
                for p, e, w, _ in ahead:  # the kernel reads one window beyond the decoded ones
                    cache.advise((e, w), p.window_chunks(w))
                for p, e, w, distance in decode:
                    if (e, w) not in cache and distance <= _ROWS_AHEAD:
                        # Its serving order (a sort, ~0.25 ms) is worked out off this thread
                        # too, before its chunks are read (the threads take work in order).
                        cache.background(p.window_positions, w)
                    cache.prefetch((e, w), p.window_chunks(w), partial(p.window_positions, w))
                local.setup = setup  # (only once asked: a failed hint is asked again)
            batch: Batch = {}
            scattered = local.scattered
            if len(pieces) == 1:
                w, a, b, lap = pieces[0]
                order = partial(plan.window_positions, w)
                # A field decoded in serving order is a slice of its window's buffer: shared,
                # not copied (the cache hands no position out twice, see oocseq.cache).
                handed_out = (a, b) if scattered else None
                buffers = cache.get(_key(epoch, w, lap, local), plan.window_chunks(w), order, handed_out)
                n = b - a
                rows: np.ndarray | None = None
                for name in self.fields:
                    if name in scattered:
                        batch[name] = buffers[name][a:b]
                        continue
                    if rows is None:
                        rows = plan.window_rows(w)[a:b]
                    batch[name] = self._gather(buffers[name], rows, local.layouts[name])
                if not scattered and lap == 0:  # (a scattered field's positions go out once)
                    key = _key(epoch, w, lap, local)
                    lo, hi = plan.window_offsets[w : w + 2].tolist()
                    local.thread.current = _Current(
                        request, key, cache.entry(key), lo, hi, plan.window_rows(w)
                    )
            else:  # across windows (or round a padded rank's end): one copy per sample
                n = sum(b - a for _, a, b, _ in pieces)
                for name, layout in local.layouts.items():  # not source.fields: it builds a dict per call
                    batch[name] = aligned_empty((n, *layout.sample_shape), layout.dtype)
                pos = 0
                for w, a, b, lap in pieces:
                    order = partial(plan.window_positions, w)
                    key = _key(epoch, w, lap, local)
                    buffers = cache.get(key, plan.window_chunks(w), order, (a, b), shared=False)
                    piece = plan.window_rows(w)[a:b]
                    for name in self.fields:
                        out = batch[name][pos : pos + b - a]
                        if name in scattered:
                            out[...] = buffers[name][a:b]
                        else:
                            buffers[name].take(piece, axis=0, out=out, mode="clip")
                    pos += b - a
        return batch, n

    @staticmethod
    def _gather(buffer: np.ndarray, rows: np.ndarray, layout: FieldSpec) -> np.ndarray:
        """Rows ``rows`` of a window's buffer, copied into a new page-aligned batch array
        (copying samples into an array 16 bytes past a page, where malloc often puts one, ran
        at a fifth of the rate: memcpy of 12 KiB samples)."""
        out = aligned_empty((len(rows), *layout.sample_shape), layout.dtype)
        buffer.take(rows, axis=0, out=out, mode="clip")
        return out

    def prepare(self, epoch: int, start: int, stop: int) -> list[Any]:
        """Batches ``start:stop`` of ``epoch``, in order (a worker's task); a batch that fails
        is kept as a :class:`~oocseq.prefetch.Failed`, raised when that batch is served."""
        out: list[Any] = []
        with self.hold(epoch, start, stop):
            for i in range(start, stop):
                try:
                    out.append(self.get(epoch, i, readahead=True))
                except Exception as e:
                    out.append(Failed(e))
        return out

    def _apply_transform(self, batch: Batch, indices: np.ndarray, epoch: int, n: int) -> Batch:
        transform = self.transform
        assert transform is not None  # (checked by the caller)
        where = f"samples {indices[:8].tolist()}{'...' if len(indices) > 8 else ''} of {self.source.path}"
        try:
            if self._transform_takes_rng:
                out = transform(batch, SampleRandom(self.seed, epoch, indices))
            else:
                out = transform(batch)
        except InvalidSourceError as e:  # a bad label, say (oocseq.transforms): names the sample
            e.add_note(f"oocseq: in the transform, on {where}")
            raise
        except Exception as e:
            raise TransformError(f"transform failed on {where}: {type(e).__name__}: {e}") from e
        if not isinstance(out, Mapping):
            raise TransformError(
                f"transform must return a dict {{field: array}}, got {type(out).__name__} ({where})"
            )
        out = dict(out)
        wanted = self.fields if self.weight_key is None else [*self.fields, self.weight_key]
        missing = [f for f in wanted if f not in out]
        if missing:
            raise TransformError(
                f"transform returned no field {missing[0]!r}, which x/y/sample_weight name; it returned "
                f"{sorted(out)} ({where}). Return every field of the batch it was given."
            )
        for name, value in out.items():
            shape = np.shape(value)
            if not shape or shape[0] != n:
                raise TransformError(
                    f"transform returned field {name!r} of shape {shape} for a batch of {n} samples ({where}); "
                    f"every field must keep the batch's leading length {n}"
                )
        return out

    def _assemble(self, batch: Batch) -> tuple[Any, ...]:
        xs = _select(self.x, batch)
        if self.y is None:
            return (xs,)
        ys = _select(self.y, batch)
        if self.weight_key is not None:
            return xs, ys, np.asarray(batch[self.weight_key])
        return xs, ys

    # -- identity -----------------------------------------------------------------------------
    def plan_args(self) -> dict[str, Any]:
        """The arguments that shape the plan (JSON-serialisable)."""
        return {
            "n": len(self.source),
            "chunk_len": self.source.chunk_len,
            "window": self.window,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
            "rank": self.shard.rank,
            "world_size": self.shard.world_size,
            "remainder": self.shard.balance,
        }

    def fingerprint(self) -> int:
        """CRC-32 of the source's manifest (of the arrays' layout in memory): tells this
        source from another of the same shape."""
        src = self.source
        if isinstance(src, ArraySource):
            return src.fingerprint()
        return zlib.crc32(json.dumps(src.manifest.to_json(), sort_keys=True).encode())

    @property
    def stats(self) -> dict[str, int]:
        """Work counters of this process: ``chunk_decodes``, ``cache_hits``,
        ``peak_resident_chunks`` (see :mod:`oocseq.cache`)."""
        c = self._local.cache
        return {"chunk_decodes": c.decodes, "cache_hits": c.hits, "peak_resident_chunks": c.peak_resident}
