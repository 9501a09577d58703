"""Keras: :class:`KerasChunkedSequence` is a ``ChunkedSequence`` that is also a
``keras.utils.PyDataset``, so ``model.fit(seq)`` accepts it.

``ChunkedSequence(...)`` returns one automatically when Keras has been imported; importing
this module imports Keras.
"""

from __future__ import annotations

from typing import Any

import keras

from ..sequence import ChunkedSequence


class KerasChunkedSequence(ChunkedSequence, keras.utils.PyDataset):
    """A :class:`~oocseq.ChunkedSequence` that Keras's ``model.fit`` / ``evaluate`` /
    ``predict`` accept. ``workers``, ``use_multiprocessing`` and ``max_queue_size`` are the
    ``PyDataset`` arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ChunkedSequence.__init__(self, *args, **kwargs)  # sets what PyDataset.__init__ would

    @property
    def num_batches(self) -> int:
        return len(self)


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
