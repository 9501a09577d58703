"""The cursor under any order of the calls users make: peeks, ``fit``, ``evaluate``,
``predict``, iteration and ``state_dict`` / ``load_state_dict``, interleaved by hypothesis, with
real Keras (the backend of this process). After every call: ``fit`` trained each sample once per
epoch, ``evaluate`` saw each sample once, ``predict`` returned every row once (in store order
for an unshuffled sequence), a peek was plan batch ``i`` and moved nothing, and iteration went
on from where the cursor stood."""

from __future__ import annotations

import json
import random

import keras
import numpy as np
import pytest
from conftest import ids_of, make_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oocseq import ChunkedSequence

N, CHUNK, BATCH = 48, 4, 8  # 6 batches per epoch


class Recorder(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(10)
        self.trained: list[list[int]] = []
        self.tested: list[list[int]] = []

    def call(self, x):
        return keras.ops.concatenate([x, self.dense(x)], axis=1)

    def train_step(self, *args):
        self.trained.append(ids_of(np.asarray(args[-1][0])).tolist())
        return super().train_step(*args)

    def test_step(self, *args):
        self.tested.append(ids_of(np.asarray(args[-1][0])).tolist())
        return super().test_step(*args)


def _loss(y, out):
    return keras.losses.sparse_categorical_crossentropy(y, out[:, 3:], from_logits=True)


def new_model() -> Recorder:
    model = Recorder()
    model.compile("sgd", _loss, run_eagerly=True)
    return model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("cursor") / "s.zarr", N, CHUNK)


OPS = st.one_of(
    st.tuples(st.just("peek"), st.integers(0, N // BATCH - 1)),
    st.tuples(st.just("fit"), st.booleans()),  # Keras's shuffle
    st.tuples(st.just("fit_half"), st.just(None)),  # steps_per_epoch = len / 2, two epochs
    st.tuples(st.just("evaluate"), st.just(None)),
    st.tuples(st.just("predict"), st.just(None)),
    st.tuples(st.just("iter"), st.integers(0, N // BATCH)),
    st.tuples(st.just("resume"), st.just(None)),
    st.tuples(st.just("new_model"), st.just(None)),
)

ALL = list(range(N))


def flat(batches):
    return sorted(i for b in batches for i in b)


@pytest.mark.timeout(900)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shuffle=st.booleans(), seed=st.integers(0, 100), ops=st.lists(OPS, min_size=1, max_size=6))
def test_any_order_of_calls(store, shuffle, seed, ops):
    random.seed(seed)
    keras.utils.set_random_seed(seed)
    seq = ChunkedSequence(store, BATCH, seed=seed, window=2, shuffle=shuffle)
    model = new_model()
    try:
        for op, arg in ops:
            before = (seq.epoch, seq.state_dict()["position"])
            if op == "peek":
                x, _ = seq[arg]
                np.testing.assert_array_equal(ids_of(x), seq.batch_indices(arg))
                assert (seq.epoch, seq.state_dict()["position"]) == before, "a peek moved the cursor"
            elif op in ("fit", "fit_half"):
                model.trained = []
                if op == "fit":
                    model.fit(seq, epochs=1, shuffle=arg, verbose=0)
                    epochs = [model.trained]
                else:
                    model.fit(seq, epochs=2, steps_per_epoch=len(seq) // 2, verbose=0)
                    epochs = [model.trained]  # two Keras epochs: one plan epoch
                for trained in epochs:
                    assert len(trained) == len(seq) and flat(trained) == ALL, (op, trained)
            elif op == "evaluate":
                model.tested = []
                model.evaluate(seq, verbose=0)
                assert len(model.tested) == len(seq) and flat(model.tested) == ALL, model.tested
            elif op == "predict":
                out = np.asarray(model.predict(seq, verbose=0))
                rows = np.rint(out[:, 0]).astype(np.int64).tolist()
                assert sorted(rows) == ALL
                if not shuffle:
                    assert rows == ALL
            elif op == "iter":
                epoch, position = before
                if position >= len(seq):
                    epoch, position = epoch + 1, 0
                it = iter(seq)
                for j in range(min(arg, len(seq) - position)):
                    x, _ = next(it)
                    np.testing.assert_array_equal(ids_of(x), seq.core.batch_indices(epoch, position + j))
                it.close()
            elif op == "resume":
                state = json.loads(json.dumps(seq.state_dict()))
                seq.close()
                seq = ChunkedSequence(store, BATCH, seed=seed, window=2, shuffle=shuffle)
                seq.load_state_dict(state)
                assert (seq.epoch, seq.state_dict()["position"]) == before
                rest = [ids_of(b[0]).tolist() for b in iter(seq)] if before[1] < len(seq) else []
                want = [seq.core.batch_indices(before[0], k).tolist() for k in range(before[1], len(seq))]
                assert rest == want
            elif op == "new_model":
                model = new_model()
    finally:
        seq.close()
        keras.backend.clear_session()
