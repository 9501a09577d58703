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
        ChunkedSequence.__init__(self, *args, **kwargs)

    # PyDataset keeps these in private attributes behind properties; ChunkedSequence sets them
    # as plain attributes, so route both through the same names.
    @property
    def workers(self) -> int:
        return self._workers

    @workers.setter
    def workers(self, value: int) -> None:
        self._workers = value

    @property
    def use_multiprocessing(self) -> bool:
        return self._use_multiprocessing

    @use_multiprocessing.setter
    def use_multiprocessing(self, value: bool) -> None:
        self._use_multiprocessing = value

    @property
    def max_queue_size(self) -> int:
        return self._max_queue_size

    @max_queue_size.setter
    def max_queue_size(self, value: int) -> None:
        self._max_queue_size = value

    @property
    def num_batches(self) -> int:
        return len(self)


def as_pydataset(seq: ChunkedSequence) -> KerasChunkedSequence:
    """The same sequence as a Keras ``PyDataset`` (for one built before Keras was imported)."""
    if isinstance(seq, KerasChunkedSequence):
        return seq
    new = KerasChunkedSequence.__new__(KerasChunkedSequence)
    new.__setstate__(seq.__getstate__())
    return new
