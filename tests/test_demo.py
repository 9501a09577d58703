"""The README's main job (scripts/train_demo.py) runs end to end in its ``--quick`` mode: real
PNG folder and CSV files, ingestion into Zarr and HDF5, Keras fit from ChunkedSequence. Few
epochs here, so the accuracy gate of the script is not what is checked; that training learns is.
The larger-than-memory stage (minutes, GBs of disk) is not run here: only its disk check and
its data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import oocseq

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"


def _load_demo():
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    demo = importlib.util.module_from_spec(spec)
    sys.modules["train_demo"] = demo
    spec.loader.exec_module(demo)
    return demo


@pytest.mark.timeout(300)
def test_train_demo_runs_end_to_end(tmp_path, capsys):
    demo = _load_demo()
    status = demo.main(["--quick", "--workdir", str(tmp_path), "--epochs", "3", "--csv-epochs", "5"])
    out = capsys.readouterr().out

    assert status in (0, 1)  # 1 only if an accuracy is under the full run's gate
    rows = [line for line in out.splitlines() if line.startswith("| digits") or line.startswith("| breast")]
    assert len(rows) == 4  # two datasets x two formats
    accuracies = [float(r.split("|")[4]) for r in rows]
    assert min(accuracies) > 0.7, rows  # chance is 0.1 (digits) and ~0.6 (cancer)
    for name, n in (("digits_train", 1437), ("digits_val", 360)):
        zarr_store = oocseq.open_store(tmp_path / f"{name}.zarr")
        h5_store = oocseq.open_store(tmp_path / f"{name}.h5")
        assert abs(len(zarr_store) - n) <= 5 and len(zarr_store) == len(h5_store)
        assert zarr_store.metadata["class_names"] == [str(d) for d in range(10)]


def test_larger_than_memory_stage_checks_disk_space_first(tmp_path, capsys):
    demo = _load_demo()
    status = demo.main(["--workdir", str(tmp_path), "--big-gb", "1e9"])
    err = capsys.readouterr().err
    assert status == 2
    assert "not enough disk space" in err and "--big-gb" in err
    assert not any(tmp_path.glob("crops_*"))  # nothing written


def test_photo_crops_are_labelled_by_their_quadrant():
    import _photo_crops as crops

    x = np.concatenate(list(crops.crops(1500, seed=3)))
    y = np.concatenate(list(crops.labels(1500, seed=3)))
    assert x.shape == (1500, crops.CROP, crops.CROP, 3) and x.dtype == np.uint8
    assert np.array_equal(y, np.concatenate(list(crops.labels(1500, seed=3))))  # deterministic
    assert set(np.unique(y)) == set(range(len(crops.CLASS_NAMES)))
    # Each crop is its labelled photo quadrant's pixels at its corner (up to brightness and
    # mirroring), and lies wholly inside that quadrant.
    photos = crops.photos()
    qh, qw = photos[0].shape[0] // 2, photos[0].shape[1] // 2
    _, labels, corners = crops._block_labels_and_corners(1500, 3, 0)
    for j in range(0, len(labels), 7):
        c, (r, col) = labels[j], corners[j]
        assert (c // 2) % 2 * qh <= r <= (c // 2) % 2 * qh + qh - crops.CROP
        assert c % 2 * qw <= col <= c % 2 * qw + qw - crops.CROP
        region = photos[c // 4][r : r + crops.CROP, col : col + crops.CROP].astype(float)
        got = x[j].astype(float)
        err = min(
            np.abs(got - np.clip(mirrored * g, 0, 255)).mean()
            for g in crops.GAINS
            for mirrored in (region, region[:, ::-1])
        )
        assert err < 1.0, (j, err)
