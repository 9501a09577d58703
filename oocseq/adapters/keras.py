"""Keras: :class:`KerasChunkedSequence` is a ``ChunkedSequence`` that is also a
``keras.utils.PyDataset``, so ``model.fit(seq)`` accepts it.

``ChunkedSequence(...)`` returns one automatically when Keras has been imported; importing
this module imports Keras.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras

from ..sequence import ChunkedSequence


class KerasChunkedSequence(ChunkedSequence, keras.utils.PyDataset):
    """A :class:`~oocseq.ChunkedSequence` that Keras's ``model.fit`` / ``evaluate`` /
    ``predict`` accept. ``workers``, ``use_multiprocessing`` and ``max_queue_size`` are the
    ``PyDataset`` arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ChunkedSequence.__init__(self, *args, **kwargs)  # sets what PyDataset.__init__ would
        warn_if_enqueuer_repeats(self)

    @property
    def num_batches(self) -> int:
        return len(self)


#: Backends whose ``model.fit`` trains on batches that Keras's OrderedEnqueuer left in its queue.
_REQUEUING_BACKENDS = ("jax", "torch")


def warn_if_enqueuer_repeats(seq: ChunkedSequence) -> bool:
    """Warn (and return True) when Keras will serve ``seq`` through its ``OrderedEnqueuer``
    on a backend where that trains some batches twice and skips others.

    What happens (Keras 3.15, ``trainers/data_adapters/py_dataset_adapter.py``): with
    ``workers > 1`` or ``use_multiprocessing=True`` the enqueuer computes batches ahead; when
    an epoch's iterator stops early (``fit`` reads one batch to build the model, then resets),
    ``stop()`` moves the batches already computed into a ``ready_queue`` that the next
    epoch's iterator yields *before* its own, and that epoch still stops after ``len(seq)``
    batches: the leftovers are trained again and as many of the epoch's own batches never.
    The TensorFlow backend builds a ``tf.data`` pipeline instead and is not affected."""
    if seq.workers <= 1 and not seq.use_multiprocessing:
        return False
    backend = keras.backend.backend()
    if backend not in _REQUEUING_BACKENDS:
        return False
    warnings.warn(
        f"ChunkedSequence with workers={seq.workers}, use_multiprocessing={seq.use_multiprocessing} on "
        f"the {backend} backend: Keras's OrderedEnqueuer re-serves batches left in its queue at the start "
        "of the next epoch, so model.fit trains some batches twice and skips others. oocseq already "
        "decodes ahead in its own threads (ReadOptions): use workers=1, use_multiprocessing=False.",
        RuntimeWarning,
        stacklevel=4,
    )
    return True


class SyncEpoch(keras.callbacks.Callback):
    """Keep a sequence's epoch equal to Keras's: ``seq.set_epoch(epoch)`` at the start of each
    epoch of ``fit``, so Keras epoch ``k`` trains on plan epoch ``k`` (also with
    ``initial_epoch``), even when ``fit`` reads a batch first to build the model.

    Example: ``model.fit(seq, epochs=10, callbacks=[SyncEpoch(seq)])``."""

    def __init__(self, seq: ChunkedSequence) -> None:
        super().__init__()
        self.seq = seq

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.seq.set_epoch(epoch)


def as_pydataset(seq: ChunkedSequence) -> KerasChunkedSequence:
    """The same sequence as a Keras ``PyDataset`` (for one built before Keras was imported)."""
    if isinstance(seq, KerasChunkedSequence):
        return seq
    new = KerasChunkedSequence.__new__(KerasChunkedSequence)
    new.__setstate__(seq.__getstate__())
    return new
