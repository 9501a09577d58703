"""The ``oocseq`` command: ``main([...])`` in-process, and once as ``python -m oocseq``."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oocseq.cli import main, parse_size
from oocseq.store import open_store

REPO = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 images of class ``circle`` and 2 of class ``square``, of different sizes."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, count in (("circle", 3), ("square", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, size=(10 + i, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "wine.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["alcohol", "ash", "kind"])
        for i in range(11):
            writer.writerow([12 + i / 10, 2 + i / 100, ("red", "white")[i % 3 == 0]])
    return path


def test_ingest_images_and_info(
    capsys: pytest.CaptureFixture[str], image_folder: Path, tmp_path: Path, fmt: str
) -> None:
    dest = tmp_path / f"img{fmt}"
    code, out, _ = run(
        capsys,
        "ingest",
        "images",
        image_folder,
        dest,
        "--size",
        "8x6",
        "--seed",
        "3",
        "--compression",
        "zstd",
    )
    assert code == 0, out
    assert "wrote" in out and "5 samples" in out
    store = open_store(dest)
    assert store.fields["x"].shape == (5, 8, 6, 3)
    assert store.metadata["compression"]["cname"] == "zstd"

    code, out, _ = run(capsys, "info", dest)
    assert code == 0
    assert "samples:      5" in out
    assert "(5, 8, 6, 3)" in out and "uint8" in out and "(5,)" in out and "int64" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["0", "circle", "3"] in lines and ["1", "square", "2"] in lines
    assert "image_folder" in out


def test_ingest_images_options(
    capsys: pytest.CaptureFixture[str], image_folder: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "img.h5"
    code, _, err = run(
        capsys,
        "ingest",
        "images",
        image_folder,
        dest,
        "--size",
        "4",
        "--color-mode",
        "grayscale",
        "--no-preshuffle",
        "--chunk-len",
        "2",
        "--compression",
        "none",
        "--workers",
        "1",
        "-q",
    )
    assert code == 0, err
    store = open_store(dest)
    assert store.fields["x"].shape == (5, 4, 4, 1) and store.chunk_len == 2
    assert store.metadata["compression"] is None and store.metadata["preshuffle"] is None
    np.testing.assert_array_equal(store["y"][:], [0, 0, 0, 1, 1])


def test_ingest_csv_and_info(capsys: pytest.CaptureFixture[str], table: Path, tmp_path: Path) -> None:
    dest = tmp_path / "wine.zarr"
    code, out, _ = run(
        capsys,
        "ingest",
        "csv",
        table,
        dest,
        "--label",
        "kind",
        "--features",
        "ash,alcohol",
        "--block-rows",
        "4",
    )
    assert code == 0
    store = open_store(dest)
    assert store.metadata["feature_names"] == ["ash", "alcohol"]
    np.testing.assert_allclose(store["x"][:, 1], (12 + np.arange(11) / 10)[store.source_index], rtol=1e-6)

    code, out, _ = run(capsys, "info", dest)
    assert code == 0
    assert "(11, 2)" in out and "float32" in out and "(11,)" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["0", "red", "7"] in lines and ["1", "white", "4"] in lines
    assert "features (2): ash, alcohol" in out
    assert f"csv, {table.resolve()}, 11 rows" in out


def test_ingest_npy_and_verify(capsys: pytest.CaptureFixture[str], tmp_path: Path, fmt: str) -> None:
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.int16).reshape(6, 2))
    np.save(tmp_path / "b.npy", np.arange(4, dtype=np.int16).reshape(2, 2))
    dest = tmp_path / f"n{fmt}"
    code, out, _ = run(
        capsys,
        "ingest",
        "npy",
        tmp_path / "a.npy",
        tmp_path / "b.npy",
        dest,
        "--field",
        "emb",
        "--chunk-len",
        "3",
    )
    assert code == 0
    assert "emb (8, 2) int16" in out
    code, out, _ = run(capsys, "verify", dest)
    assert code == 0 and out.startswith("OK")
    code, out, _ = run(capsys, "info", dest)
    assert "emb" in out and "(8, 2)" in out and "3 (3 chunks)" in out and "npy, 2 file(s)" in out


def test_verify_reports_a_damaged_chunk(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(40, dtype=np.float64).reshape(10, 4))
    dest = tmp_path / "n.zarr"
    assert (
        run(capsys, "ingest", "npy", tmp_path / "a.npy", dest, "--chunk-len", "5", "--compression", "none")[0]
        == 0
    )
    chunk = next(p for p in sorted((dest / "x").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", dest)
    assert code == 1 and out == ""
    assert err.startswith("oocseq: error:") and "checksum" in err and "Traceback" not in err


def test_errors_are_one_line_without_traceback(
    capsys: pytest.CaptureFixture[str], table: Path, tmp_path: Path
) -> None:
    code, _, err = run(capsys, "ingest", "csv", tmp_path / "missing.csv", tmp_path / "s.zarr")
    assert code == 1 and err.startswith("oocseq: error:") and "missing.csv" in err

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3,x\n")
    code, _, err = run(capsys, "ingest", "csv", bad, tmp_path / "s.zarr", "-q")
    assert code == 1 and "row 1" in err and "'b'" in err and "Traceback" not in err

    code, _, err = run(capsys, "ingest", "csv", table, tmp_path / "s.txt", "-q")
    assert code == 1 and "*.zarr" in err

    code, _, err = run(capsys, "info", tmp_path / "none.zarr")
    assert code == 1 and "no store" in err

    assert run(capsys, "ingest", "csv", table, tmp_path / "w.zarr", "--label", "kind", "-q")[0] == 0
    code, _, err = run(capsys, "ingest", "csv", table, tmp_path / "w.zarr", "--label", "kind", "-q")
    assert code == 1 and "overwrite" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], image_folder: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "ingest", "images", image_folder, tmp_path / "s.zarr", "--size", "32by32")
    assert code == 2 and "HEIGHTxWIDTH" in err
    assert run(capsys, "ingest", "images", image_folder, tmp_path / "s.zarr")[0] == 2  # --size is required
    assert run(capsys, "ingest", "csv", "a.csv", "s.zarr", "--chunk-len", "0")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys)[0] == 2
    assert run(capsys, "--help")[0] == 0


def test_parse_size() -> None:
    assert parse_size("32x48") == (32, 48)
    assert parse_size("64") == (64, 64)
    for bad in ("0x3", "3x", "x", "3x4x5", "-2x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="HEIGHTxWIDTH"):
            parse_size(bad)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_python_dash_m(tmp_path: Path, table: Path) -> None:
    dest = tmp_path / "wine.h5"
    ingest = subprocess.run(
        [sys.executable, "-m", "oocseq", "ingest", "csv", str(table), str(dest), "--label", "kind"],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert ingest.returncode == 0, ingest.stderr
    info = subprocess.run(
        [sys.executable, "-m", "oocseq", "info", str(dest)],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert info.returncode == 0, info.stderr
    assert "x      (11, 2)" in info.stdout and "white" in info.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "oocseq", "info", str(tmp_path / "none.h5")],
        capture_output=True,
        text=True,
        env=_env(),
        check=False,
    )
    assert missing.returncode == 1 and missing.stderr.startswith("oocseq: error:")


def test_cli_imports_no_ml_framework() -> None:
    code = (
        "import sys, oocseq.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'keras', 'torch', 'jax', 'tensorflow'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True
    )
    assert result.stdout.strip() == "[]"


# -- errors name the command's flags; the report of what an ingestion did -----------------------------
#: Python keyword spellings that must not reach a command-line user.
PYTHON_SPELLINGS = (
    "=True",
    "=False",
    "on_error=",
    "feature_columns",
    "label_column",
    "allow_missing",
    "exclude=",
)


def test_errors_name_the_flags(
    capsys: pytest.CaptureFixture[str], image_folder: Path, tmp_path: Path
) -> None:
    table = tmp_path / "t.csv"
    table.write_text("id,a,b,label\nr0,1,,cat\nr1,3,4,dog\n")
    cases = [
        # (argv, flag the message must name)
        (["ingest", "csv", table, tmp_path / "s.zarr", "--label", "label"], "--exclude id"),
        (
            ["ingest", "csv", table, tmp_path / "s.zarr", "--label", "label", "--exclude", "id"],
            "--allow-missing",
        ),
        (["ingest", "csv", table, tmp_path / "s.zarr", "--label", "nope"], "(--label)"),
        (["ingest", "csv", table, tmp_path / "s.zarr", "--features", "a,zz"], "(--features)"),
        (["ingest", "csv", table, tmp_path / "s.zarr", "--exclude", "zz"], "(--exclude)"),
        (
            ["ingest", "csv", table, tmp_path / "s.zarr", "--label", "label", "--exclude", "label"],
            "--exclude",
        ),
        (["ingest", "csv", table, tmp_path / "s.zarr", "--features", "a", "--exclude", "a"], "--features"),
    ]
    (image_folder / "circle" / "broken.png").write_bytes(b"not an image")
    cases.append(
        (["ingest", "images", image_folder, tmp_path / "i.zarr", "--size", "4x4"], "--on-error skip")
    )
    existing = tmp_path / "e.zarr"
    assert run(capsys, "ingest", "npy", _npy(tmp_path), existing, "-q")[0] == 0
    cases.append((["ingest", "npy", _npy(tmp_path), existing, "-q"], "--overwrite"))
    for argv, flag in cases:
        code, _, err = run(capsys, *argv, "-q")
        assert code == 1, (argv, err)
        assert flag in err, (argv, err)
        assert not any(s in err for s in PYTHON_SPELLINGS), (argv, err)


def _npy(tmp_path: Path) -> Path:
    path = tmp_path / "a.npy"
    np.save(path, np.arange(40, dtype=np.float32).reshape(10, 4))
    return path


def test_cli_message_leaves_paths_alone() -> None:
    from oocseq.cli import cli_message

    msg = "/data/overwrite/label_column.csv (exclude)/x: pass overwrite=True"
    assert cli_message(msg) == "/data/overwrite/label_column.csv (--exclude)/x: pass --overwrite"
    msg = "check delimiter=',' and encoding='utf-8'; chunk_len=99 makes chunks"
    assert cli_message(msg) == "check --delimiter ',' and --encoding 'utf-8'; --chunk-len 99 makes chunks"


def test_exclude_on_the_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text(
        "id,a,date,b,label\n" + "".join(f"r{i},{i},2024-01-0{i % 9 + 1},{2 * i},c{i % 2}\n" for i in range(7))
    )
    dest = tmp_path / "s.zarr"
    code, _, err = run(capsys, "ingest", "csv", table, dest, "--label", "label", "--exclude", "id,date", "-q")
    assert code == 0, err
    store = open_store(dest)
    assert store.metadata["feature_names"] == ["a", "b"]


def test_ingest_report(capsys: pytest.CaptureFixture[str], image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "square" / "broken.png").write_bytes(b"not an image")
    dest = tmp_path / "s.zarr"
    code, out, err = run(
        capsys, "ingest", "images", image_folder, dest, "--size", "4x4", "--on-error", "skip", "-q"
    )
    assert code == 0 and err == ""  # skipped files are in the report, not a Python warning
    files = sorted(p for p in image_folder.rglob("*.png"))
    lines = out.splitlines()
    assert lines[0].startswith(f"wrote {dest} (zarr): 5 samples; x (5, 4, 4, 3) uint8")
    assert f"from {len(files)} files" in lines[1]
    assert "ratio" in lines[1] and "uncompressed" in lines[1]
    assert "images/s" in lines[2] and "/s read" in lines[2]
    assert "skipped 1 file" in out and "square/broken.png" in out

    code, out, _ = run(
        capsys, "ingest", "npy", _npy(tmp_path), tmp_path / "n.h5", "--compression", "none", "-q"
    )
    assert code == 0 and "10 samples" in out and "samples/s" in out
    assert "wrote 160 B of chunks (160 B uncompressed, ratio 1.00x" in out
