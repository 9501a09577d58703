"""Keras: :class:`KerasChunkedSequence` (a ``ChunkedSequence`` that is always a
``keras.utils.PyDataset``, to subclass explicitly), :func:`as_pydataset` for a sequence built
before Keras was imported, :class:`SyncEpoch` to pin plan epochs to Keras epochs, and
:class:`MidEpochBackup` / :func:`fit_resumable` to resume an interrupted ``fit`` mid-epoch.

Any ``ChunkedSequence`` (and any subclass of it) built once Keras is imported is a
``PyDataset`` already; importing this module imports Keras.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras

from ..errors import ArgumentError, StateError
from ..sequence import ChunkedSequence

__all__ = ["KerasChunkedSequence", "MidEpochBackup", "SyncEpoch", "as_pydataset", "fit_resumable"]


class KerasChunkedSequence(ChunkedSequence, keras.utils.PyDataset):
    """A :class:`~oocseq.ChunkedSequence` that is a ``keras.utils.PyDataset`` by its class,
    whatever was imported when: subclass it to say so explicitly.

    ``workers``, ``use_multiprocessing`` and ``max_queue_size`` are the ``PyDataset``
    arguments, carried out by oocseq (:mod:`oocseq.prefetch`): Keras sees a sequential
    dataset (``workers`` reads at most 1, ``use_multiprocessing`` False), so it never starts
    its ``OrderedEnqueuer``, which on the JAX and PyTorch backends trains some batches twice
    and skips others. What was asked for is :attr:`~oocseq.ChunkedSequence.worker_options`."""


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


def as_pydataset(seq: ChunkedSequence) -> ChunkedSequence:
    """The same sequence as a Keras ``PyDataset`` (for one built before Keras was imported)."""
    if isinstance(seq, keras.utils.PyDataset):
        return seq
    return copy.copy(seq)  # rebuilt by its class, which is a PyDataset now that Keras is imported


_BACKUP_FORMAT = "oocseq.MidEpochBackup"


class MidEpochBackup(keras.callbacks.Callback):
    """Save the model, its optimizer and the sequence's position every ``save_freq`` batches
    and at the end of every epoch; on the next ``fit`` with the same ``backup_dir``, restore
    them, so that training goes on from the batch after the last save, with exactly the
    batches the uninterrupted run would have trained.

    Keras's own ``BackupAndRestore`` restores the weights but replays the interrupted epoch
    from its first batch (the samples before the interruption are trained twice in that
    epoch). Keras also fixes the number of steps of every epoch of one ``fit`` call, so the
    rest of an interrupted epoch needs a ``fit`` of its own, over a sequence that shows Keras
    only the batches left: :func:`fit_resumable` does both; use it rather than this callback
    alone. A ``fit`` stopped part-way (``model.stop_training``, e.g. a time budget) is saved
    where it stopped.

    Like :class:`SyncEpoch`, it serves plan epoch ``k`` in Keras epoch ``k``.

    Files in ``backup_dir``: ``state.json`` (epoch, position, the sequence's
    :meth:`~oocseq.ChunkedSequence.state_dict` and the weights file's name) and
    ``ckpt-N.weights.h5`` (``model.save_weights``: weights and optimizer variables). The JSON
    is replaced atomically after its weights file is complete, so a crash while saving leaves
    the previous backup intact.

    Args:
        seq: the training sequence passed to ``fit``.
        backup_dir: a directory (created if missing).
        save_freq: save every this many trained batches (int >= 1), or ``"epoch"``: at epoch
            ends only.

    Raises:
        StateError (at ``on_train_begin``): the backup is of another store or plan (another
            seed, batch size, ...), or unreadable.
    """

    def __init__(
        self, seq: ChunkedSequence, backup_dir: str | os.PathLike[str], save_freq: int | str = 100
    ) -> None:
        super().__init__()
        if save_freq != "epoch" and (
            not isinstance(save_freq, int) or isinstance(save_freq, bool) or save_freq < 1
        ):
            raise ArgumentError(f"save_freq must be an int >= 1 or 'epoch', got {save_freq!r}")
        self.seq = seq
        self.backup_dir = Path(backup_dir)
        self.save_freq = save_freq
        self._pending: dict[str, Any] | None = None  # a restored state not yet applied to the sequence
        self._offset = 0  # batches of the current epoch trained before this fit (resumed epoch)
        self._trained = 0  # batches of the current epoch trained so far (with the offset)
        self._since_save = 0
        self._epoch = 0

    @property
    def state_path(self) -> Path:
        return self.backup_dir / "state.json"

    def read(self) -> dict[str, Any] | None:
        """The saved state, or None when there is no backup yet.
        Raises StateError for a file that is not such a backup."""
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as e:
            raise StateError(
                f"{self.state_path} is not valid JSON ({e}); delete it to start afresh"
            ) from None

        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        ok = (
            isinstance(state, dict)
            and state.get("format") == _BACKUP_FORMAT
            and state.get("version") == 1
            and count(state.get("epoch"))
            and count(state.get("position"))
            and count(state.get("number"))
            and isinstance(state.get("weights"), str)
            and isinstance(state.get("sequence"), Mapping)
        )
        if not ok:
            raise StateError(
                f"{self.state_path} is not an oocseq MidEpochBackup state (format/version 1 with epoch, "
                "position and number ints >= 0, weights, sequence); delete it to start afresh"
            )
        seq_state = state["sequence"]
        if (seq_state.get("epoch"), seq_state.get("position")) != (state["epoch"], state["position"]):
            raise StateError(
                f"{self.state_path}: epoch/position differ from the sequence's; delete it to start afresh"
            )
        if Path(state["weights"]).name != state["weights"] or not state["weights"].endswith(".weights.h5"):
            raise StateError(
                f"{self.state_path}: weights must name a .weights.h5 file in {self.backup_dir}, got {state['weights']!r}"
            )
        return state

    def resume_point(self) -> tuple[int, int] | None:
        """``(epoch, position)`` of the saved state: the next batch to train is plan batch
        ``position`` of epoch ``epoch``; None without a backup."""
        state = self.read()
        return None if state is None else (state["epoch"], state["position"])

    def restorer(self) -> keras.callbacks.Callback:
        """A callback doing this one's restoring (``on_train_begin``, ``on_epoch_begin``), to
        put *first* in the list while this one, saving, goes *last*: the model is restored
        before other callbacks start, and saved after their ``on_epoch_end`` (a learning-rate
        change, say). :func:`fit_resumable` does so."""
        self._restorer = _Restorer(self)
        return self._restorer

    _restorer: keras.callbacks.Callback | None = None

    # -- restoring ---------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._restorer is None:
            self._restore()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._restorer is None:
            self._begin_epoch(epoch)

    def _restore(self) -> None:
        # After fit has built the model (it reads a batch to do so, then ends that "epoch").
        state = self.read()
        self._pending = None
        if state is None:
            return
        try:
            self.seq.load_state_dict(state["sequence"])  # checks store and plan now, not later
        except StateError as e:
            raise StateError(f"cannot resume from {self.state_path}: {e}") from None
        weights = self.backup_dir / state["weights"]
        if not weights.is_file():
            raise StateError(f"{self.state_path} names {weights}, which is missing")
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(weights)
        self._pending = state

    def _begin_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        pending, self._pending = self._pending, None
        if pending is not None and pending["epoch"] == epoch and pending["position"] > 0:
            self.seq.load_state_dict(pending["sequence"])
            self._offset = pending["position"]
        else:
            self.seq.set_epoch(epoch)
            self._offset = 0
        self._trained = self._offset

    # -- saving -------------------------------------------------------------------------------
    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        trained = self._offset + batch + 1  # batch: the epoch's last step (steps_per_execution)
        self._since_save += trained - self._trained
        self._trained = trained
        # The last batch of an epoch is saved by on_epoch_end, as the start of the next epoch.
        every = self.save_freq
        if isinstance(every, int) and self._since_save >= every and trained < len(self.seq):
            self.save(self._epoch, trained)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._trained < len(self.seq):  # fit stopped part-way (stop_training): resume there
            self.save(epoch, self._trained)
        else:
            self.save(epoch + 1, 0)
        self._offset = 0

    def save(self, epoch: int, position: int) -> None:
        """Save now: the model has trained plan batches ``0 .. position - 1`` of ``epoch``.
        (Counted from Keras's steps, not from the batches the sequence has served: Keras may
        have fetched some ahead.)"""
        self._since_save = 0
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        previous = self.read()
        number = 0 if previous is None else int(previous.get("number", 0)) + 1
        sync = getattr(self.model, "jax_state_sync", None)  # JAX keeps the state off the model in fit
        if sync is not None:
            sync()
        name = f"ckpt-{number}.weights.h5"
        self.model.save_weights(self.backup_dir / name, overwrite=True)
        _fsync(self.backup_dir / name)  # on disk before state.json names it
        seq_state = self.seq.state_dict()
        seq_state.update(epoch=epoch, position=position)
        state = {
            "format": _BACKUP_FORMAT,
            "version": 1,
            "epoch": epoch,
            "position": position,
            "weights": name,
            "number": number,
            "sequence": seq_state,
        }
        fd, tmp = tempfile.mkstemp(prefix=".state.", suffix=".json", dir=self.backup_dir)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        if os.name != "nt":  # (directories cannot be opened for fsync on Windows)
            _fsync(self.backup_dir)  # the rename too, before the previous weights go
        for old in self.backup_dir.glob("ckpt-*.weights.h5"):
            if old.name != name:
                old.unlink(missing_ok=True)


def fit_resumable(
    model: keras.Model,
    seq: ChunkedSequence,
    backup_dir: str | os.PathLike[str],
    *,
    epochs: int,
    save_freq: int | str = 100,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    **fit_kwargs: Any,
) -> dict[str, list[Any]]:
    """``model.fit(seq, epochs=epochs, ...)`` that resumes mid-epoch from ``backup_dir``
    (:class:`MidEpochBackup`): run the same call again after an interruption and it trains
    exactly the batches that were left, with the model and optimizer as they were at the last
    save. Without a backup it is one plain ``fit``; with one saved mid-epoch, one ``fit`` for
    the rest of that epoch (the sequence shows Keras only the batches left) and one for the
    epochs after it; with every epoch done, a ``fit`` of no epoch that restores the model.
    A ``fit`` stopped by ``model.stop_training`` (``EarlyStopping``, a time budget) returns,
    saved where it stopped.

    Returns:
        The merged ``History.history`` dict (metric -> one value per epoch run).

    Raises:
        StateError: the backup is of another store or plan.
    """
    for name in ("initial_epoch", "steps_per_epoch", "x", "y"):
        if name in fit_kwargs:
            raise ArgumentError(f"fit_resumable chooses {name} itself; do not pass it")
    seq = as_pydataset(seq)
    backup = MidEpochBackup(seq, backup_dir, save_freq)
    # Restored before the other callbacks start, saved after their on_epoch_end.
    all_callbacks = [backup.restorer(), *callbacks, backup]
    point = backup.resume_point()
    start = 0 if point is None else point[0]
    history: dict[str, list[Any]] = {}

    def run(**kw: Any) -> None:
        h = model.fit(seq, callbacks=all_callbacks, **fit_kwargs, **kw)
        for key, values in h.history.items():
            history.setdefault(key, []).extend(values)

    if point is not None and 0 < point[1] < len(seq) and start < epochs:
        seq._keras_offset = point[1]  # Keras sees only the batches left of the epoch
        try:
            run(initial_epoch=start, epochs=start + 1)
        finally:
            seq._keras_offset = 0
        point = backup.resume_point()  # where that fit ended (it may have been stopped part-way)
        if model.stop_training or point is None or point[1] > 0 or point[0] >= epochs:
            return history
        start = point[0]
    # With every epoch done, a fit of no epoch still restores the saved model (on_train_begin).
    run(initial_epoch=min(start, epochs), epochs=epochs)
    return history


class _Restorer(keras.callbacks.Callback):
    """The restoring half of a :class:`MidEpochBackup` (see :meth:`MidEpochBackup.restorer`)."""

    def __init__(self, backup: MidEpochBackup) -> None:
        super().__init__()
        self.backup = backup

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.backup._restore()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.backup._begin_epoch(epoch)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
