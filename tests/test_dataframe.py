"""DataFrames of every shape Keras's ``flow_from_dataframe`` and custom generators use:
unlabeled, multi-output, multi-modal (image + tabular columns), any index; then a two-input,
two-output ``model.fit`` on the store."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import oocseq
from oocseq import ArgumentError, InvalidSourceError
from oocseq.ingest.images import list_image_folder

FORMATS = (".zarr", ".h5")


def _images(root: Path, n: int) -> list[str]:
    """``n`` 4x3 RGB PNGs whose pixels encode their number (pixel value ``i``)."""
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        Image.new("RGB", (3, 4), (i, 2 * i, 3 * i)).save(root / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


KINDS = ["int", "float", "float_nan", "str", "bool", "category"]


def _column(kind: str, n: int, rng: np.random.Generator) -> pd.Series:
    if kind == "int":
        return pd.Series(rng.integers(-5, 5, n))
    if kind == "float":
        return pd.Series(rng.normal(size=n))
    if kind == "float_nan":
        v = rng.normal(size=n)
        v[rng.random(n) < 0.3] = np.nan
        return pd.Series(v)
    if kind == "bool":
        return pd.Series(rng.random(n) < 0.5)
    values = rng.choice(["cat", "dog", "Ému", "10", "9"], n)
    return pd.Series(values, dtype="category" if kind == "category" else object)


@st.composite
def frames(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=0, max_size=4))
    cols = {f"c{j}": _column(k, n, rng) for j, k in enumerate(kinds)}
    names = list(cols)
    n_y = draw(st.integers(0, len(names)))
    y_cols = [c for c in names[:n_y] if kinds[names.index(c)] != "float_nan"]  # labels need values
    extra = names[n_y:]
    index = draw(
        st.sampled_from(
            [
                pd.RangeIndex(n),
                pd.Index(rng.permutation(100)[:n] * 7 - 50),
                pd.Index([f"row-{i}" for i in rng.permutation(n)]),
            ]
        )
    )
    return {
        "n": n,
        "cols": cols,
        "kinds": dict(zip(names, kinds, strict=True)),
        "y_col": y_cols if y_cols or draw(st.booleans()) else None,
        "extra_cols": extra,
        "index": index,
        "preshuffle": draw(st.booleans()),
        "fmt": draw(st.sampled_from(FORMATS)),
    }


def _expected(series: pd.Series, kind: str) -> tuple[np.ndarray, list[str] | None]:
    if kind == "int":
        return series.to_numpy(np.int64), None
    if kind.startswith("float"):
        return series.to_numpy(np.float32), None
    text = series.astype(str)
    names = sorted(set(text))
    return np.asarray([names.index(v) for v in text], dtype=np.int64), names


@settings(max_examples=15)
@given(spec=frames())
def test_store_fields_equal_the_columns(spec: dict) -> None:
    """Every label and extra column becomes a field named after it, holding the column's
    values (class indices for strings) for the row each sample came from."""
    with tempfile.TemporaryDirectory() as d:
        files = _images(Path(d) / "imgs", spec["n"])
        df = pd.DataFrame({"filename": files, **{k: v.to_numpy() for k, v in spec["cols"].items()}})
        for k, kind in spec["kinds"].items():
            if kind == "category":
                df[k] = df[k].astype("category")
        df.index = spec["index"]
        store = oocseq.ingest_dataframe(
            df,
            Path(d) / f"s{spec['fmt']}",
            directory=Path(d) / "imgs",
            image_size=(4, 3),
            y_col=spec["y_col"],
            extra_cols=spec["extra_cols"],
            preshuffle=spec["preshuffle"],
            chunk_len=3,
        )
        stored = list(spec["y_col"] or []) + spec["extra_cols"]
        assert list(store.fields) == ["x", *stored]
        index = store.dataframe_index
        assert index is not None and len(index) == spec["n"]
        if spec["index"].dtype.kind == "i":
            assert index.dtype == np.int64
            rows = [spec["index"].get_loc(int(v)) for v in index]
        else:
            rows = [spec["index"].get_loc(str(v)) for v in index]
        assert sorted(rows) == list(range(spec["n"]))
        if not spec["preshuffle"]:
            assert rows == list(range(spec["n"]))
        # the image of each sample is the row's file
        assert [int(s.removeprefix("img").removesuffix(".png")) for s in store.sources] == rows
        np.testing.assert_array_equal(store["x"][:, 0, 0, 0], rows)
        class_names = store.metadata["field_class_names"]
        for name in stored:
            want, names = _expected(df[name], spec["kinds"][name])
            np.testing.assert_array_equal(store[name][:], want[rows])
            assert store.fields[name].dtype == want.dtype
            assert class_names.get(name) == names
        assert store.metadata["columns"] == {"x": "filename", **{c: c for c in stored}}
        store.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_unlabeled_frame(tmp_path: Path, fmt: str) -> None:
    files = _images(tmp_path / "imgs", 5)
    df = pd.DataFrame({"filename": files})
    store = oocseq.ingest_dataframe(
        df, tmp_path / f"s{fmt}", directory=tmp_path / "imgs", image_size=(4, 3), y_col=None
    )
    assert list(store.fields) == ["x"] and "class_names" not in store.metadata
    seq = oocseq.ChunkedSequence(store, 2, y=None, shuffle=False)
    (x,) = seq[0]
    assert x.shape == (2, 4, 3, 3)
    seq.close()


def test_stacked_extra_columns_and_weights(tmp_path: Path) -> None:
    files = _images(tmp_path / "imgs", 6)
    df = pd.DataFrame(
        {
            "filename": files,
            "label": list("abcabc"),
            "h": np.arange(6) * 1.5,
            "bmi": np.arange(6, dtype=np.int32),
            "smoker": [True, False] * 3,
            "w": [1, 2, 3, 4, 5, 6],
        },
        index=pd.MultiIndex.from_arrays([list("pqrstu"), range(6)], names=["patient", "visit"]),
    )
    store = oocseq.ingest_dataframe(
        df,
        tmp_path / "s.h5",
        directory=tmp_path / "imgs",
        image_size=(4, 3),
        y_col="label",
        extra_cols={"tab": ["h", "bmi", "smoker"]},
        weight_col="w",
        preshuffle=False,
    )
    assert list(store.fields) == ["x", "y", "tab", "w"]
    np.testing.assert_array_equal(
        store["tab"][:], np.stack([np.arange(6) * 1.5, np.arange(6), [1, 0] * 3], 1)
    )
    assert store.fields["tab"].dtype == np.float32 and store.fields["w"].dtype == np.float32
    assert store["w"][:].tolist() == [1, 2, 3, 4, 5, 6]
    assert store.metadata["class_names"] == ["a", "b", "c"]
    assert store.metadata["field_class_names"] == {"y": ["a", "b", "c"]}
    assert store.metadata["source"]["index"] == {"name": ["patient", "visit"], "kind": "str"}
    assert store.dataframe_index.tolist() == [str(t) for t in df.index]
    # A converted copy keeps every per-sample record, so saved sequence states still apply.
    other = ".h5" if store.format == "zarr" else ".zarr"
    copy = oocseq.convert_store(store, tmp_path / f"copy{other}")
    back = oocseq.convert_store(copy, tmp_path / f"back.{store.format}")
    for converted in (copy, back):
        assert converted.dataframe_index.tolist() == store.dataframe_index.tolist()
        assert converted.sources.tolist() == store.sources.tolist()
        assert converted.manifest.aux == store.manifest.aux
    assert back.manifest.checksums == store.manifest.checksums
    copy.close()
    back.close()
    seq = oocseq.ChunkedSequence(
        store, 3, x={"image": "x", "tab": "tab"}, y="y", sample_weight="w", shuffle=False
    )
    x, y, w = seq[1]
    assert set(x) == {"image", "tab"} and y.tolist() == [0, 1, 2] and w.tolist() == [4, 5, 6]
    seq.close()


def test_multi_output_classes_per_column(tmp_path: Path) -> None:
    files = _images(tmp_path / "imgs", 4)
    df = pd.DataFrame({"filename": files, "gender": list("mffm"), "race": ["b", "a", "c", "a"]})
    store = oocseq.ingest_dataframe(
        df,
        tmp_path / "s.zarr",
        directory=tmp_path / "imgs",
        image_size=(4, 3),
        y_col=["gender", "race"],
        classes={"race": ["c", "b", "a"]},
        preshuffle=False,
    )
    assert store.metadata["field_class_names"] == {"gender": ["f", "m"], "race": ["c", "b", "a"]}
    assert store["gender"][:].tolist() == [1, 0, 0, 1] and store["race"][:].tolist() == [1, 2, 0, 2]
    assert "class_names" not in store.metadata
    from oocseq.cli import describe

    text = describe(store)
    assert "classes of gender (2): f, m" in text and "classes of race (3): c, b, a" in text
    # No field named y: the shuffle report measures the first field of class indices.
    from oocseq.cli import _shuffle_report

    assert _shuffle_report(store, 2, None).label == "gender"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y_col": ["age", "age"]}, "twice"),
        ({"y_col": ["x"]}, "twice"),
        ({"y_col": "label", "extra_cols": ["y"]}, "twice"),
        ({"y_col": ["Patient Age"]}, "rename"),
        ({"y_col": None, "extra_cols": {"tab": ["age", "label"]}}, "not numeric"),
        ({"y_col": None, "extra_cols": {"tab": []}}, "no columns"),
        ({"y_col": ["missing"]}, "no column 'missing'"),
        ({"y_col": ["label", "age"], "classes": ["a"]}, "classes"),
        ({"y_col": "label", "classes": {"age": ["1"], "nope": ["a"]}}, "nope"),
        ({"y_col": None, "weight_col": "label"}, "not numeric"),
        ({"y_col": None, "extra_cols": {"tab": ["big"]}}, "float32"),
    ],
)
def test_bad_layouts_refused(tmp_path: Path, kwargs: dict, match: str) -> None:
    files = _images(tmp_path / "imgs", 2)
    df = pd.DataFrame(
        {
            "filename": files,
            "label": ["a", "b"],
            "age": [1, 2],
            "Patient Age": [3, 4],
            "y": [0, 1],
            "x": [5, 6],
            "big": [1e39, 0],
        }
    )
    dest = tmp_path / "s.zarr"
    with pytest.raises((InvalidSourceError, ArgumentError), match=match):
        oocseq.ingest_dataframe(df, dest, directory=tmp_path / "imgs", image_size=(4, 3), **kwargs)
    assert not dest.exists()


def test_preshuffle_matches_the_image_folder(tmp_path: Path) -> None:
    """A DataFrame listing an image folder's files in the folder's order is stored in the same
    order as the folder: both pre-shuffle rows with the same seeded permutation."""
    for c in ("a", "b", "c"):
        _images(tmp_path / "src" / c, 4)
    folder = oocseq.ingest_image_folder(tmp_path / "src", tmp_path / "f.zarr", image_size=(4, 3), seed=3)
    names, rel, labels = list_image_folder(tmp_path / "src")
    df = pd.DataFrame({"filename": rel, "class": [names[i] for i in labels]})
    frame = oocseq.ingest_dataframe(
        df, tmp_path / "d.zarr", directory=tmp_path / "src", image_size=(4, 3), seed=3
    )
    assert frame.sources.tolist() == folder.sources.tolist()
    np.testing.assert_array_equal(frame["y"][:], folder["y"][:])
    np.testing.assert_array_equal(frame["x"][:], folder["x"][:])


# -- a two-input, two-output model trains on the store ----------------------------------------------


def test_two_input_two_output_fit(tmp_path: Path) -> None:
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n = 96
    root = tmp_path / "imgs"
    root.mkdir()
    gender = rng.integers(0, 2, n)
    files = []
    for i in range(n):
        # the image tells the gender (dark or bright), the tabular column tells the age
        Image.fromarray((rng.integers(0, 60, (8, 8, 3)) + 190 * gender[i]).astype(np.uint8)).save(
            root / f"{i}.png"
        )
        files.append(f"{i}.png")
    bmi = rng.normal(size=n)
    df = pd.DataFrame(
        {"filename": files, "gender": np.where(gender == 1, "m", "f"), "age": 1 + 2 * bmi, "bmi": bmi}
    )
    store = oocseq.ingest_dataframe(
        df,
        tmp_path / "s.zarr",
        directory=root,
        image_size=(8, 8),
        y_col=["gender", "age"],
        extra_cols={"tab": ["bmi"]},
    )
    image = keras.Input((8, 8, 3), name="image")
    tab = keras.Input((1,), name="tab")
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(image))
    h = keras.layers.Concatenate()([h, tab])
    outputs = {
        "gender": keras.layers.Dense(2, activation="softmax", name="gender")(h),
        "age": keras.layers.Dense(1, name="age")(h),
    }
    model = keras.Model({"image": image, "tab": tab}, outputs)
    model.compile(
        keras.optimizers.Adam(0.05),
        loss={"gender": "sparse_categorical_crossentropy", "age": "mse"},
        metrics={"gender": ["accuracy"]},
    )
    x = {"image": "x", "tab": "tab"}
    y = {"gender": "gender", "age": "age"}
    train = oocseq.ChunkedSequence(store, 16, x=x, y=y, seed=0)
    history = model.fit(train, epochs=8, verbose=0).history
    assert history["loss"][-1] < 0.2 * history["loss"][0]
    test = oocseq.ChunkedSequence(store, 32, x=x, y=None, shuffle=False)
    pred = model.predict(test, verbose=0)
    # predictions line up with the stored rows: each field of a sample came from one row
    want = store["gender"][:]
    assert (pred["gender"].argmax(1) == want).mean() >= 0.95
    assert np.corrcoef(pred["age"][:, 0], store["age"][:])[0, 1] > 0.9
    assert store.metadata["field_class_names"]["gender"] == ["f", "m"]
    train.close()
    test.close()
    keras.backend.clear_session()
