"""Mid-epoch resume of ``model.fit`` (:class:`MidEpochBackup`, :func:`fit_resumable`): after an
interruption at any batch, a restart trains exactly the batches the uninterrupted run trained
after the last save, and ends with the same weights and optimizer state."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import make_store
from test_workers import BATCH, CHUNK, SEED, WINDOW, N, Recorder, plan_epoch

from oocseq import ChunkedSequence, StateError
from oocseq.adapters.keras import MidEpochBackup, fit_resumable

EPOCHS = 3


class Crash(Exception):
    pass


class InterruptAfter(keras.callbacks.Callback):
    """After ``steps`` calls of ``on_train_batch_end`` in all, crashes (the process "dies") or,
    with ``stop=True``, sets ``stop_training`` (a time budget, say)."""

    def __init__(self, steps: int, stop: bool = False):
        super().__init__()
        self.steps, self.stop, self.count = steps, stop, 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1
        if self.count == self.steps:
            if not self.stop:
                raise Crash(f"after {self.steps} batches")
            self.model.stop_training = True


def new_model(steps_per_execution: int = 1) -> Recorder:
    keras.utils.set_random_seed(0)
    model = Recorder()
    model.compile(
        keras.optimizers.Adam(0.01),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
        steps_per_execution=steps_per_execution,
    )
    return model


def new_seq(store, seed=SEED) -> ChunkedSequence:
    return ChunkedSequence(store, BATCH, seed=seed, window=WINDOW)


def state_of(model) -> list[np.ndarray]:
    return [np.asarray(v) for v in model.weights] + [np.asarray(v) for v in model.optimizer.variables]


@pytest.fixture(autouse=True)
def _clear_keras():
    yield
    keras.backend.clear_session()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """What 3 epochs train without interruption (per save_freq: saving must change nothing)."""
    runs = {}
    for save_freq in (1, 3, "epoch"):
        d = tmp_path_factory.mktemp("full")
        store = make_store(d / "s.zarr", N, CHUNK)
        model = new_model()
        history = fit_resumable(
            model, new_seq(store), d / "backup", epochs=EPOCHS, save_freq=save_freq, verbose=0
        )
        runs[save_freq] = (store, model.steps, state_of(model), history)
        keras.backend.clear_session()
    return runs


def test_uninterrupted_run_trains_plan_epoch_k_in_keras_epoch_k(uninterrupted):
    store, steps, _, history = uninterrupted[3]
    n = -(-N // BATCH)
    assert len(steps) == EPOCHS * n and len(history["loss"]) == EPOCHS
    for k in range(EPOCHS):
        assert steps[k * n : (k + 1) * n] == plan_epoch(store.path, k)
    assert uninterrupted[1][1] == uninterrupted["epoch"][1] == steps


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("crash_after", "save_freq"),
    [(1, 1), (5, 3), (10, 1), (11, 3), (12, 3), (17, 1), (20, "epoch"), (26, 3), (32, 1)],
)
def test_restart_trains_exactly_the_rest(tmp_path, uninterrupted, crash_after, save_freq):
    _, full_steps, full_state, _ = uninterrupted[save_freq]
    store = make_store(tmp_path / "s.h5", N, CHUNK)  # another format, same samples
    backup = tmp_path / "backup"
    model = new_model()
    with pytest.raises(Crash):
        fit_resumable(
            model,
            new_seq(store),
            backup,
            epochs=EPOCHS,
            save_freq=save_freq,
            verbose=0,
            callbacks=[InterruptAfter(crash_after)],
        )
    assert model.steps == full_steps[:crash_after]
    point = MidEpochBackup(new_seq(store), backup).resume_point()
    epoch, position = (0, 0) if point is None else point  # the crash came before the first save
    done = epoch * -(-N // BATCH) + position
    assert done <= crash_after
    keras.backend.clear_session()

    model = new_model()  # a fresh process would start like this
    history = fit_resumable(model, new_seq(store), backup, epochs=EPOCHS, save_freq=save_freq, verbose=0)
    assert model.steps == full_steps[done:]
    assert len(history["loss"]) == EPOCHS - epoch
    for a, b in zip(state_of(model), full_state, strict=True):  # weights and optimizer (Adam) state
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and once finished, running it again trains nothing more
    again = new_model()
    fit_resumable(again, new_seq(store), backup, epochs=EPOCHS, save_freq=save_freq, verbose=0)
    assert again.steps == []


def test_backup_of_another_plan_is_refused(tmp_path):
    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    backup = tmp_path / "backup"
    model = new_model()
    with pytest.raises(Crash):
        fit_resumable(
            model, new_seq(store), backup, epochs=2, save_freq=2, verbose=0, callbacks=[InterruptAfter(3)]
        )
    with pytest.raises(StateError, match="seed=5 in the state, 6 here"):
        fit_resumable(new_model(), new_seq(store, seed=6), backup, epochs=2, verbose=0)
    other = make_store(tmp_path / "t.zarr", N + 1, CHUNK)
    with pytest.raises(StateError, match="another store"):
        fit_resumable(new_model(), new_seq(other), backup, epochs=2, verbose=0)


def test_a_damaged_backup_is_refused(tmp_path):
    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "state.json").write_text("{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        fit_resumable(new_model(), new_seq(store), backup, epochs=1, verbose=0)
    good = {
        "format": "oocseq.MidEpochBackup",
        "version": 1,
        "epoch": 0,
        "position": 2,
        "number": 0,
        "weights": "ckpt-0.weights.h5",
        "sequence": {"epoch": 0, "position": 2},
    }
    for change, message in [
        ({"weights": "../../etc/x.weights.h5"}, "must name a .weights.h5 file"),
        ({"position": -1}, "ints >= 0"),
        ({"epoch": True}, "ints >= 0"),
        ({"number": "7"}, "ints >= 0"),
        ({"position": 3}, "differ from the sequence's"),
    ]:
        (backup / "state.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(StateError, match=message):
            fit_resumable(new_model(), new_seq(store), backup, epochs=1, verbose=0)


def test_fit_resumable_chooses_the_epochs_itself(tmp_path):
    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    with pytest.raises(ValueError, match="initial_epoch"):
        fit_resumable(new_model(), new_seq(store), tmp_path / "b", epochs=1, initial_epoch=1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop_after", [4, 11, 15])
def test_a_stopped_fit_resumes_where_it_stopped(tmp_path, uninterrupted, stop_after):
    _, full_steps, full_state, _ = uninterrupted["epoch"]
    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    model = new_model()
    fit_resumable(
        model,
        new_seq(store),
        tmp_path / "b",
        epochs=EPOCHS,
        save_freq="epoch",
        verbose=0,
        callbacks=[InterruptAfter(stop_after, stop=True)],
    )
    assert model.steps == full_steps[:stop_after]
    model2 = new_model()
    fit_resumable(model2, new_seq(store), tmp_path / "b", epochs=EPOCHS, save_freq="epoch", verbose=0)
    assert model2.steps == full_steps[stop_after:]
    for a, b in zip(state_of(model2), full_state, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(300)
def test_resume_with_steps_per_execution(tmp_path, uninterrupted):
    _, full_steps, _, _ = uninterrupted[3]

    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    model = new_model(steps_per_execution=4)
    with pytest.raises(Crash):  # the 2nd call of on_train_batch_end: 8 batches trained
        fit_resumable(
            model,
            new_seq(store),
            tmp_path / "b",
            epochs=EPOCHS,
            save_freq=3,
            verbose=0,
            callbacks=[InterruptAfter(2)],
        )
    epoch, position = MidEpochBackup(new_seq(store), tmp_path / "b").resume_point()
    done = epoch * -(-N // BATCH) + position
    assert 0 < done <= 8
    model = new_model(steps_per_execution=4)
    fit_resumable(model, new_seq(store), tmp_path / "b", epochs=EPOCHS, save_freq=3, verbose=0)
    assert model.steps == full_steps[done:]


def test_a_finished_backup_restores_the_model(tmp_path, uninterrupted):
    """Run again after the last epoch (say the script died before saving the model): nothing
    is trained, and the model is the trained one."""
    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    model = new_model()
    fit_resumable(model, new_seq(store), tmp_path / "b", epochs=2, save_freq=5, verbose=0)
    trained = state_of(model)
    again = new_model()
    history = fit_resumable(again, new_seq(store), tmp_path / "b", epochs=2, save_freq=5, verbose=0)
    assert again.steps == [] and history == {}
    for a, b in zip(state_of(again), trained, strict=True):
        np.testing.assert_array_equal(a, b)


class HalveLearningRate(keras.callbacks.Callback):
    """Changes optimizer state in on_epoch_end (as ReduceLROnPlateau does)."""

    def on_epoch_end(self, epoch, logs=None):
        lr = self.model.optimizer.learning_rate
        lr.assign(lr * 0.5)


@pytest.mark.timeout(300)
def test_saved_after_the_other_callbacks_epoch_end(tmp_path):
    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    full = new_model()
    fit_resumable(
        full,
        new_seq(store),
        tmp_path / "a",
        epochs=EPOCHS,
        save_freq="epoch",
        verbose=0,
        callbacks=[HalveLearningRate()],
    )
    model = new_model()
    with pytest.raises(Crash):  # in epoch 1, after the epoch-0 save
        fit_resumable(
            model,
            new_seq(store),
            tmp_path / "b",
            epochs=EPOCHS,
            save_freq="epoch",
            verbose=0,
            callbacks=[HalveLearningRate(), InterruptAfter(15)],
        )
    model = new_model()
    fit_resumable(
        model,
        new_seq(store),
        tmp_path / "b",
        epochs=EPOCHS,
        save_freq="epoch",
        verbose=0,
        callbacks=[HalveLearningRate()],
    )
    for a, b in zip(state_of(model), state_of(full), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(300)
def test_a_stop_at_the_end_of_the_resumed_epoch_is_kept(tmp_path, uninterrupted):
    _, full_steps, _, _ = uninterrupted[3]
    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    with pytest.raises(Crash):
        fit_resumable(
            new_model(),
            new_seq(store),
            tmp_path / "b",
            epochs=EPOCHS,
            save_freq=3,
            verbose=0,
            callbacks=[InterruptAfter(4)],
        )  # saved at 3 batches
    model = new_model()
    fit_resumable(
        model,
        new_seq(store),
        tmp_path / "b",
        epochs=EPOCHS,
        save_freq=3,
        verbose=0,
        callbacks=[InterruptAfter(-(-N // BATCH) - 3, stop=True)],
    )  # stops on the epoch's last batch
    assert model.steps == full_steps[3 : -(-N // BATCH)]  # and does not go on to the next epoch
    assert MidEpochBackup(new_seq(store), tmp_path / "b").resume_point() == (1, 0)
