"""Round trips through ``oocseq.ingest_arrays`` and the ``Store`` read API.

What is written must read back bit for bit: through ``store[name]``, ``store.read_chunk``,
and through plain zarr / h5py (the store is a plain Zarr v3 / HDF5 store).
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter for plain h5py reads)
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import oocseq
from oocseq.manifest import ALLOWED_DTYPES

#: Every dtype a field may have: the manifest's allowlist.
DTYPES = sorted(ALLOWED_DTYPES)
FORMATS = [".zarr", ".h5"]
COMPRESSIONS = [None, "lz4", "zstd", "zlib"]
MiB = 1 << 20

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


# -- helpers ---------------------------------------------------------------------------------
def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal shape, dtype and values (NaN == NaN), and the very same bytes (bit for bit)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    np.testing.assert_array_equal(actual, expected)
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def plain_read(path: Path, name: str) -> np.ndarray:
    """Read a field with zarr / h5py alone."""
    if path.suffix == ".zarr":
        return np.asarray(zarr.open_group(str(path), mode="r")[name][:])
    with h5py.File(path, "r") as f:
        return np.asarray(f[name][:])


def check_store(store: oocseq.Store, path: Path, expected: dict[str, np.ndarray], chunk_len: int) -> None:
    """Every read path of ``store`` gives ``expected`` (in source order), reordered as the
    store's pre-shuffle wrote it."""
    n = len(next(iter(expected.values())))
    order = store.source_index
    assert order is not None
    # the pre-shuffle is a permutation of the source rows (nothing lost or repeated)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    expected = {name: src[order] for name, src in expected.items()}
    assert len(store) == n
    # capped at n where n is known up front (arrays), as given for streams
    assert store.chunk_len in (chunk_len, min(chunk_len, max(n, 1)))
    assert store.num_chunks == math.ceil(n / store.chunk_len)
    assert list(store.fields) == list(expected)
    for name, src in expected.items():
        info = store.fields[name]
        assert tuple(info.shape) == src.shape
        assert np.dtype(info.dtype) == src.dtype
        assert_same(store[name][:], src)
        assert_same(np.asarray(store[name]), src)
        parts = [store.read_chunk(name, c) for c in range(store.num_chunks)]
        for c, part in enumerate(parts):
            assert_same(part, src[c * chunk_len : (c + 1) * chunk_len])
        assert_same(plain_read(path, name), src)
    store.verify()


def rng_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random values over the dtype's whole range, with NaN / inf / -0.0 for floats."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
    if dt.kind == "f":
        out = rng.standard_normal(shape).astype(dt) * dt.type(100)
        flat = out.reshape(-1)
        specials = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=dt)
        flat[: min(len(flat), 4)] = specials[: min(len(flat), 4)]
        return out
    real = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    out = real.astype(dt)
    if out.size:
        out.reshape(-1)[0] = complex(np.nan, 1.0)
    return out


# -- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_compression_round_trips(tmp_path: Path, fmt: str, dtype: str) -> None:
    rng = np.random.default_rng(DTYPES.index(dtype))
    for k, compression in enumerate(COMPRESSIONS):
        # n=7 with chunk_len=3: a short last chunk; sample shapes of 0..2 dims.
        src = {
            "x": rng_array(rng, dtype, (7, 2, 3)),
            "v": rng_array(rng, dtype, (7, 4)),
            "s": rng_array(rng, dtype, (7,)),
        }
        path = tmp_path / f"s{k}{fmt}"
        store = oocseq.ingest_arrays(path, src, chunk_len=3, compression=compression)
        check_store(store, path, src, 3)
        meta = store.metadata
        if compression is None:
            assert meta["compression"] is None
        else:
            assert meta["compression"]["cname"] == compression
        store.close()


