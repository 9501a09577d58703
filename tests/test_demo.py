"""The README's main job (scripts/train_demo.py) runs end to end: real PNG folder and CSV
files, ingestion into Zarr and HDF5, Keras fit from ChunkedSequence. Few epochs here, so the
accuracy gate of the script is not what is checked; that training learns is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import oocseq

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"


@pytest.mark.timeout(300)
def test_train_demo_runs_end_to_end(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    demo = importlib.util.module_from_spec(spec)
    sys.modules["train_demo"] = demo
    spec.loader.exec_module(demo)

    status = demo.main(["--workdir", str(tmp_path), "--epochs", "3", "--csv-epochs", "5"])
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
