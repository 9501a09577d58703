"""``ingest_npy``: memory-mapped ``.npy`` files concatenated along axis 0, and bad input."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from oocseq.errors import FieldLengthError, InvalidSourceError, SourceNotFoundError
from oocseq.ingest.npy import ingest_npy
from oocseq.store import open_store


def save(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


def test_one_file_round_trip(tmp_path: Path, fmt: str) -> None:
    x = np.random.default_rng(0).integers(0, 255, size=(37, 4, 5), dtype=np.uint8)
    src = save(tmp_path / "x.npy", x)
    store = ingest_npy(src, tmp_path / f"s{fmt}", chunk_len=8)  # 37 = 4 chunks of 8 and one of 5

    store = open_store(store.path)
    assert store.fields["x"].shape == (37, 4, 5) and store.fields["x"].dtype == np.uint8
    np.testing.assert_array_equal(store["x"][:], x[store.source_index])
    assert store.metadata["source"] == {
        "kind": "npy",
        "files": [{"field": "x", "path": str(src.resolve()), "rows": 37}],
    }
    store.verify()


def test_files_are_concatenated_in_order(tmp_path: Path, fmt: str) -> None:
    parts = [
        np.arange(i * 100, i * 100 + k, dtype=np.float64).reshape(-1, 1) for i, k in enumerate([5, 0, 9, 1])
    ]
    files = [save(tmp_path / f"p{i}.npy", p) for i, p in enumerate(parts)]
    store = ingest_npy([str(f) for f in files], tmp_path / f"s{fmt}", field="feats", chunk_len=4)
    assert list(store.fields) == ["feats"]
    np.testing.assert_array_equal(store["feats"][:], np.concatenate(parts)[store.source_index])
    rows = [(f["path"], f["rows"]) for f in store.metadata["source"]["files"]]
    assert rows == [(str(f.resolve()), len(p)) for f, p in zip(files, parts, strict=True)]


def test_several_fields_split_differently(tmp_path: Path, fmt: str) -> None:
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    y = np.arange(10, dtype=np.int64) % 3
    xs = [save(tmp_path / "x0.npy", x[:7]), save(tmp_path / "x1.npy", x[7:])]
    ys = [save(tmp_path / "y0.npy", y[:2]), save(tmp_path / "y1.npy", y[2:])]
    store = ingest_npy({"x": xs, "y": ys}, tmp_path / f"s{fmt}", chunk_len=3)
    np.testing.assert_array_equal(store["x"][:], x[store.source_index])
    np.testing.assert_array_equal(store["y"][:], y[store.source_index])
    assert [f["field"] for f in store.metadata["source"]["files"]] == ["x", "x", "y", "y"]


def test_big_endian_and_fortran_order(tmp_path: Path) -> None:
    x = np.asfortranarray(np.arange(24, dtype=">f4").reshape(6, 4))
    store = ingest_npy(save(tmp_path / "x.npy", x), tmp_path / "s.h5", chunk_len=4)
    assert store.fields["x"].dtype == np.dtype("float32")
    np.testing.assert_array_equal(store["x"][:], x[store.source_index])


def test_small_input_is_one_chunk_of_its_own_size(tmp_path: Path) -> None:
    store = ingest_npy(save(tmp_path / "x.npy", np.ones((10, 2))), tmp_path / "s.zarr")
    assert store.chunk_len == 10 and store.num_chunks == 1


@settings(max_examples=20, deadline=None)
@given(
    x=hnp.arrays(
        st.sampled_from([np.uint8, np.int32, np.float32, np.float64, np.bool_]),
        st.tuples(st.integers(1, 50), st.integers(1, 3)),
    ),
    cuts=st.lists(st.integers(0, 50), max_size=4),
    chunk_len=st.integers(1, 60),
    fmt=st.sampled_from([".zarr", ".h5"]),
    big_endian=st.booleans(),
    preshuffle=st.booleans(),
    workers=st.sampled_from([1, 2]),
)
def test_round_trip_property(
    x: np.ndarray,
    cuts: list[int],
    chunk_len: int,
    fmt: str,
    big_endian: bool,
    preshuffle: bool,
    workers: int,
) -> None:
    """Any array, split into files at any points, in either byte order, read and encoded in
    the calling thread or in worker threads, reads back bit for bit (with checksums that
    match: every chunk read is checked)."""
    with tempfile.TemporaryDirectory() as tmp:
        pieces = np.split(x, sorted(min(c, len(x)) for c in cuts))
        stored = [p.astype(p.dtype.newbyteorder(">")) if big_endian else p for p in pieces]
        files = [save(Path(tmp) / f"p{i}.npy", p) for i, p in enumerate(stored)]
        store = ingest_npy(
            files, Path(tmp) / f"s{fmt}", chunk_len=chunk_len, preshuffle=preshuffle, workers=workers
        )
        out = store["x"][:]
        assert out.dtype == x.dtype
        assert out.tobytes() == x[store.source_index].tobytes()
        store.verify()  # raises CorruptStoreError for a chunk whose checksum does not match
        store.close()


# -- bad input ---------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    first = save(tmp_path / "a.npy", np.ones((3, 2)))
    with pytest.raises(SourceNotFoundError, match=r"b\.npy"):
        ingest_npy([first, tmp_path / "b.npy"], tmp_path / "s.zarr")


def test_dtype_mismatch_names_the_file(tmp_path: Path) -> None:
    a = save(tmp_path / "a.npy", np.ones((3, 2), dtype=np.float32))
    b = save(tmp_path / "b.npy", np.ones((3, 2), dtype=np.float64))
    with pytest.raises(
        InvalidSourceError, match=r"'.*b\.npy' holds samples of shape \(2,\) and dtype float64"
    ) as info:
        ingest_npy([a, b], tmp_path / "s.zarr")
    assert "a.npy" in str(info.value)
    assert not (tmp_path / "s.zarr").exists()


def test_shape_mismatch_names_the_file(tmp_path: Path) -> None:
    a = save(tmp_path / "a.npy", np.ones((3, 2)))
    b = save(tmp_path / "b.npy", np.ones((3, 3)))
    with pytest.raises(InvalidSourceError, match=r"b\.npy' holds samples of shape \(3,\)"):
        ingest_npy([a, b], tmp_path / "s.zarr")


def test_object_array_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidSourceError, match=r"o\.npy.*object arrays are refused"):
        ingest_npy(tmp_path / "o.npy", tmp_path / "s.zarr")


def test_non_npy_files_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "z.npz", x=np.ones(3))
    with pytest.raises(InvalidSourceError, match=r"z\.npz' is not a \.npy file"):
        ingest_npy(tmp_path / "z.npz", tmp_path / "s.zarr")
    (tmp_path / "t.npy").write_text("not numpy")
    with pytest.raises(InvalidSourceError, match=r"t\.npy' is not a \.npy file"):
        ingest_npy(tmp_path / "t.npy", tmp_path / "s.zarr")


def test_scalar_string_and_empty_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="scalar"):
        ingest_npy(save(tmp_path / "s.npy", np.float32(3)), tmp_path / "s.zarr")
    with pytest.raises(InvalidSourceError, match=r"u\.npy.*dtype <U"):
        ingest_npy(save(tmp_path / "u.npy", np.array(["ab", "c"])), tmp_path / "s.zarr")
    with pytest.raises(InvalidSourceError, match="no samples"):
        ingest_npy(save(tmp_path / "e.npy", np.ones((0, 2))), tmp_path / "s.zarr")
    with pytest.raises(InvalidSourceError, match=r"no \.npy files"):
        ingest_npy([], tmp_path / "s.zarr")


def test_fields_of_different_lengths(tmp_path: Path) -> None:
    x = save(tmp_path / "x.npy", np.ones((5, 2)))
    y = save(tmp_path / "y.npy", np.ones(4))
    with pytest.raises(FieldLengthError, match=r"x=5.*y=4"):
        ingest_npy({"x": x, "y": y}, tmp_path / "s.zarr")
