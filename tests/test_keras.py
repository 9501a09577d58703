"""Real Keras ``model.fit`` on ChunkedSequence (backend from KERAS_BACKEND; conftest picks jax)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ids_of, make_store, x_of, y_of

import oocseq
from oocseq import ChunkedSequence
from oocseq.adapters.keras import SyncEpoch, as_pydataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seeded():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


def test_sequence_is_a_pydataset(store):
    seq = ChunkedSequence(store, 8)
    assert isinstance(seq, keras.utils.PyDataset)
    assert seq.workers == 1 and seq.use_multiprocessing is False and seq.max_queue_size == 10
    assert seq.num_batches == len(seq)
    other = ChunkedSequence(store, 8, workers=3, use_multiprocessing=True, max_queue_size=4)
    # what was asked for is oocseq's; Keras sees a sequential dataset (see test_workers)
    assert other.worker_options == oocseq.WorkerOptions(3, True, 4)
    assert other.workers == 1 and other.use_multiprocessing is False and other.max_queue_size == 4
    other.close()


# -- learning ------------------------------------------------------------------------------------
def _toy_store(path, n, seed):
    """Two Gaussian blobs: label 1 iff x0 + x1 > 0 (linearly separable)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return oocseq.ingest_arrays(path, {"x": x, "y": y}, chunk_len=32, preshuffle=False)


