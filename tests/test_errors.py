"""Bad input gets a clear error, of the right type, naming what is wrong, and nothing is lost.

Every error is checked for its oocseq class AND the matching built-in, and for a message that
names the offending path / field / row / chunk. Failed or interrupted ingestions must leave
nothing at the destination (and no hidden ``.partial`` leftovers next to it).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import oocseq
from oocseq import (
    CorruptStoreError,
    FieldLengthError,
    FieldNotFoundError,
    ImageDecodeError,
    InvalidSourceError,
    NotAStoreError,
    OocseqError,
    SourceNotFoundError,
    StoreExistsError,
    StoreNotFoundError,
)

FORMATS = [".zarr", ".h5"]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers ---------------------------------------------------------------------------------
def check_error(err: BaseException, oocseq_type: type, builtin: type, *needles: str) -> None:
    """``err`` is an ``oocseq_type`` and a ``builtin``, and its message contains every needle."""
    assert isinstance(err, oocseq_type), type(err).__mro__
    assert isinstance(err, OocseqError)
    assert isinstance(err, builtin), type(err).__mro__
    msg = str(err)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message {msg!r}"


def names_field(msg: str, field: str) -> bool:
    """The message names field ``field`` (quoted, or as a path component)."""
    return re.search(rf"('{re.escape(field)}'|/{re.escape(field)}\b)", msg) is not None


def assert_nothing_left(dest: Path) -> None:
    """No store at ``dest`` and no hidden partial store next to it."""
    assert not dest.exists(), f"{dest} was left behind"
    if dest.parent.exists():
        leftovers = [
            p.name
            for p in dest.parent.iterdir()
            if ".partial" in p.name or p.name.startswith(f".{dest.name}")
        ]
        assert not leftovers, f"partial leftovers: {leftovers}"


def small_store(path: Path, chunk_len: int = 4, compression: str | None = "lz4") -> oocseq.Store:
    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    y = np.arange(10, dtype=np.int64)
    return oocseq.ingest_arrays(
        path, {"x": x, "y": y}, chunk_len=chunk_len, compression=compression, preshuffle=False
    )


def read_manifest(path: Path) -> dict[str, Any]:
    if path.suffix == ".zarr":
        return json.loads((path / "zarr.json").read_text())["attributes"]["oocseq"]
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["oocseq"])


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``edit`` to the manifest on disk (``edit`` mutates it; returning ``"DELETE"`` removes it)."""
    if path.suffix == ".zarr":
        meta_path = path / "zarr.json"
        meta = json.loads(meta_path.read_text())
        if edit(meta["attributes"]["oocseq"]) == "DELETE":
            del meta["attributes"]["oocseq"]
        meta_path.write_text(json.dumps(meta))
        return
    with h5py.File(path, "r+") as f:
        doc = json.loads(f.attrs["oocseq"])
        if edit(doc) == "DELETE":
            del f.attrs["oocseq"]
        else:
            f.attrs["oocseq"] = json.dumps(doc)


