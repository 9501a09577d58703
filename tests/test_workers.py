"""Keras ``model.fit`` with ``workers``, ``use_multiprocessing`` and ``max_queue_size``: one
worker, worker threads, and worker processes under fork, spawn and forkserver, on Zarr and HDF5
stores, on the JAX, PyTorch and TensorFlow backends.

What the model trains on is recorded in ``train_step`` (``run_eagerly=True``). oocseq runs the
workers itself (Keras's own enqueuer re-serves batches across epochs on JAX and PyTorch, see
:mod:`oocseq.prefetch`), so in every configuration Keras epoch ``k`` must train exactly the
batches of plan epoch ``k`` (also with ``SyncEpoch``; the batch ``fit`` reads to build the
model first is not counted), in plan order: every sample exactly once, and the same batches whatever the
configuration.

Runs on another backend or with worker processes happen in a fresh Python process (the backend
and the start method are global), which prints its recordings as JSON; every such test runs
under a timeout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import ids_of, make_store, y_of

from oocseq import ChunkedSequence, TransformError
from oocseq.adapters.keras import SyncEpoch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

N, CHUNK, BATCH, SEED, WINDOW, EPOCHS = 103, 8, 10, 5, 2, 2  # 11 batches per epoch


# -- recording what model.fit trains on ----------------------------------------------------------
class Recorder(keras.Model):
    """Records the sample ids (x[:, 0]) of every batch ``train_step`` receives."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(10)
        self.steps: list[list[int]] = []

    def call(self, x):
        return self.dense(x)

    def train_step(self, *args):  # jax: (state, data); tensorflow / torch: (data,)
        data = args[-1]
        ids = ids_of(np.asarray(data[0]))
        np.testing.assert_array_equal(np.asarray(data[1]), y_of(ids))
        self.steps.append(ids.tolist())
        return super().train_step(*args)


class EpochSplitter(keras.callbacks.Callback):
    def __init__(self, recorder: Recorder):
        super().__init__()
        self.recorder = recorder
        self.epochs: list[list[list[int]]] = []
        self._start = 0

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(self.recorder.steps[self._start :])
        self._start = len(self.recorder.steps)


class LogIds:
    """A transform that logs ``(pid, first sample ids)`` of every batch it prepares to a file
    (appends from any thread or process): to tell where batches were prepared."""

    def __init__(self, log: str):
        self.log = log

    def __call__(self, batch):
        line = json.dumps({"pid": os.getpid(), "ids": batch["x"][:3, 0].astype(np.int64).tolist()})
        with open(self.log, "a") as f:
            f.write(line + "\n")
        return batch


class RaiseOn:
    """A transform that raises on the batch holding ``sample`` (picklable: module level)."""

    def __init__(self, sample: int):
        self.sample = sample

    def __call__(self, batch):
        if self.sample in batch["x"][:, 0].astype(np.int64):
            raise ValueError(f"cannot augment sample {self.sample}")
        return batch


def run_fit(
    store_path: str,
    *,
    workers: int = 1,
    use_multiprocessing: bool = False,
    epochs: int = EPOCHS,
    sync: bool = False,
    raise_on: int | None = None,
    log: str | None = None,
) -> dict:
    """``model.fit`` on a ChunkedSequence; what it trained on, per epoch, and what warned.
    Returns a JSON-serialisable dict (also used by the subprocess runs)."""
    keras.utils.set_random_seed(0)
    random.seed(1234)  # Keras shuffles batch indices with Python's random
    kw = dict(seed=SEED, window=WINDOW, workers=workers, use_multiprocessing=use_multiprocessing)
    if raise_on is not None:
        kw["transform"] = RaiseOn(raise_on)
    elif log is not None:
        kw["transform"] = LogIds(log)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seq = ChunkedSequence(store_path, BATCH, **kw)
        model = Recorder()
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
        splitter = EpochSplitter(model)
        callbacks = [splitter, SyncEpoch(seq)] if sync else [splitter]
        error = None
        try:
            model.fit(seq, epochs=epochs, verbose=0, callbacks=callbacks)
        except Exception as e:
            error = {
                "type": type(e).__name__,
                "message": str(e),
                "notes": list(getattr(e, "__notes__", [])),
                "is_transform_error": isinstance(e, TransformError),
            }
        seq.close()
    return {
        "backend": keras.backend.backend(),
        "pid": os.getpid(),
        "epochs": splitter.epochs,
        "len": len(seq),
        "seq_epoch": seq.epoch,
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught if "oocseq" in str(w.filename)],
        "error": error,
    }


