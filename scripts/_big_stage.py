"""The main job's larger-than-memory stage: a store several times larger than the memory the
training process may use, trained on with ``model.fit(ChunkedSequence(...))``.

The parent (``run``) writes the stores, then starts each measurement as a child process of this
file (``--child SPEC``) inside a fresh memory cgroup that counts page cache, with the store
evicted from the page cache first:

1. ``fit``: one epoch of a small CNN from a ``ChunkedSequence``, every training step recording
   the sample ids it received (:class:`oocseq.testing.FitRecorder`); the validation accuracy;
   then a few batches of the hand-written ``PyDataset`` (shuffled indices, h5py fancy indexing)
   through the same compiled model.
2. ``load``: ``h5py.File(store)["x"][:]``, loading everything, which the limit should kill.

Without a memory cgroup (not root, no cgroupfs), the limit is a stated budget that the child's
peak RssAnon is held against (neither page cache nor mapped libraries count then), and loading
everything is skipped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _memlimit  # noqa: E402
import _photo_crops as crops  # noqa: E402

BATCH = 128
BASELINE_BATCHES = 8  # hand-written PyDataset batches timed (it is ~30x slower: extrapolated)
VAL_SAMPLES = 4096
MIN_ACCURACY = 0.85  # which of 8 photo quadrants a crop came from; chance is 0.125
GiB = 2**30


# -- the child ---------------------------------------------------------------------------------
def child_fit(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import h5py
    import keras

    import oocseq
    from oocseq.testing import FitRecorder, epoch_ids

    class Clock(keras.callbacks.Callback):
        """Times steps after the first (which compiles), and samples peak RssAnon."""

        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []
            self.peak_rss_anon = 0
            self.peak_rss_file = 0

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.times.append(time.perf_counter())
            self.peak_rss_anon = max(self.peak_rss_anon, _memlimit.proc_status("RssAnon"))
            self.peak_rss_file = max(self.peak_rss_file, _memlimit.proc_status("RssFile"))

    def rate(clock: Clock, batch_sizes: list[int]) -> float:
        # samples of steps 2..k over the time from the end of step 1 to the end of step k
        return sum(batch_sizes[1:]) / (clock.times[-1] - clock.times[0])

    keras.utils.set_random_seed(0)
    store = oocseq.open_store(spec["train"])
    val_store = oocseq.open_store(spec["val"])
    rss_before = _memlimit.proc_status("RssAnon")
    seq = oocseq.ChunkedSequence(store, BATCH, x={"x": "x", "id": "id"}, y="y", seed=0)
    val = oocseq.ChunkedSequence(val_store, 512, x={"x": "x", "id": "id"}, y="y", shuffle=False)
    inner = keras.Sequential(
        [
            keras.Input(shape=crops.SAMPLE_SHAPE),
            keras.layers.Rescaling(1 / 255),  # uint8 pixels in the store
            keras.layers.AveragePooling2D(4),  # 128x128 -> 32x32: a small, fast CNN
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(len(crops.CLASS_NAMES), activation="softmax"),
        ]
    )
    model = FitRecorder(inner, id_input="id")
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    clock = Clock()
    t = time.perf_counter()
    model.fit(seq, epochs=1, verbose=0, callbacks=[clock])
    fit_seconds = time.perf_counter() - t
    sizes = [len(b) for b in model.epochs[0]]
    seq_rate = rate(clock, sizes)
    trained = model.epochs[0]
    served = np.concatenate(trained)
    counts = np.bincount(served, minlength=len(store))
    # What the plan says epoch 0 holds, from the public API alone: a cross-check of the record.
    planned = np.sort(epoch_ids(seq, 0))
    accuracy = float(model.evaluate(val, verbose=0, return_dict=True)["accuracy"])
    stats = seq.stats
    peak_anon = max(clock.peak_rss_anon, _memlimit.proc_status("RssAnon"))
    seq.close()

    # The hand-written pattern over the same store, through the same compiled model.
    class HandWritten(keras.utils.PyDataset):
        def __init__(self, path: str, batch_size: int) -> None:
            super().__init__()
            self.file = h5py.File(path, "r")
            self.x, self.y, self.ids = self.file["x"], self.file["y"], self.file["id"]
            self.batch_size = batch_size
            self.order = np.random.default_rng(0).permutation(len(self.y))

        def __len__(self) -> int:
            return math.ceil(len(self.order) / self.batch_size)

        def __getitem__(self, i: int) -> Any:
            idx = np.sort(self.order[i * self.batch_size : (i + 1) * self.batch_size])  # h5py: increasing
            return {"x": self.x[idx], "id": self.ids[idx]}, self.y[idx]

    store.close()
    cold = _memlimit.evict([Path(spec["train"])])
    base_clock = Clock()
    hand = HandWritten(spec["train"], BATCH)
    model.fit(hand, epochs=1, steps_per_epoch=BASELINE_BATCHES, verbose=0, callbacks=[base_clock])
    base_rate = rate(base_clock, [BATCH] * BASELINE_BATCHES)
    return {
        "n": len(counts),
        "fit_seconds": fit_seconds,
        "samples_per_s": seq_rate,
        "baseline_samples_per_s": base_rate,
        "baseline_cold": cold,
        "batches": len(trained),
        "len_seq": len(seq),
        "trained_once": int(np.count_nonzero(counts == 1)),
        "trained_twice_or_more": int(np.count_nonzero(counts > 1)),
        "never_trained": int(np.count_nonzero(counts == 0)),
        "record_matches_plan": bool(np.array_equal(np.sort(served), planned)),
        "accuracy": accuracy,
        "val_n": len(val_store),
        "chunk_decodes": stats["chunk_decodes"],
        "num_chunks": store.num_chunks,
        "peak_resident_chunks": stats["peak_resident_chunks"],
        "rss_anon_before_data": rss_before,
        "peak_rss_anon": peak_anon,
        "peak_rss_file": clock.peak_rss_file,
        "peak_rss": _memlimit.proc_status("VmHWM"),
    }


def child_load(spec: dict[str, Any]) -> dict[str, Any]:
    import h5py

    with h5py.File(spec["train"], "r") as f:
        x = f["x"][:]
    return {"loaded_bytes": int(x.nbytes), "peak_rss": _memlimit.proc_status("VmHWM")}


def child_main(spec: dict[str, Any]) -> None:
    out = child_fit(spec) if spec["what"] == "fit" else child_load(spec)
    print("RESULT " + json.dumps(out), flush=True)


# -- the parent --------------------------------------------------------------------------------
class NotEnoughDisk(Exception):
    """Too little free disk space for the stores of this stage (checked before writing)."""


def _child(
    spec: dict[str, Any], cgroup: _memlimit.MemoryCgroup | None, timeout: float
) -> tuple[int, dict, str]:
    import oocseq

    env = dict(os.environ)
    # The child imports the same oocseq as this process.
    root = str(Path(oocseq.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("KERAS_BACKEND", "jax")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        preexec_fn=cgroup.join if cgroup else None,
        check=False,
    )
    out: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
    return proc.returncode, out, proc.stderr


def _size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def mb(b: float) -> str:
    return f"{b / 1e6:.0f} MB"


def run(workdir: Path, store_gb: float, limit: int, keep: bool) -> dict[str, Any]:
    """Write the stores, train in a memory-limited child, try loading everything; print the
    figures. Returns the figures; ``ok`` says whether every check passed."""
    import oocseq

    n = max(BATCH, int(store_gb * 1e9) // crops.SAMPLE_BYTES)
    train_path, val_path = workdir / "crops_train.h5", workdir / "crops_val.h5"
    need = int((n + VAL_SAMPLES) * (crops.SAMPLE_BYTES + 16) * 1.02) + 200 * 2**20
    for p in (train_path, val_path):  # an old run's stores are replaced: their space counts
        if p.exists():
            p.unlink()
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise NotEnoughDisk(
            f"not enough disk space under {workdir}: the larger-than-memory stage writes {gb(need)} "
            f"({n} crops of {crops.CROP}x{crops.CROP}x3), {gb(free)} free. Free some space, point "
            f"--workdir at a larger disk, or pass a smaller --big-gb (or --quick to skip this stage)."
        )
    print(
        f"writing {n} photo crops {crops.CROP}x{crops.CROP}x3 uint8 ({gb(n * crops.SAMPLE_BYTES)}) with "
        f"labels (which of {len(crops.CLASS_NAMES)} photo quadrants) and sample ids, streamed from a "
        f"generator into {train_path} ({gb(free)} free on disk, {gb(need)} needed)",
        flush=True,
    )
    t = time.perf_counter()
    meta = {"class_names": crops.CLASS_NAMES}
    train = oocseq.ingest_arrays(
        train_path,
        {"x": crops.crops(n, seed=1), "y": crops.labels(n, seed=1), "id": crops.ids(n)},
        compression=None,  # photo pixels barely compress with lz4; raw chunks read fastest
        metadata=meta,
        overwrite=True,
        # The crops are drawn in random order already, and `id` is the stored position that the
        # exactly-once check compares with the plan: no pre-shuffle (nor its spool on disk).
        preshuffle=False,
    )
    write_seconds = time.perf_counter() - t
    val = oocseq.ingest_arrays(
        val_path,
        {
            "x": crops.crops(VAL_SAMPLES, seed=2),
            "y": crops.labels(VAL_SAMPLES, seed=2),
            "id": crops.ids(VAL_SAMPLES),
        },
        compression=None,
        metadata=meta,
        overwrite=True,
        preshuffle=False,
    )
    store_bytes = _size(train_path)
    train_len, chunk_len, num_chunks = len(train), train.chunk_len, train.num_chunks
    train.close()
    val.close()
    print(
        f"    {train_path}: {train_len} samples, {num_chunks} chunks of {chunk_len}, "
        f"{gb(store_bytes)} ({store_bytes / GiB:.2f} GiB) on disk, written in {write_seconds:.0f} s "
        f"({store_bytes / 1e6 / write_seconds:.0f} MB/s); validation {val_path}: {len(val)} samples"
    )

    spec = {"what": "fit", "train": str(train_path), "val": str(val_path)}
    figures: dict[str, Any] = {"store_bytes": store_bytes, "limit": limit, "n": train_len}
    cgroup, why = _memlimit.make_cgroup(limit, "fit")
    cold = _memlimit.evict([train_path, val_path])
    if cgroup is not None:
        print(
            f"memory limit: {mb(limit)} ({limit / GiB:.2f} GiB) memory cgroup ({why}; counts page cache) "
            f"around the training process; the store is {store_bytes / limit:.1f}x the limit. "
            f"Page cache: {cold}",
            flush=True,
        )
    else:
        print(
            f"memory limit: no memory cgroup here ({why}); instead a stated budget of {mb(limit)} "
            f"that the training process's peak RssAnon (its own memory: neither page cache nor "
            f"mapped libraries) is held against. "
            f"The store is {store_bytes / limit:.1f}x the budget; this machine has "
            f"{gb(_memlimit.mem_total())} of memory. Page cache: {cold}",
            flush=True,
        )
    try:
        code, out, err = _child(spec, cgroup, timeout=900)
    finally:
        counters = cgroup.counters() if cgroup else {}
        if cgroup:
            cgroup.remove()
    if code != 0 or not out:
        print(err[-3000:], file=sys.stderr)
        raise SystemExit(
            f"the training process failed: {_memlimit.exit_status(code)}"
            + (f", {counters.get('oom_kills', 0)} OOM kill(s) in its cgroup" if cgroup else "")
        )
    figures.update(out)
    figures["cgroup"] = counters

    # Loading everything, in the same limit.
    if cgroup is not None:
        load_cg, why = _memlimit.make_cgroup(limit, "load")
        if load_cg is None:
            raise SystemExit(f"could not make a second memory cgroup: {why}")
        _memlimit.evict([train_path])
        try:
            lcode, lout, _ = _child({"what": "load", "train": str(train_path)}, load_cg, timeout=600)
        finally:
            lcounters = load_cg.counters()
            load_cg.remove()
        killed = lcode != 0
        load_line = (
            f"{_memlimit.exit_status(lcode)}, {lcounters['oom_kills']} OOM kill(s)"
            if killed
            else f"NOT killed: it loaded {gb(lout.get('loaded_bytes', 0))} (the limit does not hold)"
        )
    else:
        killed = None
        load_line = (
            f"skipped: it needs {gb(store_bytes)} in one array; without a cgroup nothing would stop it "
            f"short of this machine's {gb(_memlimit.mem_total())}"
        )
    figures["load_killed"] = killed

    o = figures
    seq_rate, base_rate = o["samples_per_s"], o["baseline_samples_per_s"]
    peak_cg = counters.get("peak_usage", 0)
    # Without a cgroup: the process's own memory (RssAnon) against the budget; its mapped
    # shared libraries (in VmHWM, ~500 MB for JAX) are not data and are shared with others.
    within = counters.get("oom_kills", 0) == 0 if cgroup else o["peak_rss_anon"] <= limit
    once = o["trained_once"] == o["n"] and o["never_trained"] == 0 and o["trained_twice_or_more"] == 0
    acc_ok = o["accuracy"] >= MIN_ACCURACY
    print(
        "\n".join(
            [
                f"store: {gb(store_bytes)} ({store_bytes / GiB:.2f} GiB), {o['n']} samples; memory limit "
                f"{mb(limit)} ({'cgroup' if cgroup else 'budget against peak RssAnon'}): the store is "
                f"{store_bytes / limit:.1f}x the limit",
                f"training process: peak RssAnon {mb(o['peak_rss_anon'])} (its own memory; "
                f"{mb(o['rss_anon_before_data'])} before the first batch), peak RSS {mb(o['peak_rss'])} "
                f"(VmHWM: also file pages mapped, {mb(o['peak_rss_file'])} at most, mostly shared libraries "
                "partly charged to other cgroups); peak cgroup usage (page cache included) "
                + (
                    f"{mb(peak_cg)} of {mb(limit)}, {counters.get('oom_kills', 0)} OOM kills"
                    if cgroup
                    else "n/a"
                ),
                f"| reading the {gb(store_bytes)} store, batch {BATCH} | samples/s | one epoch |",
                "|---|---|---|",
                f"| model.fit(ChunkedSequence) | {seq_rate:,.0f} | {o['fit_seconds']:.0f} s (measured) |",
                f"| hand-written PyDataset, shuffled indices + h5py fancy indexing ({BASELINE_BATCHES} batches) | "
                f"{base_rate:,.0f} | {o['n'] / base_rate / 60:.0f} min (extrapolated); ChunkedSequence is "
                f"{seq_rate / base_rate:.0f}x faster |",
                f"| load everything, h5py.File(...)['x'][:] | - | {load_line} |",
                f"exactly once: the {o['batches']} training steps (len(seq) = {o['len_seq']}) received "
                f"{o['trained_once']} of {o['n']} sample ids once, {o['trained_twice_or_more']} twice or more, "
                f"{o['never_trained']} never (recorded in train_step); the record equals the plan's epoch: "
                f"{o['record_matches_plan']}",
                f"chunk decodes: {o['chunk_decodes']} for {o['num_chunks']} chunks x 3 fields "
                f"(peak {o['peak_resident_chunks']} decoded chunks held)",
                f"validation accuracy {o['accuracy']:.4f} on {o['val_n']} crops (expected >= {MIN_ACCURACY:.2f}; "
                f"chance {1 / len(crops.CLASS_NAMES):.3f})",
            ]
        ),
        flush=True,
    )
    figures["ok"] = bool(within and once and acc_ok and o["record_matches_plan"] and killed is not False)
    figures["problems"] = [
        what
        for what, good in (
            ("peak memory over the limit", within),
            ("a sample not trained exactly once", once and o["record_matches_plan"]),
            (f"accuracy under {MIN_ACCURACY}", acc_ok),
            ("loading everything was not stopped by the limit", killed is not False),
        )
        if not good
    ]
    if not keep:
        train_path.unlink()
        val_path.unlink()
    return figures


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
    else:
        sys.exit("this module is run by scripts/train_demo.py")
