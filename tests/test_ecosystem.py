"""Stores open in xarray: ``xarray.open_zarr`` and ``xarray.open_dataset(engine="h5netcdf")``
see every field as a variable, with named dimensions ("sample" for axis 0), and equal values."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import oocseq
from oocseq import CorruptStoreError
from oocseq.manifest import FieldSpec, with_dims

FORMATS = (".zarr", ".h5")


def open_xr(path: Path) -> xr.Dataset:
    if path.suffix == ".zarr":
        return xr.open_zarr(path)
    return xr.open_dataset(path, engine="h5netcdf")


# Field names include ones that collide with the dimension names oocseq picks.
NAMES = ["x", "y", "sample", "height", "feature", "x_dim1", "img", "w"]
DTYPES = ["bool", "uint8", "int16", "int64", "uint32", "float32", "float64"]


@st.composite
def stores(draw: st.DrawFn) -> tuple[int, dict[str, np.ndarray]]:
    n = draw(st.integers(1, 20))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    fields = {}
    for name in names:
        shape = tuple(draw(st.lists(st.integers(1, 4), max_size=2)))
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        fields[name] = (
            rng.integers(0, 100, (n, *shape)) if dtype.kind != "f" else rng.normal(size=(n, *shape))
        ).astype(dtype)
    return n, fields


@settings(max_examples=12)
@given(data=stores(), fmt=st.sampled_from(FORMATS))
def test_xarray_opens_any_store(data: tuple[int, dict[str, np.ndarray]], fmt: str) -> None:
    n, fields = data
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"s{fmt}"
        store = oocseq.ingest_arrays(path, fields, preshuffle=False, chunk_len=7)
        with open_xr(path) as ds:
            assert sorted(ds.data_vars) == sorted(fields)
            assert not ds.coords  # dimensions only: no field became a coordinate
            for name, values in fields.items():
                var = ds[name]
                assert var.dims == store.manifest.fields[name].dims
                assert var.dims[0] in ("sample", "_sample")
                assert var.dtype == values.dtype
                np.testing.assert_array_equal(var.values, values)
            # One size per dimension name: the dataset would not open otherwise, and the
            # sample axis is n everywhere.
            assert ds.sizes[next(iter(ds.data_vars.values())).dims[0]] == n
            assert json.loads(ds.attrs["oocseq"])["n"] == n if fmt == ".h5" else ds.attrs["oocseq"]["n"] == n
        store.close()
        assert len(oocseq.open_store(path)) == n


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_dims_are_named(tmp_path: Path, fmt: str) -> None:
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (5, 4), (i * 40, 0, 0)).save(tmp_path / "src" / c / f"{i}.png")
    store = oocseq.ingest_image_folder(tmp_path / "src", tmp_path / f"s{fmt}", image_size=(4, 5))
    with open_xr(store.path) as ds:
        assert ds["x"].dims == ("sample", "height", "width", "channel")
        assert dict(ds.sizes) == {"sample": 6, "height": 4, "width": 5, "channel": 3}
        assert ds["y"].dims == ("sample",)
        np.testing.assert_array_equal(ds["x"].values, store["x"][:])


@pytest.mark.parametrize("fmt", FORMATS)
def test_csv_features_dim(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,cat\n3,4,dog\n5,6,cat\n")
    store = oocseq.ingest_csv(tmp_path / "t.csv", tmp_path / f"s{fmt}", label_column="label")
    with open_xr(store.path) as ds:
        assert ds["x"].dims == ("sample", "feature")
        np.testing.assert_array_equal(ds["x"].values, store["x"][:])


def test_with_dims_names_and_collisions() -> None:
    u8 = np.dtype(np.uint8)
    img = FieldSpec((4, 5, 3), u8, dims=("height", "width", "channel"))
    got = with_dims({"x": img, "height": FieldSpec((), u8), "m": FieldSpec((4, 6, 3), u8, dims=img.dims)})
    assert got["x"].dims == ("sample", "x_height", "width", "channel")
    assert got["height"].dims == ("sample",)
    # the same name with another size becomes the field's own
    assert got["m"].dims == ("sample", "m_height", "m_width", "channel")
    got = with_dims({"sample": FieldSpec((2,), u8), "b": FieldSpec((2,), u8)})
    assert got["sample"].dims == ("_sample", "sample_dim1") and got["b"].dims == ("_sample", "b_dim1")


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_without_dims_still_opens(tmp_path: Path, fmt: str) -> None:
    """Stores written before axes were named (no ``dims`` in the manifest, no Zarr
    dimension_names, no HDF5 dimension scales) open and read as before."""
    path = tmp_path / f"old{fmt}"
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    oocseq.ingest_arrays(path, {"x": x}, preshuffle=False).close()
    if fmt == ".zarr":
        meta = path / "x" / "zarr.json"
        doc = json.loads(meta.read_text())
        del doc["dimension_names"]
        meta.write_text(json.dumps(doc))
        root = json.loads((path / "zarr.json").read_text())
        del root["consolidated_metadata"]
        for spec in root["attributes"]["oocseq"]["fields"].values():
            del spec["dims"]
        (path / "zarr.json").write_text(json.dumps(root))
    else:
        with h5py.File(path, "r+") as f:
            f["x"].dims[0].detach_scale(f["sample"])
            f["x"].dims[1].detach_scale(f["x_dim1"])
            del f["sample"], f["x_dim1"]
            doc = json.loads(f.attrs["oocseq"])
            for spec in doc["fields"].values():
                del spec["dims"]
            f.attrs["oocseq"] = json.dumps(doc)
    with oocseq.open_store(path) as store:
        assert store.manifest.fields["x"].dims is None
        np.testing.assert_array_equal(store["x"][:], x)
        assert store.verify() == 1


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dims", [["sample"], "sample", ["sample", "../x"], ["sample", 3]])
def test_malformed_dims_refused(tmp_path: Path, fmt: str, dims: object) -> None:
    path = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(path, {"x": np.zeros((4, 2), np.float32)}, preshuffle=False).close()
    if fmt == ".zarr":
        root = json.loads((path / "zarr.json").read_text())
        root["attributes"]["oocseq"]["fields"]["x"]["dims"] = dims
        (path / "zarr.json").write_text(json.dumps(root))
    else:
        with h5py.File(path, "r+") as f:
            doc = json.loads(f.attrs["oocseq"])
            doc["fields"]["x"]["dims"] = dims
            f.attrs["oocseq"] = json.dumps(doc)
    with pytest.raises(CorruptStoreError, match="dims"):
        oocseq.open_store(path)


def test_consolidated_metadata_is_not_trusted(tmp_path: Path) -> None:
    """oocseq reads each array's own zarr.json: a consolidated copy that lies about a field's
    codecs does not change what oocseq checks."""
    path = tmp_path / "s.zarr"
    x = np.arange(12, dtype=np.int64)
    oocseq.ingest_arrays(path, {"x": x}, preshuffle=False).close()
    root = json.loads((path / "zarr.json").read_text())
    root["consolidated_metadata"]["metadata"]["x"]["codecs"] = [
        {"name": "bytes", "configuration": {"endian": "big"}}
    ]
    (path / "zarr.json").write_text(json.dumps(root))
    with oocseq.open_store(path) as store:
        np.testing.assert_array_equal(store["x"][:], x)
