"""``ingest_csv``: round trips, label kinds, and errors that name the file, row and column.

Every test writes a real CSV file and reads the store back."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from oocseq.errors import CSVValueError, InvalidSourceError, SourceNotFoundError, StoreExistsError
from oocseq.ingest.csv import ingest_csv
from oocseq.store import open_store


def write_csv(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def table(n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` rows of three float32 features and a class label."""
    x = (np.arange(n * 3, dtype=np.float32).reshape(n, 3) / 4 - 7).astype(np.float32)
    labels = [("cat", "dog", "bird")[i % 3] for i in range(n)]
    return x, labels


def write_table(path: Path, x: np.ndarray, labels: list[str]) -> Path:
    rows = [[*(repr(float(v)) for v in row), label] for row, label in zip(x, labels, strict=True)]
    return write_csv(path, ["a", "b", "c", "label"], rows)


# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(("block_rows", "chunk_len"), [(3, 4), (7, 7), (100, 3), (1, 1)])
def test_round_trip_with_class_labels(tmp_path: Path, fmt: str, block_rows: int, chunk_len: int) -> None:
    x, labels = table(23)  # 23: a multiple of neither the blocks nor the chunks
    src = write_table(tmp_path / "t.csv", x, labels)
    store = ingest_csv(
        src,
        tmp_path / f"s{fmt}",
        label_column="label",
        block_rows=block_rows,
        chunk_len=chunk_len,
        preshuffle=False,
    )

    store = open_store(store.path)
    assert len(store) == 23
    assert store.fields["x"].shape == (23, 3) and store.fields["x"].dtype == np.float32
    assert store.fields["y"].shape == (23,) and store.fields["y"].dtype == np.int64
    np.testing.assert_array_equal(store["x"][:], x)
    names = ["bird", "cat", "dog"]
    np.testing.assert_array_equal(store["y"][:], [names.index(v) for v in labels])
    meta = store.metadata
    assert meta["class_names"] == names
    assert meta["label_mapping"] == {"bird": 0, "cat": 1, "dog": 2}
    assert meta["feature_names"] == ["a", "b", "c"]
    assert meta["label_column"] == "label" and meta["label_kind"] == "class"
    assert meta["source"] == {"kind": "csv", "path": str(src.resolve()), "rows": 23}
    store.verify()


def test_class_names_are_global_across_blocks(tmp_path: Path) -> None:
    """A class first seen in the last block still gets its sorted index in every block."""
    labels = ["m"] * 5 + ["z"] * 5 + ["a"]
    src = write_csv(tmp_path / "t.csv", ["f", "label"], [[i, v] for i, v in enumerate(labels)])
    store = ingest_csv(src, tmp_path / "s.zarr", label_column="label", block_rows=2, preshuffle=False)
    assert store.metadata["class_names"] == ["a", "m", "z"]
    np.testing.assert_array_equal(store["y"][:], [1] * 5 + [2] * 5 + [0])


def test_integer_labels_are_kept(tmp_path: Path, fmt: str) -> None:
    labels = [3, -1, 0, 12, 7, 3, 2**40]
    src = write_csv(tmp_path / "t.csv", ["y", "f"], [[v, i] for i, v in enumerate(labels)])
    store = ingest_csv(src, tmp_path / f"s{fmt}", label_column="y", block_rows=3, preshuffle=False)
    assert store.fields["y"].dtype == np.int64
    np.testing.assert_array_equal(store["y"][:], labels)
    np.testing.assert_array_equal(store["x"][:], np.arange(7, dtype=np.float32)[:, None])
    assert store.metadata["label_kind"] == "int"
    assert "class_names" not in store.metadata


def test_float_labels_are_regression_targets(tmp_path: Path) -> None:
    """One non-integer number makes every label float32, even in other blocks."""
    labels = ["1", "2", "3", "4.5", "-0.25", "1e3"]
    src = write_csv(tmp_path / "t.csv", ["f", "target"], [[i, v] for i, v in enumerate(labels)])
    store = ingest_csv(src, tmp_path / "s.h5", label_column="target", block_rows=2, preshuffle=False)
    assert store.fields["y"].dtype == np.float32
    np.testing.assert_array_equal(store["y"][:], np.array([1, 2, 3, 4.5, -0.25, 1000], dtype=np.float32))
    assert store.metadata["label_kind"] == "float"


def test_numbers_mixed_with_text_are_class_names(tmp_path: Path) -> None:
    labels = ["2", "10", "x", "2"]
    src = write_csv(tmp_path / "t.csv", ["f", "label"], [[i, v] for i, v in enumerate(labels)])
    store = ingest_csv(src, tmp_path / "s.zarr", label_column="label", block_rows=2, preshuffle=False)
    assert store.metadata["class_names"] == ["10", "2", "x"]  # string order
    np.testing.assert_array_equal(store["y"][:], [1, 0, 2, 1])