def test_fit_learns(tmp_path, fmt):
    train = ChunkedSequence(_toy_store(tmp_path / f"train{fmt}", 1024, 0), 32, seed=0)
    val = ChunkedSequence(_toy_store(tmp_path / f"val{fmt}", 256, 1), 64, shuffle=False)
    model = keras.Sequential(
        [
            keras.Input((2,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.02), "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(train, epochs=3, validation_data=val, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0] or history["loss"][-1] < 0.15
    assert history["val_accuracy"][-1] >= 0.93
    _loss, acc = model.evaluate(val, verbose=0)
    assert acc >= 0.93


# -- exactly once inside model.fit ---------------------------------------------------------------
class Recorder(keras.Model):
    """Records the sample ids (x[:, 0]) of every batch ``train_step`` receives."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(10)
        self.steps: list[np.ndarray] = []

    def call(self, x):
        return self.dense(x)

    def train_step(self, *args):  # jax: (state, data); tensorflow / torch: (data,)
        data = args[-1]
        self.steps.append(ids_of(np.asarray(data[0])))
        np.testing.assert_array_equal(np.asarray(data[1]), y_of(self.steps[-1]))
        return super().train_step(*args)


class EpochSplitter(keras.callbacks.Callback):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder
        self.epochs: list[list[np.ndarray]] = []
        self._start = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(self.recorder.steps[self._start :])
        self._start = len(self.recorder.steps)


def _fit_and_record(store, epochs, sync=False, **seq_kwargs):
    seq = ChunkedSequence(store, **seq_kwargs)
    model = Recorder()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    splitter = EpochSplitter(model)
    random.seed(1234)  # Keras shuffles batch indices with Python's random
    callbacks = [splitter, SyncEpoch(seq)] if sync else [splitter]
    model.fit(seq, epochs=epochs, verbose=0, callbacks=callbacks)
    return seq, splitter.epochs


def test_fit_trains_every_sample_once_per_epoch(store):
    n = len(store)
    seq, epochs = _fit_and_record(store, 3, batch_size=10, seed=5, window=2)
    assert len(epochs) == 3
    for batches in epochs:
        assert len(batches) == len(seq)
        served = np.concatenate(batches)
        np.testing.assert_array_equal(np.sort(served), np.arange(n))
        assert sorted(len(b) for b in batches) == sorted([10] * (n // 10) + [n % 10])
    as_sets = [{frozenset(b.tolist()) for b in batches} for batches in epochs]
    assert as_sets[0] != as_sets[1] != as_sets[2]

    # Same seed, same Python random state: the very same batches in the same order.
    _, again = _fit_and_record(store, 3, batch_size=10, seed=5, window=2)
    for p, q in zip(epochs, again, strict=True):
        assert [b.tolist() for b in p] == [b.tolist() for b in q]
    # Another seed: other batches.
    _, other = _fit_and_record(store, 1, batch_size=10, seed=6, window=2)
    assert {frozenset(b.tolist()) for b in other[0]} != as_sets[0]


def test_fit_epochs_follow_the_plan(store):
    """With the SyncEpoch callback, Keras epoch ``k`` trains on the batches of
    ``seq.set_epoch(k)`` and ``seq.epoch`` counts Keras's epochs, so a run can be resumed with
    ``set_epoch`` / ``initial_epoch`` and reproduced from the plan alone."""
    seq, epochs = _fit_and_record(store, 2, sync=True, batch_size=10, seed=5, window=2)
    assert seq.epoch == 2
    for k, batches in enumerate(epochs):
        ref = ChunkedSequence(store, 10, seed=5, window=2)
        ref.set_epoch(k)
        planned = {frozenset(ref.batch_indices(i).tolist()) for i in range(len(ref))}
        assert {frozenset(b.tolist()) for b in batches} == planned, f"Keras epoch {k}"


def test_fit_default_shuffle_keeps_chunk_locality(tmp_path):
    """DESIGN.md: model.fit(seq) shuffles batch indices by default; chunk locality must survive
    that call pattern: an epoch still decodes about every chunk once, not once per batch."""
    store = make_store(tmp_path / "s.h5", 800, 4)  # 200 chunks, 50 windows of 4 chunks
    seq = ChunkedSequence(store, 4, window=4, seed=0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(10)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(seq, epochs=1, verbose=0)  # shuffle=True, Keras's default
    fields = 2
    decodes = seq.stats["chunk_decodes"]
    ideal = store.num_chunks * fields
    peek = (2 * seq.window + 1) * fields  # Keras reads one batch to build the model
    assert decodes <= 1.25 * ideal + peek, (
        f"{decodes} chunk decodes in one epoch of {store.num_chunks} chunks"
    )


def test_fit_epochs_read_the_next_epoch_ahead_and_decode_each_chunk_once(tmp_path):
    """Over several fit epochs (Keras's calls: a batch read to build the model, shuffled
    requests, on_epoch_end), each epoch's last windows read the next epoch's first one ahead,
    and it is used, not decoded again: three epochs decode each chunk once each, plus the
    model-building peek and the fourth epoch's first window."""
    store = make_store(tmp_path / "s.h5", 400, 4)  # 100 chunks, 25 windows of 4 chunks
    seq = ChunkedSequence(store, 4, window=4, seed=0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(10)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    try:
        model.fit(seq, epochs=3, verbose=0)
        assert (seq.epoch, 0) in seq.core._local.cache  # read ahead by the last fit epoch
        fields = 2
        peek = (2 * seq.window + 1) * fields
        assert seq.stats["chunk_decodes"] <= (3 * store.num_chunks + seq.window) * fields + peek
    finally:
        seq.close()


# -- adapters ------------------------------------------------------------------------------------
def test_as_pydataset_on_a_keras_sequence_is_identity(store):
    seq = ChunkedSequence(store, 8)
    assert as_pydataset(seq) is seq


def test_as_pydataset_for_a_sequence_built_before_keras(store):
    """A ChunkedSequence made before Keras was imported is not a PyDataset; as_pydataset makes
    one with the same batches, that model.fit accepts. Runs in a fresh process, where Keras is
    really imported after the sequence was built."""
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import oocseq
        seq = oocseq.ChunkedSequence({str(store.path)!r}, 8, seed=3, window=2)
        assert "keras" not in sys.modules
        seq.on_epoch_end(); list(seq); seq.on_epoch_end()  # epoch 1 (epoch 0 was served)
        want = [seq[i] for i in range(len(seq))]
        import keras
        from oocseq.adapters.keras import as_pydataset
        pd = as_pydataset(seq)
        assert isinstance(pd, keras.utils.PyDataset), type(pd)
        assert pd.epoch == 1 and len(pd) == len(seq)
        for i, batch in enumerate(want):
            for a, b in zip(pd[i], batch, strict=True):
                np.testing.assert_array_equal(a, b)
        assert pd.workers == 1 and pd.use_multiprocessing is False and pd.max_queue_size == 10
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(10)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(pd, epochs=1, verbose=0)
        print("OK")
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "KERAS_BACKEND": keras.backend.backend(),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


# -- images --------------------------------------------------------------------------------------
def test_uint8_images_with_rescaling(tmp_path, fmt):
    rng = np.random.default_rng(0)
    n = 240
    y = rng.integers(0, 2, n).astype(np.int64)
    # class 1: left half bright, right half dark; class 0 the other way round (noisy)
    left = np.arange(8)[None, None, :, None] < 4
    base = np.where((y[:, None, None, None] == 1) == left, 200, 50)
    x = np.clip(base + rng.normal(0, 30, (n, 8, 8, 1)), 0, 255).astype(np.uint8)
    store = oocseq.ingest_arrays(tmp_path / f"img{fmt}", {"x": x, "y": y}, chunk_len=16, preshuffle=False)
    seq = ChunkedSequence(store, 24, seed=0)
    xb, yb = seq[0]
    assert xb.dtype == np.uint8 and xb.shape == (24, 8, 8, 1) and yb.shape == (24,)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1), dtype="uint8"),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.Adam(0.02), "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(seq, epochs=3, verbose=0).history
    assert history["accuracy"][-1] >= 0.9
    pred = model.predict(ChunkedSequence(store, 50, y=None, shuffle=False), verbose=0)
    assert pred.shape == (n, 2)
    np.testing.assert_allclose(pred.sum(axis=1), 1, rtol=1e-5)
    assert np.mean(pred.argmax(axis=1) == y) >= 0.9  # predictions come back in store order


def test_fit_with_dict_inputs(store):
    """Multi-input models: x as {input_name: field}."""
    seq = ChunkedSequence(store, 16, x={"a": "x", "b": "w"}, seed=1)
    a = keras.Input((3,), name="a")
    b = keras.Input((), name="b")
    h = keras.layers.Concatenate()([a, keras.layers.Reshape((1,))(b)])
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(10)(h))
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(seq, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    np.testing.assert_array_equal(seq[0][0]["a"], x_of(seq.batch_indices(0)))


class _Subclass(ChunkedSequence):
    """A user's subclass (module level: pickled by reference)."""

    def transform(self, batch):
        return batch


def test_a_subclass_is_a_pydataset_and_pickles(store):
    import pickle

    seq = _Subclass(store, 8, seed=3)
    assert isinstance(seq, keras.utils.PyDataset) and isinstance(seq, _Subclass)
    again = pickle.loads(pickle.dumps(seq))
    assert isinstance(again, keras.utils.PyDataset) and isinstance(again, _Subclass)
    for i in (0, len(seq) - 1):
        np.testing.assert_array_equal(ids_of(again[i][0]), seq.batch_indices(i))
    assert type(again) is type(seq)  # one PyDataset flavour per class
