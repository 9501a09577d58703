"""Samples per second of one epoch through Keras workers and PyTorch DataLoader workers.

On Blosc-lz4 compressed stores (Zarr and HDF5) of 64x64x3 uint8 crops of real photos, batch 128:

* Keras ``model.fit`` (JAX backend) of a trivial model (``GlobalAveragePooling2D`` + ``Dense``),
  so that the time is Keras's data machinery plus a negligible step:
  ``workers=1`` (the default: oocseq decodes ahead in its own threads), ``workers=2`` threads
  and ``workers=2`` processes (``use_multiprocessing=True``). oocseq runs these workers itself
  (:mod:`oocseq.prefetch`); Keras sees a sequential dataset. The in-RAM reference is a plain
  ``PyDataset`` served by Keras's own ``OrderedEnqueuer``, which on JAX re-serves queued
  batches (not exactly-once: shown for its speed only).
* PyTorch ``DataLoader(TorchBatches(seq), batch_size=None, num_workers=N)`` for N = 0 and 2
  (fork, ``persistent_workers``), touching every batch.

Each configuration twice: batches as stored (uint8), and with a ``transform`` that does real
per-sample work (``x.astype(float32) / 255`` and a random horizontal flip drawn from the
per-sample ``rng``), where worker processes can help.

A timed epoch follows an untimed one of the same configuration (jit compilation, worker start
for persistent workers); Keras's timed epoch is the second of ``model.fit(epochs=2)``, measured
by a callback from ``on_epoch_begin`` to ``on_epoch_end`` (it includes starting the worker pool,
which Keras's enqueuer does every epoch; oocseq keeps its pools). Each round runs the Keras part and the PyTorch part in fresh
processes (in a random order; configurations in a random order inside), so Keras/JAX and torch
never share a process; a cell is the median over rounds, a ratio the median of the ratios taken
within a round. The page cache is warm (the stores were just written).

Run:  python benchmarks/workers.py [--size-mb 256] [--runs 3] [--batch-size 128] [--workdir out/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data  # shared with the other benchmark scripts
from _data import (
    crops_in_ram,
    environment,
    fmt_rate,
    fmt_ratio,
    interleaved,
    load_summary,
    median,
    num_samples,
    paired_ratios,
    remove,
    store_path,
    write_store,
)

STORES = ("Zarr lz4", "HDF5 lz4")
TRANSFORMS = ("uint8 as stored", "transform")

#: Keras configurations: name -> (workers, use_multiprocessing, fit's shuffle)
KERAS = {
    "workers=1 (default; oocseq decode threads)": (1, False, True),
    "workers=2, threads": (2, False, True),
    "workers=2, processes": (2, True, True),
}
KERAS_BASE = "workers=1 (default; oocseq decode threads)"

#: PyTorch configurations: name -> num_workers
TORCH = {
    "num_workers=0": 0,
    "num_workers=2 (fork, persistent_workers)": 2,
}
TORCH_BASE = "num_workers=0"


def augment(batch: dict[str, np.ndarray], rng: Any) -> dict[str, np.ndarray]:
    """Per-sample work: to float32 in [0, 1] and a random horizontal flip (one draw per
    sample from the sample's own stream)."""
    x = batch["x"].astype(np.float32) / 255
    flip = rng.random() < 0.5
    x[flip] = x[flip, :, ::-1]
    return {**batch, "x": x}


def _transform(name: str) -> Callable[..., Any] | None:
    return augment if name == "transform" else None


RAM = "in-RAM slices"  # the reference column: each framework's own ceiling on this machine


def ram_arrays(stores: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The whole store in memory (x, y), for the reference column."""
    import oocseq

    store = oocseq.Store(stores[STORES[0]])
    return store["x"][0 : len(store)], store["y"][0 : len(store)]


def ram_batch(
    x: np.ndarray, y: np.ndarray, i: int, batch_size: int, tname: str, seed: int
) -> tuple[Any, Any]:
    """Batch ``i`` as contiguous slices of the in-RAM arrays (no shuffle, no decoding: the
    cheapest batch there is), through the same transform (per-sample rng of the samples)."""
    from oocseq.rng import SampleRandom

    s = slice(i * batch_size, min((i + 1) * batch_size, len(x)))
    if tname != "transform":
        return x[s].copy(), y[s].copy()  # a new array per batch, as any loader makes
    b = augment({"x": x[s], "y": y[s]}, SampleRandom(seed, 0, np.arange(s.start, s.stop)))
    return b["x"], b["y"]


# --- Keras part (its own process) -------------------------------------------------------------


def keras_part(stores: dict[str, str], batch_size: int, run: int) -> dict[str, Any]:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    import oocseq

    ram_x, ram_y = ram_arrays(stores)

    class RamBatches(keras.utils.PyDataset):
        """Reference: contiguous slices of arrays in memory, through the same Keras machinery."""

        def __init__(self, tname: str, seed: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.tname, self.seed = tname, seed

        def __len__(self) -> int:
            return -(-len(ram_x) // batch_size)

        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return ram_batch(ram_x, ram_y, i, batch_size, self.tname, self.seed)

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds.append(time.perf_counter() - self._t)

    notes: dict[str, list[str]] = {}

    def record(key: str, caught: list[warnings.WarningMessage]) -> None:
        for w in caught:
            text = f"{w.category.__name__}: {str(w.message).splitlines()[0]}"
            if text not in notes.setdefault(key, []):
                notes[key].append(text)

    def one_epoch(kind: str, tname: str, config: str, run: int) -> float:
        workers, processes, shuffle = KERAS[config]
        key = json.dumps([kind, tname, config])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if kind == RAM:
                seq = RamBatches(tname, run, workers=workers, use_multiprocessing=processes)
            else:
                seq = oocseq.ChunkedSequence(
                    stores[kind],
                    batch_size,
                    seed=run,
                    transform=_transform(tname),
                    workers=workers,
                    use_multiprocessing=processes,
                )
                assert isinstance(seq, keras.utils.PyDataset)
            model = keras.Sequential(
                [keras.Input((64, 64, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
            )
            model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            timer = EpochTimer()
            model.fit(seq, epochs=2, shuffle=shuffle, verbose=0, callbacks=[timer])  # epoch 1: warm-up
            if kind != RAM:
                seq.close()
        record(key, caught)
        return len(ram_x) / timer.seconds[-1]

    measurements = {
        json.dumps([kind, tname, config]): partial(one_epoch, kind, tname, config)
        for kind in (*stores, RAM)
        for tname in TRANSFORMS
        for config in KERAS
        if kind != RAM or KERAS[config][2]  # in RAM, fit's shuffle changes nothing
    }
    runs = interleaved(measurements, {}, 1, seed=100 + run, label="keras ")
    return {
        "rates": {k: v[0] for k, v in runs.results.items()},
        "others": runs.all_others(),
        "notes": notes,
        "versions": f"Keras {keras.__version__}, backend {keras.backend.backend()}",
    }


# --- PyTorch part (its own process) -----------------------------------------------------------


def torch_part(stores: dict[str, str], batch_size: int, run: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    import oocseq
    from oocseq.adapters.torch import TorchBatches, worker_range

    ram_x, ram_y = ram_arrays(stores)

    class RamBatches(IterableDataset):  # type: ignore[type-arg]
        """Reference: contiguous slices of arrays in memory, split between workers as
        TorchBatches splits an epoch."""

        def __init__(self, tname: str, seed: int) -> None:
            self.tname, self.seed = tname, seed

        def set_epoch(self, epoch: int) -> None:
            pass

        def __iter__(self) -> Any:
            info = get_worker_info()
            worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
            for i in worker_range(-(-len(ram_x) // batch_size), worker, num_workers):
                bx, by = ram_batch(ram_x, ram_y, i, batch_size, self.tname, self.seed)
                yield torch.from_numpy(bx), torch.from_numpy(by)

    def one_epoch(kind: str, tname: str, config: str, run: int) -> float:
        num_workers = TORCH[config]
        seq = None
        if kind == RAM:
            batches: Any = RamBatches(tname, run)
        else:
            seq = oocseq.ChunkedSequence(stores[kind], batch_size, seed=run, transform=_transform(tname))
            batches = TorchBatches(seq)
        extra: dict[str, Any] = {}
        if num_workers:
            extra = {"multiprocessing_context": "fork", "persistent_workers": True}
        loader = DataLoader(batches, batch_size=None, num_workers=num_workers, **extra)
        seconds = samples = 0.0
        for epoch in range(2):  # epoch 0: warm-up (starts the persistent workers)
            batches.set_epoch(epoch)
            samples, total = 0, 0.0
            t = time.perf_counter()
            for x, _y in loader:
                total += float(x[:1, :1].sum())  # touch the batch
                samples += len(x)
            seconds = time.perf_counter() - t
        assert samples == len(ram_x), (samples, len(ram_x))  # every sample once
        del loader  # stops the workers
        if seq is not None:
            seq.close()
        return samples / seconds

    measurements = {
        json.dumps([kind, tname, config]): partial(one_epoch, kind, tname, config)
        for kind in (*stores, RAM)
        for tname in TRANSFORMS
        for config in TORCH
    }
    runs = interleaved(measurements, {}, 1, seed=200 + run, label="torch ")
    return {
        "rates": {k: v[0] for k, v in runs.results.items()},
        "others": runs.all_others(),
        "notes": {},
        "versions": f"torch {torch.__version__}",
    }


PARTS = {"keras": keras_part, "torch": torch_part}


# --- parent ----------------------------------------------------------------------------------


def run_part(part: str, stores: dict[str, Path], args: argparse.Namespace, run: int) -> dict[str, Any]:
    """One round of ``part`` in a fresh Python process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--part",
            part,
            "--run",
            str(run),
            "--result",
            str(out),
            "--batch-size",
            str(args.batch_size),
            "--quiet-wait",
            str(args.quiet_wait),
            "--stores",
            json.dumps({k: str(p) for k, p in stores.items()}),
        ]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=args.part_timeout)
        print(f"  round {run + 1}: {part} part done ({time.perf_counter() - t:.0f} s)", flush=True)
        return json.loads(out.read_text())


