"""Keras ``model.fit`` with PyDataset workers: one worker, a thread pool, and worker processes
under fork, spawn and forkserver, on Zarr and HDF5 stores.

What the model trains on is recorded in ``train_step`` (``run_eagerly=True``). Where Keras
delivers every batch once, every sample must be trained exactly once per epoch. Where Keras
itself re-serves batches (its ``OrderedEnqueuer`` with ``workers > 1`` or
``use_multiprocessing=True`` on the JAX and PyTorch backends, see DESIGN.md and issue 4),
oocseq must warn, and what it serves must still be batches of its epoch plans, with a new
shuffle every epoch.

Worker-process runs happen in a fresh Python process (the start method is global), which prints
its recordings as JSON; every such test runs under a timeout.
"""

from __future__ import annotations

import collections
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
from oocseq.adapters.keras import KerasChunkedSequence, SyncEpoch

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


class LoggedSequence(KerasChunkedSequence):
    """The library's Keras sequence, logging every request ``(pid, i, epoch, first ids)`` to a
    file (appends from any thread or process), to report what Keras asked for, and where."""

    def __init__(self, *args, log: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.log = log

    def __getitem__(self, i):
        out = super().__getitem__(i)
        line = json.dumps({"pid": os.getpid(), "i": int(i), "epoch": self.epoch, "ids": ids_of(out[0])[:3].tolist()})
        with open(self.log, "a") as f:
            f.write(line + "\n")
        return out


class RaiseOn:
    """A transform that raises on the batch holding ``sample`` (picklable: module level)."""

    def __init__(self, sample: int):
        self.sample = sample

    def __call__(self, batch):
        if self.sample in batch["x"][:, 0].astype(np.int64):
            raise ValueError(f"cannot augment sample {self.sample}")
        return batch


def _is_oocseq_warning(w) -> bool:
    return issubclass(w.category, RuntimeWarning) and "workers=1" in str(w.message)


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if log is not None:
            seq = LoggedSequence(store_path, BATCH, log=log, **kw)
        else:
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
    return {
        "epochs": splitter.epochs,
        "len": len(seq),
        "seq_epoch": seq.epoch,
        "warnings": [str(w.message) for w in caught if _is_oocseq_warning(w)],
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


def run_fit_in_subprocess(tmp_path: Path, start_method: str, **cfg) -> dict:
    script = tmp_path / "fit_script.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "KERAS_BACKEND": keras.backend.backend(),
        "JAX_PLATFORMS": "cpu",
    }
    arg = json.dumps({"start_method": start_method, **cfg})
    proc = subprocess.run(
        [sys.executable, str(script), arg], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=100
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


# -- what the plan says --------------------------------------------------------------------------
def plan_batches(store_path, epoch: int) -> set[frozenset[int]]:
    ref = ChunkedSequence(store_path, BATCH, seed=SEED, window=WINDOW)
    ref.set_epoch(epoch)
    return {frozenset(ref.batch_indices(i).tolist()) for i in range(len(ref))}


def which_plan_epoch(store_path, batch: list[int], max_epoch: int) -> int | None:
    for e in range(max_epoch + 1):
        if frozenset(batch) in plan_batches(store_path, e):
            return e
    return None


def exactly_once(epoch_batches: list[list[int]]) -> bool:
    return sorted(i for b in epoch_batches for i in b) == list(range(N))


def requests_summary(log: Path) -> str:
    """What Keras requested, per process and plan epoch: for failure messages."""
    if not log.exists():
        return "(no requests logged)"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    per = collections.defaultdict(list)
    for r in rows:
        per[(r["pid"], r["epoch"])].append(r["i"])
    repeated = collections.Counter((r["epoch"], r["i"]) for r in rows)
    dup = sorted(k for k, c in repeated.items() if c > 1)
    return (
        "requests (pid, seq.epoch) -> indices: "
        + "; ".join(f"{k}: {v}" for k, v in per.items())
        + f"\n(epoch, index) requested more than once: {dup}"
    )


def check_run(
    store_path, result: dict, log: Path, *, expect_warning: bool, sync: bool = False, epochs: int = EPOCHS
) -> None:
    """The assertions every configuration must satisfy."""
    info = requests_summary(log)
    assert result["error"] is None, result["error"]
    assert len(result["epochs"]) == epochs
    epochs = result["epochs"]
    assert result["len"] == -(-N // BATCH)
    warned = bool(result["warnings"])
    assert warned == expect_warning, f"oocseq warnings: {result['warnings']}"
    for k, batches in enumerate(epochs):
        assert len(batches) == result["len"], f"Keras epoch {k} trained {len(batches)} batches\n{info}"
        # every batch trained is a batch of one of oocseq's epoch plans (no torn or mixed batch)
        origin = [which_plan_epoch(store_path, b, EPOCHS + 1) for b in batches]
        assert None not in origin, f"Keras epoch {k}: a batch that is no plan batch\n{info}"
        # a new shuffle every epoch: epoch k trains batches of plan epoch k (k + 1 when fit reads a
        # batch to build the model first) - with processes too
        assert max(origin) >= k + (0 if sync else 1), (
            f"Keras epoch {k} trained only plan epochs {sorted(set(origin))}: the sequence's epoch did "
            f"not move on (seq.epoch after fit: {result['seq_epoch']})\n{info}"
        )
        # exactly once, or else oocseq said so
        if not exactly_once(batches):
            counts = collections.Counter(i for b in batches for i in b)
            assert warned, (
                f"Keras epoch {k}: samples trained twice {sorted(i for i, c in counts.items() if c > 1)[:20]}, "
                f"never {sorted(set(range(N)) - set(counts))[:20]}, and oocseq did not warn\n{info}"
            )


@pytest.fixture(autouse=True)
def _clear_keras():
    yield
    keras.backend.clear_session()


# -- one worker: exactly once --------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sync", [False, True], ids=["plain", "SyncEpoch"])
def test_one_worker_trains_every_sample_once(tmp_path, fmt, sync):
    store = make_store(tmp_path / f"s{fmt}", N, CHUNK)
    log = tmp_path / "requests.log"
    result = run_fit(str(store.path), sync=sync, log=str(log))
    check_run(store.path, result, log, expect_warning=False, sync=sync)
    for k, batches in enumerate(result["epochs"]):
        assert exactly_once(batches), f"Keras epoch {k}\n{requests_summary(log)}"
        # the very batches of the plan: Keras epoch k is plan epoch k (SyncEpoch) or k + 1
        assert {frozenset(b) for b in batches} == plan_batches(store.path, k if sync else k + 1)


# -- a thread pool -------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_thread_workers(tmp_path, fmt):
    store = make_store(tmp_path / f"s{fmt}", N, CHUNK)
    log = tmp_path / "requests.log"
    result = run_fit(str(store.path), workers=3, log=str(log))
    check_run(store.path, result, log, expect_warning=keras.backend.backend() in ("jax", "torch"))


# -- worker processes: fork, spawn, forkserver ---------------------------------------------------
# Keras starts a new pool every epoch (and one for the batch that builds the model); spawn and
# forkserver workers import Keras and its backend, ~3 s each on 2 cores: one epoch there.
PROCESS_CONFIGS = [("fork", ".h5", EPOCHS), ("spawn", ".zarr", 1), ("forkserver", ".h5", 1)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("start_method", "suffix", "epochs"), PROCESS_CONFIGS, ids=[f"{m}-{s[1:]}" for m, s, _ in PROCESS_CONFIGS]
)
def test_process_workers(tmp_path, start_method, suffix, epochs):
    store = make_store(tmp_path / f"s{suffix}", N, CHUNK)
    log = tmp_path / "requests.log"
    result = run_fit_in_subprocess(
        tmp_path, start_method, store_path=str(store.path), workers=2, use_multiprocessing=True, epochs=epochs,
        log=str(log),
    )
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len({r["pid"] for r in rows}) >= 2, "the batches were not served by worker processes"
    check_run(store.path, result, log, expect_warning=keras.backend.backend() in ("jax", "torch"), epochs=epochs)


@pytest.mark.timeout(120)
def test_process_workers_with_sync_epoch(tmp_path):
    """With SyncEpoch the parent's epoch is set before Keras starts each epoch's pool."""
    store = make_store(tmp_path / "s.h5", N, CHUNK)
    log = tmp_path / "requests.log"
    result = run_fit_in_subprocess(
        tmp_path, "fork", store_path=str(store.path), workers=2, use_multiprocessing=True, sync=True, log=str(log)
    )
    check_run(store.path, result, log, expect_warning=keras.backend.backend() in ("jax", "torch"), sync=True)


# -- an exception in a worker reaches the caller -------------------------------------------------
def _bad_sample_and_check(store_path, error_text: str, sample: int) -> None:
    assert str(store_path) in error_text, error_text
    m = re.search(r"plan batch (\d+), epoch (\d+)", error_text)
    assert m, f"no batch index in: {error_text}"
    batch, epoch = int(m.group(1)), int(m.group(2))
    ref = ChunkedSequence(store_path, BATCH, seed=SEED, window=WINDOW)
    ref.set_epoch(epoch)
    assert sample in ref.batch_indices(batch).tolist(), f"batch {batch} of epoch {epoch} does not hold {sample}"
    assert f"cannot augment sample {sample}" in error_text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [1, 3])
def test_exception_in_a_thread_worker_reaches_fit(tmp_path, workers):
    store = make_store(tmp_path / "s.h5", N, CHUNK)
    model = Recorder()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # workers=3: the enqueuer warning
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