def png_bytes(size: tuple[int, int] = (9, 7), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_folder(root: Path, per_class: int = 3) -> Path:
    for c, name in enumerate(["cats", "dogs"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"img{i}.png").write_bytes(png_bytes(seed=10 * c + i))
    return root


# -- image folders ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_source_folder(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "no_such_folder"
    dest = tmp_path / f"out{fmt}"
    with pytest.raises(SourceNotFoundError) as e:
        oocseq.ingest_image_folder(src, dest, image_size=(8, 8))
    check_error(e.value, SourceNotFoundError, FileNotFoundError, "no_such_folder")
    assert_nothing_left(dest)


def test_empty_source_folder(tmp_path: Path) -> None:
    src = tmp_path / "empty_src"
    src.mkdir()
    dest = tmp_path / "out.zarr"
    with pytest.raises(SourceNotFoundError) as e:
        oocseq.ingest_image_folder(src, dest, image_size=(8, 8))
    check_error(e.value, SourceNotFoundError, FileNotFoundError, "empty_src")
    assert_nothing_left(dest)


def test_class_folders_without_images(tmp_path: Path) -> None:
    src = tmp_path / "no_images"
    for name in ("a", "b"):
        (src / name).mkdir(parents=True)
        (src / name / "notes.txt").write_text("not an image")
    dest = tmp_path / "out.h5"
    with pytest.raises(SourceNotFoundError) as e:
        oocseq.ingest_image_folder(src, dest, image_size=(8, 8))
    check_error(e.value, SourceNotFoundError, FileNotFoundError, "no_images")
    assert_nothing_left(dest)


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())


def _truncated_png(path: Path) -> None:
    data = png_bytes(size=(32, 32), seed=5)
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {"random_bytes": _random_bytes, "truncated_png": _truncated_png}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupt_image_raises_naming_the_file(tmp_path: Path, fmt: str, corrupt: str) -> None:
    src = image_folder(tmp_path / "src")
    CORRUPTIONS[corrupt](src / "dogs" / "bad.png")
    dest = tmp_path / "out" / f"images{fmt}"
    dest.parent.mkdir()
    with pytest.raises(ImageDecodeError) as e:
        oocseq.ingest_image_folder(src, dest, image_size=(8, 8), chunk_len=2)
    check_error(e.value, InvalidSourceError, ValueError, "bad.png")
    assert Path(e.value.path).name == "bad.png"
    assert Path(e.value.path).parent.name == "dogs"
    assert_nothing_left(dest)
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_corrupt_image_skipped_on_request(tmp_path: Path, fmt: str, corrupt: str) -> None:
    src = image_folder(tmp_path / "src")
    CORRUPTIONS[corrupt](src / "dogs" / "bad.png")
    dest = tmp_path / f"images{fmt}"
    with pytest.warns(UserWarning, match="bad.png"):
        store = oocseq.ingest_image_folder(src, dest, image_size=(8, 8), on_error="skip", chunk_len=2)
    assert len(store) == 6  # seven files, one unreadable
    skipped = store.metadata["skipped"]
    assert len(skipped) == 1
    assert Path(skipped[0]["path"]).name == "bad.png"
    assert skipped[0]["error"]
    sources = [Path(s).name for s in store.sources]
    assert "bad.png" not in sources and len(sources) == 6
    store.verify()


def test_every_image_unreadable_with_skip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(3):
        _random_bytes(src / "a" / f"bad{i}.png")
    dest = tmp_path / "out.zarr"
    with pytest.raises(InvalidSourceError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oocseq.ingest_image_folder(src, dest, image_size=(4, 4), on_error="skip")
    check_error(e.value, InvalidSourceError, ValueError)
    assert_nothing_left(dest)


@SETTINGS
@given(
    fmt_mode=st.sampled_from([("PNG", "RGB"), ("PNG", "P"), ("JPEG", "RGB"), ("BMP", "RGB"), ("GIF", "P")]),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    header_only=st.booleans(),
)
def test_damaged_image_decodes_or_raises_image_decode_error(
    fmt_mode: tuple[str, str], edits: list[tuple[int, int]], header_only: bool
) -> None:
    """Any damaged image file either decodes to the expected shape or raises ImageDecodeError
    naming it; never another exception."""
    from oocseq.ingest.images import ImageOptions, decode_image

    fmt, mode = fmt_mode
    img = Image.open(io.BytesIO(png_bytes(size=(11, 13), seed=3))).convert("RGB")
    if mode == "P":
        img = img.quantize(8)
    buf = io.BytesIO()
    img.save(buf, fmt)
    raw = bytearray(buf.getvalue())
    span = min(len(raw), 64) if header_only else len(raw)
    for pos, value in edits:
        raw[pos % span] = value
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"damaged.{fmt.lower()}"
        path.write_bytes(bytes(raw))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = decode_image(str(path), ImageOptions((5, 4)))
        except ImageDecodeError as e:
            check_error(e, InvalidSourceError, ValueError, "damaged.")
            assert e.path == str(path)
        else:
            assert out.shape == (5, 4, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_image_ingestion_keeps_existing_store(tmp_path: Path, fmt: str) -> None:
    """overwrite=True, but the ingestion fails: the old store is still there, unchanged."""
    dest = tmp_path / f"keep{fmt}"
    small_store(dest).close()
    src = image_folder(tmp_path / "src")
    _random_bytes(src / "cats" / "zz_bad.png")
    with pytest.raises(ImageDecodeError):
        oocseq.ingest_image_folder(src, dest, image_size=(8, 8), overwrite=True)
    store = oocseq.open_store(dest)
    np.testing.assert_array_equal(store["x"][:], np.arange(30, dtype=np.float32).reshape(10, 3))
    store.verify()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


# -- arrays: lengths, shapes, dtypes ---------------------------------------------------------
@SETTINGS
@given(
    lengths=st.lists(st.integers(1, 12), min_size=2, max_size=4).filter(lambda ls: len(set(ls)) > 1),
    fmt=st.sampled_from(FORMATS),
    streamed=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_fields_of_different_lengths(lengths: list[int], fmt: str, streamed: list[bool]) -> None:
    """Arrays and generators of batches alike: FieldLengthError naming fields and lengths."""
    names = ["alpha", "beta", "gamma", "delta"][: len(lengths)]

    def gen(n: int) -> Iterator[np.ndarray]:
        for s in range(0, n, 3):
            yield np.ones((min(3, n - s), 2))

    fields = {
        name: gen(n) if streamed[k] else np.ones((n, 2))
        for k, (name, n) in enumerate(zip(names, lengths, strict=True))
    }
    with tempfile.TemporaryDirectory() as d:
        dest = Path(d) / f"s{fmt}"
        with pytest.raises(FieldLengthError) as e:
            oocseq.ingest_arrays(dest, fields, chunk_len=2, preshuffle=False)
        check_error(e.value, InvalidSourceError, ValueError)
        msg = str(e.value)
        # every field whose length the error can know is named with its length
        # arrays are checked up front (only they are named); otherwise all fields at the end
        known = [(nm, n) for nm, n, s in zip(names, lengths, streamed, strict=False) if not s]
        if len({n for _, n in known}) < 2:
            known = list(zip(names, lengths, strict=True))
        for nm, n in known:
            assert re.search(rf"\b{re.escape(nm)}\b\W*{n}\b", msg), (nm, n, msg)
        assert_nothing_left(dest)


@pytest.mark.parametrize("fmt", FORMATS)
def test_generator_length_mismatch_detected_at_end(tmp_path: Path, fmt: str) -> None:
    def gen(n: int) -> Iterator[np.ndarray]:
        for s in range(0, n, 4):
            yield np.arange(s, min(n, s + 4))

    dest = tmp_path / f"s{fmt}"
    with pytest.raises(FieldLengthError) as e:
        oocseq.ingest_arrays(dest, {"x": gen(17), "y": gen(13)}, chunk_len=3, preshuffle=False)
    check_error(e.value, FieldLengthError, ValueError, "x", "17", "y", "13")
    assert_nothing_left(dest)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "batches",
    [
        pytest.param([np.zeros((2, 3)), np.zeros((2, 4))], id="shape"),
        pytest.param([np.zeros((2, 3)), np.zeros((2,))], id="ndim"),
        pytest.param([np.zeros((2, 3), np.int32), np.zeros((2, 3), np.float64)], id="dtype"),
        pytest.param([np.zeros((2, 3), np.float64), np.zeros((2, 3), np.complex128)], id="dtype-complex"),
        pytest.param([np.zeros((2, 3)), np.array([["a", "b", "c"]] * 2)], id="dtype-str"),
        pytest.param([np.zeros(2), np.float64(5.0)], id="scalar-batch"),
    ],
)
def test_generator_batches_change_shape_or_dtype(tmp_path: Path, fmt: str, batches: list[np.ndarray]) -> None:
    dest = tmp_path / f"s{fmt}"

    def gen() -> Iterator[np.ndarray]:
        yield from [batches[0]] * 3
        yield batches[1]

    with pytest.raises(InvalidSourceError) as e:
        oocseq.ingest_arrays(dest, {"feat": gen()}, chunk_len=2, preshuffle=False)
    check_error(e.value, InvalidSourceError, ValueError, "feat")
    assert_nothing_left(dest)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.array([{"a": 1}, None], dtype=object), id="object"),
        pytest.param(np.array(["a", "bc"]), id="str"),
        pytest.param(np.array([b"a", b"bc"]), id="bytes"),
        pytest.param(["x", "y", "z"], id="list-of-str"),
        pytest.param(np.zeros(3, dtype=[("a", "i4"), ("b", "f8")]), id="structured"),
        pytest.param(np.zeros(3, dtype=">i4"), id="big-endian"),
        pytest.param(np.array(["2020-01-01"], dtype="datetime64[D]"), id="datetime"),
        pytest.param(iter([np.array(["a", "b"])]), id="generator-of-str"),
    ],
)
def test_unsupported_dtype_refused(tmp_path: Path, data: Any) -> None:
    dest = tmp_path / "s.zarr"
    with pytest.raises(InvalidSourceError) as e:
        oocseq.ingest_arrays(dest, {"words": data}, preshuffle=False)
    check_error(e.value, InvalidSourceError, ValueError, "words")
    assert_nothing_left(dest)


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_json_metadata_refused_before_reading(tmp_path: Path, fmt: str) -> None:
    """Metadata that cannot be stored is refused up front, not after the whole (possibly hours
    long) ingestion has run; and nothing is left behind."""
    pulled: list[int] = []

    def gen() -> Iterator[np.ndarray]:
        for k in range(6):
            pulled.append(k)
            yield np.zeros((2, 3))

    dest = tmp_path / f"s{fmt}"
    with pytest.raises((TypeError, ValueError)) as e:
        oocseq.ingest_arrays(dest, {"x": gen()}, chunk_len=2, metadata={"tags": {1, 2}}, preshuffle=False)
    assert "metadata" in str(e.value) or "tags" in str(e.value), str(e.value)
    assert len(pulled) <= 1, f"{len(pulled)} batches read before the metadata was refused"
    assert_nothing_left(dest)