def table(results: dict[str, list[dict[str, Any]]], stores: tuple[str, ...]) -> str:
    head = (
        "| configuration | "
        + " | ".join(f"{k} samples/s | {k} vs baseline" for k in stores)
        + " | exactly once? |"
    )
    lines = [head, "|---" * (2 * len(stores) + 2) + "|"]
    sections = [
        ("Keras model.fit", "keras", KERAS, KERAS_BASE),
        ("PyTorch DataLoader", "torch", TORCH, TORCH_BASE),
    ]
    for title, part, configs, base in sections:
        for tname in TRANSFORMS:
            for config in configs:
                cells = []
                for kind in stores:
                    key = json.dumps([kind, tname, config])
                    base_key = json.dumps([kind, tname, base])
                    if key not in results[part][0]["rates"]:
                        cells += ["—", "—"]
                        continue
                    rates = [r["rates"][key] for r in results[part]]
                    ratios = paired_ratios(rates, [r["rates"][base_key] for r in results[part]])
                    cells += [
                        fmt_rate(median(rates)),
                        "baseline" if config == base else fmt_ratio(median(ratios)),
                    ]
                if part == "torch" or config == base:
                    once = "yes"
                else:  # oocseq's own workers; Keras's enqueuer serves only the in-RAM reference
                    once = "yes (in-RAM reference: no)" if RAM in stores else "yes"
                lines.append(f"| {title}, {tname}: {config} | " + " | ".join(cells) + f" | {once} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _data.common_arguments(parser, size_mb=256, runs=3, runs_help="rounds; the median is shown", quiet_wait=5)
    parser.add_argument(
        "--part-timeout", type=float, default=900, help="seconds allowed for one part of a round"
    )
    parser.add_argument(
        "--part", choices=sorted(PARTS), help=argparse.SUPPRESS
    )  # internal: one round of a part
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stores", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _data.apply_arguments(args)
    _data.QUIET_BUDGET = 60.0

    if args.part:
        result = PARTS[args.part](json.loads(args.stores), args.batch_size, args.run)
        result["waited"] = _data.quiet_waited
        args.result.write_text(json.dumps(result))
        return 0

    t_start = time.perf_counter()
    n = num_samples(args.size_mb)
    print(environment())
    print(f"{n} samples of 64x64x3 uint8 ({args.size_mb:g} MB), batch {args.batch_size}", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    x, y = crops_in_ram(n)
    stores: dict[str, Path] = {}
    try:
        for kind in STORES:
            stores[kind] = store_path(args.workdir, kind, "_workers")
            store = write_store(stores[kind], {"x": x, "y": y}, "lz4")
        del x, y
        print(f"  {store.num_chunks} chunks of {store.chunk_len} samples", flush=True)
        results: dict[str, list[dict[str, Any]]] = {p: [] for p in PARTS}
        rng = np.random.default_rng(1)
        for run in range(args.runs):
            for part in rng.permutation(sorted(PARTS)):
                results[str(part)].append(run_part(str(part), stores, args, run))
    finally:
        if not args.keep:
            for p in stores.values():
                remove(p)

    batches = -(-n // args.batch_size)
    print(
        f"\n{n} samples, {batches} batches of {args.batch_size} per epoch; samples/s of one epoch after an untimed one, "
        f"median of {args.runs} rounds; ratios: median over rounds of the ratio to the baseline row of the same "
        f"section and transform. {results['keras'][0]['versions']}; {results['torch'][0]['versions']}; "
        f"{os.cpu_count()} cores.\n"
    )
    print(table(results, (*STORES, RAM)))
    others = [o for rs in results.values() for r in rs for o in r["others"]]
    waited = sum(r.get("waited", 0.0) for rs in results.values() for r in rs)
    print(f"\n{load_summary(others).split(' (waited')[0]} (waited {waited:.0f} s in all for quiet moments)")
    print("\nWarnings seen in the Keras part:")
    seen: dict[str, set[str]] = {}
    for r in results["keras"]:
        for key, texts in r["notes"].items():
            _kind, _tname, config = json.loads(key)
            for text in texts:
                seen.setdefault(text, set()).add(config)
    for text, configs in seen.items():
        print(f"- {text}  [{'; '.join(sorted(configs))}]")
    if not seen:
        print("- none")
    print(f"\nTotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