def test_feature_columns_select_and_order(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "t.csv", ["a", "b", "c", "name"], [[1, 2, 3, "p"], [4, 5, 6, "q"]])
    store = ingest_csv(src, tmp_path / "s.zarr", feature_columns=["c", "a"], preshuffle=False)
    assert list(store.fields) == ["x"]
    np.testing.assert_array_equal(store["x"][:], [[3, 1], [6, 4]])
    assert store.metadata["feature_names"] == ["c", "a"]
    assert store.metadata["label_column"] is None


def test_unlabeled_table_stores_every_column(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "t.csv", ["a", "b"], [[1, 2], [3, 4], [5, 6]])
    store = ingest_csv(src, tmp_path / "s.h5", block_rows=2, chunk_len=2, preshuffle=False)
    assert list(store.fields) == ["x"]
    np.testing.assert_array_equal(store["x"][:], [[1, 2], [3, 4], [5, 6]])
    assert store.metadata["source"]["rows"] == 3


def test_delimiter_and_special_numbers(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "t.csv", ["a", "b"], [["inf", "-1e-3"], ["-inf", " 2 "]], delimiter=";")
    store = ingest_csv(src, tmp_path / "s.zarr", delimiter=";", block_rows=1, preshuffle=False)
    np.testing.assert_array_equal(store["x"][:], np.array([[np.inf, -1e-3], [-np.inf, 2]], dtype=np.float32))


def test_small_labeled_table_is_one_chunk_of_its_own_size(tmp_path: Path) -> None:
    x, labels = table(10)
    store = ingest_csv(
        write_table(tmp_path / "t.csv", x, labels),
        tmp_path / "s.zarr",
        label_column="label",
        preshuffle=False,
    )
    assert store.chunk_len == 10 and store.num_chunks == 1


@settings(max_examples=20, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.integers(1, 4)),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=True),
    ),
    block_rows=st.integers(1, 45),
    chunk_len=st.integers(1, 45),
    fmt=st.sampled_from([".zarr", ".h5"]),
)
def test_round_trip_property(x: np.ndarray, block_rows: int, chunk_len: int, fmt: str) -> None:
    """Any float32 table reads back bit for bit, whatever the block and chunk lengths."""
    labels = np.arange(len(x)) % 3
    with tempfile.TemporaryDirectory() as tmp:
        rows = [[*(repr(float(v)) for v in row), int(label)] for row, label in zip(x, labels, strict=True)]
        src = write_csv(Path(tmp) / "t.csv", [f"f{j}" for j in range(x.shape[1])] + ["y"], rows)
        store = ingest_csv(
            src,
            Path(tmp) / f"s{fmt}",
            label_column="y",
            block_rows=block_rows,
            chunk_len=chunk_len,
            preshuffle=False,
        )
        np.testing.assert_array_equal(store["x"][:], x)
        np.testing.assert_array_equal(store["y"][:], labels)
        store.close()


# -- bad input ---------------------------------------------------------------------------------


def test_non_number_names_file_row_and_column(tmp_path: Path) -> None:
    rows = [[i, i + 0.5, "a"] for i in range(10)]
    rows[7][1] = "12,5"  # a decimal comma, 8th data row, in the second block
    src = write_csv(tmp_path / "t.csv", ["p", "q", "label"], rows)
    with pytest.raises(CSVValueError) as info:
        ingest_csv(src, tmp_path / "s.zarr", label_column="label", block_rows=4, preshuffle=False)
    err = info.value
    assert (err.path, err.row, err.column, err.value) == (str(src), 7, "q", "12,5")
    message = str(err)
    assert str(src) in message and "row 7" in message and "'q'" in message and "'12,5'" in message
    assert isinstance(err, ValueError)