@pytest.mark.parametrize("name", ["", "1abc", "a/b", "../evil", "a b", 3])
def test_invalid_field_name_refused(tmp_path: Path, name: Any) -> None:
    dest = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="field name"):
        oocseq.ingest_arrays(dest, {name: np.zeros(3)}, preshuffle=False)
    assert_nothing_left(dest)


# -- interrupted ingestion -------------------------------------------------------------------
class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_interrupted_ingestion_leaves_nothing(tmp_path: Path, fmt: str, exc: type[BaseException]) -> None:
    def gen() -> Iterator[np.ndarray]:
        for k in range(5):
            yield np.full((3, 2), k)
        raise exc("interrupted mid-way")

    dest = tmp_path / f"s{fmt}"
    with pytest.raises(exc, match="interrupted mid-way"):
        oocseq.ingest_arrays(dest, {"x": gen()}, chunk_len=2, preshuffle=False)
    assert_nothing_left(dest)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_overwrite_keeps_old_store(tmp_path: Path, fmt: str) -> None:
    dest = tmp_path / f"s{fmt}"
    small_store(dest).close()

    def gen() -> Iterator[np.ndarray]:
        yield np.zeros((4, 3), dtype=np.float32)
        raise Boom("disk on fire")

    with pytest.raises(Boom):
        oocseq.ingest_arrays(dest, {"x": gen()}, chunk_len=2, overwrite=True, preshuffle=False)
    store = oocseq.open_store(dest)
    np.testing.assert_array_equal(store["x"][:], np.arange(30, dtype=np.float32).reshape(10, 3))
    store.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