@st.composite
def array_cases(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], int, str | None, str]:
    n = draw(st.integers(1, 25))
    chunk_len = draw(st.integers(1, 30))
    fields = {}
    for name in draw(
        st.lists(st.sampled_from(["x", "y", "w.1", "Z-2"]), min_size=1, max_size=2, unique=True)
    ):
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        sample = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=3))
        fields[name] = draw(hnp.arrays(dtype, (n, *sample)))
    return fields, chunk_len, draw(st.sampled_from(COMPRESSIONS)), draw(st.sampled_from(FORMATS))


@SETTINGS
@given(array_cases())
@example(({"x": np.array([1.5])}, 1, None, ".zarr"))  # n = 1
@example(({"x": np.arange(5, dtype=np.int16)}, 8, "zstd", ".h5"))  # n < chunk_len
@example(({"x": np.arange(7, dtype=np.uint64)[:, None]}, 3, "zlib", ".zarr"))  # n % chunk_len != 0
def test_round_trip_property(case: tuple[dict[str, np.ndarray], int, str | None, str]) -> None:
    fields, chunk_len, compression, fmt = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"store{fmt}"
        store = oocseq.ingest_arrays(path, fields, chunk_len=chunk_len, compression=compression)
        try:
            check_store(store, path, fields, chunk_len)
            reopened = oocseq.open_store(path)
            check_store(reopened, path, fields, chunk_len)
            reopened.close()
        finally:
            store.close()


@SETTINGS
@given(
    n=st.integers(1, 40),
    chunk_len=st.integers(1, 12),
    fmt=st.sampled_from(FORMATS),
    data=st.data(),
)
def test_field_view_indexing_matches_numpy(n: int, chunk_len: int, fmt: str, data: st.DataObject) -> None:
    """``store[name][key]`` equals ``source[key]`` for ints, slices, index arrays, masks, and
    keys over the sample axes too (samples of shape (2, 3): axis 1 is not the last axis)."""
    src = np.arange(n * 6, dtype=np.int32).reshape(n, 2, 3) * 3 - 7
    with tempfile.TemporaryDirectory() as d:
        store = oocseq.ingest_arrays(Path(d) / f"s{fmt}", {"x": src}, chunk_len=chunk_len)
        src = src[store.source_index]  # indexing is over the stored order
        view = store["x"]
        assert view.shape == src.shape and view.dtype == src.dtype and len(view) == n and view.ndim == 3
        i = data.draw(st.integers(-n, n - 1), label="i")
        assert_same(view[i], src[i])
        assert_same(view[np.int64(i)], src[i])
        start = data.draw(st.integers(-n - 2, n + 2), label="start")
        stop = data.draw(st.integers(-n - 2, n + 2), label="stop")
        step = data.draw(st.sampled_from([None, 1, 2, 3, -1, -2]), label="step")
        assert_same(view[start:stop:step], src[start:stop:step])
        idx = np.array(data.draw(st.lists(st.integers(-n, n - 1), max_size=10), label="idx"), dtype=np.int64)
        assert_same(view[idx], src[idx])
        mask = data.draw(hnp.arrays(bool, (n,)), label="mask")
        assert_same(view[mask], src[mask])
        j = data.draw(st.integers(0, 1), label="j")
        k = data.draw(st.integers(-3, 2), label="k")
        assert_same(view[i, j], src[i, j])
        assert_same(view[i, j, k], src[i, j, k])
        assert_same(view[start:stop, j], src[start:stop, j])
        assert_same(view[start:stop, :, k], src[start:stop, :, k])
        assert_same(view[idx, j], src[idx, j])
        assert_same(view[:, j, 1:], src[:, j, 1:])
        store.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_field_view_ellipsis(tmp_path: Path, fmt: str) -> None:
    """``view[...]`` is the usual numpy / h5py / zarr way to read a whole array."""
    src = np.arange(60, dtype=np.float32).reshape(10, 2, 3)
    store = oocseq.ingest_arrays(tmp_path / f"s{fmt}", {"x": src}, chunk_len=4, preshuffle=False)
    view = store["x"]
    assert_same(view[...], src)
    assert_same(view[..., 1], src[..., 1])
    assert_same(view[2:5, ...], src[2:5, ...])
    assert_same(view[0, ...], src[0, ...])
    assert_same(view[3, ..., 2], src[3, ..., 2])