def test_failed_ingestion_leaves_nothing(tmp_path: Path, fmt: str) -> None:
    """An error after chunks were written leaves neither a store nor a partial one."""
    rows = [[i, "a"] for i in range(50)]
    rows[45][0] = "oops"
    src = write_csv(tmp_path / "t.csv", ["f", "label"], rows)
    with pytest.raises(CSVValueError, match="row 45"):
        ingest_csv(
            src, tmp_path / f"s{fmt}", label_column="label", block_rows=10, chunk_len=4, preshuffle=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


def test_first_bad_cell_is_reported_by_row_then_column(tmp_path: Path) -> None:
    rows = [["1", "2", "3"], ["4", "5", "bad"], ["x", "8", "9"], ["1", "1", "1"]]
    src = write_csv(tmp_path / "t.csv", ["a", "b", "c"], rows)
    with pytest.raises(CSVValueError) as info:
        ingest_csv(src, tmp_path / "s.zarr", preshuffle=False)
    assert (info.value.row, info.value.column, info.value.value) == (1, "c", "bad")


def test_booleans_are_not_numbers(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "t.csv", ["a", "flag"], [[1, "True"], [2, "False"]])
    with pytest.raises(CSVValueError) as info:
        ingest_csv(src, tmp_path / "s.zarr", preshuffle=False)
    assert (info.value.row, info.value.column, info.value.value) == (0, "flag", "True")


@pytest.mark.parametrize("marker", ["", "NA", "nan", " "])
def test_missing_feature_needs_allow_missing(tmp_path: Path, marker: str) -> None:
    src = write_csv(tmp_path / "t.csv", ["a", "b", "label"], [[1, 2, "u"], [3, marker, "v"], [5, 6, "u"]])
    with pytest.raises(CSVValueError, match="allow_missing=True") as info:
        ingest_csv(src, tmp_path / "s.zarr", label_column="label", preshuffle=False)
    assert (info.value.row, info.value.column) == (1, "b")
    assert not (tmp_path / "s.zarr").exists()

    store = ingest_csv(
        src, tmp_path / "s.zarr", label_column="label", allow_missing=True, block_rows=2, preshuffle=False
    )
    np.testing.assert_array_equal(store["x"][:], np.array([[1, 2], [3, np.nan], [5, 6]], dtype=np.float32))


def test_allow_missing_still_refuses_text(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "t.csv", ["a", "b"], [["", "2"], ["3", "four"]])
    with pytest.raises(CSVValueError) as info:
        ingest_csv(src, tmp_path / "s.zarr", allow_missing=True, preshuffle=False)
    assert (info.value.row, info.value.column, info.value.value) == (1, "b", "four")


def test_missing_label_names_the_row(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "t.csv", ["f", "label"], [[1, "a"], [2, "b"], [3, "a"], [4, ""], [5, "b"]])
    with pytest.raises(InvalidSourceError, match=r"row 3 .*no label in column 'label'"):
        ingest_csv(src, tmp_path / "s.zarr", label_column="label", block_rows=2, preshuffle=False)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match=r"nothere\.csv"):
        ingest_csv(tmp_path / "nothere.csv", tmp_path / "s.zarr", preshuffle=False)


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(SourceNotFoundError, match="empty"):
        ingest_csv(tmp_path / "empty.csv", tmp_path / "s.zarr", preshuffle=False)
    (tmp_path / "header.csv").write_text("a,b,label\n")
    with pytest.raises(SourceNotFoundError, match="no data rows"):
        ingest_csv(tmp_path / "header.csv", tmp_path / "s.zarr", label_column="label", preshuffle=False)


def test_unknown_columns_list_the_header(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "t.csv", ["a", "b", "label"], [[1, 2, "x"]])
    with pytest.raises(InvalidSourceError, match=r"no column 'target'.*\['a', 'b', 'label'\]"):
        ingest_csv(src, tmp_path / "s.zarr", label_column="target", preshuffle=False)
    with pytest.raises(InvalidSourceError, match=r"\['z'\].*\['a', 'b', 'label'\]"):
        ingest_csv(
            src, tmp_path / "s.zarr", label_column="label", feature_columns=["a", "z"], preshuffle=False
        )
    with pytest.raises(InvalidSourceError, match="both the label_column and a feature column"):
        ingest_csv(
            src, tmp_path / "s.zarr", label_column="label", feature_columns=["a", "label"], preshuffle=False
        )


def test_unparsable_file_names_delimiter(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,b\n1,2\n3,4,5,6\n")
    with pytest.raises(InvalidSourceError, match=r"cannot read .* as CSV.*delimiter=','"):
        ingest_csv(tmp_path / "t.csv", tmp_path / "s.zarr", preshuffle=False)


def test_existing_destination_needs_overwrite(tmp_path: Path) -> None:
    x, labels = table(4)
    src = write_table(tmp_path / "t.csv", x, labels)
    ingest_csv(src, tmp_path / "s.zarr", label_column="label", preshuffle=False)
    with pytest.raises(StoreExistsError):
        ingest_csv(src, tmp_path / "s.zarr", label_column="label", preshuffle=False)
    store = ingest_csv(src, tmp_path / "s.zarr", feature_columns=["a"], overwrite=True, preshuffle=False)
    assert store.fields["x"].shape == (4, 1)


def test_block_rows_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="block_rows"):
        ingest_csv(tmp_path / "t.csv", tmp_path / "s.zarr", block_rows=0, preshuffle=False)


