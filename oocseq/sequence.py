"""``ChunkedSequence``: shuffled, chunk-aligned batches from a store, for Keras and plain loops.

Data path: epoch plan (:mod:`oocseq.plan`) -> sample indices of batch ``i`` -> the chunks they
live in, from a bounded cache of decoded windows (:mod:`oocseq.cache`) -> gathered into new batch
arrays -> ``transform`` -> ``(x, y[, sample_weight])``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cache import FieldLayout, WindowCache, default_threads
from .distributed import detect_rank
from .errors import (
    ArgumentError,
    BatchIndexError,
    FieldNotFoundError,
    InvalidSourceError,
    ShuffleWarning,
    StateError,
    TransformError,
)
from .mixing import CLUSTERED_BELOW, DEFAULT_MAX_BATCHES, ShuffleReport, label_clustering, shuffle_report
from .plan import EpochPlan, default_window, num_batches
from .prefetch import Prefetcher, WorkerOptions, _Failed
from .rng import SampleRandom
from .store import Store

__all__ = ["ChunkedSequence", "FieldSelection", "ReadOptions", "WorkerOptions"]

#: How ``x`` / ``y`` name fields: one name (an array), a list of names (a tuple of arrays, for
#: multi-input models), or a dict ``{input_name: field}`` (a dict of arrays), or None (``y`` only).
FieldSelection = str | Sequence[str] | Mapping[str, str] | None
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class ReadOptions:
    """How a :class:`ChunkedSequence` reads ahead.

    Attributes:
        readahead: windows decoded in the background ahead of the one being served, when
            batches are served in order (0: none).
        threads: decoding threads (default: the cores less one, 1 to 4); 0 decodes in the calling
            thread only. numcodecs releases the GIL, so threads decode in parallel.
    """

    readahead: int = 1
    threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.readahead, int) or self.readahead < 0:
            raise ArgumentError(f"readahead must be an int >= 0, got {self.readahead!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 0):
            raise ArgumentError(f"threads must be None or an int >= 0, got {self.threads!r}")


def _takes_two_args(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts a second positional argument (the per-sample random numbers)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: call with the batch only
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind is p.VAR_POSITIONAL for p in params) or len(positional) >= 2


class _Runtime:
    """One process's serving state (never pickled; rebuilt after fork or unpickling)."""

    def __init__(self, seq: ChunkedSequence) -> None:
        store = seq.store
        compressed = store.manifest.compression is not None
        threads = seq.read.threads if seq.read.threads is not None else default_threads(compressed)
        fields = store.fields
        self.layouts = {f: FieldLayout(fields[f].shape[1:], fields[f].dtype) for f in seq._fields}
        self.cache = WindowCache(
            store.read_chunk_into,
            self.layouts,
            store.chunk_len,
            len(store),
            seq.window,
            threads,
            store.advise_chunks,
        )
        self.lock = threading.RLock()
        self.plan: EpochPlan | None = None
        self.plans: dict[int, EpochPlan] = {}  # of other epochs, for batches prepared ahead
        self.prefetcher: Prefetcher | None = None
        self.last_served = -1  # plan batch served last (to tell in-order requests)
        self.position = 0  # next plan batch to serve in arrival order
        self.requests = 0  # requests served this epoch
        self.next_position = 0  # sample position right after the last batch read
        self.warned = False
        self.begun = False  # on_epoch_begin() called since the last epoch change
        self.in_flight: dict[object, list[tuple[int, int]]] = {}  # request -> (epoch, window)s


def _names(sel: FieldSelection, what: str) -> list[str]:
    if sel is None:
        return []
    if isinstance(sel, str):
        return [sel]
    if isinstance(sel, Mapping):
        values = list(sel.values())
    elif isinstance(sel, Sequence):
        values = list(sel)
    else:
        raise TypeError(f"{what} must be a field name, a list of names or a dict, got {type(sel).__name__}")
    if not values or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{what} must name at least one field by its name (str), got {sel!r}")
    return values


def _select(sel: FieldSelection, batch: Batch) -> Any:
    if isinstance(sel, str):
        return batch[sel]
    if isinstance(sel, Mapping):
        return {k: batch[v] for k, v in sel.items()}
    return tuple(batch[v] for v in sel)  # type: ignore[union-attr]


