"""A Keras model wrapper that records which samples ``fit``, ``evaluate`` and ``predict``
actually received, batch by batch, on any backend (JAX, TensorFlow, PyTorch), compiled or eager.

What a data pipeline hands out and what the model trains on can differ (an enqueuer that
repeats or skips batches, ``steps_per_epoch``, a resumed run), so the record is taken inside
the model's own ``train_step`` / ``test_step`` / ``predict_step``. Samples are told apart by a
sample-id field served as one more input (an ``int`` field holding ``0..n-1``, e.g. written by
``ingest_arrays(..., {"id": np.arange(n), ...})``; ids below ``2**31``); the wrapped model never
sees it. Importing this module imports Keras.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from ..errors import ArgumentError

__all__ = ["FitRecorder"]


class _Log:
    """The record, kept out of Keras's attribute tracking (which copies lists set on a layer)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.epochs: list[list[np.ndarray]] = []
        self.evaluated: list[list[np.ndarray]] = []
        self.predicted: list[list[np.ndarray]] = []
        self.target: list[np.ndarray] | None = None


class _EpochMarker(keras.callbacks.Callback):
    """Starts a new epoch of the record at every Keras epoch (``FitRecorder.fit`` adds it)."""

    def __init__(self, recorder: FitRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.recorder._flush()
        log = self.recorder._log
        with log.lock:
            log.epochs.append([])
            log.target = log.epochs[-1]

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.recorder._flush()


class FitRecorder(keras.Model):
    """``model`` wrapped so that every batch it is given is recorded by sample id.

    Args:
        model: the Keras model to train; it receives the inputs less the id input (the one
            remaining input itself when only one remains, else a dict).
        id_input: name of the id input in the dict of inputs, e.g. a
            ``ChunkedSequence(store, 64, x={"x": "x", "id": "id"}, y="y")``.

    Compile and call ``fit`` / ``evaluate`` / ``predict`` on the recorder as on ``model``.
    The record (``int64`` arrays of sample ids, one per batch, in the order the steps ran):

    - :attr:`epochs`: one list of batches per ``fit`` epoch (all ``fit`` calls, in order);
    - :attr:`evaluated`, :attr:`predicted`: one list of batches per ``evaluate`` / ``predict``
      call (``fit``'s own validation passes go to :attr:`evaluated` too).

    Compiled steps record through a host callback (``jax.debug.callback``,
    ``tf.py_function``), so ``jit_compile`` and ``run_eagerly=False`` keep their speed.

    Raises:
        ArgumentError: a batch's inputs are not a dict holding ``id_input``.
    """

    def __init__(self, model: keras.Model, id_input: str = "id", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inner = model
        self.id_input = id_input
        self._log = _Log()

    @property
    def epochs(self) -> list[list[np.ndarray]]:
        """Sample ids of every training step: one list of batches per ``fit`` epoch."""
        return self._log.epochs

    @property
    def evaluated(self) -> list[list[np.ndarray]]:
        """Sample ids of every ``evaluate`` step (``fit``'s validation too), one list per call."""
        return self._log.evaluated

    @property
    def predicted(self) -> list[list[np.ndarray]]:
        """Sample ids of every ``predict`` step, one list per call."""
        return self._log.predicted

    # -- what the wrapped model sees ----------------------------------------------------------
    def _split(self, inputs: Any) -> tuple[Any, Any]:
        if not isinstance(inputs, Mapping) or self.id_input not in inputs:
            raise ArgumentError(
                f"FitRecorder needs the inputs as a dict holding the sample-id input {self.id_input!r} "
                f"(e.g. ChunkedSequence(..., x={{'x': 'x', {self.id_input!r}: 'id'}})); got "
                f"{sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__}"
            )
        rest = {k: v for k, v in inputs.items() if k != self.id_input}
        return inputs[self.id_input], (next(iter(rest.values())) if len(rest) == 1 else rest)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.inner(self._split(inputs)[1], training=training)

    # -- recording ----------------------------------------------------------------------------
    def _append(self, ids: Any) -> None:
        batch = np.asarray(ids).astype(np.int64).reshape(-1)
        log = self._log
        with log.lock:
            if log.target is None:  # a step outside fit/evaluate/predict: a list of its own
                log.epochs.append([])
                log.target = log.epochs[-1]
            log.target.append(batch)

    def _record(self, data: Any) -> None:
        x = data[0] if isinstance(data, (tuple, list)) else data
        ids = self._split(x)[0]
        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            if isinstance(ids, jax.core.Tracer):
                jax.debug.callback(self._append, ids, ordered=True)
                return
        elif backend == "tensorflow":
            import tensorflow as tf

            if not tf.executing_eagerly():
                tf.py_function(lambda t: self._append(t.numpy()), [ids], [])
                return
        self._append(keras.ops.convert_to_numpy(ids))

    def _flush(self) -> None:
        """Wait until the host callbacks of steps already dispatched have run."""
        if keras.backend.backend() == "jax":
            import jax

            jax.effects_barrier()

    def train_step(self, *args: Any) -> Any:  # jax: (state, data); tensorflow / torch: (data,)
        self._record(args[-1])
        return super().train_step(*args)

    def test_step(self, *args: Any) -> Any:
        self._record(args[-1])
        return super().test_step(*args)

    def predict_step(self, *args: Any) -> Any:
        self._record(args[-1])
        return super().predict_step(*args)

    # -- calls --------------------------------------------------------------------------------
    def _begin(self, record: list[list[np.ndarray]]) -> list[np.ndarray] | None:
        self._flush()
        with self._log.lock:
            previous = self._log.target
            record.append([])
            self._log.target = record[-1]
        return previous

    def _end(self, previous: list[np.ndarray] | None) -> None:
        self._flush()
        with self._log.lock:
            self._log.target = previous

    def fit(self, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        callbacks = [*list(callbacks or []), _EpochMarker(self)]
        try:
            return super().fit(*args, callbacks=callbacks, **kwargs)
        finally:
            self._end(None)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        previous = self._begin(self.evaluated)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._end(previous)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        previous = self._begin(self.predicted)
        try:
            return super().predict(*args, **kwargs)
        finally:
            self._end(previous)
