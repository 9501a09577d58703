"""``ChunkedSequence``: the cursor over the batch core, for Keras, PyTorch and plain loops.

The batches themselves come from :class:`~oocseq.batches.ChunkedBatches`, a pure function of
``(epoch, i)``. This module keeps what changes: the epoch, how far into it the batches were
handed out, which plan batch answers which request during a Keras pass, resume state and the
workers that prepare batches ahead (:mod:`oocseq.prefetch`).

Which plan batch answers a request:

- ``seq[i]`` from user code (outside a Keras pass) is plan batch ``i`` of the current epoch:
  a pure read that never moves the cursor, so looking at a batch shifts nothing.
- During a Keras pass (``on_epoch_begin`` ... ``on_epoch_end``, which ``fit``, ``evaluate`` and
  ``predict`` call), the k-th *distinct* index requested gets the plan's next batch (and the
  same index asked again gets the same batch). Requests in order ``0, 1, 2, ...``
  (``predict``, ``evaluate``, ``fit(shuffle=False)``) therefore get plan batch ``i`` for
  index ``i``; the shuffled requests of ``fit(shuffle=True)`` get the plan's batches in plan
  order, which keeps chunk locality. A pass that ends before the epoch's batches are all
  handed out goes on in the next pass when Keras continues its requests there
  (``steps_per_epoch < len(seq)``); one cut short otherwise (the batch Keras reads to build a
  model) is not counted: the next pass starts where it started.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from .batches import Batch, ChunkedBatches, FieldSelection
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    BatchIndexError,
    KerasIteratorWarning,
    OocseqError,
    ShuffleWarning,
    StateError,
)
from .mixing import CLUSTERED_BELOW, DEFAULT_MAX_BATCHES, ShuffleReport, label_clustering, shuffle_report
from .options import ReadOptions, ShardOptions, WorkerOptions
from .plan import EpochPlan
from .prefetch import Prefetcher
from .store import Store

__all__ = ["ChunkedSequence", "FieldSelection", "ReadOptions", "ShardOptions", "WorkerOptions"]

_SERVE_TO_ORDER = {"arrival": "plan", "index": "index"}


class _Runtime:
    """One process's serving machinery (never pickled; rebuilt after fork or unpickling)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.prefetcher: Prefetcher | None = None
        self.last_served = (-1, -1)  # (epoch, plan batch) served last: to tell in-order requests
        self.finished: int | None = None  # the last epoch whose last batch was served in order
        #: Whether the current epoch's first batch followed the last epoch's last one: the
        #: caller goes on from epoch to epoch, so the read-ahead goes on into the next one.
        self.goes_on = False

    def record(self, epoch: int, k: int, n: int) -> tuple[bool, bool]:
        """Record that plan batch ``k`` of ``epoch`` (of ``n``) is served; return whether it
        follows the batch served before it, and whether to read ahead into the next epoch.
        Call with the lock held."""
        in_order = k == 0 or self.last_served == (epoch, k - 1)
        self.last_served = (epoch, k)
        if k == 0:
            self.goes_on = self.finished == epoch - 1
        if in_order and k == n - 1:
            self.finished = epoch
        return in_order, in_order and self.goes_on