@pytest.mark.parametrize("text", ["a,b,label\n1,2,u\n3,4,5,v\n", "a,b,label\n1,2,5,u\n3,4,v\n"])
def test_row_with_extra_fields_is_an_error(tmp_path: Path, text: str) -> None:
    """An unquoted delimiter inside a value must not shift the row's values silently."""
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(InvalidSourceError, match=r"line \d|more fields"):
        ingest_csv(tmp_path / "t.csv", tmp_path / "s.zarr", label_column="label", preshuffle=False)
    assert not (tmp_path / "s.zarr").exists()


def test_encoding(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_bytes("f,label\n1,caf\xe9\n2,th\xe9\n".encode("latin-1"))
    with pytest.raises(InvalidSourceError, match="encoding='utf-8'"):
        ingest_csv(tmp_path / "t.csv", tmp_path / "s.zarr", label_column="label", preshuffle=False)
    store = ingest_csv(
        tmp_path / "t.csv", tmp_path / "s.zarr", label_column="label", encoding="latin-1", preshuffle=False
    )
    assert store.metadata["class_names"] == ["café", "thé"]


@pytest.mark.parametrize(
    ("text", "row", "column"),
    [
        ("a,b,label\n1,1e39,0\n3,4,1\n", 0, "b"),
        ("a,b,label\n1,2,0\n3,-4e40,1\n", 1, "b"),
        ("a,b,label\n1,2,1e39\n3,4,1.5\n", 0, "label"),
    ],
)
def test_float32_overflow_is_an_error_naming_row_and_column(
    tmp_path, text: str, row: int, column: str
) -> None:
    """A finite value that float32 would store as inf is refused, never stored as inf."""
    src = tmp_path / "t.csv"
    src.write_text(text)
    with pytest.raises(CSVValueError, match="float32") as info:
        ingest_csv(src, tmp_path / "t.zarr", label_column="label", preshuffle=False)
    assert (info.value.row, info.value.column) == (row, column)
    assert not (tmp_path / "t.zarr").exists()


# -- exclude ------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["num", "text", "date"]), min_size=1, max_size=6),
    label=st.booleans(),
    fmt=st.sampled_from([".zarr", ".h5"]),
)
def test_exclude_drops_the_columns_named(kinds: list[str], label: bool, fmt: str) -> None:
    """Excluding every non-numeric column stores all the others, in file order, whatever the
    column kinds; a column left in that is not a number is an error naming it."""
    n = 4
    header = [f"{k}{j}" for j, k in enumerate(kinds)] + (["label"] if label else [])
    cell = {
        "num": lambda i, j: str(i * 10 + j),
        "text": lambda i, j: f"id{i}",
        "date": lambda i, j: f"2024-01-0{i + 1}",
    }
    rows = [
        [cell[k](i, j) for j, k in enumerate(kinds)] + (["cat" if i % 2 else "dog"] if label else [])
        for i in range(n)
    ]
    numeric = [h for h, k in zip(header, kinds, strict=False) if k == "num"]
    dropped = [h for h, k in zip(header, kinds, strict=False) if k != "num"]
    with tempfile.TemporaryDirectory() as d:
        src = write_csv(Path(d) / "t.csv", header, rows)
        kwargs = {"label_column": "label" if label else None, "preshuffle": False}
        if not numeric:
            with pytest.raises(InvalidSourceError, match="no feature columns"):
                ingest_csv(src, Path(d) / f"s{fmt}", exclude=dropped, **kwargs)
            return
        store = ingest_csv(src, Path(d) / f"s{fmt}", exclude=dropped, **kwargs)
        assert store.metadata["feature_names"] == numeric
        want = np.asarray([[float(r[header.index(c)]) for c in numeric] for r in rows], dtype=np.float32)
        np.testing.assert_array_equal(store["x"][:], want)
        store.close()
        if dropped:
            with pytest.raises(CSVValueError) as e:
                ingest_csv(src, Path(d) / f"t{fmt}", exclude=dropped[1:], **kwargs)
            assert e.value.column == dropped[0] and f"exclude=[{dropped[0]!r}]" in str(e.value)


def test_exclude_errors(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "t.csv", ["id", "a", "b", "label"], [["r0", 1, 2, "x"]])
    with pytest.raises(InvalidSourceError, match=r"no column\(s\) \['zz'\] \(exclude\)"):
        ingest_csv(src, tmp_path / "s.zarr", exclude=["zz"])
    with pytest.raises(InvalidSourceError, match="both the label_column and in exclude"):
        ingest_csv(src, tmp_path / "s.zarr", label_column="label", exclude=["label"])
    with pytest.raises(InvalidSourceError, match="both in feature_columns and in exclude"):
        ingest_csv(src, tmp_path / "s.zarr", feature_columns=["a", "id"], exclude=["id"])
    store = ingest_csv(src, tmp_path / "s.zarr", label_column="label", feature_columns=["b"], exclude="id")
    assert store.metadata["feature_names"] == ["b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
