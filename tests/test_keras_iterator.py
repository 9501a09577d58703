"""How a ChunkedSequence finds Keras's epoch iterator (its ``steps_per_epoch``), and that every
way the lookup can fail falls back to serving whole passes right, with a real Keras fit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import oocseq  # noqa: E402
import oocseq.sequence as sequence_module  # noqa: E402
from oocseq import ChunkedSequence, KerasIteratorWarning  # noqa: E402
from oocseq.testing.keras import FitRecorder  # noqa: E402

N, BATCH = 96, 8  # 12 batches
ALL = list(range(N))


def arrays() -> dict[str, np.ndarray]:
    ids = np.arange(N)
    return {
        "x": (ids[:, None] * 0.01).astype(np.float32),
        "id": ids.astype(np.int32),
        "y": (ids % 3).astype(np.int64),
    }


def recorder() -> FitRecorder:
    inner = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3)])
    model = FitRecorder(inner)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def ids(batches: list[np.ndarray]) -> list[int]:
    return [int(i) for b in batches for i in b]


def plan_ids(seq: ChunkedSequence, epoch: int) -> list[int]:
    return [int(i) for k in range(len(seq)) for i in seq.core.batch_indices(epoch, k)]


class Level1(ChunkedSequence):
    def on_epoch_begin(self):
        super().on_epoch_begin()

    def on_epoch_end(self):
        super().on_epoch_end()


class Level2(Level1):
    def on_epoch_begin(self):
        super().on_epoch_begin()


class Level3(Level2):
    def on_epoch_begin(self):
        super().on_epoch_begin()

    def on_epoch_end(self):
        super().on_epoch_end()


@pytest.mark.parametrize("cls", [ChunkedSequence, Level3])
def test_steps_per_epoch_goes_on_through_the_plan(cls):
    """Found through a subclass's overrides too: two Keras epochs of half the steps are one plan epoch."""
    seq = cls(arrays(), BATCH, x={"x": "x", "id": "id"}, seed=4)
    model = recorder()
    model.fit(seq, epochs=4, steps_per_epoch=len(seq) // 2, verbose=0)
    got = [ids(e) for e in model.epochs]
    assert [len(e) for e in got] == [N // 2] * 4
    assert got[0] + got[1] == plan_ids(seq, 0) and got[2] + got[3] == plan_ids(seq, 1)


def _no_frames(monkeypatch):
    monkeypatch.setattr(sequence_module, "_getframe", None)


def _raising_frames(monkeypatch):
    def broken(depth):
        raise RuntimeError("no frames here")

    monkeypatch.setattr(sequence_module, "_getframe", broken)


def _keras_changed(monkeypatch):
    # Only the adapter's frame is looked at: as if Keras had put more calls between its iterator and it
    monkeypatch.setattr(sequence_module, "_MAX_FRAMES", 1)


@pytest.mark.parametrize(
    ("fail", "warns"), [(_no_frames, True), (_raising_frames, False), (_keras_changed, True)]
)
def test_a_failed_lookup_serves_whole_passes_right(monkeypatch, fail, warns):
    fail(monkeypatch)
    seq = ChunkedSequence(arrays(), BATCH, x={"x": "x", "id": "id"}, seed=4)
    plain = ChunkedSequence(arrays(), BATCH, x={"x": "x", "id": "id"}, y=None, shuffle=False)
    model = recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(seq, epochs=2, verbose=0)
        model.evaluate(seq, verbose=0)
        plain[3]  # a peek
        model.predict(plain, verbose=0)
    # fit: Keras epoch k trains plan epoch k (after fit's model-building read), each sample once
    assert [sorted(ids(e)) for e in model.epochs] == [ALL, ALL]
    assert [ids(e) for e in model.epochs] == [plan_ids(seq, 0), plan_ids(seq, 1)]
    assert sorted(ids(model.evaluated[0])) == ALL
    assert ids(model.predicted[0]) == ALL  # in store order
    ours = [w for w in caught if issubclass(w.category, KerasIteratorWarning)]
    others = [w for w in caught if not issubclass(w.category, KerasIteratorWarning)]
    assert not others, [str(w.message) for w in others]
    if warns:
        assert len({id(w) for w in ours}) >= 1 and "steps_per_epoch" in str(ours[0].message)
        assert len([w for w in ours if "could not find" in str(w.message)]) <= 2  # once per sequence
    else:
        assert not ours


def test_a_failed_lookup_with_steps_per_epoch_warns_and_restarts_each_pass(monkeypatch):
    _keras_changed(monkeypatch)
    seq = ChunkedSequence(arrays(), BATCH, x={"x": "x", "id": "id"}, seed=4)
    model = recorder()
    with pytest.warns(KerasIteratorWarning, match="steps_per_epoch"):
        model.fit(seq, epochs=2, steps_per_epoch=len(seq) // 2, verbose=0)
    half = plan_ids(seq, 0)[: N // 2]
    # the documented fallback: no sample twice inside a pass, no crash, no garbage
    assert [ids(e) for e in model.epochs] == [half, half]


def test_frames_whose_attributes_raise_are_skipped():
    seq = ChunkedSequence(arrays(), BATCH, seed=1)

    class Hostile:
        @property
        def data_adapter(self):
            raise RuntimeError("not today")

        def drive(self):
            seq.on_epoch_begin()
            seq[5]
            seq.on_epoch_end()

    Hostile().drive()  # no error, no warning (Keras is not the caller)
    assert seq.epoch == 0  # one batch of a pass cut short: not counted


@pytest.mark.parametrize(
    ("value", "steps"),
    [(5, 5), (np.int64(5), 5), (True, None), (0, None), (-3, None), (None, None), (5.0, None)],
)
def test_steps_of_an_iterator(value, steps):
    class It:
        steps_per_epoch = value

    assert sequence_module._keras_steps(It()) == steps

    class Broken:
        @property
        def steps_per_epoch(self):
            raise RuntimeError

    assert sequence_module._keras_steps(Broken()) is None
    assert sequence_module._dropped_requests(Broken()) is False
    assert oocseq.KerasIteratorWarning is KerasIteratorWarning
