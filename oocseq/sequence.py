"""``ChunkedSequence``: shuffled, chunk-aligned batches from a store, for Keras and plain loops.

Data path: epoch plan (:mod:`oocseq.plan`) -> sample indices of batch ``i`` -> the chunks they
live in, from a bounded decoded-chunk cache (:mod:`oocseq.cache`) -> gathered into new batch
arrays -> ``transform`` -> ``(x, y[, sample_weight])``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ._gather import gather
from .cache import ChunkCache
from .errors import BatchIndexError, FieldNotFoundError, InvalidSourceError
from .plan import EpochPlan, default_window, num_batches
from .store import Store

__all__ = ["ChunkedSequence", "FieldSelection"]

#: How ``x`` / ``y`` name fields: one name (an array), a list of names (a tuple of arrays, for
#: multi-input models), or a dict ``{input_name: field}`` (a dict of arrays), or None (``y`` only).
FieldSelection = str | Sequence[str] | Mapping[str, str] | None
Batch = dict[str, np.ndarray]


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
        transform: ``f(batch) -> batch`` applied to each batch as a dict ``{field: array}``
            (of the fields named by ``x``, ``y``, ``sample_weight``) before it is assembled,
            e.g. ``lambda b: {**b, "x": b["x"].astype("float32") / 255}``.
        num_classes: one-hot encode ``y`` (one integer field) into float32 ``(batch, num_classes)``.
        sample_weight: a field of per-sample weights, served as the third element.
        class_weight: ``{class: weight}``: per-sample weights from the integer ``y``, served as
            the third element. Not together with ``sample_weight``.
        workers, use_multiprocessing, max_queue_size: Keras ``PyDataset`` arguments.

    ``seq[i]`` returns batch ``i`` of the current epoch's plan: a tuple ``(x, y)``,
    ``(x, y, sample_weight)`` or ``(x,)``; arrays keep the store's dtypes (``uint8`` images
    stay ``uint8`` unless ``transform`` converts them).

    Memory: at most ``cache_chunks`` decoded chunks per field are held (see ``stats``).

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
        transform: Callable[[Batch], Batch] | None = None,
        num_classes: int | None = None,
        sample_weight: str | None = None,
        class_weight: Mapping[int, float] | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if x is None:
            raise ValueError("x must name at least one field")
        self.batch_size = batch_size
        self.x, self.y = x, y
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.window = default_window(self.store.chunk_len, batch_size) if window is None else window
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive int (chunks), got {window!r}")
        self.drop_remainder = bool(drop_remainder)
        self.transform = transform
        self.num_classes = num_classes
        self.sample_weight = sample_weight
        self.class_weight = dict(class_weight) if class_weight is not None else None
        self._check_targets()
        self._fields = list(dict.fromkeys(_names(x, "x") + _names(y, "y") + _names(sample_weight, "sample_weight")))
        for name in self._fields:
            if name not in self.store:
                raise FieldNotFoundError(
                    f"{self.store.path} has no field {name!r}; its fields are {sorted(self.store.fields)}"
                )
        self.workers = workers
        self.use_multiprocessing = use_multiprocessing
        self.max_queue_size = max_queue_size
        self._epoch = 0
        self._served = False  # has a batch of the current epoch been served?
        self._init_runtime()

    def _check_targets(self) -> None:
        if self.sample_weight is not None and self.class_weight is not None:
            raise ValueError("give sample_weight or class_weight, not both")
        if (self.num_classes is not None or self.class_weight is not None) and not isinstance(self.y, str):
            raise ValueError("num_classes and class_weight need y to be one integer field")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")

    def _init_runtime(self) -> None:
        """Per-process state: never pickled (see __getstate__)."""
        self._plan: EpochPlan | None = None
        self._plan_lock = threading.Lock()
        self.cache = ChunkCache(self.cache_chunks * len(self._fields))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_plan", "_plan_lock", "cache"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- the plan -----------------------------------------------------------------------------
    @property
    def cache_chunks(self) -> int:
        """Decoded chunks held per field: enough that, served in order, every chunk is decoded
        once per epoch (a batch touches at most ``2 * window + batch_size // chunk_len + 1``)."""
        return 3 * self.window + 2 * (self.batch_size // self.store.chunk_len) + 4

    @property
    def epoch(self) -> int:
        """The epoch whose order is served (starts at 0; :meth:`on_epoch_end` adds one)."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch``'s order from now on."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        with self._plan_lock:
            self._epoch = epoch
            self._plan = None
            self._served = False

    def on_epoch_end(self) -> None:
        """Move to the next epoch's order, if any batch of this epoch has been served.

        Keras also calls this when ``fit`` / ``evaluate`` start, before any batch is served
        (``EpochIterator.reset``); skipping those calls keeps ``seq.epoch`` equal to Keras's
        epoch number. Use :meth:`set_epoch` to change epochs explicitly."""
        if self._served:
            self.set_epoch(self._epoch + 1)

    def on_epoch_begin(self) -> None:
        """Nothing to do: the plan of an epoch is computed on first use."""

    @property
    def plan(self) -> EpochPlan:
        """The current epoch's :class:`~oocseq.plan.EpochPlan`."""
        plan = self._plan
        if plan is None:
            with self._plan_lock:
                if self._plan is None:
                    self._plan = EpochPlan(
                        len(self.store), self.store.chunk_len, self.window, self.seed, self._epoch, self.shuffle
                    )
                plan = self._plan
        return plan

    def __len__(self) -> int:
        """Batches per epoch."""
        return num_batches(len(self.store), self.batch_size, self.drop_remainder)

    def batch_indices(self, i: int) -> np.ndarray:
        """Sample indices (int64) of batch ``i`` of the current epoch, in the order served."""
        n_batches = len(self)
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
            raise TypeError(f"batch index must be an int, got {type(i).__name__}")
        if not 0 <= i < n_batches:
            raise BatchIndexError(f"batch index {i} out of range: this sequence has {n_batches} batches (len(seq))")
        start = int(i) * self.batch_size
        return self.plan.indices(start, start + self.batch_size)

    # -- serving ------------------------------------------------------------------------------
    def read_batch(self, indices: np.ndarray) -> Batch:
        """The raw fields (``{field: array}``) of the given sample indices, in that order."""
        out: Batch = {}
        for name in self._fields:
            info = self.store.fields[name]
            arr = np.empty((len(indices), *info.shape[1:]), dtype=info.dtype)
            gather(indices, self.store.chunk_len, lambda c, f=name: self._chunk(f, c), arr)
            out[name] = arr
        return out

    def _chunk(self, name: str, c: int) -> np.ndarray:
        return self.cache.get((name, c), lambda: self.store.read_chunk(name, c))

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        """Batch ``i``: ``(x, y)``, ``(x, y, sample_weight)`` or ``(x,)``."""
        idx = self.batch_indices(i)
        self._served = True
        batch = self.read_batch(idx)
        if self.transform is not None:
            batch = self.transform(batch)
            if not isinstance(batch, Mapping):
                raise TypeError(f"transform must return a dict of fields, got {type(batch).__name__}")
        return self._assemble(batch, idx)

    def _assemble(self, batch: Batch, idx: np.ndarray) -> tuple[Any, ...]:
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

    def _label_error(self, labels: np.ndarray, bad: np.ndarray, idx: np.ndarray, expected: str) -> InvalidSourceError:
        k = int(np.flatnonzero(bad)[0])
        return InvalidSourceError(
            f"{self.store.path}: sample {int(idx[k])} has label {labels[k]!r} in field {self.y!r}; "
            f"expected {expected}"
        )

    def _one_hot(self, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
        k = self.num_classes
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"num_classes needs a 1-D integer y field, {self.y!r} is {labels.dtype} {labels.shape[1:]}")
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
        """The batches of the current epoch, in order (call :meth:`on_epoch_end` between epochs)."""
        for i in range(len(self)):
            yield self[i]

    @property
    def stats(self) -> dict[str, int]:
        """Work counters since construction: ``chunk_decodes``, ``cache_hits``,
        ``peak_resident_chunks`` (all fields together)."""
        c = self.cache
        return {"chunk_decodes": c.decodes, "cache_hits": c.hits, "peak_resident_chunks": c.peak_resident}

    def __repr__(self) -> str:
        return (
            f"<oocseq.ChunkedSequence {str(self.store.path)!r} batches={len(self)} batch_size={self.batch_size} "
            f"window={self.window} shuffle={self.shuffle} seed={self.seed} epoch={self._epoch}>"
        )