# -- existing destinations -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_dest_exists_without_overwrite(tmp_path: Path, fmt: str) -> None:
    dest = tmp_path / f"exists{fmt}"
    small_store(dest).close()
    with pytest.raises(StoreExistsError) as e:
        oocseq.ingest_arrays(dest, {"x": np.ones(5)}, preshuffle=False)
    check_error(e.value, StoreExistsError, FileExistsError, f"exists{fmt}")
    store = oocseq.open_store(dest)
    assert len(store) == 10 and list(store.fields) == ["x", "y"]
    store.close()
    # overwrite=True replaces it
    new = oocseq.ingest_arrays(dest, {"z": np.arange(5.0)}, overwrite=True, preshuffle=False)
    assert len(new) == 5 and list(new.fields) == ["z"]
    np.testing.assert_array_equal(oocseq.open_store(dest)["z"][:], np.arange(5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]


def test_image_dest_exists_without_overwrite(tmp_path: Path) -> None:
    src = image_folder(tmp_path / "src")
    dest = tmp_path / "imgs.h5"
    oocseq.ingest_image_folder(src, dest, image_size=(4, 4)).close()
    with pytest.raises(StoreExistsError) as e:
        oocseq.ingest_image_folder(src, dest, image_size=(4, 4))
    check_error(e.value, StoreExistsError, FileExistsError, "imgs.h5")


# -- opening things that are not stores ------------------------------------------------------
@pytest.mark.parametrize("name", ["missing.zarr", "missing.h5", "missing.hdf5"])
def test_open_missing_store(tmp_path: Path, name: str) -> None:
    with pytest.raises(StoreNotFoundError) as e:
        oocseq.open_store(tmp_path / name)
    check_error(e.value, StoreNotFoundError, FileNotFoundError, name)


def _plain_dir(p: Path) -> None:
    p.mkdir()


def _dir_with_file(p: Path) -> None:
    p.mkdir()
    (p / "README").write_text("hello")


def _random_file(p: Path) -> None:
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _empty_file(p: Path) -> None:
    p.write_bytes(b"")


def _plain_zarr_or_hdf5(p: Path) -> None:
    """A valid Zarr group / HDF5 file, but not an oocseq store."""
    if p.suffix == ".zarr":
        import zarr

        g = zarr.open_group(str(p), mode="w")
        g.create_array("x", shape=(4,), dtype="f8")
    else:
        with h5py.File(p, "w") as f:
            f["x"] = np.arange(4.0)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("make", [_plain_dir, _dir_with_file, _random_file, _empty_file, _plain_zarr_or_hdf5])
def test_open_not_a_store(tmp_path: Path, suffix: str, make: Callable[[Path], None]) -> None:
    path = tmp_path / f"thing{suffix}"
    make(path)
    with pytest.raises(NotAStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, NotAStoreError, ValueError, f"thing{suffix}")


@pytest.mark.parametrize("name", ["data.npy", "data.txt", "data", "data.zarr.bak"])
def test_open_wrong_suffix(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"123")
    with pytest.raises(ValueError, match=re.escape(name)):
        oocseq.open_store(path)
    with pytest.raises(ValueError, match=re.escape(name)):
        oocseq.ingest_arrays(tmp_path / ("out_" + name), {"x": np.zeros(3)}, preshuffle=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_field(tmp_path: Path, fmt: str) -> None:
    store = small_store(tmp_path / f"s{fmt}")
    with pytest.raises(FieldNotFoundError) as e:
        store["nope"]
    check_error(e.value, FieldNotFoundError, KeyError, "'nope'", "'x'", "'y'")
    with pytest.raises(FieldNotFoundError) as e:
        store.read_chunk("nope", 0)
    check_error(e.value, FieldNotFoundError, KeyError, "'nope'", "'x'", "'y'")
    with pytest.raises(FieldNotFoundError) as e:
        oocseq.ChunkedSequence(store, 2, x="nope")
    check_error(e.value, FieldNotFoundError, KeyError, "'nope'")


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunk_and_sample_index_out_of_range(tmp_path: Path, fmt: str) -> None:
    store = small_store(tmp_path / f"s{fmt}")  # 10 samples, 3 chunks
    for c in (3, -1, 100):
        with pytest.raises(IndexError, match=str(c)):
            store.read_chunk("x", c)
    for i in (10, -11):
        with pytest.raises(IndexError, match=str(i)):
            store["x"][i]
    with pytest.raises(IndexError):
        store["x"][[0, 10]]


# -- incomplete and hostile manifests --------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m.pop("complete"), id="complete-removed"),
        pytest.param(lambda m: m.update(complete=False), id="complete-false"),
        pytest.param(lambda m: m.update(complete="yes"), id="complete-str"),
        pytest.param(lambda m: "DELETE", id="manifest-missing"),
        pytest.param(lambda m: m.update(format="other"), id="other-format"),
        pytest.param(lambda m: m.update(format_version=999), id="future-version"),
    ],
)
def test_incomplete_store_is_not_a_store(tmp_path: Path, fmt: str, edit: Callable) -> None:
    path = tmp_path / f"s{fmt}"
    small_store(path).close()
    edit_manifest(path, edit)
    with pytest.raises(NotAStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, NotAStoreError, ValueError, f"s{fmt}")