# -- kinds of input --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s.hdf5", "s.H5", "s.HDF5", "s.ZARR"])
def test_other_suffixes(tmp_path: Path, name: str) -> None:
    src = np.arange(9, dtype=np.int16).reshape(3, 3)
    store = oocseq.ingest_arrays(tmp_path / name, {"x": src}, chunk_len=2, preshuffle=False)
    assert store.format == ("zarr" if name.lower().endswith(".zarr") else "hdf5")
    assert_same(oocseq.open_store(tmp_path / name)["x"][:], src)


@pytest.mark.parametrize("fmt", FORMATS)
def test_memmap_input(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(1)
    src = rng.standard_normal((53, 4, 3)).astype(np.float32)
    raw = tmp_path / "raw.bin"
    src.tofile(raw)
    mm = np.memmap(raw, dtype=np.float32, mode="r", shape=src.shape)
    labels = np.lib.format.open_memmap(tmp_path / "y.npy", mode="w+", dtype=np.int16, shape=(53,))
    labels[:] = np.arange(53) - 20
    labels.flush()
    y = np.load(tmp_path / "y.npy", mmap_mode="r")
    path = tmp_path / f"s{fmt}"
    store = oocseq.ingest_arrays(path, {"x": mm, "y": y}, chunk_len=10, compression="zstd")
    check_store(store, path, {"x": src, "y": np.arange(53, dtype=np.int16) - 20}, 10)


@pytest.mark.parametrize("fmt", FORMATS)
def test_h5py_dataset_input(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(2)
    src = rng.integers(0, 255, (37, 5, 5), dtype=np.uint8)
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f.create_dataset("images", data=src, chunks=(4, 5, 5))
        f.create_dataset("labels", data=np.arange(37, dtype=np.int64))
    path = tmp_path / f"s{fmt}"
    with h5py.File(tmp_path / "in.h5", "r") as f:
        store = oocseq.ingest_arrays(path, {"x": f["images"], "y": f["labels"]}, chunk_len=8)
    check_store(store, path, {"x": src, "y": np.arange(37, dtype=np.int64)}, 8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_list_input(tmp_path: Path, fmt: str) -> None:
    x = [[1.5, 2.0], [3.0, -4.0], [5.0, 6.25]]
    y = [True, False, True]
    path = tmp_path / f"s{fmt}"
    store = oocseq.ingest_arrays(path, {"x": x, "y": y}, chunk_len=2)
    check_store(store, path, {"x": np.asarray(x), "y": np.asarray(y)}, 2)


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8).filter(lambda s: sum(s) > 0),
    chunk_len=st.integers(1, 10),
    fmt=st.sampled_from(FORMATS),
    y_as_array=st.booleans(),
)
def test_streaming_generator_of_batches(sizes: list[int], chunk_len: int, fmt: str, y_as_array: bool) -> None:
    """Batches of varying size (empty ones included) are concatenated in order."""
    n = sum(sizes)
    x = np.arange(n * 6, dtype=np.float64).reshape(n, 2, 3) / 7
    y = (np.arange(n) % 5).astype(np.uint8)
    bounds = np.cumsum([0, *sizes])

    def batches(a: np.ndarray):
        for s, e in itertools.pairwise(bounds):
            yield a[s:e]

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"s{fmt}"
        fields = {"x": batches(x), "y": y if y_as_array else batches(y)}
        store = oocseq.ingest_arrays(path, fields, chunk_len=chunk_len)
        check_store(store, path, {"x": x, "y": y}, chunk_len)
        store.close()


def test_streaming_memory_is_bounded(tmp_path: Path) -> None:
    """A 32 MiB generator input never needs much more than a few chunks in memory."""
    batch = 256 * 1024 // 8  # 256 KiB of float64 per batch

    def gen():
        for k in range(128):
            yield np.full((batch,), float(k))

    tracemalloc.start()
    try:
        store = oocseq.ingest_arrays(tmp_path / "s.h5", {"x": gen()}, chunk_len=2 * batch, preshuffle=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(store) == 128 * batch
    assert peak < 12 * MiB, f"peak traced memory {peak / MiB:.1f} MiB for 32 MiB of input"
    assert_same(store.read_chunk("x", 5), np.repeat([10.0, 11.0], batch))


def test_preshuffled_stream_memory_is_bounded(tmp_path: Path) -> None:
    """Spooled to disk and read back shuffled: memory still holds a few chunks, not the data."""
    batch = 256 * 1024 // 8

    def gen():
        for k in range(128):
            yield np.full((batch,), float(k))

    tracemalloc.start()
    try:
        store = oocseq.ingest_arrays(tmp_path / "s.h5", {"x": gen()}, chunk_len=2 * batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert store.metadata["preshuffle"] is not None
    assert peak < 12 * MiB, f"peak traced memory {peak / MiB:.1f} MiB for 32 MiB of input"
    assert_same(store["x"][:], np.repeat(np.arange(128.0), batch)[store.source_index])


# -- chunk_len=None --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_default_chunk_len_is_about_4_mib(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, (500, 64, 64, 3), dtype=np.uint8)  # 12 KiB per sample
    y = np.arange(500, dtype=np.int64)
    path = tmp_path / f"s{fmt}"
    store = oocseq.ingest_arrays(path, {"y": y, "x": x})
    chunk_bytes = store.chunk_len * x[0].nbytes  # the widest field decides
    assert 1 * MiB <= chunk_bytes <= 8 * MiB, chunk_bytes
    assert store.num_chunks >= 2
    check_store(store, path, {"y": y, "x": x}, store.chunk_len)


@pytest.mark.parametrize(
    ("sample", "dtype"),
    [((10,), "float32"), ((), "bool"), ((3, 7), "complex128"), ((300, 1000), "uint16")],
)
def test_default_chunk_len_for_narrow_fields(tmp_path: Path, sample: tuple[int, ...], dtype: str) -> None:
    sample_bytes = math.prod(sample) * np.dtype(dtype).itemsize
    # enough samples that the data is longer than one chunk of about 4 MiB
    n = 4 * MiB // sample_bytes + 2
    x = np.ones((n, *sample), dtype=dtype)
    store = oocseq.ingest_arrays(tmp_path / "big.h5", {"x": x})
    assert store.chunk_len < n
    chunk_bytes = store.chunk_len * sample_bytes
    assert 1 * MiB <= chunk_bytes <= 8 * MiB, (store.chunk_len, chunk_bytes)
    assert_same(store.read_chunk("x", store.num_chunks - 1), x[(store.num_chunks - 1) * store.chunk_len :])
    # little data: one chunk of at most about 4 MiB, holding everything
    small = np.ones((5, *sample), dtype=dtype)
    store = oocseq.ingest_arrays(tmp_path / "small.zarr", {"x": small})
    assert store.num_chunks == 1
    assert store.chunk_len * sample_bytes <= 8 * MiB
    assert_same(store["x"][:], small)


def test_default_chunk_len_huge_sample(tmp_path: Path) -> None:
    x = np.zeros((2, 3, 1024, 1024), dtype=np.float32)  # 12 MiB per sample
    x[1, 2, 3, 4] = 5.0
    store = oocseq.ingest_arrays(tmp_path / "s.zarr", {"x": x}, compression="lz4")
    assert store.chunk_len >= 1
    assert store.num_chunks == math.ceil(2 / store.chunk_len)
    assert_same(store["x"][1], x[1])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batches", [3, 200])  # 12 samples (96 KiB), 800 samples (6.25 MiB)
def test_default_chunk_len_streaming(tmp_path: Path, fmt: str, batches: int) -> None:
    """A stream of unknown length gets about 4 MiB chunks, or one chunk of exactly its samples
    when it ends before filling one."""

    def gen(y=False):
        for b in range(batches):
            yield (
                np.arange(4 * b, 4 * b + 4) if y else np.full((4, 32, 32), b, dtype=np.float64)
            )  # 8 KiB/sample

    store = oocseq.ingest_arrays(tmp_path / f"s{fmt}", {"x": gen(), "y": gen(y=True)}, preshuffle=False)
    assert len(store) == 4 * batches
    if batches == 3:
        assert store.chunk_len == 12 and store.num_chunks == 1
    else:
        assert 1 * MiB <= store.chunk_len * 8 * 1024 <= 8 * MiB and store.num_chunks > 1
    assert_same(store["y"][0 : len(store)], np.arange(4 * batches))
    assert_same(store["x"][len(store) - 1], np.full((32, 32), batches - 1, dtype=np.float64))
    store.verify()


# -- description -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_fields_len_and_metadata(tmp_path: Path, fmt: str, compression: str | None) -> None:
    x = np.zeros((11, 2, 3), dtype=np.float16)
    y = np.arange(11, dtype=np.uint32)
    user = {"author": "me", "classes": ["a", "b"], "nested": {"k": [1, 2.5, None]}, "np": np.int64(3)}
    store = oocseq.ingest_arrays(
        tmp_path / f"s{fmt}", {"x": x, "y": y}, chunk_len=4, compression=compression, metadata=user
    )
    assert len(store) == 11
    assert store.chunk_len == 4
    assert store.num_chunks == 3
    assert {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in store.fields.items()} == {
        "x": ((11, 2, 3), np.dtype(np.float16)),
        "y": ((11,), np.dtype(np.uint32)),
    }
    assert "x" in store and "nope" not in store and list(store) == ["x", "y"]
    meta = store.metadata
    assert meta["format_version"] == 2
    assert meta["checksum"] == "crc32c"
    assert meta["author"] == "me"
    assert meta["classes"] == ["a", "b"]
    assert meta["nested"] == {"k": [1, 2.5, None]}
    assert meta["np"] == 3
    if compression is None:
        assert meta["compression"] is None
    else:
        assert meta["compression"]["cname"] == compression
    json.dumps(meta)  # plain JSON
    # The same after reopening from disk.
    again = oocseq.open_store(tmp_path / f"s{fmt}")
    assert again.metadata == meta
    assert again.fields == store.fields


def test_user_metadata_cannot_fake_format_facts(tmp_path: Path) -> None:
    """User metadata must not shadow what the store really is (format version, compression):
    either the reserved keys are refused, or the store's own values win."""
    user = {"format_version": 99, "compression": "none-at-all"}
    try:
        store = oocseq.ingest_arrays(
            tmp_path / "s.zarr", {"x": np.arange(3)}, compression="zstd", metadata=user
        )
    except ValueError:
        return
    assert store.metadata["format_version"] == 2
    assert store.metadata["compression"]["cname"] == "zstd"


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_passes_on_good_store(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(4)
    store = oocseq.ingest_arrays(
        tmp_path / f"s{fmt}", {"x": rng.standard_normal((23, 3)), "y": rng.integers(0, 9, 23)}, chunk_len=5
    )
    assert store.verify() == 2 * 5  # chunks checked: 2 fields of 5 chunks
    assert oocseq.open_store(tmp_path / f"s{fmt}").verify() == 10


def test_store_opens_without_oocseq(tmp_path: Path) -> None:
    """A fresh interpreter that never imports oocseq reads both formats with zarr / h5py."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((13, 2, 2)).astype(np.float32)
    y = rng.integers(-5, 5, 13).astype(np.int8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    oocseq.ingest_arrays(
        tmp_path / "s.zarr", {"x": x, "y": y}, chunk_len=4, compression="zstd", preshuffle=False
    )
    oocseq.ingest_arrays(
        tmp_path / "s.h5", {"x": x, "y": y}, chunk_len=4, compression="lz4", preshuffle=False
    )
    code = """
import sys, numpy as np, zarr, h5py, hdf5plugin
d = sys.argv[1]
x, y = np.load(d + "/x.npy"), np.load(d + "/y.npy")
g = zarr.open_group(d + "/s.zarr", mode="r")
assert np.array_equal(g["x"][:], x) and g["x"].dtype == x.dtype
assert np.array_equal(g["y"][:], y) and g["y"].dtype == y.dtype
with h5py.File(d + "/s.h5", "r") as f:
    assert np.array_equal(f["x"][:], x) and f["x"].dtype == x.dtype
    assert np.array_equal(f["y"][:], y) and f["y"].dtype == y.dtype
assert "oocseq" not in sys.modules
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("compression", [None, "lz4"])
def test_concurrent_reads_from_threads(tmp_path: Path, fmt: str, compression: str | None) -> None:
    """One Store shared by several threads: every read is still right."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, 5)).astype(np.float32)
    store = oocseq.ingest_arrays(
        tmp_path / f"s{fmt}", {"x": x}, chunk_len=7, compression=compression, preshuffle=False
    )
    store = oocseq.open_store(tmp_path / f"s{fmt}")  # fresh: handles are opened by the threads

    def work(seed: int) -> bool:
        r = np.random.default_rng(seed)
        for _ in range(40):
            c = int(r.integers(0, store.num_chunks))
            assert_same(store.read_chunk("x", c), x[c * 7 : (c + 1) * 7])
            idx = r.integers(0, 200, 9)
            assert_same(store["x"][idx], x[idx])
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


# -- pickling and processes ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_pickle_is_small_and_works(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((256, 512))  # 1 MiB
    store = oocseq.ingest_arrays(tmp_path / f"s{fmt}", {"x": x}, chunk_len=32, preshuffle=False)
    assert_same(store.read_chunk("x", 0), x[:32])  # open the file handle first
    blob = pickle.dumps(store)
    assert len(blob) < 4096, len(blob)
    clone = pickle.loads(blob)
    assert len(clone) == 256 and clone.chunk_len == 32 and clone.fields == store.fields
    for c in range(clone.num_chunks):
        assert_same(clone.read_chunk("x", c), x[c * 32 : (c + 1) * 32])
    assert_same(clone["x"][:], x)
    clone.verify()
    store.close()
    clone.close()


def _child_read(store: oocseq.Store, queue: mp.Queue) -> None:  # runs in the child process
    try:
        chunks = [store.read_chunk(name, c) for name in store.fields for c in range(store.num_chunks)]
        store.verify()
        queue.put(("ok", os.getpid(), chunks))
    except BaseException as e:  # report, do not hang the parent
        queue.put(("error", os.getpid(), repr(e)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_store_in_child_process(tmp_path: Path, fmt: str, method: str) -> None:
    if method not in mp.get_all_start_methods():
        pytest.skip(f"{method} is not available on this platform")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((20, 3)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    store = oocseq.ingest_arrays(tmp_path / f"s{fmt}", {"x": x, "y": y}, chunk_len=6, preshuffle=False)
    store.read_chunk("x", 0)  # the parent holds an open handle when the child starts
    ctx = mp.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_read, args=(store, queue))
    proc.start()
    try:
        status, pid, payload = queue.get(timeout=120)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=10)
    assert status == "ok", payload
    assert pid != os.getpid()
    assert proc.exitcode == 0
    expected = [src[c * 6 : (c + 1) * 6] for src in (x, y) for c in range(store.num_chunks)]
    assert len(payload) == len(expected)
    for got, want in zip(payload, expected, strict=True):
        assert_same(got, want)
    # The parent's handle still works after the child used its own.
    assert_same(store["x"][:], x)
