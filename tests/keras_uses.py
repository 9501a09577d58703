"""What Keras's ``fit``, ``evaluate`` and ``predict`` receive from a ChunkedSequence in the ways
users call them (after a peek, with ``steps_per_epoch``, subclassed, from in-memory arrays).

:func:`run_all` runs every use on the current backend and returns what was recorded, as JSON;
``test_keras_uses.py`` runs it in this process (JAX) and in fresh processes on the PyTorch and
TensorFlow backends, with Keras or oocseq imported first, and checks it. Run as a script it
prints ``RESULT <json>``.
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np

N, CHUNK, BATCH, SEED, WINDOW = 100, 8, 10, 5, 2  # 10 batches per epoch


def _ids(x) -> list[int]:
    x = np.asarray(x)
    ids = x[:, 0].astype(np.int64)
    want = np.stack([ids, ids + 0.25, ids + 0.5], axis=1).astype(np.float32)
    if not np.array_equal(x[:, :3], want):
        raise AssertionError(f"malformed rows: {x[:2]}")
    return ids.tolist()


def run_all(store_path: str) -> dict:
    import keras

    import oocseq
    from oocseq import ChunkedSequence

    keras.utils.set_random_seed(0)
    random.seed(1234)  # Keras shuffles batch indices with Python's random

    class Recorder(keras.Model):
        """Records the sample ids of every batch train_step / test_step receive; its output's
        first three columns are its input (so predict's rows tell which samples came)."""

        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(10)
            self.trained: list[list[int]] = []
            self.tested: list[list[int]] = []

        def call(self, x):
            return keras.ops.concatenate([x, self.dense(x)], axis=1)

        def train_step(self, *args):  # jax: (state, data); tensorflow / torch: (data,)
            self.trained.append(_ids(args[-1][0]))
            return super().train_step(*args)

        def test_step(self, *args):
            self.tested.append(_ids(args[-1][0]))
            return super().test_step(*args)

    def loss(y, out):
        return keras.losses.sparse_categorical_crossentropy(y, out[:, 3:], from_logits=True)

    def new_model() -> Recorder:
        model = Recorder()
        model.compile("sgd", loss, run_eagerly=True)
        return model

    class Splitter(keras.callbacks.Callback):
        def __init__(self, model):
            super().__init__()
            self.rec, self.epochs, self._start = model, [], 0

        def on_epoch_end(self, epoch, logs=None):
            self.epochs.append(self.rec.trained[self._start :])
            self._start = len(self.rec.trained)

    def fit(model, seq, **kw) -> list:
        splitter = Splitter(model)
        model.fit(seq, verbose=0, callbacks=[splitter], **kw)
        return splitter.epochs

    def predicted(model, seq) -> list[int]:
        out = np.asarray(model.predict(seq, verbose=0))
        return np.rint(out[:, 0]).astype(np.int64).tolist()

    def plan(seq, epoch: int) -> list[list[int]]:
        return [seq.core.batch_indices(epoch, i).tolist() for i in range(len(seq))]

    out: dict = {"backend": keras.backend.backend()}
    kw = dict(seed=SEED, window=WINDOW)

    # predict on an unshuffled sequence after a peek: the store's rows, in order; twice.
    seq = ChunkedSequence(store_path, BATCH, y=None, shuffle=False, **kw)
    seq[0]
    model = new_model()
    out["predict_after_peek"] = [predicted(model, seq), predicted(model, seq)]
    seq[3]
    out["predict_after_second_peek"] = predicted(model, seq)

    # evaluate (shuffled sequence, after peeks and a partial iteration): each sample once.
    seq = ChunkedSequence(store_path, BATCH, **kw)
    seq[4]
    next(iter(seq))
    model = new_model()
    model.evaluate(seq, verbose=0)
    out["evaluate"] = model.tested
    model.tested = []
    model.evaluate(seq, verbose=0)
    out["evaluate_again"] = model.tested

    # fit: Keras epoch k trains plan epoch k in plan order (an unbuilt model: fit reads a batch).
    seq = ChunkedSequence(store_path, BATCH, **kw)
    seq[7]  # a peek changes nothing
    out["fit"] = fit(new_model(), seq, epochs=2)
    out["fit_plan"] = [plan(seq, 0), plan(seq, 1)]

    # steps_per_epoch < len: goes on through the plan across Keras epochs.
    seq = ChunkedSequence(store_path, BATCH, **kw)
    out["fit_half_steps"] = fit(new_model(), seq, epochs=4, steps_per_epoch=len(seq) // 2)
    out["fit_half_steps_plan"] = [plan(seq, 0), plan(seq, 1)]

    # steps_per_epoch > len: a clear error.
    seq = ChunkedSequence(store_path, BATCH, **kw)
    try:
        fit(new_model(), seq, epochs=1, steps_per_epoch=len(seq) + 1)
        out["too_many_steps"] = None
    except Exception as e:
        out["too_many_steps"] = [type(e).__name__, isinstance(e, oocseq.ArgumentError), str(e)]

    # fit then predict and evaluate on the same (shuffled) sequence: each sample once.
    seq = ChunkedSequence(store_path, BATCH, **kw)
    model = new_model()
    fit(model, seq, epochs=1)
    out["predict_after_fit"] = predicted(model, seq)

    # A user's subclass: overriding __getitem__ (calling super) and a transform method.
    calls = [0]

    class Scaled(ChunkedSequence):
        def __getitem__(self, i):
            batch = super().__getitem__(i)
            calls[0] += 1
            return batch

    class WithTransform(ChunkedSequence):
        def transform(self, batch, rng):
            return {**batch, "y": (batch["y"] + 1) % 10} if "y" in batch else batch

    subclass: dict = {}
    for name, cls in (("getitem", Scaled), ("transform", WithTransform)):
        seq = cls(store_path, BATCH, **kw)
        model = new_model()
        got = {"is_pydataset": isinstance(seq, keras.utils.PyDataset), "type": type(seq).__name__}
        got["fit"] = fit(model, seq, epochs=1)
        model.tested = []
        model.evaluate(seq, verbose=0)
        got["evaluate"] = model.tested
        plain = cls(store_path, BATCH, y=None, shuffle=False, **kw)
        got["predict"] = predicted(model, plain)
        got["labels_shifted"] = (
            bool(np.array_equal(seq.batch(0)[1], (np.asarray(seq.batch_indices(0)) + 1) % 10))
            if name == "transform"
            else None
        )
        subclass[name] = got
    out["subclass"] = subclass
    out["subclass_getitem_calls"] = calls[0]

    # In-memory arrays.
    idx = np.arange(N)
    x = np.stack([idx, idx + 0.25, idx + 0.5], axis=1).astype(np.float32)
    seq = ChunkedSequence({"x": x, "y": idx % 10}, BATCH, **kw)
    model = new_model()
    out["arrays_fit"] = fit(model, seq, epochs=2)
    out["arrays_predict"] = predicted(model, ChunkedSequence({"x": x}, BATCH, y=None, shuffle=False))
    return out


if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    if cfg["oocseq_first"]:
        import oocseq  # noqa: F401
    import keras  # noqa: F401

    print("RESULT " + json.dumps(run_all(cfg["store_path"])))
