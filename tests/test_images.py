"""Image folders and DataFrames of image paths, ingested with real files written by Pillow.

Every sample is traced back to its file through ``store.sources`` and compared with an
independent decode of that file; labels must match the file's class folder.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import oocseq
from oocseq import ImageDecodeError, InvalidSourceError
from oocseq.ingest.images import ImageOptions, decode_image

FORMATS = [".zarr", ".h5"]
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZE = (6, 10)  # (height, width): not square, so a swapped H/W shows

# Class folder names (not in sorted order; "Zebra" sorts before "ant"; non-ASCII and spaces).
CLASSES = ["dog", "ant", "Zebra", "čaj ☕"]


def _img(rng: np.random.Generator, mode: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        return rgb.quantize(colors=16)
    return rgb


# (relative path inside the class folder, Pillow mode, format, (width, height))
FILES = [
    ("a_rgb.png", "RGB", "PNG", (10, 6)),  # already the target size: no resize
    ("b_gray.png", "L", "PNG", (13, 9)),
    ("c_pal.png", "P", "PNG", (7, 11)),
    ("d_rgba.png", "RGBA", "PNG", (20, 4)),
    ("e_photo.jpg", "RGB", "JPEG", (16, 12)),
    ("f_gray.jpeg", "L", "JPEG", (5, 5)),
    ("g_bitmap.bmp", "RGB", "BMP", (9, 14)),
    ("h_anim.gif", "P", "GIF", (12, 8)),
    ("UPPER.PNG", "RGB", "PNG", (3, 17)),
    ("sub/deeper/i_nested.png", "RGB", "PNG", (8, 8)),
]


def make_folder(
    root: Path, classes: list[str] = CLASSES, files: list = FILES, seed: int = 0
) -> dict[str, str]:
    """Write an image folder; return {relative path: class name} of every image."""
    rng = np.random.default_rng(seed)
    expected: dict[str, str] = {}
    for k, cls in enumerate(classes):
        for relp, mode, fmt, size in files[k:]:  # classes of different sizes
            path = root / cls / relp
            path.parent.mkdir(parents=True, exist_ok=True)
            _img(rng, mode, size).save(path, fmt)
            expected[f"{cls}/{relp}"] = cls
        # things that are not images
        (root / cls / "notes.txt").write_text("not an image")
        (root / cls / "labels.csv").write_text("a,b\n1,2\n")
        (root / cls / "sub" / "data.npy").parent.mkdir(parents=True, exist_ok=True)
        np.save(root / cls / "sub" / "data.npy", np.zeros(3))
    (root / "README.md").write_text("top-level file, not a class")
    return expected


def reference_decode(path: Path, size: tuple[int, int], mode: str = "RGB") -> np.ndarray:
    """Independent decode: Pillow convert + bilinear resize to (height, width)."""
    h, w = size
    with Image.open(path) as img:
        img = img.convert(mode)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def rel(source: str) -> str:
    return Path(source).as_posix()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("imgs") / "src"
    return root, make_folder(root)


# -- folders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_folder_round_trip(tmp_path: Path, folder: tuple[Path, dict[str, str]], fmt: str) -> None:
    root, expected = folder
    store = oocseq.ingest_image_folder(root, tmp_path / f"imgs{fmt}", image_size=SIZE, chunk_len=4)
    n = len(expected)
    assert len(store) == n
    assert store.fields["x"].shape == (n, *SIZE, 3) and store.fields["x"].dtype == np.uint8
    assert store.fields["y"].shape == (n,) and store.fields["y"].dtype == np.int64
    class_names = store.metadata["class_names"]
    assert class_names == sorted(CLASSES)
    x, y = store["x"][:], store["y"][:]
    sources = [rel(s) for s in store.sources]
    assert sorted(sources) == sorted(expected)  # every image once, nothing else
    options = ImageOptions(SIZE)
    for i, src in enumerate(sources):
        assert class_names[y[i]] == expected[src] == src.split("/")[0]
        np.testing.assert_array_equal(x[i], decode_image(str(root / src), options), err_msg=src)
        np.testing.assert_array_equal(x[i], reference_decode(root / src, SIZE), err_msg=src)
    assert np.bincount(y, minlength=len(CLASSES)).tolist() == [
        Counter(expected.values())[c] for c in class_names
    ]
    store.verify()


def test_nested_and_non_image_files(tmp_path: Path, folder: tuple[Path, dict[str, str]]) -> None:
    root, _ = folder
    store = oocseq.ingest_image_folder(root, tmp_path / "imgs.h5", image_size=SIZE, preshuffle=False)
    sources = [rel(s) for s in store.sources]
    assert {f"{c}/sub/deeper/i_nested.png" for c in CLASSES} <= set(sources)
    assert {f"{c}/UPPER.PNG" for c in CLASSES} <= set(sources)
    assert not [s for s in sources if s.endswith((".txt", ".csv", ".npy", ".md"))]


def test_preshuffle_off_keeps_sorted_order(tmp_path: Path, folder: tuple[Path, dict[str, str]]) -> None:
    root, _ = folder
    store = oocseq.ingest_image_folder(root, tmp_path / "plain.zarr", image_size=SIZE, preshuffle=False)
    sources = [rel(s) for s in store.sources]
    y = store["y"][:]
    assert np.all(np.diff(y) >= 0), "class by class"
    class_names = store.metadata["class_names"]
    for label, cls in enumerate(class_names):
        in_class = [s for s, lab in zip(sources, y, strict=True) if lab == label]
        assert all(s.startswith(cls + "/") for s in in_class)
        assert in_class == sorted(in_class)
    assert not store.metadata["preshuffle"]


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), fmt=st.sampled_from(FORMATS))
def test_preshuffle_is_a_seeded_permutation(folder: tuple[Path, dict[str, str]], seed: int, fmt: str) -> None:
    root, _ = folder
    with tempfile.TemporaryDirectory() as d:
        plain = oocseq.ingest_image_folder(root, Path(d) / f"plain{fmt}", image_size=SIZE, preshuffle=False)
        a = oocseq.ingest_image_folder(root, Path(d) / f"a{fmt}", image_size=SIZE, seed=seed, chunk_len=5)
        b = oocseq.ingest_image_folder(root, Path(d) / f"b{fmt}", image_size=SIZE, seed=seed, chunk_len=3)
        src_plain = [rel(s) for s in plain.sources]
        src_a, src_b = [rel(s) for s in a.sources], [rel(s) for s in b.sources]
        assert src_a == src_b, "same seed, same order (whatever the chunking)"
        assert src_a != src_plain, "the pre-shuffle changes the order"
        assert sorted(src_a) == sorted(src_plain)
        assert a.metadata["preshuffle"]["seed"] == seed
        xa, ya, xp, yp = a["x"][:], a["y"][:], plain["x"][:], plain["y"][:]
        np.testing.assert_array_equal(xa, b["x"][:])
        np.testing.assert_array_equal(ya, b["y"][:])
        pos = {s: i for i, s in enumerate(src_plain)}
        perm = np.array([pos[s] for s in src_a])
        np.testing.assert_array_equal(xa, xp[perm])
        np.testing.assert_array_equal(ya, yp[perm])
        # not class-sorted any more
        assert not np.all(np.diff(ya) >= 0)
        for s in (plain, a, b):
            s.close()


def test_default_preshuffle_differs_between_seeds(
    tmp_path: Path, folder: tuple[Path, dict[str, str]]
) -> None:
    root, _ = folder
    default = oocseq.ingest_image_folder(root, tmp_path / "d.zarr", image_size=SIZE)
    assert default.metadata["preshuffle"] == {"seed": 0}
    s0 = [rel(s) for s in default.sources]
    s1 = [
        rel(s)
        for s in oocseq.ingest_image_folder(root, tmp_path / "s1.zarr", image_size=SIZE, seed=1).sources
    ]
    assert s0 != s1


def test_metadata(tmp_path: Path, folder: tuple[Path, dict[str, str]]) -> None:
    root, expected = folder
    store = oocseq.ingest_image_folder(root, tmp_path / "m.h5", image_size=SIZE, seed=7, color_mode="rgb")
    meta = store.metadata
    assert meta["preshuffle"] == {"seed": 7}
    assert list(meta["image_size"]) == list(SIZE)
    assert meta["color_mode"] == "rgb"
    assert meta["class_names"] == sorted(CLASSES)
    source = meta["source"]
    assert Path(source["root"]) == root.resolve()
    counts = Counter(expected.values())
    assert source["files_per_class"] == {c: counts[c] for c in sorted(CLASSES)}
    assert meta.get("skipped", []) == []
    again = oocseq.open_store(tmp_path / "m.h5")
    assert again.metadata == meta
    np.testing.assert_array_equal(again.sources, store.sources)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("color_mode", "pil_mode", "channels"), [("grayscale", "L", 1), ("rgba", "RGBA", 4), ("rgb", "RGB", 3)]
)
def test_color_modes(
    tmp_path: Path,
    folder: tuple[Path, dict[str, str]],
    fmt: str,
    color_mode: str,
    pil_mode: str,
    channels: int,
) -> None:
    root, expected = folder
    store = oocseq.ingest_image_folder(root, tmp_path / f"c{fmt}", image_size=(5, 4), color_mode=color_mode)
    assert store.fields["x"].shape == (len(expected), 5, 4, channels)
    assert store.metadata["color_mode"] == color_mode
    x = store["x"][:]
    options = ImageOptions((5, 4), color_mode)
    for i, src in enumerate(store.sources):
        np.testing.assert_array_equal(x[i], decode_image(str(root / src), options))
        np.testing.assert_array_equal(x[i], reference_decode(root / src, (5, 4), pil_mode))


def test_zarr_and_hdf5_agree(tmp_path: Path, folder: tuple[Path, dict[str, str]]) -> None:
    root, _ = folder
    z = oocseq.ingest_image_folder(root, tmp_path / "a.zarr", image_size=SIZE, seed=3, compression="zstd")
    h = oocseq.ingest_image_folder(
        root, tmp_path / "a.h5", image_size=SIZE, seed=3, compression=None, chunk_len=2
    )
    np.testing.assert_array_equal(z["x"][:], h["x"][:])
    np.testing.assert_array_equal(z["y"][:], h["y"][:])
    assert [rel(s) for s in z.sources] == [rel(s) for s in h.sources]
    zm = {k: v for k, v in z.metadata.items() if k != "compression"}
    hm = {k: v for k, v in h.metadata.items() if k != "compression"}
    assert zm == hm


def test_workers_do_not_change_the_result(tmp_path: Path, folder: tuple[Path, dict[str, str]]) -> None:
    root, _ = folder
    one = oocseq.ingest_image_folder(root, tmp_path / "w1.h5", image_size=SIZE, workers=1, chunk_len=3)
    many = oocseq.ingest_image_folder(root, tmp_path / "w4.h5", image_size=SIZE, workers=4, chunk_len=3)
    np.testing.assert_array_equal(one["x"][:], many["x"][:])
    np.testing.assert_array_equal(one["y"][:], many["y"][:])
    np.testing.assert_array_equal(one.sources, many.sources)


@pytest.mark.parametrize("fmt", FORMATS)
def test_skipped_images_keep_labels_aligned(tmp_path: Path, fmt: str) -> None:
    """With unreadable files skipped (pre-shuffled, several per chunk), every kept sample still
    has its own file's pixels and its own folder's label."""
    root = tmp_path / "src"
    expected = make_folder(root)
    bad = ["ant/zz_bad1.png", "dog/sub/bad2.jpg", "Zebra/a_bad3.gif"]
    for b in bad:
        (root / b).write_bytes(b"\x89PNG not really" * 3)
    with pytest.warns(UserWarning):
        store = oocseq.ingest_image_folder(
            root, tmp_path / f"s{fmt}", image_size=SIZE, on_error="skip", chunk_len=4, seed=11
        )
    sources = [rel(s) for s in store.sources]
    assert sorted(sources) == sorted(expected)
    assert sorted(rel(s["path"]) for s in store.metadata["skipped"]) == sorted(bad)
    x, y = store["x"][:], store["y"][:]
    names = store.metadata["class_names"]
    for i, src in enumerate(sources):
        assert names[y[i]] == expected[src]
        np.testing.assert_array_equal(x[i], reference_decode(root / src, SIZE), err_msg=src)


def test_single_class_single_image(tmp_path: Path) -> None:
    root = tmp_path / "src"
    make_folder(root, classes=["only"], files=[("one.png", "RGB", "PNG", (3, 3))])
    store = oocseq.ingest_image_folder(root, tmp_path / "s.zarr", image_size=(2, 2))
    assert len(store) == 1 and store.metadata["class_names"] == ["only"]
    assert store["y"][:].tolist() == [0]
    np.testing.assert_array_equal(store["x"][0], reference_decode(root / "only" / "one.png", (2, 2)))


def test_image_size_validated(tmp_path: Path, folder: tuple[Path, dict[str, str]]) -> None:
    root, _ = folder
    for bad in [(0, 4), (4,), (4, 4, 4), (-1, 3), (2.5, 3), "4x4"]:
        with pytest.raises(ValueError, match="image_size"):
            oocseq.ingest_image_folder(root, tmp_path / "bad.zarr", image_size=bad)
    with pytest.raises(ValueError, match="color_mode"):
        oocseq.ingest_image_folder(root, tmp_path / "bad.zarr", image_size=(4, 4), color_mode="cmyk")
    assert not (tmp_path / "bad.zarr").exists()


# -- DataFrames ------------------------------------------------------------------------------
def _frame_folder(root: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        relp = f"part{i % 2}/img_{i:03d}.png"
        (root / relp).parent.mkdir(parents=True, exist_ok=True)
        _img(rng, ["RGB", "L", "P", "RGBA"][i % 4], (4 + i % 5, 3 + i % 3)).save(root / relp, "PNG")
        names.append(relp)
    return names


@SETTINGS
@given(
    labels=st.lists(st.sampled_from(["cat", "dog", "bird", "Ant", "10", "9"]), min_size=1, max_size=12),
    fmt=st.sampled_from(FORMATS),
)
def test_dataframe_string_labels(labels: list[str], fmt: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "imgs"
        files = _frame_folder(root, len(labels))
        df = pd.DataFrame({"filename": files, "class": labels})
        store = oocseq.ingest_dataframe(
            df, Path(d) / f"df{fmt}", directory=root, image_size=(4, 3), preshuffle=False
        )
        class_names = sorted(set(labels))
        assert store.metadata["class_names"] == class_names
        assert store["y"][:].tolist() == [class_names.index(lab) for lab in labels]  # DataFrame order kept
        assert [rel(s) for s in store.sources] == files
        x = store["x"][:]
        for i, f in enumerate(files):
            np.testing.assert_array_equal(x[i], reference_decode(root / f, (4, 3)))
        store.close()


def test_dataframe_preshuffle_keeps_rows_together(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    files = _frame_folder(root, 12)
    labels = [["cat", "dog", "emu"][i % 3] for i in range(12)]
    df = pd.DataFrame({"filename": files, "class": labels})
    store = oocseq.ingest_dataframe(
        df, tmp_path / "df.zarr", directory=root, image_size=(3, 3), preshuffle=True, seed=5, chunk_len=5
    )
    sources = [rel(s) for s in store.sources]
    assert sources != files and sorted(sources) == sorted(files)
    by_file = dict(zip(files, labels, strict=True))
    x, y = store["x"][:], store["y"][:]
    for i, src in enumerate(sources):
        assert store.metadata["class_names"][y[i]] == by_file[src]
        np.testing.assert_array_equal(x[i], reference_decode(root / src, (3, 3)))


def test_dataframe_integer_labels_kept(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    files = _frame_folder(root, 6)
    labels = [7, -2, 0, 7, 1000, 3]
    df = pd.DataFrame({"path": files, "target": labels}, index=[10, 20, 30, 40, 50, 60])
    store = oocseq.ingest_dataframe(
        df,
        tmp_path / "df.h5",
        x_col="path",
        y_col="target",
        directory=root,
        image_size=(3, 3),
        preshuffle=False,
    )
    assert store["y"][:].tolist() == labels
    assert store.fields["y"].dtype == np.int64
    assert "class_names" not in store.metadata or store.metadata["class_names"] is None


def test_dataframe_absolute_paths_without_directory(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    files = _frame_folder(root, 3)
    df = pd.DataFrame({"filename": [str(root / f) for f in files], "class": ["b", "a", "b"]})
    store = oocseq.ingest_dataframe(df, tmp_path / "df.zarr", image_size=(3, 3))
    assert store.metadata["class_names"] == ["a", "b"]
    assert store["y"][:].tolist() == [1, 0, 1]


def test_dataframe_explicit_classes_order(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    files = _frame_folder(root, 4)
    df = pd.DataFrame({"filename": files, "class": ["z", "a", "m", "a"]})
    store = oocseq.ingest_dataframe(
        df, tmp_path / "df.zarr", directory=root, image_size=(3, 3), classes=["z", "m", "a"], preshuffle=False
    )
    assert store.metadata["class_names"] == ["z", "m", "a"]
    assert store["y"][:].tolist() == [0, 2, 1, 2]


def test_dataframe_label_not_in_classes(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    files = _frame_folder(root, 4)
    df = pd.DataFrame({"filename": files, "class": ["a", "b", "wolf", "a"]})
    dest = tmp_path / "df.zarr"
    with pytest.raises(InvalidSourceError) as e:
        oocseq.ingest_dataframe(df, dest, directory=root, image_size=(3, 3), classes=["a", "b"])
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "row 2" in msg and "wolf" in msg
    assert not dest.exists()


def test_dataframe_missing_label(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    files = _frame_folder(root, 3)
    df = pd.DataFrame({"filename": files, "class": ["a", None, "b"]})
    with pytest.raises(InvalidSourceError, match="row 1"):
        oocseq.ingest_dataframe(df, tmp_path / "df.zarr", directory=root, image_size=(3, 3))


@pytest.mark.parametrize("missing", ["x", "y"])
def test_dataframe_missing_column(tmp_path: Path, missing: str) -> None:
    root = tmp_path / "imgs"
    files = _frame_folder(root, 2)
    df = pd.DataFrame({"filename": files, "class": ["a", "b"]})
    kwargs = {"x_col": "file_path"} if missing == "x" else {"y_col": "label"}
    dest = tmp_path / "df.h5"
    with pytest.raises(InvalidSourceError) as e:
        oocseq.ingest_dataframe(df, dest, directory=root, image_size=(3, 3), **kwargs)
    assert isinstance(e.value, ValueError)
    assert next(iter(kwargs.values())) in str(e.value)
    assert not dest.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_dataframe_missing_file(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "imgs"
    files = _frame_folder(root, 3)
    df = pd.DataFrame({"filename": [*files[:2], "part0/ghost.png", files[2]], "class": ["a", "b", "a", "b"]})
    dest = tmp_path / f"df{fmt}"
    with pytest.raises(ImageDecodeError) as e:
        oocseq.ingest_dataframe(df, dest, directory=root, image_size=(3, 3))
    assert isinstance(e.value, InvalidSourceError) and isinstance(e.value, ValueError)
    assert "ghost.png" in str(e.value)
    assert Path(e.value.path).name == "ghost.png"
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_a_fifo_is_skipped_unopened_and_reported(tmp_path: Path) -> None:
    """A FIFO named like an image would block forever if opened; it is left out and listed."""
    import os

    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "src" / "a" / "ok.png")
    os.mkfifo(tmp_path / "src" / "a" / "pipe.png")
    for on_error in ("raise", "skip"):
        with pytest.warns(UserWarning, match="pipe.png"):
            store = oocseq.ingest_image_folder(
                tmp_path / "src", tmp_path / f"{on_error}.zarr", image_size=(4, 4), on_error=on_error
            )
        assert len(store) == 1
        assert [s["path"] for s in store.metadata["skipped"]] == ["a/pipe.png"]
        assert "not a regular file" in store.metadata["skipped"][0]["error"]
    # Decoding a path that is a FIFO (a DataFrame row) fails at once, naming it.
    with pytest.raises(ImageDecodeError, match="not a regular file") as info:
        decode_image(str(tmp_path / "src" / "a" / "pipe.png"), ImageOptions((4, 4)))
    assert info.value.path.endswith("pipe.png")


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path, mode: str) -> None:
    values = (np.arange(192).reshape(12, 16) * 300).astype(np.uint16)  # 0..57300
    img = Image.fromarray(values) if mode == "I;16" else Image.fromarray(values.astype(np.int32), "I")
    path = tmp_path / ("g16.png" if mode == "I;16" else "g32.tif")  # PNG cannot hold mode I
    img.save(path)
    out = decode_image(str(path), ImageOptions((12, 16), color_mode="grayscale"))
    np.testing.assert_array_equal(out[..., 0], (values.astype(np.uint32) * 255 + 32767) // 65535)
    assert out.max() == round(57300 * 255 / 65535)


def test_float_pixels_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(ImageDecodeError, match="floating-point"):
        decode_image(str(path), ImageOptions((4, 4)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_folder_ingestion_resumes_after_an_interrupt(tmp_path: Path, fmt: str, monkeypatch) -> None:
    """KeyboardInterrupt keeps the partial store; the same call resumes it (skipped files
    before the interruption stay listed) and gives the store an uninterrupted run gives."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(12):
            _img(rng, "RGB", (5, 5)).save(tmp_path / "src" / c / f"{i}.png")
    (tmp_path / "src" / "a" / "3.png").write_bytes(b"not a png")
    kw = {"image_size": (4, 4), "chunk_len": 3, "on_error": "skip", "workers": 1}
    with pytest.warns(UserWarning):
        ref = oocseq.ingest_image_folder(tmp_path / "src", tmp_path / f"ref{fmt}", **kw)
    from oocseq.ingest import _writer

    real_append, calls = _writer.StoreWriter.append, [0]

    def interrupted(self, name, data):
        calls[0] += 1
        if calls[0] == 9:
            raise KeyboardInterrupt
        real_append(self, name, data)

    monkeypatch.setattr(_writer.StoreWriter, "append", interrupted)
    dest = tmp_path / f"s{fmt}"
    with pytest.raises(KeyboardInterrupt):
        oocseq.ingest_image_folder(tmp_path / "src", dest, **kw)
    assert not dest.exists() and any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    monkeypatch.setattr(_writer.StoreWriter, "append", real_append)
    taken = []
    real_take = _writer.StoreWriter._take_over
    monkeypatch.setattr(
        _writer.StoreWriter,
        "_take_over",
        lambda self, *a: real_take(self, *a) and not taken.append(a[2]["k"]),
    )
    with pytest.warns(UserWarning, match="skipped 1"):
        store = oocseq.ingest_image_folder(tmp_path / "src", dest, **kw)
    assert taken and taken[0] >= 2
    np.testing.assert_array_equal(store["x"][:], ref["x"][:])
    np.testing.assert_array_equal(store["y"][:], ref["y"][:])
    assert list(store.sources) == list(ref.sources)
    assert store.metadata == ref.metadata
    assert store.manifest.checksums == ref.manifest.checksums
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", f"ref{fmt}", f"s{fmt}"])