_KERAS_CLASSES: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def _keras_class(cls: type) -> type:
    """``cls`` as a ``keras.utils.PyDataset`` too (Keras is imported already; oocseq never
    imports it): a subclass with the same name that also derives from ``PyDataset``, made once
    per class, so a user's subclass of ChunkedSequence is one as well."""
    pydataset = sys.modules["keras"].utils.PyDataset
    if issubclass(cls, pydataset):
        return cls
    made = _KERAS_CLASSES.get(cls)
    if made is None:
        made = type(
            cls.__name__,
            (cls, pydataset),
            {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_plain_class": cls},
        )
        _KERAS_CLASSES[cls] = made
    return made


def _rebuild(cls: type) -> ChunkedSequence:
    """Unpickling: an empty instance of ``cls`` (a PyDataset too when Keras is imported here)."""
    return ChunkedSequence.__new__(cls)  # type: ignore[no-any-return]


class ChunkedSequence:
    """Shuffled batches from a chunked store (or in-memory arrays), reading whole chunks.

    When Keras has been imported (before or after oocseq), every ``ChunkedSequence``, and every
    instance of a subclass of it, is also a ``keras.utils.PyDataset``: ``model.fit(seq)``,
    ``evaluate`` and ``predict`` accept it. oocseq itself never imports Keras; for a sequence
    built before Keras was imported, see :func:`oocseq.adapters.keras.as_pydataset`.

    Args:
        store: an opened :class:`~oocseq.Store`, a store path, or a dict ``{field: array}`` of
            equal-length numpy arrays (served from memory with the same plan; see
            :class:`~oocseq.memory.ArraySource` for the chunk length).
        batch_size: samples per batch (the last batch may be shorter; see ``drop_remainder``).
        x: the input field(s): a name, a list of names (tuple of arrays) or a dict
            ``{input_name: field}`` for multi-input models.
        y: the target field(s), same forms, or ``None`` for unlabeled data (batches are ``(x,)``).
        sample_weight: a field of per-sample weights, served as the third element.
        shuffle: serve a new chunk-aligned shuffled order each epoch; ``False`` serves samples
            in store order. This, not ``model.fit(shuffle=...)``, decides the order trained.
        seed: seed of the shuffle (int >= 0). The order is a pure function of
            ``(seed, epoch, n, chunk_len, window)``.
        window: chunks whose samples are shuffled together (default: at least 8, and enough
            for two batches; at most the number of chunks). Larger windows mix more and hold
            more decoded chunks in memory.
        drop_remainder: drop the last, short batch so every batch has ``batch_size`` samples.
        transform: ``f(batch) -> batch`` or ``f(batch, rng) -> batch``, applied to each batch
            as a dict ``{field: array}`` (of the fields named by ``x``, ``y``,
            ``sample_weight``) before it is assembled, e.g.
            ``lambda b: {**b, "x": b["x"].astype("float32") / 255}``. Every field it returns
            must keep the batch's leading length. ``rng`` is a
            :class:`~oocseq.rng.SampleRandom`: per-sample random numbers keyed by
            ``(seed, epoch, sample index)``. A subclass may define a ``transform`` method
            instead. Errors in it are raised as TransformError naming the samples.
            :mod:`oocseq.transforms` has stock ones: ``one_hot(num_classes)``,
            ``class_weights({class: weight})`` (served as the third element) and ``compose``.
        read: :class:`~oocseq.ReadOptions`: read-ahead windows, decoding threads, and
            ``keras_order``, which plan batch answers Keras's requests (see the module
            docstring).
        shard: :class:`~oocseq.ShardOptions`: this process's rank and world size; ranks serve
            disjoint, chunk-aligned shares of every epoch and the same number of batches.
            Default: :meth:`ShardOptions.detect` (``torch.distributed``, JAX or ``RANK`` /
            ``WORLD_SIZE``, else one rank).
        workers: Keras's ``PyDataset`` argument, carried out by oocseq: threads (or processes,
            with ``use_multiprocessing=True``) that prepare the next batches of the plan
            (read, gather, ``transform``), about ``max_queue_size`` ahead; or a
            :class:`~oocseq.WorkerOptions` (e.g. with ``start_method="forkserver"``). Keras
            itself sees a sequential dataset, so its own enqueuer never re-serves batches.
        **kwargs: ``use_multiprocessing`` and ``max_queue_size`` (Keras's other ``PyDataset``
            arguments, as in ``super().__init__(**kwargs)``).

    ``seq[i]`` returns a tuple ``(x, y)``, ``(x, y, sample_weight)`` or ``(x,)``; arrays keep
    the store's dtypes (``uint8`` images stay ``uint8`` unless ``transform`` converts them).

    Memory: at most :attr:`max_resident_chunks` decoded chunks per field while a batch is
    served (see ``stats``), independent of the store's size.

    Raises:
        FieldNotFoundError: ``x``/``y``/``sample_weight`` names a field the store lacks.
        ArgumentError: a bad argument (batch_size < 1, conflicting weights, ...).
        ArgumentTypeError: an argument of the wrong type.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> ChunkedSequence:
        # Be a keras.utils.PyDataset when Keras is in use, without ever importing it ourselves.
        if "keras" in sys.modules:
            cls = _keras_class(cls)
        return super().__new__(cls)

    def __init__(
        self,
        store: Store | str | os.PathLike[str] | Mapping[str, Any],
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
        read: ReadOptions | None = None,
        shard: ShardOptions | None = None,
        workers: int | WorkerOptions = 1,
        **kwargs: Any,
    ) -> None:
        hook = getattr(type(self), "transform", None)
        if transform is None and callable(hook):
            transform = self.transform  # a subclass's method (a bound method pickles)
        else:
            self.transform: Callable[..., Batch] | None = transform
        read, shard, worker_options, transform = _legacy_arguments(read, shard, workers, transform, kwargs, y)
        self.core = ChunkedBatches(
            store,
            batch_size,
            x=x,
            y=y,
            sample_weight=sample_weight,
            shuffle=shuffle,
            seed=seed,
            window=window,
            drop_remainder=drop_remainder,
            transform=transform,
            shard=shard if shard is not None else ShardOptions.detect(),
            read=read,
        )
        self.worker_options = worker_options
        self._epoch = 0
        self._position = 0  # plan batches of the epoch handed out (by a Keras pass or iteration)
        self._taken: dict[int, int] = {}  # this epoch's Keras requests: index -> plan batch
        self._in_pass = False  # between Keras's on_epoch_begin and on_epoch_end
        self._pass_start = (0, 0)  # (epoch, position) when the pass began
        self._pass_continues = False  # the next pass goes on with this one's requests
        self._continuing = False  # this pass goes on with the last one's requests
        self._peeked: set[int] = set()  # batches of this epoch read by index (outside a pass)
        self._keras_offset = 0  # batches of the epoch trained before this fit (fit_resumable)
        self._owner_pid = os.getpid()  # the cursor is this process's
        self._rt_pid = -1
        self._warn_if_clustered()

    def _warn_if_clustered(self) -> None:
        """Warn (ShuffleWarning) when the label field is clustered by chunk: a shuffled epoch
        then mixes few classes per batch. Reads a few label chunks."""
        if not self.shuffle or not isinstance(self.y, str):
            return
        try:
            clustering = label_clustering(self.store, self.y)
        except OocseqError:  # a damaged label chunk: raised where a batch serves it, not here
            return
        if clustering is None or clustering >= CLUSTERED_BELOW:
            return
        where = getattr(self.store, "path", "the arrays")
        warnings.warn(
            ShuffleWarning(
                f"the labels of field {self.y!r} of {where} are sorted or clustered by chunk (a chunk "
                f"holds {clustering:.0%} of the label entropy of the store), so a chunk-aligned shuffle "
                f"with windows of {self.window} of {self.store.num_chunks} chunks gives batches of few "
                "classes (seq.shuffle_report() measures it). Re-ingest with preshuffle=True (the default "
                "of every ingest function), or pass a larger window"
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

    # -- what the core decides, read-only here --------------------------------------------------
    store = property(lambda self: self.core.source, doc="The store (or in-memory arrays) read.")
    batch_size = property(lambda self: self.core.batch_size, doc="Samples per batch.")
    x = property(lambda self: self.core.x, doc="The input field selection.")
    y = property(lambda self: self.core.y, doc="The target field selection.")
    sample_weight = property(lambda self: self.core.sample_weight, doc="The weight field, if any.")
    shuffle = property(lambda self: self.core.shuffle, doc="Whether epochs are shuffled.")
    seed = property(lambda self: self.core.seed, doc="Seed of the shuffle.")
    window = property(lambda self: self.core.window, doc="Chunks per window.")
    drop_remainder = property(
        lambda self: self.core.drop_remainder, doc="Whether the short batch is dropped."
    )
    read = property(lambda self: self.core.read, doc="The :class:`ReadOptions`.")
    keras_order = property(lambda self: self.core.read.keras_order, doc="``read.keras_order``.")
    shard = property(lambda self: self.core.shard, doc="The :class:`ShardOptions`.")
    rank = property(lambda self: self.core.shard.rank, doc="This process's rank.")
    world_size = property(lambda self: self.core.shard.world_size, doc="Ranks in all.")

    # -- what Keras reads to decide on its own enqueuer (PyDataset's attributes) -----------------
    @property
    def workers(self) -> int:
        """At most 1: what Keras sees (oocseq runs ``worker_options.workers`` itself); setting
        it sets ``worker_options.workers``."""
        return min(self.worker_options.workers, 1)

    @workers.setter
    def workers(self, value: int) -> None:
        self._set_worker_options(workers=value)

    @property
    def use_multiprocessing(self) -> bool:
        """False: what Keras sees; setting it sets ``worker_options.use_multiprocessing``."""
        return False

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

    @property
    def num_batches(self) -> int:
        """Batches Keras is shown: ``len(seq)``, less those of the epoch trained before a
        resumed ``fit`` (:func:`~oocseq.adapters.keras.fit_resumable`)."""
        return len(self) - self._keras_offset

    def _set_worker_options(self, **changes: Any) -> None:
        if getattr(self, "_rt_pid", None) != os.getpid():  # no runtime yet (or another process's)
            self.worker_options = dataclasses.replace(self.worker_options, **changes)
            return
        rt = self._rt
        with rt.lock:
            self.worker_options = dataclasses.replace(self.worker_options, **changes)
            old, rt.prefetcher = rt.prefetcher, None  # the next batch starts workers of the new kind
        if old is not None:
            old.close()  # outside rt.lock: the prefetcher's lock comes first

    # -- per-process state, pickling --------------------------------------------------------------
    @property
    def _rt(self) -> _Runtime:
        if self._rt_pid != os.getpid():
            self._runtime = _Runtime()
            self._rt_pid = os.getpid()
        return self._runtime

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_runtime", None)
        state["_rt_pid"] = -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # By the user's class, not the PyDataset flavour made at run time (it has no import path).
        cls = type(self).__dict__.get("_plain_class", type(self))
        return _rebuild, (cls,), self.__getstate__()

    # -- the plan -----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch (of this rank; the same on every rank)."""
        return len(self.core)

    @property
    def epoch(self) -> int:
        """The epoch whose order is served (starts at 0)."""
        return self._epoch

    @property
    def plan(self) -> EpochPlan:
        """The current epoch's :class:`~oocseq.plan.EpochPlan`."""
        return self.core.plan(self._epoch)

    def batch_indices(self, i: int) -> np.ndarray:
        """Sample indices (int64) of batch ``i`` of the current epoch's plan."""
        return self.core.batch_indices(self._epoch, i)

    @property
    def max_resident_chunks(self) -> int:
        """Bound on decoded chunks held per field while one batch is being served (see the
        README's "Memory" section for the formula with worker threads)."""
        w, cl, ra = self.window, self.store.chunk_len, self.read.readahead
        opts = self.worker_options
        if not opts.parallel or opts.use_multiprocessing:
            return 2 * w + self.batch_size // cl + 1 + ra * w
        task, ahead = self._task_shape()
        return ahead * (task * self.batch_size // (w * cl) + 4 + ra) * w

    def _task_shape(self) -> tuple[int, int]:
        """Worker tasks: ``(batches per task, tasks queued ahead)``: a task is about one
        window of batches; enough tasks for ``max_queue_size`` batches and one per worker."""
        opts = self.worker_options
        task = -(-self.window * self.store.chunk_len // self.batch_size)
        return task, max(opts.workers, -(-opts.max_queue_size // task))

    # -- epochs -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch``'s order from now on, from its first batch.

        Raises:
            ArgumentError: ``epoch`` is not an int >= 0.
        """
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ArgumentError(f"epoch must be an int >= 0, got {epoch!r}")
        rt = self._rt
        with rt.lock:
            self._epoch = int(epoch)
            self._position = 0
            self._taken = {}
            self._peeked = set()
            self._continuing = False
            rt.last_served = (-1, -1)
            rt.goes_on = False  # (until its first batch follows the last epoch's last)
            prefetcher = rt.prefetcher
        if prefetcher is not None:  # outside rt.lock: the prefetcher takes its lock, then rt.lock
            prefetcher.reset()

    def on_epoch_begin(self) -> None:
        """Keras calls this when a pass over the data begins (each ``fit`` epoch, ``evaluate``,
        ``predict``): requests until :meth:`on_epoch_end` are answered in the plan's order
        (see the module docstring).

        Raises:
            ArgumentError: Keras was asked for more steps per epoch than the sequence has
                batches (``steps_per_epoch`` / ``steps`` > ``len(seq)``).
        """
        steps = _keras_steps(_keras_iterator(self))
        if steps is not None and steps > self.num_batches:
            raise ArgumentError(
                f"Keras was asked for {steps} steps per epoch from a sequence of {self.num_batches} "
                "batches; give steps_per_epoch (steps) <= len(seq). With fewer, each Keras epoch goes on "
                "through the plan where the last one stopped."
            )
        with self._rt.lock:
            if not self._continuing and self._position > self._keras_offset:
                # A new pass asks for a whole epoch: not the rest of one that iteration or an
                # earlier pass began.
                self._next_epoch_locked()
            self._continuing = False
            self._in_pass = True
            self._pass_start = (self._epoch, self._position)
            # Keras goes on with the same requests in the next pass only with steps_per_epoch.
            self._pass_continues = steps is not None

    def on_epoch_end(self) -> None:
        """End a pass (Keras) or an epoch (plain loops).

        At the end of a Keras pass: move to the next epoch if all its batches were handed out,
        else keep going through it in the next pass (``steps_per_epoch < len(seq)``); a pass
        cut short otherwise (the batch Keras reads to build a model) is not counted. Called outside a pass (by a plain loop, or by
        Keras when ``fit`` / ``evaluate`` / ``predict`` start): move to the next epoch if
        batches of this one were handed out (by iteration or a Keras pass) or every batch of it
        was read by index (``for i in range(len(seq)): seq[i]``); a few peeks, or nothing
        served, change nothing, so no epoch is skipped. :meth:`set_epoch` pins the epoch; so does
        ``oocseq.adapters.keras.SyncEpoch`` in ``fit``."""
        if self._in_pass and self._pass_continues and _dropped_requests(_keras_iterator(self)):
            self._pass_continues = False  # Keras dropped its requests (reset after a model build)
        rt = self._rt
        with rt.lock:
            if self._in_pass:
                self._in_pass = False
                advance = 0 < len(self) <= self._position
                epoch, start = self._pass_start
                self._continuing = not advance and self._pass_continues
                if not advance and not self._pass_continues and epoch == self._epoch:
                    # A pass cut short without steps_per_epoch (the batch Keras reads to build a
                    # model, a stopped fit): its batches were not trained; the next pass,
                    # with requests of its own, starts where this one started.
                    self._position = start
                    self._taken = {}
            else:
                # Not for a few peeks (Keras's TensorFlow backend reads two batches to learn
                # their shapes): for batches handed out, or every batch read by index.
                advance = self._position > 0 or 0 < len(self) <= len(self._peeked)
        if advance:
            self.set_epoch(self._epoch + 1)

    # -- serving ------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> tuple[Any, ...]:
        """Batch ``i``: ``(x, y)``, ``(x, y, sample_weight)`` or ``(x,)``.

        Outside a Keras pass, plan batch ``i`` of the current epoch (the cursor does not move).
        During one, the plan batch that the pass's request order maps ``i`` to (see the module
        docstring); every sample is served exactly once per epoch.

        Raises:
            BatchIndexError: ``i`` outside ``range(len(seq))``.
            ArgumentTypeError: ``i`` is not an int.
        """
        k, epoch = self._claim(i)
        return self._serve(k, epoch, i)

    def _claim(self, i: Any) -> tuple[int, int]:
        """Which plan batch, of which epoch, answers request ``i``."""
        rt = self._rt
        with rt.lock:
            if not self._in_pass or os.getpid() != self._owner_pid:
                i = self.core.check_index(i)
                self._peeked.add(i)
                return i, self._epoch
            i = self.core.check_index(i)
            n = len(self.core)
            if i >= n - self._keras_offset:
                raise BatchIndexError(
                    f"batch index {i} out of range: Keras is shown {self.num_batches} batches "
                    f"(the rest of a resumed epoch of {n})"
                )
            k = self._taken.get(i)
            if k is None:
                if self._position >= n:  # more than an epoch in one pass: the next epoch
                    self._next_epoch_locked()
                k = self._keras_offset + i if self.keras_order == "index" else self._position
                self._taken[i] = k
                self._position += 1
            return k, self._epoch

    def _next_epoch_locked(self) -> None:
        self._epoch += 1
        self._position = 0
        self._taken = {}
        self._peeked = set()
        self._continuing = False
        self._rt.last_served = (-1, -1)
        # The prefetcher drops other epochs' tasks at its next request by itself.

    def _serve(self, k: int, epoch: int, request: int | None = None) -> tuple[Any, ...]:
        try:
            return self._compute(k, epoch)
        except Exception as e:
            # Worker threads and processes hand exceptions back: say where they came from.
            asked = f"seq[{request}], " if request is not None else ""
            e.add_note(f"oocseq: while serving {asked}plan batch {k}, epoch {epoch} from {self.store.path}")
            raise

    def _compute(self, k: int, epoch: int) -> tuple[Any, ...]:
        """Plan batch ``k`` of ``epoch``: from the workers when they prepare batches ahead and
        requests come in plan order, else computed here."""
        rt = self._rt
        opts = self.worker_options
        with rt.lock:
            in_order, next_epoch = rt.record(epoch, k, len(self.core))
            prefetcher = None
            if opts.parallel and in_order and os.getpid() == self._owner_pid:
                if rt.prefetcher is None:
                    rt.prefetcher = Prefetcher(opts, *self._task_shape(), self.core)
                prefetcher = rt.prefetcher
            current = epoch == self._epoch
        if prefetcher is not None and current:
            return prefetcher.get(epoch, k, len(self))  # type: ignore[no-any-return]
        # Read ahead only when batches come in order: a random-access caller would waste it.
        return self.core.get(epoch, k, readahead=in_order, next_epoch=next_epoch)

    def batch(self, i: int) -> tuple[Any, ...]:
        """Plan batch ``i`` of the current epoch (the same as ``seq[i]`` outside a Keras pass),
        computed in the calling thread."""
        epoch = self._epoch
        rt = self._rt
        with rt.lock:
            in_order, next_epoch = rt.record(epoch, i, len(self.core))
        return self.core.get(epoch, i, readahead=in_order, next_epoch=next_epoch)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        """The rest of the current epoch's batches, in plan order; if the current epoch has
        been handed out in full, first moves to the next one. So ``for x, y in seq`` in a
        loop trains epoch after epoch, and after :meth:`load_state_dict` it resumes mid-epoch."""
        if self._position >= len(self):
            self.set_epoch(self._epoch + 1)
        while True:
            with self._rt.lock:
                if self._position >= len(self):
                    return
                k, epoch = self._position, self._epoch
                self._position += 1
            yield self._serve(k, epoch)

    # -- resuming -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where this sequence stands, as a small JSON-serialisable dict: the epoch, the number
        of its batches handed out (``position``), the arguments that shape the plan and a
        fingerprint of the store. :meth:`load_state_dict` resumes from it."""
        return {
            "format": "oocseq.ChunkedSequence",
            "version": 1,
            "epoch": self._epoch,
            "position": self._position,
            "plan": self.core.plan_args(),
            "store": self.core.fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next batches handed out (by iteration or a Keras
        pass) are plan batches ``position, position+1, ...`` of epoch ``epoch``.

        Raises:
            StateError: a state of another store, of another plan (seed, batch size, window,
                ranks, ...) or an unknown format, naming what differs.
        """
        check_state(self.core, state)
        epoch, position = state["epoch"], state["position"]
        if not (
            isinstance(epoch, int) and epoch >= 0 and isinstance(position, int) and 0 <= position <= len(self)
        ):
            raise StateError(f"bad epoch/position in state: {epoch!r}/{position!r}")
        self.set_epoch(epoch)
        with self._rt.lock:
            self._position = position
            self._continuing = position > 0  # the next Keras pass goes on from here

    @property
    def stats(self) -> dict[str, int]:
        """Work counters of this process since construction: ``chunk_decodes`` (chunks of one
        field read and decoded), ``cache_hits`` (window requests served decoded),
        ``peak_resident_chunks`` (decoded chunks held at once, all fields together); and
        ``worker_chunk_decodes``, the chunk decodes of the current worker processes
        (``use_multiprocessing=True``) for the batches they prepared."""
        prefetcher = self._rt.prefetcher
        return {
            **self.core.stats,
            "worker_chunk_decodes": prefetcher.worker_decodes if prefetcher is not None else 0,
        }

    def close(self) -> None:
        """Stop this process's workers and read-ahead threads and drop its decoded chunks."""
        if self._rt_pid == os.getpid():
            if self._runtime.prefetcher is not None:
                self._runtime.prefetcher.close()
                self._runtime.prefetcher = None
        self.core.close()

    def __repr__(self) -> str:
        return (
            f"<oocseq.{type(self).__name__} {str(self.store.path)!r} batches={len(self)} "
            f"batch_size={self.batch_size} window={self.window} shuffle={self.shuffle} seed={self.seed} "
            f"epoch={self._epoch}>"
        )


def check_state(core: ChunkedBatches, state: Any) -> None:
    """Check that ``state`` (a :meth:`ChunkedSequence.state_dict`) is of ``core``'s store and plan.

    Raises:
        StateError: naming what differs.
    """
    if (
        not isinstance(state, Mapping)
        or state.get("format") != "oocseq.ChunkedSequence"
        or state.get("version") != 1
    ):
        raise StateError(f"not a ChunkedSequence state (format/version 1): {str(state)[:200]}")
    if state.get("store") != core.fingerprint():
        raise StateError(f"this state is of another store than {core.source.path} (its manifest differs)")
    mine, theirs = core.plan_args(), state.get("plan")
    if not isinstance(theirs, Mapping):
        raise StateError("the state has no plan arguments")
    differ = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if differ:
        raise StateError(
            "the state is of another plan: "
            + ", ".join(f"{k}={a!r} in the state, {b!r} here" for k, (a, b) in differ.items())
        )


#: Frames looked through for Keras's epoch iterator (a subclass's ``on_epoch_begin`` calling
#: ``super()`` adds one per level).
_MAX_FRAMES = 16
#: ``sys._getframe`` where the interpreter has it (CPython, PyPy); None elsewhere.
_getframe: Callable[[int], Any] | None = getattr(sys, "_getframe", None)


def _keras_iterator(seq: ChunkedSequence) -> Any:
    """The Keras epoch iterator calling ``seq.on_epoch_begin`` / ``on_epoch_end`` (through its
    data adapter), or None.

    Keras tells a ``PyDataset`` neither its ``steps_per_epoch`` nor whether the next epoch goes
    on with the same requests, and has no public way to ask, so this looks up the caller's
    frames for an object whose ``data_adapter.py_dataset`` is ``seq`` (Keras 3's
    ``EpochIterator``). Whatever fails (no frames on this interpreter, a stack too short, an
    attribute that raises, a Keras that changed) gives None: the sequence then treats every
    pass as a whole one (see :meth:`ChunkedSequence.on_epoch_begin`), and warns once when
    Keras was on the stack.
    """
    keras_seen = False
    try:
        frame = _getframe(2) if _getframe is not None else None  # the caller of on_epoch_*
        for _ in range(_MAX_FRAMES):
            if frame is None:
                break
            it = frame.f_locals.get("self")
            adapter = getattr(it, "data_adapter", None)
            if adapter is not None and getattr(adapter, "py_dataset", None) is seq:
                return it
            name = frame.f_globals.get("__name__")
            keras_seen = keras_seen or (isinstance(name, str) and name.split(".")[0] == "keras")
            frame = frame.f_back
    except Exception:  # anything at all: this is only a lookup
        keras_seen = keras_seen or (_getframe is None and "keras" in sys.modules)
    else:
        keras_seen = keras_seen or (_getframe is None and "keras" in sys.modules)
    if keras_seen and not seq.__dict__.get("_warned_no_iterator"):
        seq.__dict__["_warned_no_iterator"] = True
        warnings.warn(
            KerasIteratorWarning(
                f"oocseq could not find the epoch iterator of Keras {_keras_version()} among the callers "
                "of on_epoch_begin/on_epoch_end, so it cannot tell fit(steps_per_epoch=k) from a pass cut "
                "short: a pass that ends before the epoch's last batch starts over in the next one. Whole "
                "epochs (fit without steps_per_epoch, evaluate, predict) are served as usual"
            ),
            stacklevel=4,
        )
    return None


def _keras_version() -> str:
    return str(getattr(sys.modules.get("keras"), "__version__", "?"))


def _keras_steps(it: Any) -> int | None:
    """``steps_per_epoch`` of a Keras epoch iterator, or None (not given, or not an int > 0)."""
    try:
        steps = getattr(it, "steps_per_epoch", None)
    except Exception:
        return None
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps > 0:
        return int(steps)
    return None


def _dropped_requests(it: Any) -> bool:
    """Whether a Keras epoch iterator dropped its requests (``reset``, after reading a batch
    to build the model): its current iterator is None."""
    try:
        return it is not None and getattr(it, "_current_iterator", True) is None
    except Exception:
        return False


def _moved(old: str, new: str) -> None:
    warnings.warn(
        f"ChunkedSequence({old}) is deprecated and will be removed; write {new}",
        DeprecationWarning,
        stacklevel=4,
    )


def _legacy_arguments(
    read: ReadOptions | None,
    shard: ShardOptions | None,
    workers: int | WorkerOptions,
    transform: Callable[..., Batch] | None,
    kwargs: dict[str, Any],
    y: FieldSelection,
) -> tuple[ReadOptions | None, ShardOptions | None, WorkerOptions, Callable[..., Batch] | None]:
    """Keyword arguments of earlier versions (each still works, with a DeprecationWarning that
    says what to write instead) and Keras's ``PyDataset`` keywords."""
    kwargs = dict(kwargs)
    order = None
    if "serve" in kwargs:
        serve = kwargs.pop("serve")
        if serve not in _SERVE_TO_ORDER:
            raise ArgumentError(f"serve must be 'arrival' or 'index', got {serve!r}")
        order = _SERVE_TO_ORDER[serve]
        _moved(f"serve={serve!r}", f"read=oocseq.ReadOptions(keras_order={order!r})")
    if "keras_order" in kwargs:
        order = kwargs.pop("keras_order")
        _moved(f"keras_order={order!r}", f"read=oocseq.ReadOptions(keras_order={order!r})")
    if order is not None:
        read = dataclasses.replace(read if read is not None else ReadOptions(), keras_order=order)
    labels = {k: kwargs.pop(k) for k in ("class_weight", "num_classes") if kwargs.get(k) is not None}
    for k in ("class_weight", "num_classes"):
        kwargs.pop(k, None)  # (None: the old default)
    if labels:
        from . import transforms

        if not isinstance(y, str):
            raise ArgumentError("num_classes and class_weight need y to be one integer field")
        made: list[Callable[..., Batch]] = [] if transform is None else [transform]
        written = []
        if "class_weight" in labels:  # from the integer labels: before any one-hot encoding
            made.append(transforms.class_weights(labels["class_weight"], field=y))
            written.append(f"oocseq.transforms.class_weights({labels['class_weight']!r}, field={y!r})")
        if "num_classes" in labels:
            made.append(transforms.one_hot(labels["num_classes"], field=y))
            written.append(f"oocseq.transforms.one_hot({labels['num_classes']!r}, field={y!r})")
        transform = made[0] if len(made) == 1 else transforms.compose(*made)
        what = " and ".join(f"{k}=" for k in labels)
        new = written[0] if len(written) == 1 else f"oocseq.transforms.compose({', '.join(written)})"
        _moved(what, f"transform={new} (with a transform of your own first in compose)")
    flat = {k: kwargs.pop(k) for k in ("rank", "world_size", "remainder") if k in kwargs}
    if flat:
        _moved("rank=, world_size=, remainder=", "shard=oocseq.ShardOptions(rank, world_size, balance)")
        if shard is not None:
            raise ArgumentError("give shard=ShardOptions(...) or rank/world_size, not both")
        rank, world_size = flat.get("rank"), flat.get("world_size")
        if (rank is None) != (world_size is None):
            raise ArgumentError(
                f"give both rank and world_size, or neither (then they come from torch.distributed, "
                f"JAX or RANK / WORLD_SIZE); got rank={rank!r}, world_size={world_size!r}"
            )
        balance = flat.get("remainder", "pad")
        shard = (
            ShardOptions.detect(balance)
            if rank is None
            else ShardOptions(rank, int(world_size or 0), balance)
        )
    use_mp = kwargs.pop("use_multiprocessing", None)
    queue = kwargs.pop("max_queue_size", None)
    if kwargs:
        raise ArgumentTypeError(f"ChunkedSequence got unexpected keyword argument(s) {sorted(kwargs)}")
    if isinstance(workers, WorkerOptions):
        if use_mp is not None or queue is not None:
            raise ArgumentError(
                "give use_multiprocessing and max_queue_size inside WorkerOptions, not beside it"
            )
        return read, shard, workers, transform
    options = WorkerOptions(
        workers, use_mp if use_mp is not None else False, queue if queue is not None else 10
    )
    return read, shard, options, transform
