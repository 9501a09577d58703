"""oocseq.transforms: one_hot, class_weights, compose, balanced_class_weights; the keywords
they replace (num_classes=, class_weight=) and a real Keras fit with them."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import FORMATS, ids_of, make_store, x_of, y_of
from hypothesis import given, settings
from hypothesis import strategies as st

import oocseq
from oocseq import ChunkedSequence, InvalidSourceError, transforms

N, CLASSES = 60, 4


def arrays(labels: np.ndarray) -> dict[str, np.ndarray]:
    n = len(labels)
    return {"x": np.arange(n, dtype=np.float32)[:, None], "y": labels}


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=80),
    batch_size=st.integers(1, 20),
    seed=st.integers(0, 2**32),
    weights=st.lists(st.floats(0, 10, allow_nan=False), min_size=7, max_size=7),
)
def test_one_hot_and_class_weights_match_numpy(labels, batch_size, seed, weights):
    y = np.asarray(labels, dtype=np.int64)
    table = dict(enumerate(weights))
    t = transforms.compose(transforms.class_weights(table), transforms.one_hot(7))
    seq = ChunkedSequence(arrays(y), batch_size, seed=seed, transform=t)
    seen = []
    for i in range(len(seq)):
        x, onehot, w = seq[i]
        ids = x[:, 0].astype(np.int64)
        seen.append(ids)
        np.testing.assert_array_equal(onehot, np.eye(7, dtype=np.float32)[y[ids]])
        np.testing.assert_array_equal(w, np.asarray(weights, dtype=np.float32)[y[ids]])
        assert onehot.dtype == np.float32 and w.dtype == np.float32
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(len(y)))


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(0, 9), min_size=1, max_size=300), chunk_len=st.integers(1, 40))
def test_balanced_class_weights_from_counts(labels, chunk_len):
    y = np.asarray(labels, dtype=np.int32)
    got = transforms.balanced_class_weights(oocseq.ArraySource({"y": y}, chunk_len=chunk_len))
    counts = np.bincount(y)
    present = np.flatnonzero(counts)
    assert sorted(got) == present.tolist()
    for c in present:
        assert got[int(c)] == pytest.approx(len(y) / (len(present) * counts[c]))
    # every class weighs the same in all: sum of weights over its samples
    totals = {int(c): got[int(c)] * counts[c] for c in present}
    assert max(totals.values()) == pytest.approx(min(totals.values()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_balanced_class_weights_of_a_store_path(tmp_path, fmt):
    store = make_store(tmp_path / f"s{fmt}", N, 7)
    counts = np.bincount(y_of(np.arange(N)))
    got = transforms.balanced_class_weights(str(store.path))
    assert got == pytest.approx({c: N / (len(counts) * k) for c, k in enumerate(counts)})
    with pytest.raises(oocseq.FieldNotFoundError, match="'label'"):
        transforms.balanced_class_weights(store, "label")
    with pytest.raises(oocseq.ArgumentError, match="integer labels"):
        transforms.balanced_class_weights(store, "x")


def test_negative_label_in_the_store_names_the_sample():
    y = np.array([0, 1, 2, -1, 1])
    with pytest.raises(InvalidSourceError, match=r"sample 3 has label -1 in field 'y'"):
        transforms.balanced_class_weights({"y": y}, "y")


def test_bad_labels_name_the_sample_not_garbage():
    y = np.array([0, 1, 2, 3, 9, 1, 0, 2])
    seq = ChunkedSequence(arrays(y), 4, shuffle=False, transform=transforms.one_hot(4))
    assert seq[0][1].shape == (4, 4)
    with pytest.raises(
        InvalidSourceError, match=r"sample 4 has label 9 in field 'y'; expected an int in \[0, 4\)"
    ):
        seq[1]
    weighted = ChunkedSequence(
        arrays(y), 4, shuffle=False, transform=transforms.class_weights({0: 1, 1: 2, 2: 3})
    )
    with pytest.raises(InvalidSourceError, match=r"sample 3 has label 3 .* keys \[0, 1, 2\]"):
        weighted[0]


def test_label_field_that_is_missing_or_not_integer():
    y = np.arange(8) % 2
    with pytest.raises(oocseq.ArgumentError, match=r"reads field 'label'.*field="):
        ChunkedSequence(arrays(y), 4, transform=transforms.one_hot(2, field="label"))
    with pytest.raises(oocseq.ArgumentError, match="reads field 'label'"):
        ChunkedSequence(arrays(y), 4, transform=transforms.compose(transforms.class_weights({0: 1}, "label")))
    with pytest.raises(oocseq.TransformError, match="integer labels") as err:
        ChunkedSequence(arrays(y), 4, transform=transforms.one_hot(2, field="x"))[0]
    assert isinstance(err.value.__cause__, oocseq.ArgumentError)


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: transforms.one_hot(0), "positive int"),
        (lambda: transforms.one_hot(True), "positive int"),
        (lambda: transforms.class_weights({}), "non-empty"),
        (lambda: transforms.class_weights({"a": 1.0}), "int labels"),
        (lambda: transforms.class_weights({0: -1.0}), ">= 0"),
        (lambda: transforms.class_weights({0: "heavy"}), "number"),
        (lambda: transforms.compose(transforms.one_hot(2), 3), "callables"),
    ],
)
def test_bad_arguments(make, error):
    with pytest.raises(oocseq.OocseqError, match=error):
        make()


def test_two_sources_of_weights_rejected(tmp_path):
    store = make_store(tmp_path / "s.zarr", N, 7)
    with pytest.raises(oocseq.ArgumentError, match="not both"):
        ChunkedSequence(store, 5, sample_weight="w", transform=transforms.class_weights({0: 1.0}))
    with pytest.raises(oocseq.ArgumentError, match="needs y"):
        ChunkedSequence(store, 5, y=None, transform=transforms.class_weights({0: 1.0}))


def test_transforms_pickle_and_compose_with_a_users_transform(tmp_path):
    store = make_store(tmp_path / "s.zarr", N, 7)
    t = transforms.compose(
        lambda b: {**b, "x": b["x"] * 2},
        transforms.class_weights({c: c + 1.0 for c in range(10)}),
        transforms.one_hot(10),
    )
    assert t.sample_weight_key == "sample_weight"
    for stock in (
        transforms.one_hot(10),
        transforms.class_weights({0: 1.0}),
        transforms.compose(transforms.one_hot(3)),
    ):
        assert pickle.loads(pickle.dumps(stock)) == stock  # worker processes of any start method
    seq = ChunkedSequence(store, 8, seed=1, transform=t)
    idx = seq.batch_indices(2)
    x, y, w = seq[2]
    np.testing.assert_array_equal(x, x_of(idx) * 2)
    np.testing.assert_array_equal(y, np.eye(10, dtype=np.float32)[y_of(idx)])
    np.testing.assert_array_equal(w, y_of(idx) + 1.0)


def test_old_keywords_warn_with_what_to_write_and_serve_the_same(tmp_path):
    store = make_store(tmp_path / "s.h5", N, 7)
    cw = {c: 1 + c / 10 for c in range(10)}
    new = ChunkedSequence(
        store, 9, seed=2, transform=transforms.compose(transforms.class_weights(cw), transforms.one_hot(10))
    )
    with pytest.warns(DeprecationWarning, match=r"write transform=oocseq.transforms.compose\(") as rec:
        old = ChunkedSequence(store, 9, seed=2, num_classes=10, class_weight=cw)
    assert "class_weights({0: 1.0" in str(rec[0].message) and "one_hot(10, field='y')" in str(rec[0].message)
    for i in range(len(new)):
        for a, b in zip(old[i], new[i], strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.warns(DeprecationWarning, match=r"transform=oocseq.transforms.one_hot\(10, field='y'\)"):
        alone = ChunkedSequence(store, 9, seed=2, num_classes=10, class_weight=None)
    assert len(alone[0]) == 2
    with pytest.raises(oocseq.ArgumentError, match="one integer field"):
        ChunkedSequence(store, 9, y=["y", "w"], num_classes=10)
    with pytest.raises(oocseq.ArgumentTypeError, match="unexpected keyword"):
        ChunkedSequence(store, 9, num_class=10)


def test_a_real_keras_fit_trains_with_the_class_weights(tmp_path):
    """fit with transforms.class_weights == fit from numpy arrays with those sample weights ==
    Keras's own fit(class_weight=...) on the sequence."""
    keras = pytest.importorskip("keras")
    store = make_store(tmp_path / "s.zarr", N, 7)
    ids = np.arange(N)
    x, y = x_of(ids), y_of(ids)
    cw = {c: 0.5 + c for c in range(10)}

    def trained(data, **kw):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(10, kernel_initializer="zeros")])
        model.compile(keras.optimizers.SGD(0.01), keras.losses.CategoricalCrossentropy(from_logits=True))
        model.fit(data, epochs=2, verbose=0, **kw)
        return model.get_weights()[0]

    onehot = transforms.one_hot(10)
    ours = ChunkedSequence(
        store, 8, shuffle=False, transform=transforms.compose(transforms.class_weights(cw), onehot)
    )
    assert len(ours[0]) == 3
    ref = trained(
        x,
        y=np.eye(10, dtype=np.float32)[y],
        sample_weight=np.vectorize(cw.get)(y),
        batch_size=8,
        shuffle=False,
    )
    np.testing.assert_allclose(trained(ours), ref, rtol=1e-5, atol=1e-6)
    kerass = ChunkedSequence(store, 8, shuffle=False, transform=onehot)
    np.testing.assert_allclose(trained(kerass, class_weight=cw), ref, rtol=1e-5, atol=1e-6)
    unweighted = trained(x, y=np.eye(10, dtype=np.float32)[y], batch_size=8, shuffle=False)
    assert not np.allclose(unweighted, ref)
    assert ids_of(ours[0][0]).tolist() == list(range(8))