SCRIPT = """
import json, multiprocessing, sys

if __name__ == "__main__":
    cfg = json.loads(sys.argv[1])
    multiprocessing.set_start_method(cfg.pop("start_method"), force=True)
    import test_workers
    print("RESULT " + json.dumps(test_workers.run_fit(**cfg)))
"""


def run_fit_in_subprocess(tmp_path: Path, start_method: str, backend: str | None = None, **cfg) -> dict:
    script = tmp_path / "fit_script.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "KERAS_BACKEND": backend or keras.backend.backend(),
        "JAX_PLATFORMS": "cpu",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    arg = json.dumps({"start_method": start_method, **cfg})
    proc = subprocess.run(
        [sys.executable, str(script), arg], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=150
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["backend"] == env["KERAS_BACKEND"]
    return result


# -- what the plan says --------------------------------------------------------------------------
def plan_epoch(store_path, epoch: int) -> list[list[int]]:
    """The batches (sample ids) of plan epoch ``epoch``, in plan order."""
    ref = ChunkedSequence(store_path, BATCH, seed=SEED, window=WINDOW)
    ref.set_epoch(epoch)
    return [ref.batch_indices(i).tolist() for i in range(len(ref))]


def describe(batches: list[list[int]], store_path, epoch: int) -> str:
    """Where a Keras epoch's batches differ from the plan's, for failure messages."""
    want = plan_epoch(store_path, epoch)
    counts: dict[int, int] = {}
    for b in batches:
        for i in b:
            counts[i] = counts.get(i, 0) + 1
    twice = sorted(i for i, c in counts.items() if c > 1)
    never = sorted(set(range(N)) - set(counts))
    first = next((j for j, (a, b) in enumerate(zip(batches, want, strict=False)) if a != b), None)
    return (
        f"{len(batches)} batches trained, plan has {len(want)}; first differing batch: {first}; "
        f"samples trained twice: {twice[:20]}, never: {never[:20]}"
    )


def check_run(store_path, result: dict, *, sync: bool = False, epochs: int = EPOCHS) -> None:
    """Keras epoch k trained exactly plan epoch k, in plan order, and
    oocseq had nothing to warn about."""
    assert result["error"] is None, result["error"]
    assert result["warnings"] == [], result["warnings"]
    assert result["len"] == -(-N // BATCH)
    assert len(result["epochs"]) == epochs
    for k, batches in enumerate(result["epochs"]):
        e = k
        assert batches == plan_epoch(store_path, e), f"Keras epoch {k} vs plan epoch {e}: " + describe(
            batches, store_path, e
        )
        assert sorted(i for b in batches for i in b) == list(range(N))  # exactly once (implied)


def prepared_by(log: Path) -> set[int]:
    """The processes whose transform prepared batches."""
    return {json.loads(line)["pid"] for line in log.read_text().splitlines()}


@pytest.fixture(autouse=True)
def _clear_keras():
    yield
    keras.backend.clear_session()


# -- in this process (JAX): one worker and worker threads ----------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("workers", "sync"), [(1, False), (1, True), (3, False), (3, True)])
def test_threads_train_every_sample_once(tmp_path, fmt, workers, sync):
    store = make_store(tmp_path / f"s{fmt}", N, CHUNK)
    log = tmp_path / "prepared.log"
    result = run_fit(str(store.path), workers=workers, sync=sync, log=str(log))
    check_run(store.path, result, sync=sync)
    assert prepared_by(log) == {os.getpid()}


# -- worker processes, other backends ------------------------------------------------------------
def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# (backend, start method, store format, workers, use_multiprocessing). Spawn and
# forkserver workers import oocseq (not Keras): fast to start. Threads on every backend.
SUBPROCESS_CONFIGS = [
    ("jax", "fork", ".h5", 2, True),
    ("jax", "spawn", ".zarr", 2, True),
    ("jax", "forkserver", ".h5", 2, True),
    ("torch", "fork", ".zarr", 2, True),
    ("torch", "spawn", ".h5", 2, True),
    ("torch", "forkserver", ".zarr", 2, True),
    ("torch", "spawn", ".zarr", 3, False),
    ("tensorflow", "fork", ".h5", 2, True),
    ("tensorflow", "spawn", ".zarr", 2, True),
    ("tensorflow", "forkserver", ".h5", 2, True),
    ("tensorflow", "spawn", ".h5", 3, False),
    ("tensorflow", "spawn", ".zarr", 1, False),
]


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    ("backend", "start_method", "suffix", "workers", "use_multiprocessing"),
    SUBPROCESS_CONFIGS,
    ids=[f"{b}-{m if mp else 'threads'}-{s[1:]}-w{w}" for b, m, s, w, mp in SUBPROCESS_CONFIGS],
)
def test_backends_and_worker_processes(tmp_path, backend, start_method, suffix, workers, use_multiprocessing):
    if not _has(backend):  # the backend's module has the backend's name
        pytest.skip(f"{backend} is not installed (pip install -e '.[test]' installs it)")
    store = make_store(tmp_path / f"s{suffix}", N, CHUNK)
    log = tmp_path / "prepared.log"
    result = run_fit_in_subprocess(
        tmp_path,
        start_method,
        backend=backend,
        store_path=str(store.path),
        workers=workers,
        use_multiprocessing=use_multiprocessing,
        log=str(log),
    )
    check_run(store.path, result)
    pids = prepared_by(log)
    if use_multiprocessing:  # prepared in worker processes only
        assert pids and result["pid"] not in pids, f"prepared by {pids}, fit ran in {result['pid']}"
    else:
        assert pids == {result["pid"]}


@pytest.mark.timeout(200)
def test_process_workers_with_sync_epoch(tmp_path):
    store = make_store(tmp_path / "s.h5", N, CHUNK)
    result = run_fit_in_subprocess(
        tmp_path, "fork", store_path=str(store.path), workers=2, use_multiprocessing=True, sync=True
    )
    check_run(store.path, result, sync=True)


def test_keras_sees_a_sequential_dataset(tmp_path):
    """Keras must not start its own enqueuer (it re-serves batches across epochs on JAX and
    PyTorch); the workers asked for are oocseq's."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    seq = ChunkedSequence(store, BATCH, workers=4, use_multiprocessing=True, max_queue_size=7)
    assert PyDatasetAdapter(seq).enqueuer is None
    assert (seq.worker_options.workers, seq.worker_options.use_multiprocessing) == (4, True)
    assert seq.worker_options.max_queue_size == 7 == seq.max_queue_size
    seq.workers = 3  # set after construction: still oocseq's
    seq.use_multiprocessing = False
    assert PyDatasetAdapter(seq).enqueuer is None
    assert (seq.worker_options.workers, seq.worker_options.use_multiprocessing) == (3, False)
    seq.close()


# -- an exception in a worker reaches the caller -------------------------------------------------
def _bad_sample_and_check(store_path, error_text: str, sample: int) -> None:
    assert str(store_path) in error_text, error_text
    m = re.search(r"plan batch (\d+), epoch (\d+)", error_text)
    assert m, f"no batch index in: {error_text}"
    batch, epoch = int(m.group(1)), int(m.group(2))
    ref = ChunkedSequence(store_path, BATCH, seed=SEED, window=WINDOW)
    ref.set_epoch(epoch)
    assert sample in ref.batch_indices(batch).tolist(), (
        f"batch {batch} of epoch {epoch} does not hold {sample}"
    )
    assert f"cannot augment sample {sample}" in error_text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 3])
def test_exception_in_a_thread_worker_reaches_fit(tmp_path, workers):
    store = make_store(tmp_path / "s.h5", N, CHUNK)
    model = Recorder()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    seq = ChunkedSequence(store, BATCH, seed=SEED, window=WINDOW, transform=RaiseOn(57), workers=workers)
    with pytest.raises(TransformError) as info:
        model.fit(seq, epochs=2, verbose=0)
    e = info.value
    _bad_sample_and_check(store.path, str(e) + "\n" + "\n".join(getattr(e, "__notes__", [])), 57)
    # and the sequence still serves: nothing is left locked
    np.testing.assert_array_equal(ids_of(seq.batch(0)[0]), seq.batch_indices(0))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_exception_in_a_worker_process_reaches_fit(tmp_path, start_method):
    store = make_store(tmp_path / "s.zarr", N, CHUNK)
    result = run_fit_in_subprocess(
        tmp_path, start_method, store_path=str(store.path), workers=2, use_multiprocessing=True, raise_on=57
    )
    error = result["error"]
    assert error is not None, "fit did not raise"
    assert error["is_transform_error"], error
    _bad_sample_and_check(store.path, error["message"] + "\n" + "\n".join(error["notes"]), 57)
