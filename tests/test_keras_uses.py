"""What ``model.fit`` (``train_step``), ``evaluate`` (``test_step``) and ``predict`` receive from a
ChunkedSequence in the ways users call them, on the JAX (this process), PyTorch and TensorFlow
backends (fresh processes, with oocseq or Keras imported first): see ``keras_uses.py``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from conftest import make_store
from keras_uses import BATCH, CHUNK, N, run_all

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ALL = list(range(N))


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def check(out: dict) -> None:
    n_batches = N // BATCH
    # predict after a peek: every row once, in store order (and again, and after another peek)
    assert out["predict_after_peek"] == [ALL, ALL]
    assert out["predict_after_second_peek"] == ALL
    # evaluate: each sample once, each time
    for key in ("evaluate", "evaluate_again"):
        assert len(out[key]) == n_batches and sorted(flat(out[key])) == ALL, key
    # fit: Keras epoch k trains plan epoch k, in plan order
    assert out["fit"] == out["fit_plan"]
    # steps_per_epoch = len / 2: two Keras epochs make one plan epoch, in plan order
    half = out["fit_half_steps"]
    assert [len(e) for e in half] == [n_batches // 2] * 4
    assert [half[0] + half[1], half[2] + half[3]] == out["fit_half_steps_plan"]
    # steps_per_epoch > len: a clear ArgumentError
    name, is_oocseq, message = out["too_many_steps"]
    assert is_oocseq and "steps_per_epoch" in message, out["too_many_steps"]
    # predict after fit on a shuffled sequence: every sample once
    assert sorted(out["predict_after_fit"]) == ALL
    # subclasses
    for name, got in out["subclass"].items():
        assert got["is_pydataset"], name
        assert len(got["fit"]) == 1 and sorted(flat(got["fit"][0])) == ALL, name
        assert sorted(flat(got["evaluate"])) == ALL, name
        assert got["predict"] == ALL, name
    assert out["subclass"]["transform"]["labels_shifted"] is True
    assert out["subclass_getitem_calls"] >= 3 * n_batches
    # in-memory arrays
    assert len(out["arrays_fit"]) == 2
    for epoch in out["arrays_fit"]:
        assert sorted(flat(epoch)) == ALL
    assert out["arrays_predict"] == ALL


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    return str(make_store(tmp_path_factory.mktemp("uses") / "s.zarr", N, CHUNK).path)


def test_keras_uses_in_this_process(store_path):
    try:
        out = run_all(store_path)
    finally:
        keras.backend.clear_session()
    check(out)


CONFIGS = [("torch", True), ("tensorflow", False), ("jax", False)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("backend", "oocseq_first"), CONFIGS, ids=[f"{b}-{'oocseq' if o else 'keras'}-first" for b, o in CONFIGS]
)
def test_keras_uses_on_other_backends(store_path, tmp_path, backend, oocseq_first):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    arg = json.dumps({"store_path": store_path, "oocseq_first": oocseq_first})
    proc = subprocess.run(
        [sys.executable, str(TESTS / "keras_uses.py"), arg],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=280,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["backend"] == backend
    check(out)