class ChunkedSequence:
    """Shuffled batches from a chunked store, reading whole chunks.

    When Keras is imported before construction, the instance is a ``keras.utils.PyDataset``
    (``model.fit(seq)`` accepts it); oocseq itself never imports Keras.

    Args:
        store: an opened :class:`~oocseq.Store` or a store path.
        batch_size: samples per batch (the last batch may be shorter; see ``drop_remainder``).
        x: the input field(s): a name, a list of names (tuple of arrays) or a dict
            ``{input_name: field}`` for multi-input models.
        y: the target field(s), same forms, or ``None`` for unlabeled data (batches are ``(x,)``).
        shuffle: serve a new chunk-aligned shuffled order each epoch; ``False`` serves samples
            in store order.
        seed: seed of the shuffle (int >= 0). The order is a pure function of
            ``(seed, epoch, n, chunk_len, window)``.
        window: chunks whose samples are shuffled together (default: at least 8, and enough
            for two batches; see :func:`oocseq.plan.default_window`). Larger windows mix more
            and hold more decoded chunks in memory.
        drop_remainder: drop the last, short batch so every batch has ``batch_size`` samples.
        transform: ``f(batch) -> batch`` or ``f(batch, rng) -> batch``, applied to each batch
            as a dict ``{field: array}`` (of the fields named by ``x``, ``y``,
            ``sample_weight``) before it is assembled, e.g.
            ``lambda b: {**b, "x": b["x"].astype("float32") / 255}``. ``rng`` is a
            :class:`~oocseq.rng.SampleRandom`: per-sample random numbers keyed by
            ``(seed, epoch, sample index)``, the same whatever worker, process or rank serves
            the sample. An exception in it is raised as TransformError naming the samples.
        num_classes: one-hot encode ``y`` (one integer field) into float32 ``(batch, num_classes)``.
        sample_weight: a field of per-sample weights, served as the third element.
        class_weight: ``{class: weight}``: per-sample weights from the integer ``y``, served as
            the third element. Not together with ``sample_weight``.
        serve: ``"arrival"`` (default): the n-th request of an epoch gets the plan's n-th batch,
            whatever index it asks for, so Keras's shuffled calls keep chunk locality;
            ``"index"``: ``seq[i]`` is always the plan's batch ``i``. See :meth:`__getitem__`.
        read: :class:`ReadOptions` (read-ahead windows, decoding threads).
        rank, world_size: this process's data-parallel shard; ranks serve disjoint,
            chunk-aligned shares of every epoch and the same number of batches. Default: from
            ``torch.distributed``, JAX or ``RANK`` / ``WORLD_SIZE`` (see
            :func:`oocseq.distributed.detect_rank`), else one rank.
        remainder: ``"pad"`` (default: repeat a rank's own samples so that every sample is
            served each epoch) or ``"drop"`` (serve no sample twice; up to a chunk per rank is
            left out each epoch, others each epoch). See :class:`~oocseq.plan.EpochPlan`.
        workers, use_multiprocessing, max_queue_size: Keras's ``PyDataset`` arguments,
            carried out by oocseq (see :class:`~oocseq.WorkerOptions`): ``workers`` threads,
            or processes with ``use_multiprocessing``, prepare the next batches of the plan
            (read, gather, ``transform``), about ``max_queue_size`` ahead. Keras itself
            sees a sequential dataset, because its own enqueuer re-serves batches across
            epochs (see :mod:`oocseq.prefetch`). ``workers`` may also be a
            :class:`~oocseq.WorkerOptions` (e.g. with ``start_method="forkserver"``).

    ``seq[i]`` returns a tuple ``(x, y)``, ``(x, y, sample_weight)`` or ``(x,)``; arrays keep
    the store's dtypes (``uint8`` images stay ``uint8`` unless ``transform`` converts them).
    ``seq.batch(i)`` is the plan's batch ``i`` whatever the order of requests.

    Memory: at most :attr:`max_resident_chunks` decoded chunks per field while a batch is
    served (see ``stats``), independent of the store's size.

    Raises:
        FieldNotFoundError: ``x``/``y``/``sample_weight`` names a field the store lacks.
        ValueError: a bad argument (batch_size < 1, conflicting weights, ...).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> ChunkedSequence:
        # Be a keras.utils.PyDataset when Keras is in use, without ever importing it ourselves.
        if cls is ChunkedSequence and "keras" in sys.modules:
            from .adapters.keras import KerasChunkedSequence

            cls = KerasChunkedSequence
        return super().__new__(cls)

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        batch_size: int,
        *,
        x: FieldSelection = "x",
        y: FieldSelection = "y",
        shuffle: bool = True,
        seed: int = 0,
        window: int | None = None,
        drop_remainder: bool = False,
        transform: Callable[..., Batch] | None = None,
        num_classes: int | None = None,
        sample_weight: str | None = None,
        class_weight: Mapping[int, float] | None = None,
        serve: str = "arrival",
        read: ReadOptions | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        remainder: str = "pad",
        workers: int | WorkerOptions = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ArgumentError(f"seed must be an int >= 0, got {seed!r}")
        if x is None:
            raise ArgumentError("x must name at least one field")
        if serve not in ("arrival", "index"):
            raise ArgumentError(f"serve must be 'arrival' or 'index', got {serve!r}")
        self.batch_size = batch_size
        self.x, self.y = x, y
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.window = default_window(self.store.chunk_len, batch_size) if window is None else window
        if not isinstance(self.window, int) or self.window < 1:
            raise ArgumentError(f"window must be a positive int (chunks), got {window!r}")
        self.drop_remainder = bool(drop_remainder)
        self.transform = transform
        self._transform_takes_rng = transform is not None and _takes_two_args(transform)
        self.num_classes = num_classes
        self.sample_weight = sample_weight
        self.class_weight = dict(class_weight) if class_weight is not None else None
        self.serve = serve
        self.read = read if read is not None else ReadOptions()
        if rank is None and world_size is None:
            rank, world_size = detect_rank()
        elif rank is None or world_size is None:
            raise ArgumentError(
                f"give both rank and world_size, or neither (then they come from torch.distributed, "
                f"JAX or RANK / WORLD_SIZE); got rank={rank!r}, world_size={world_size!r}"
            )
        self.rank, self.world_size = rank, world_size
        self.remainder = remainder
        # Validates rank / world_size / remainder against the store now, not at the first batch.
        self._length = len(self._new_plan(0))
        self._check_targets()
        self._fields = list(
            dict.fromkeys(_names(x, "x") + _names(y, "y") + _names(sample_weight, "sample_weight"))
        )
        for name in self._fields:
            if name not in self.store:
                raise FieldNotFoundError(
                    f"{self.store.path} has no field {name!r}; its fields are {sorted(self.store.fields)}"
                )
        if isinstance(workers, WorkerOptions):
            if (use_multiprocessing, max_queue_size) != (False, 10):
                raise ArgumentError(
                    "give use_multiprocessing and max_queue_size inside WorkerOptions, not beside it"
                )
            self.worker_options = workers
        else:
            self.worker_options = WorkerOptions(workers, use_multiprocessing, max_queue_size)
        self._warn_if_clustered()
        self._epoch = 0
        self._owner_pid = os.getpid()  # arrival order is kept by this process only
        self._rt_pid = -1

    @property
    def workers(self) -> int:
        """Threads (or processes, with ``use_multiprocessing``) preparing batches ahead; see
        :attr:`worker_options`. Setting it takes effect at the next batch."""
        return self.worker_options.workers

    @workers.setter
    def workers(self, value: int) -> None:
        self._set_worker_options(workers=value)

    @property
    def use_multiprocessing(self) -> bool:
        """Whether the workers are processes; see :attr:`worker_options`."""
        return self.worker_options.use_multiprocessing

    @use_multiprocessing.setter
    def use_multiprocessing(self, value: bool) -> None:
        self._set_worker_options(use_multiprocessing=value)

    @property
    def max_queue_size(self) -> int:
        """Batches prepared ahead at most; see :attr:`worker_options`."""
        return self.worker_options.max_queue_size

    @max_queue_size.setter
    def max_queue_size(self, value: int) -> None:
        self._set_worker_options(max_queue_size=value)

    def _set_worker_options(self, **changes: Any) -> None:
        if getattr(self, "_rt_pid", None) != os.getpid():  # no runtime yet (or another process's)
            self.worker_options = dataclasses.replace(self.worker_options, **changes)
            return
        rt = self._runtime
        with rt.lock:
            self.worker_options = dataclasses.replace(self.worker_options, **changes)
            old, rt.prefetcher = rt.prefetcher, None  # the next batch starts workers of the new kind
        if old is not None:
            old.close()  # outside rt.lock: the prefetcher's lock comes first

    def _warn_if_clustered(self) -> None:
        """Warn (ShuffleWarning) when the label field is clustered by chunk: a shuffled epoch
        then mixes few classes per batch. Reads a few label chunks."""
        if not self.shuffle or not isinstance(self.y, str):
            return
        clustering = label_clustering(self.store, self.y)
        if clustering is None or clustering >= CLUSTERED_BELOW:
            return
        warnings.warn(
            ShuffleWarning(
                f"the labels of field {self.y!r} of {self.store.path} are sorted or clustered by chunk (a "
                f"chunk holds {clustering:.0%} of the label entropy of the store), so a chunk-aligned "
                f"shuffle with windows of {self.window} of {self.store.num_chunks} chunks gives batches of "
                "few classes (seq.shuffle_report() measures it). Re-ingest with preshuffle=True (the "
                "default of ingest_arrays, ingest_npy and ingest_image_folder), or pass a larger window"
            ),
            stacklevel=3,
        )

    def shuffle_report(self, *, max_batches: int = DEFAULT_MAX_BATCHES) -> ShuffleReport:
        """How the batches of the current epoch's plan mix: distinct chunks per batch, the
        window's share of the store, and, for an integer ``y`` field, label entropy and classes
        per batch next to an iid shuffle. Reads the labels of the first ``max_batches``
        batches. See :class:`oocseq.mixing.ShuffleReport`; ``print(report)`` shows a table."""
        label = self.y if isinstance(self.y, str) else None
        return shuffle_report(self.store, self.plan, self.batch_size, label=label, max_batches=max_batches)

    def _check_targets(self) -> None:
        if self.sample_weight is not None and self.class_weight is not None:
            raise ArgumentError("give sample_weight or class_weight, not both")
        if (self.num_classes is not None or self.class_weight is not None) and not isinstance(self.y, str):
            raise ArgumentError("num_classes and class_weight need y to be one integer field")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ArgumentError(f"num_classes must be a positive int, got {self.num_classes!r}")

    # -- per-process state: locks, the cache and its threads, the position in the epoch --------
    @property
    def _rt(self) -> _Runtime:
        """This process's runtime state, created on first use after construction, unpickling
        or a fork (threads and locks do not survive a fork)."""
        if self._rt_pid != os.getpid():
            self._runtime = _Runtime(self)
            self._rt_pid = os.getpid()
        return self._runtime

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_runtime", None)
        state["_rt_pid"] = -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _copy_as(self, cls: type[ChunkedSequence]) -> Any:
        """This sequence's arguments and epoch as a new ``cls`` instance (its own runtime):
        a plain ChunkedSequence for worker processes, a Keras one for ``as_pydataset``."""
        new = object.__new__(cls)
        new.__setstate__(self.__getstate__())
        return new

    # -- the plan -----------------------------------------------------------------------------
    @property
    def max_resident_chunks(self) -> int:
        """Bound on decoded chunks held per field while one batch is being served:
        ``2 * window + batch_size // chunk_len + 1`` for the batch (the locality bound) plus
        ``read.readahead * window`` decoded ahead. With worker threads (``workers > 1``), the
        windows of every block of batches queued (``ahead`` blocks of ``block`` batches, see
        :mod:`oocseq.prefetch`): ``ahead * (block * batch_size // (window * chunk_len) + 4 +
        readahead) * window`` (a block's positions span whole windows, and at most two short
        ones and one wrap-around of ``remainder="pad"``); with worker processes, the
        one-batch bound in each. Decoded memory is at most
        ``(max_resident_chunks + 2 * window) * chunk_bytes`` summed over the fields served
        (``chunk_bytes = chunk_len * sample bytes``; the ``2 * window`` are reusable buffers of
        dropped windows), plus one such term per extra request served concurrently, plus the
        batches prepared ahead (``max_queue_size`` rounded up to whole blocks)."""
        w, cl, ra = self.window, self.store.chunk_len, self.read.readahead
        opts = self.worker_options
        if not opts.parallel or opts.use_multiprocessing:
            return 2 * w + self.batch_size // cl + 1 + ra * w
        block, ahead = self._block_shape()
        return ahead * (block * self.batch_size // (w * cl) + 4 + ra) * w

    def _block_shape(self) -> tuple[int, int]:
        """Worker tasks: ``(batches per block, blocks queued ahead)``: a block is about one
        window of batches; enough blocks for ``max_queue_size`` batches and one per worker."""
        opts = self.worker_options
        block = -(-self.window * self.store.chunk_len // self.batch_size)
        return block, max(opts.workers, -(-opts.max_queue_size // block))

    @property
    def epoch(self) -> int:
        """The epoch whose order is served (starts at 0; :meth:`on_epoch_end` adds one)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch``'s order from now on, from its first batch."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ArgumentError(f"epoch must be an int >= 0, got {epoch!r}")
        rt = self._rt
        with rt.lock:
            self._epoch = epoch
            rt.plan = None
            rt.position = 0
            rt.requests = 0
            rt.begun = False
            rt.warned = False
            rt.last_served = -1
            prefetcher = rt.prefetcher
        if prefetcher is not None:  # outside rt.lock: the prefetcher takes its lock, then rt.lock
            prefetcher.reset()

    def on_epoch_begin(self) -> None:
        """Keras calls this before each epoch; it marks the epoch as begun, so that the
        ``on_epoch_end`` that follows moves on even when the batches were served by worker
        processes (``use_multiprocessing=True``) and none by this one."""
        self._rt.begun = True

    def on_epoch_end(self) -> None:
        """Move to the next epoch's order, if any batch of this epoch has been served.

        Keras also calls this when ``fit`` / ``evaluate`` start (``EpochIterator.reset``);
        with no batch served and no :meth:`on_epoch_begin` since the last epoch change, that
        call is ignored. But when ``fit`` must first build the
        model, Keras reads one batch before that call, so its first epoch trains plan epoch 1.
        To make plan epoch ``k`` train in Keras epoch ``k`` (for reproducing or resuming a run),
        pass the callback ``oocseq.adapters.keras.SyncEpoch(seq)`` to ``fit``; elsewhere use
        :meth:`set_epoch`."""
        rt = self._rt
        if rt.requests or rt.begun:
            self.set_epoch(self._epoch + 1)

    @property
    def plan(self) -> EpochPlan:
        """The current epoch's :class:`~oocseq.plan.EpochPlan`."""
        rt = self._rt
        with rt.lock:
            if rt.plan is None:
                rt.plan = self._new_plan(self._epoch)
            return rt.plan

    def _new_plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(
            len(self.store),
            self.store.chunk_len,
            self.window,
            self.seed,
            epoch,
            self.shuffle,
            self.rank,
            self.world_size,
            self.remainder,
        )

    def __len__(self) -> int:
        """Batches per epoch (of this rank; the same on every rank)."""
        return num_batches(self._length, self.batch_size, self.drop_remainder)

    def _check_index(self, i: int) -> int:
        n_batches = len(self)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"batch index must be an int, got {type(i).__name__}")
        if not 0 <= i < n_batches:
            raise BatchIndexError(
                f"batch index {i} out of range: this sequence has {n_batches} batches (len(seq))"
            )
        return int(i)

    def batch_indices(self, i: int) -> np.ndarray:
        """Sample indices (int64) of batch ``i`` of the current epoch's plan."""
        start = self._check_index(i) * self.batch_size
        return self.plan.indices(start, start + self.batch_size)

    # -- serving ------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> tuple[Any, ...]:
        """The next batch of the epoch's plan (``serve="arrival"``), or batch ``i`` of it
        (``serve="index"``, and in processes other than the one that built the sequence).

        Returns ``(x, y)``, ``(x, y, sample_weight)`` or ``(x,)``. Requested in order
        ``0, 1, 2, ...`` both modes serve :meth:`batch_indices` ``(i)``. Requested in any other
        order (Keras's ``model.fit`` shuffles batch indices by default), arrival order still
        serves the plan's batches in order, so each window is decoded once per epoch; every
        sample is served exactly once per epoch in both modes."""
        k, epoch = self._claim(self._check_index(i))
        try:
            return self._serve(k, epoch)
        except Exception as e:
            # Worker threads and processes hand exceptions back: say where they came from.
            if hasattr(e, "add_note"):
                e.add_note(
                    f"oocseq: while serving seq[{i}] (plan batch {k}, epoch {epoch}) from {self.store.path}"
                )
            raise

    def _serve(self, k: int, epoch: int) -> tuple[Any, ...]:
        """Plan batch ``k`` of ``epoch`` (the epoch when it was claimed): from the workers
        when they prepare batches ahead and requests come in plan order (always so in arrival
        order), else computed here."""
        rt = self._rt
        opts = self.worker_options
        with rt.lock:
            # Arrival order claims plan batches in order by construction (even when several
            # threads ask at once); by index, read ahead only for requests made in order.
            in_order = self.serve == "arrival" or k == rt.last_served + 1
            rt.last_served = k
            prefetcher = rt.prefetcher
            if opts.parallel and in_order and os.getpid() == self._owner_pid:
                if prefetcher is None:
                    prefetcher = rt.prefetcher = Prefetcher(opts, *self._block_shape(), self)
            else:
                prefetcher = None
            current = epoch == self._epoch
        if prefetcher is not None and current:  # (a late request of a past epoch: computed here)
            return prefetcher.get(epoch, k, len(self))
        if current:
            return self.batch(k)
        return self._batch_of(self._plan_for(epoch), k, readahead=False)  # the epoch changed meanwhile

    def _worker_copy(self) -> ChunkedSequence:
        """This sequence for worker processes: a plain ChunkedSequence (a Keras-flavoured one
        would make each spawned worker import Keras) that prepares batches when asked."""
        plain = self._copy_as(ChunkedSequence)
        plain.worker_options = WorkerOptions()
        # A process decodes only its own blocks' windows: read-ahead would decode the next
        # block's, which another process serves.
        plain.read = dataclasses.replace(self.read, readahead=0)
        return plain

    def _prepare_block(self, epoch: int, start: int, stop: int) -> list[Any]:
        """Plan batches ``start:stop`` of ``epoch`` (a worker's task); a batch that fails is
        kept as its exception, raised when that batch is served."""
        plan = self._plan_for(epoch)
        token = self._reserve_block(epoch, start, stop)
        out: list[Any] = []
        try:
            for i in range(start, stop):
                try:
                    out.append(self._batch_of(plan, i, readahead=True))
                except Exception as e:
                    out.append(_Failed(e))
        finally:
            self._release_block(token)
        return out

    def _reserve_block(self, epoch: int, start: int, stop: int) -> object:
        """Keep the windows of plan batches ``start:stop`` of ``epoch`` (and the read-ahead
        beyond them) in the cache until :meth:`_release_block`: another worker's batch would
        otherwise drop them between two batches of this block."""
        plan = self._plan_for(epoch)
        windows = [w for w, _ in plan.window_spans(start * self.batch_size, stop * self.batch_size)]
        if windows:
            windows += range(windows[-1] + 1, min(windows[-1] + 1 + self.read.readahead, plan.num_windows))
        keys = [(epoch, w) for w in windows]
        token = object()
        rt = self._rt
        with rt.lock:
            rt.in_flight[token] = keys
        return token

    def _release_block(self, token: object) -> None:
        rt = self._rt
        with rt.lock:
            rt.in_flight.pop(token, None)

    def _claim(self, i: int) -> tuple[int, int]:
        """Which plan batch, of which epoch, answers request ``i``."""
        rt = self._rt
        with rt.lock:
            rt.requests += 1
            epoch = self._epoch
            if self.serve == "index" or os.getpid() != self._owner_pid:
                return i, epoch
            k = rt.position
            rt.position += 1
            if k < len(self):
                return k, epoch
            if not rt.warned:
                rt.warned = True
                warnings.warn(
                    f"{len(self) + 1} batches were requested from a sequence of {len(self)} batches in "
                    f"epoch {self._epoch} without on_epoch_end(): the extra requests are served by "
                    "index, so some batches repeat. Call on_epoch_end() or set_epoch() between epochs "
                    "(Keras's model.fit does).",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return i, epoch

    def batch(self, i: int) -> tuple[Any, ...]:
        """Batch ``i`` of the current epoch's plan (independent of the order of requests),
        computed in the calling thread."""
        start = self._check_index(i) * self.batch_size
        rt = self._rt
        # Read ahead only when batches come in order: a random-access caller would waste it.
        sequential = start == rt.next_position
        rt.next_position = min(start + self.batch_size, self._length)
        return self._batch_of(self.plan, i, readahead=sequential)

    def _plan_for(self, epoch: int) -> EpochPlan:
        """The plan of ``epoch`` (the current one, or one of two others kept)."""
        rt = self._rt
        with rt.lock:
            if epoch == self._epoch:
                return self.plan
            plan = rt.plans.get(epoch)
            if plan is None:
                if len(rt.plans) >= 2:
                    rt.plans.pop(next(iter(rt.plans)))
                plan = rt.plans[epoch] = self._new_plan(epoch)
            return plan

    def _batch_of(self, plan: EpochPlan, i: int, readahead: bool) -> tuple[Any, ...]:
        start = i * self.batch_size
        stop = start + self.batch_size
        rt = self._rt
        sequential = readahead  # read ahead (and advise the kernel) beyond this batch's windows
        spans = plan.window_spans(start, stop)
        last = spans[-1][0]
        ahead = range(last + 1, min(last + 1 + (self.read.readahead if sequential else 0), plan.num_windows))
        keys = [(plan.epoch, w) for w, _ in spans]
        token = object()
        with rt.lock:
            rt.in_flight[token] = keys + [(plan.epoch, w) for w in ahead]
            rt.cache.retain(k for ks in rt.in_flight.values() for k in ks)
        try:
            if sequential:  # disk read-ahead one window beyond the decoded read-ahead
                for w in range(last + 1, min(ahead.stop + 1, plan.num_windows)):
                    rt.cache.advise((plan.epoch, w), plan.window_chunks(w))
            for w in [w for w, _ in spans] + list(ahead):
                rt.cache.prefetch((plan.epoch, w), plan.window_chunks(w))
            n = sum(len(rows) for _, rows in spans)
            batch: Batch = {}
            for name, layout in rt.layouts.items():  # not store.fields: it builds a dict per call
                batch[name] = np.empty((n, *layout.sample_shape), dtype=layout.dtype)
            pos = 0
            for w, rows in spans:
                buffers = rt.cache.get((plan.epoch, w), plan.window_chunks(w))
                for name in self._fields:  # one copy per sample, straight into the batch
                    np.take(buffers[name], rows, axis=0, out=batch[name][pos : pos + len(rows)], mode="clip")
                pos += len(rows)
        finally:
            with rt.lock:
                del rt.in_flight[token]
        # Sample indices only where they are used (transform, label checks): ~40 us a batch.
        indices = None
        if self.transform is not None or self.num_classes is not None or self.class_weight is not None:
            indices = plan.span_indices(spans)  # spans as computed above: not twice
        if self.transform is not None:
            batch = self._apply_transform(self.transform, batch, indices, plan.epoch)
        return self._assemble(batch, indices)

    def _apply_transform(
        self, transform: Callable[..., Batch], batch: Batch, indices: np.ndarray, epoch: int
    ) -> Batch:
        try:
            if self._transform_takes_rng:
                out = transform(batch, SampleRandom(self.seed, epoch, indices))
            else:
                out = transform(batch)
        except Exception as e:
            raise TransformError(
                f"transform failed on samples {indices[:8].tolist()}{'...' if len(indices) > 8 else ''} "
                f"of {self.store.path}: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(out, Mapping):
            raise TypeError(f"transform must return a dict of fields, got {type(out).__name__}")
        return dict(out)

    def read_batch(self, indices: np.ndarray) -> Batch:
        """The raw fields (``{field: array}``) of arbitrary sample indices, in that order
        (through the store's chunk reads, not the window cache)."""
        return {name: self.store[name][np.asarray(indices, dtype=np.int64)] for name in self._fields}

    def _assemble(self, batch: Batch, idx: np.ndarray | None) -> tuple[Any, ...]:
        xs = _select(self.x, batch)
        if self.y is None:
            return (xs,)
        ys = _select(self.y, batch)
        labels = ys
        if self.num_classes is not None:
            ys = self._one_hot(labels, idx)
        if self.sample_weight is not None:
            return xs, ys, np.asarray(batch[self.sample_weight])
        if self.class_weight is not None:
            return xs, ys, self._class_weights(labels, idx)
        return xs, ys

    def _label_error(
        self, labels: np.ndarray, bad: np.ndarray, idx: np.ndarray, expected: str
    ) -> InvalidSourceError:
        k = int(np.flatnonzero(bad)[0])
        return InvalidSourceError(
            f"{self.store.path}: sample {int(idx[k])} has label {labels[k]!r} in field {self.y!r}; "
            f"expected {expected}"
        )

    def _one_hot(self, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
        k = self.num_classes
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ArgumentError(
                f"num_classes needs a 1-D integer y field, {self.y!r} is {labels.dtype} {labels.shape[1:]}"
            )
        bad = (labels < 0) | (labels >= k)
        if bad.any():
            raise self._label_error(labels, bad, idx, f"an int in [0, {k}) (num_classes={k})")
        out = np.zeros((len(labels), k), dtype=np.float32)
        out[np.arange(len(labels)), labels] = 1.0
        return out

    def _class_weights(self, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
        weights = self.class_weight or {}
        labels = np.asarray(labels)
        bad = ~np.isin(labels, np.fromiter(weights.keys(), dtype=np.int64))
        if bad.any():
            raise self._label_error(labels, bad, idx, f"one of the class_weight keys {sorted(weights)}")
        table = {int(c): float(w) for c, w in weights.items()}
        return np.fromiter((table[int(v)] for v in labels), dtype=np.float32, count=len(labels))

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """The rest of the current epoch's batches, in order; if the current epoch has been
        served in full, first moves to the next one. So ``for x, y in seq`` in a loop trains
        epoch after epoch, and after :meth:`load_state_dict` it resumes mid-epoch."""
        if self._rt.position >= len(self):
            self.on_epoch_end()
        for i in range(self._rt.position, len(self)):
            yield self[i]

    # -- resuming -----------------------------------------------------------------------------
    def _plan_args(self) -> dict[str, Any]:
        return {
            "n": len(self.store),
            "chunk_len": self.store.chunk_len,
            "window": self.window,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
            "rank": self.rank,
            "world_size": self.world_size,
            "remainder": self.remainder,
        }

    def _store_fingerprint(self) -> int:
        """CRC-32 of the store's manifest: tells this store from another of the same shape."""
        doc = json.dumps(self.store.manifest.to_json(), sort_keys=True).encode()
        return zlib.crc32(doc)

    def state_dict(self) -> dict[str, Any]:
        """Where this sequence stands, as a small JSON-serialisable dict: the epoch, the number
        of batches served in it (``position``), the arguments that shape the plan and a
        fingerprint of the store. :meth:`load_state_dict` resumes from it."""
        return {
            "format": "oocseq.ChunkedSequence",
            "version": 1,
            "epoch": self._epoch,
            "position": self._rt.position,
            "plan": self._plan_args(),
            "store": self._store_fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next requests get the batches that the
        uninterrupted run would have served next (plan batches ``position, position+1, ...``
        of epoch ``epoch``).

        Raises StateError for a state of another store, of another plan (seed, batch size,
        window, ranks, ...) or an unknown format, naming what differs."""
        if (
            not isinstance(state, Mapping)
            or state.get("format") != "oocseq.ChunkedSequence"
            or state.get("version") != 1
        ):
            raise StateError(f"not a ChunkedSequence state (format/version 1): {str(state)[:200]}")
        if state.get("store") != self._store_fingerprint():
            raise StateError(f"this state is of another store than {self.store.path} (its manifest differs)")
        mine, theirs = self._plan_args(), state.get("plan")
        if not isinstance(theirs, Mapping):
            raise StateError("the state has no plan arguments")
        differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if differ:
            raise StateError(
                "the state is of another plan: "
                + ", ".join(f"{k}={a!r} in the state, {b!r} here" for k, (a, b) in differ.items())
            )
        epoch, position = state.get("epoch"), state.get("position")
        if not (
            isinstance(epoch, int) and epoch >= 0 and isinstance(position, int) and 0 <= position <= len(self)
        ):
            raise StateError(f"bad epoch/position in state: {epoch!r}/{position!r}")
        self.set_epoch(epoch)
        rt = self._rt
        with rt.lock:
            rt.position = position
            rt.requests = position
            rt.next_position = position * self.batch_size

    @property
    def stats(self) -> dict[str, int]:
        """Work counters of this process since construction: ``chunk_decodes`` (chunks of one
        field read and decoded), ``cache_hits`` (window requests served decoded),
        ``peak_resident_chunks`` (decoded chunks held at once, all fields together); and
        ``worker_chunk_decodes``, the chunk decodes of the current worker processes
        (``use_multiprocessing=True``) for the batches they prepared."""
        rt = self._rt
        c = rt.cache
        workers = rt.prefetcher.worker_decodes if rt.prefetcher is not None else 0
        return {
            "chunk_decodes": c.decodes,
            "cache_hits": c.hits,
            "peak_resident_chunks": c.peak_resident,
            "worker_chunk_decodes": workers,
        }

    def close(self) -> None:
        """Stop this process's read-ahead threads and drop its decoded chunks."""
        if self._rt_pid == os.getpid():
            if self._runtime.prefetcher is not None:
                self._runtime.prefetcher.close()
            self._runtime.cache.close()
            self._rt_pid = -1

    def __repr__(self) -> str:
        return (
            f"<oocseq.ChunkedSequence {str(self.store.path)!r} batches={len(self)} batch_size={self.batch_size} "
            f"window={self.window} shuffle={self.shuffle} seed={self.seed} epoch={self._epoch}>"
        )