HOSTILE_EDITS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "negative-n": lambda m: m.update(n=-1),
    "n-str": lambda m: m.update(n="10"),
    "n-float": lambda m: m.update(n=10.0),
    "n-bool": lambda m: m.update(n=True),
    "n-huge": lambda m: m.update(n=10**20),
    "object-dtype": lambda m: m["fields"]["x"].update(dtype="object"),
    "str-dtype": lambda m: m["fields"]["x"].update(dtype="<U8"),
    "structured-dtype": lambda m: m["fields"]["x"].update(dtype=[["a", "<i4"]]),
    "unknown-compression": lambda m: m.update(compression={"codec": "blosc", "cname": "snappy", "clevel": 5}),
    "pickle-compression": lambda m: m.update(compression={"codec": "pickle"}),
    "compression-str": lambda m: m.update(compression="lz4"),
    "clevel-bad": lambda m: m.update(compression={"codec": "blosc", "cname": "lz4", "clevel": 42}),
    "chunk-len-huge": lambda m: m.update(chunk_len=10**15),
    "chunk-len-zero": lambda m: m.update(chunk_len=0),
    "chunk-len-negative": lambda m: m.update(chunk_len=-4),
    "chunk-len-float": lambda m: m.update(chunk_len=4.0),
    "chunk-len-str": lambda m: m.update(chunk_len="4"),
    "chunk-len-null": lambda m: m.update(chunk_len=None),
    "chunk-len-other": lambda m: m.update(chunk_len=5),
    "shape-negative": lambda m: m["fields"]["x"].update(shape=[-3]),
    "shape-wrong": lambda m: m["fields"]["x"].update(shape=[4]),
    "dtype-wrong": lambda m: m["fields"]["x"].update(dtype="float64"),
    "fields-empty": lambda m: m.update(fields={}),
    "fields-list": lambda m: m.update(fields=["x"]),
    "field-name-path": lambda m: m["fields"].update({"../../etc": m["fields"].pop("y")}),
    "field-missing-array": lambda m: m["fields"].update(ghost={"shape": [], "dtype": "int8"}),
    "checksums-short": lambda m: m["checksums"].update(x=[1, 2]),
    "checksums-unknown-field": lambda m: m["checksums"].update(ghost=[0, 0, 0]),
    "checksums-not-int": lambda m: m["checksums"].update(x=["a", "b", "c"]),
    "attrs-list": lambda m: m.update(attrs=[1, 2]),
    "aux-bad": lambda m: m.update(aux=["../x"]),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("edit", sorted(HOSTILE_EDITS))
def test_hostile_manifest_is_corrupt(tmp_path: Path, fmt: str, edit: str) -> None:
    path = tmp_path / f"s{fmt}"
    small_store(path).close()
    edit_manifest(path, HOSTILE_EDITS[edit])
    with pytest.raises(CorruptStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, CorruptStoreError, ValueError, f"s{fmt}")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [9, 11, 12])
def test_manifest_n_disagrees_with_arrays(tmp_path: Path, fmt: str, n: int) -> None:
    """n changed, but still 3 chunks of 4 (so the checksum count agrees): the layout check fails."""
    path = tmp_path / f"s{fmt}"
    small_store(path).close()
    edit_manifest(path, lambda m: m.update(n=n))
    with pytest.raises(CorruptStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, CorruptStoreError, ValueError, f"s{fmt}", "'x'")


def test_hdf5_manifest_not_json(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    small_store(path).close()
    with h5py.File(path, "r+") as f:
        f.attrs["oocseq"] = "{not json"
    with pytest.raises(CorruptStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, CorruptStoreError, ValueError, "s.h5")


def test_zarr_field_array_deleted(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    small_store(path).close()
    shutil.rmtree(path / "y")
    with pytest.raises(CorruptStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, CorruptStoreError, ValueError, "'y'")


def test_hdf5_field_dataset_deleted(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    small_store(path).close()
    with h5py.File(path, "r+") as f:
        del f["y"]
    with pytest.raises(CorruptStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, CorruptStoreError, ValueError, "'y'")


def test_hdf5_disallowed_filter(tmp_path: Path) -> None:
    """A dataset with a filter oocseq does not allow (here gzip) is refused."""
    path = tmp_path / "s.h5"
    small_store(path).close()
    with h5py.File(path, "r+") as f:
        data = f["y"][:]
        del f["y"]
        f.create_dataset("y", data=data, chunks=(4,), maxshape=(None,), compression="gzip")
    with pytest.raises(CorruptStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, CorruptStoreError, ValueError, "'y'")


# -- hostile Zarr codecs ---------------------------------------------------------------------
def _edit_array_meta(path: Path, name: str, edit: Callable[[dict[str, Any]], Any]) -> None:
    meta_path = path / name / "zarr.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta))


def _edit_codecs(path: Path, name: str, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    _edit_array_meta(path, name, lambda m: edit(m["codecs"]))


PICKLE = {"name": "numcodecs.pickle", "configuration": {"protocol": 5}}

HOSTILE_ARRAY_META: dict[str, Callable[[dict[str, Any]], Any]] = {
    "pickle-appended": lambda m: m["codecs"].append(PICKLE),
    "pickle-instead-of-blosc": lambda m: m.update(codecs=[m["codecs"][0], PICKLE]),
    "unknown-codec": lambda m: m["codecs"].append({"name": "no.such.codec", "configuration": {}}),
    "transpose-codec": lambda m: m["codecs"].insert(
        0, {"name": "transpose", "configuration": {"order": [1, 0]}}
    ),
    "unknown-data-type": lambda m: m.update(data_type="no_such_type"),
    "data-type-differs": lambda m: m.update(data_type="float64"),
    "negative-shape": lambda m: m.update(shape=[-1, 3]),
    "bad-chunk-grid": lambda m: m.update(chunk_grid={"name": "weird"}),
    "chunk-key-v2": lambda m: m.update(
        chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}
    ),
    "node-type-group": lambda m: m.update(node_type="group"),
    "zarr-format-2": lambda m: m.update(zarr_format=2),
}


@pytest.mark.parametrize("edit", sorted(HOSTILE_ARRAY_META))
def test_zarr_hostile_array_metadata_is_corrupt(tmp_path: Path, edit: str) -> None:
    """A field's ``zarr.json`` edited (disallowed or unknown codecs, malformed metadata):
    whatever zarr makes of it, the store is refused as corrupt, naming the field."""
    path = tmp_path / "s.zarr"
    small_store(path).close()
    _edit_array_meta(path, "x", HOSTILE_ARRAY_META[edit])
    with pytest.raises(CorruptStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, CorruptStoreError, ValueError, "s.zarr")
    assert names_field(str(e.value), "x"), str(e.value)


def test_zarr_array_metadata_not_json(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    small_store(path).close()
    (path / "y" / "zarr.json").write_text("{not json")
    with pytest.raises(CorruptStoreError) as e:
        oocseq.open_store(path)
    check_error(e.value, CorruptStoreError, ValueError, "s.zarr")
    assert names_field(str(e.value), "y"), str(e.value)


def test_zarr_big_endian_codec_never_passes_verify(tmp_path: Path) -> None:
    """The bytes codec switched to big-endian reinterprets every value: refused when opening,
    or at least caught by ``verify()``."""
    path = tmp_path / "s.zarr"
    small_store(path).close()
    _edit_codecs(path, "x", lambda cs: cs[0].update(configuration={"endian": "big"}))
    try:
        store = oocseq.open_store(path)
    except CorruptStoreError:
        return
    with pytest.raises(CorruptStoreError) as e:
        store.verify()
    check_error(e.value, CorruptStoreError, ValueError, "'x'")


def test_zarr_registered_pickle_codec_refused_before_decoding(tmp_path: Path) -> None:
    """Where zarr *can* build a ``numcodecs.pickle`` codec (older numcodecs registered one),
    oocseq still refuses the store when opening it, and never calls the codec's decode."""
    import zarr.registry
    from zarr.abc.codec import BytesBytesCodec

    decoded: list[int] = []

    class FakePickle(BytesBytesCodec):
        is_fixed_size = False

        @classmethod
        def from_dict(cls, data: dict[str, Any]) -> FakePickle:
            return cls()

        def to_dict(self) -> dict[str, Any]:
            return {"name": "numcodecs.pickle", "configuration": {"protocol": 5}}

        def compute_encoded_size(self, input_byte_length: int, chunk_spec: Any) -> int:
            return input_byte_length

        async def _decode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
            decoded.append(1)
            return chunk_bytes

        async def _encode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
            return chunk_bytes

    registries = vars(zarr.registry)["__codec_registries"]
    zarr.registry.register_codec("numcodecs.pickle", FakePickle)
    try:
        path = tmp_path / "s.zarr"
        small_store(path, compression=None).close()
        _edit_codecs(path, "x", lambda cs: cs.append(PICKLE))
        with pytest.raises(CorruptStoreError) as e:
            store = oocseq.open_store(path)
            store.read_chunk("x", 0)
        check_error(e.value, CorruptStoreError, ValueError, "numcodecs.pickle")
        assert names_field(str(e.value), "x"), str(e.value)
        assert decoded == []
    finally:
        registries.pop("numcodecs.pickle", None)


# -- missing and damaged chunks --------------------------------------------------------------
@pytest.mark.parametrize("field", ["x", "y"])
def test_zarr_missing_chunk_never_reads_as_zeros(tmp_path: Path, field: str) -> None:
    path = tmp_path / "s.zarr"
    small_store(path).close()  # x (10, 3), y (10,): 3 chunks of 4
    chunk_file = path / field / "c" / "1"
    if field == "x":
        chunk_file = chunk_file / "0"
    assert chunk_file.is_file()
    chunk_file.unlink()
    store = oocseq.open_store(path)
    needles = ("chunk 1", f"'{field}'")
    with pytest.raises(CorruptStoreError) as e:
        store.read_chunk(field, 1)
    check_error(e.value, CorruptStoreError, ValueError, *needles, str(chunk_file))
    for key in (slice(4, 6), slice(None), 5, [0, 7]):
        with pytest.raises(CorruptStoreError) as e:
            store[field][key]
        check_error(e.value, CorruptStoreError, ValueError, *needles)
    with pytest.raises(CorruptStoreError) as e:
        np.asarray(store[field])
    with pytest.raises(CorruptStoreError) as e:
        store.verify()
    check_error(e.value, CorruptStoreError, ValueError, *needles)
    # other chunks still read
    np.testing.assert_array_equal(
        store[field][8:],
        (np.arange(30, dtype=np.float32).reshape(10, 3) if field == "x" else np.arange(10))[8:],
    )
    # a whole shuffled epoch through a ChunkedSequence
    seq = oocseq.ChunkedSequence(store, batch_size=3, seed=1)
    with pytest.raises(CorruptStoreError) as e:
        for _ in seq:
            pass
    check_error(e.value, CorruptStoreError, ValueError, *needles)
    seq2 = oocseq.ChunkedSequence(oocseq.open_store(path), batch_size=4, shuffle=False)
    with pytest.raises(CorruptStoreError) as e:
        for _ in seq2:
            pass
    check_error(e.value, CorruptStoreError, ValueError, *needles)


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_hdf5_unallocated_chunk_never_reads_as_zeros(tmp_path: Path, compression: str | None) -> None:
    """HDF5 returns the fill value for a chunk that was never written: oocseq must not."""
    import hdf5plugin

    path = tmp_path / "s.h5"
    small_store(path, compression=compression).close()  # y (10,) int64, chunks of 4
    with h5py.File(path, "r+") as f:
        data = f["y"][:]
        del f["y"]
        kwargs = {} if compression is None else dict(hdf5plugin.Blosc(cname="lz4", clevel=5))
        ds = f.create_dataset("y", shape=(10,), maxshape=(None,), chunks=(4,), dtype=np.int64, **kwargs)
        ds[0:4] = data[0:4]
        ds[8:10] = data[8:10]  # chunk 1 never written
    store = oocseq.open_store(path)
    np.testing.assert_array_equal(store.read_chunk("y", 0), np.arange(4))
    for read in (
        lambda: store.read_chunk("y", 1),
        lambda: store["y"][:],
        lambda: store["y"][5],
        store.verify,
    ):
        with pytest.raises(CorruptStoreError) as e:
            read()
        check_error(e.value, CorruptStoreError, ValueError, "chunk 1", "'y'")


@pytest.mark.parametrize("frac", [0.5, 0.9, 0.99])
def test_hdf5_truncated_file(tmp_path: Path, frac: float) -> None:
    path = tmp_path / "s.h5"
    oocseq.ingest_arrays(
        path, {"x": np.arange(4000.0).reshape(1000, 4)}, chunk_len=100, preshuffle=False
    ).close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * frac))
    with pytest.raises((NotAStoreError, CorruptStoreError)) as e:
        oocseq.open_store(path).verify()
    check_error(e.value, OocseqError, ValueError, "s.h5")


@SETTINGS
@given(
    compression=st.sampled_from([None, "lz4", "zstd", "zlib"]),
    mode=st.sampled_from(["flip", "truncate", "extend", "garbage"]),
    data=st.data(),
)
def test_zarr_damaged_chunk_detected(compression: str | None, mode: str, data: st.DataObject) -> None:
    """Damaged chunk bytes: reading raises CorruptStoreError naming the chunk, or returns the
    original data (never other data); ``verify()`` agrees."""
    x = (np.arange(10 * 3 * 5, dtype=np.float64) % 17).reshape(10, 3, 5)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.zarr"
        oocseq.ingest_arrays(path, {"x": x}, chunk_len=4, compression=compression, preshuffle=False).close()
        f = path / "x" / "c" / "1" / "0" / "0"
        raw = bytearray(f.read_bytes())
        if mode == "flip":
            for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
                raw[i] ^= data.draw(st.integers(1, 255))
        elif mode == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif mode == "extend":
            raw += bytes(data.draw(st.integers(1, 64)))
        else:
            raw = bytearray(data.draw(st.binary(min_size=0, max_size=600)))
        f.write_bytes(bytes(raw))
        store = oocseq.open_store(path)
        try:
            got = store.read_chunk("x", 1)
        except CorruptStoreError as e:
            check_error(e, CorruptStoreError, ValueError, "chunk 1", "'x'")
            intact = False
        else:
            assert got.tobytes() == x[4:8].tobytes() and got.shape == (4, 3, 5)
            intact = True
        if intact:
            store.verify()
        else:
            with pytest.raises(CorruptStoreError) as e:
                store.verify()
            check_error(e.value, CorruptStoreError, ValueError, "chunk 1", "'x'")


@pytest.mark.parametrize("compression", [None, "lz4"])
@pytest.mark.parametrize("field", ["x", "y"])
def test_hdf5_flipped_bytes_fail_verify(tmp_path: Path, compression: str | None, field: str) -> None:
    path = tmp_path / "s.h5"
    x = (np.arange(40 * 6, dtype=np.float32) % 13).reshape(40, 6)
    y = np.arange(40, dtype=np.int64) % 5
    oocseq.ingest_arrays(
        path, {"x": x, "y": y}, chunk_len=8, compression=compression, preshuffle=False
    ).close()
    with h5py.File(path, "r") as f:
        ds = f[field]
        info = ds.id.get_chunk_info_by_coord((16,) + (0,) * (ds.ndim - 1))  # chunk 2
        offset, size = info.byte_offset, info.size
    raw = bytearray(path.read_bytes())
    for i in range(offset + size // 3, offset + size // 3 + 5):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    store = oocseq.open_store(path)
    # chunks 0 and 1 are intact
    for c in (0, 1):
        np.testing.assert_array_equal(
            store.read_chunk(field, c), (x if field == "x" else y)[c * 8 : (c + 1) * 8]
        )
    for read in (lambda: store.read_chunk(field, 2), lambda: store[field][:], store.verify):
        with pytest.raises(CorruptStoreError) as e:
            read()
        check_error(e.value, CorruptStoreError, ValueError, "chunk 2", f"'{field}'", "s.h5")
