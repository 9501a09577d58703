"""Samples per second of a shuffled epoch: ChunkedSequence against the usual ways to read.

One run, one process, the same data in every store:

* in-RAM numpy: random batches ``x[np.sort(idx)]`` from an array in memory (the baseline that
  every ratio is relative to);
* h5py fancy index ``ds[np.sort(idx)]`` and zarr ``arr.oindex[np.sort(idx)]``: random batches
  read straight from the HDF5 / Zarr store, as a hand-written ``PyDataset`` does;
* ``oocseq.ChunkedSequence``: shuffled epochs, batches requested in order ``0..len-1``; in a
  random order of ``i`` (what ``model.fit`` does with its default ``shuffle=True``), served
  ``serve="arrival"`` (the default); and in a random order with ``serve="index"`` (only the
  first ``--fancy-batches`` requests: it is slow).

Data: random 64x64x3 uint8 crops of the two real photos that ship with scikit-learn
(``load_sample_images``), so chunks compress as real images do. Stores: Zarr and HDF5, Blosc-lz4
and uncompressed, chunks of about 4 MiB. The page cache is warm (the stores were just written).

The read-path targets are measured by ``read_path.py`` and
``larger_than_ram.py``; this script gives the broader comparison table.

Run:  python benchmarks/throughput.py [--size-mb 256] [--runs 5] [--epochs 2] [--fancy-batches 20] [--workdir out/bench]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

import oocseq
from oocseq.bench import time_epoch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import SAMPLE_SHAPE, fmt_rate, photo_crops  # shared with read_path.py, larger_than_ram.py

STORES = {  # column name -> (file suffix, compression)
    "Zarr lz4": (".zarr", "lz4"),
    "Zarr raw": (".zarr", None),
    "HDF5 lz4": (".h5", "lz4"),
    "HDF5 raw": (".h5", None),
}

Result = tuple[float, int | None, int]  # samples/s, chunk decodes (None: not counted), batches read


def fancy_batches(
    read: Callable[[np.ndarray], object],
    n: int,
    batch_size: int,
    count: int | None,
    rng: np.random.Generator,
    run: int,
) -> Result:
    """``read(idx)`` for ``count`` random sorted batches of a globally shuffled epoch (all of them
    if ``count`` is None)."""
    perm = rng.permutation(n)
    batches = [np.sort(perm[s : s + batch_size]) for s in range(0, n, batch_size)][:count]
    t = time.perf_counter()
    for idx in batches:
        read(idx)
    return sum(len(b) for b in batches) / (time.perf_counter() - t), None, len(batches)


def sequence_epochs(
    store: oocseq.Store,
    batch_size: int,
    order: str,
    serve: str,
    max_batches: int | None,
    epochs: int,
    run: int,
) -> Result:
    """``epochs`` consecutive epochs (or the first ``max_batches`` requests of one) through a
    fresh ChunkedSequence, each timed by :func:`oocseq.bench.time_epoch`: batches requested
    ``"in order"`` or in a ``"random"`` order of ``i`` (a new one each epoch). Chunk decodes
    are per epoch."""
    keras_order = {"arrival": "plan", "index": "index"}[serve]
    seq = oocseq.ChunkedSequence(
        store, batch_size, y=None, seed=0, read=oocseq.ReadOptions(keras_order=keras_order)
    )
    seq.set_epoch(run * epochs)
    timed = "keras" if order == "random" else order
    timings = [time_epoch(seq, timed, max_batches=max_batches) for _ in range(epochs)]
    seq.close()
    samples = sum(t.samples for t in timings)
    seconds = sum(t.seconds for t in timings)
    return samples / seconds, max(t.chunk_decodes for t in timings), timings[0].batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size-mb", type=float, default=256, help="dataset size in MB (default 256; 1000+ for >= 1 GB)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--runs", type=int, default=5, help="runs per measurement; the median is shown (default 5)"
    )
    parser.add_argument(
        "--epochs", type=int, default=2, help="ChunkedSequence epochs timed per run (default 2)"
    )
    parser.add_argument(
        "--fancy-batches",
        type=int,
        default=20,
        help="random batches timed per run for the slow h5py / zarr fancy reads (default 20)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("out/bench"), help="where the stores are written"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the stores (default: delete them at the end)"
    )
    args = parser.parse_args(argv)

    import h5py
    import hdf5plugin  # noqa: F401  (registers the Blosc filter with HDF5 for h5py reads)
    import zarr

    sample_bytes = int(np.prod(SAMPLE_SHAPE))
    n = int(args.size_mb * 1e6) // sample_bytes
    bs = args.batch_size
    print(
        f"oocseq {oocseq.__version__}, numpy {np.__version__}, zarr {zarr.__version__}, h5py {h5py.__version__}; "
        f"Python {platform.python_version()}, {os.cpu_count()} cores"
    )
    print(
        f"data: {n} crops 64x64x3 uint8 of real photos = {n * sample_bytes / 1e6:.0f} MB; batch {bs}; "
        f"median of {args.runs} runs"
    )

    blocks = list(photo_crops(n))
    x = np.concatenate([b for b, _ in blocks])  # in RAM: the baseline, and the source of the stores
    y = np.concatenate([c for _, c in blocks])  # label: which photo (unused by the reads timed here)
    del blocks
    args.workdir.mkdir(parents=True, exist_ok=True)
    stores: dict[str, oocseq.Store] = {}
    for name, (suffix, compression) in STORES.items():
        path = args.workdir / f"crops_{name.split()[1]}{suffix}"
        t = time.perf_counter()
        stores[name] = oocseq.ingest_arrays(path, {"x": x, "y": y}, compression=compression, overwrite=True)
        ratio = n * sample_bytes / stores[name].stored_nbytes("x")
        print(f"  wrote {stores[name]} in {time.perf_counter() - t:.1f} s, compression ratio {ratio:.2f}")
    chunk_len, num_chunks = stores["Zarr lz4"].chunk_len, stores["Zarr lz4"].num_chunks
    probe = oocseq.ChunkedSequence(stores["Zarr lz4"], bs, y=None)
    print(
        f"chunk_len {chunk_len} ({chunk_len * sample_bytes / 2**20:.1f} MiB), {num_chunks} chunks, "
        f"window {probe.window} chunks, {len(probe)} batches per epoch"
    )

    # Every measurement: a function of the run number.
    fancy = "random batch, fancy index (sorted)"
    rng = np.random.default_rng(1)
    measurements: dict[tuple[str, str], Callable[[int], Result]] = {
        (fancy, "in-RAM numpy"): partial(fancy_batches, lambda i: x[i], n, bs, None, rng),  # a whole epoch
    }
    warmups = {(fancy, "in-RAM numpy"): partial(fancy_batches, lambda i: x[i], n, bs, 20, rng, 0)}
    h5_files = []
    for name, store in stores.items():  # opened with plain zarr / h5py, as users read such files
        if store.format == "zarr":
            read = zarr.open_group(str(store.path), mode="r")["x"].oindex.__getitem__
        else:
            h5_files.append(h5py.File(store.path, "r"))
            read = h5_files[-1]["x"].__getitem__
        measurements[fancy, name] = partial(fancy_batches, read, n, bs, args.fancy_batches, rng)
        warmups[fancy, name] = partial(fancy_batches, read, n, bs, 2, rng, 0)
    patterns = {  # row -> (order of requests, serve, batches timed)
        "ChunkedSequence, requests 0..len-1": ("in order", "arrival", None),
        "ChunkedSequence, requests in random order, serve='arrival'": ("random", "arrival", None),
        "ChunkedSequence, requests in random order, serve='index'": ("random", "index", args.fancy_batches),
    }
    for row, (order, serve, limit) in patterns.items():
        for name, store in stores.items():
            epochs = 1 if limit else args.epochs
            measurements[row, name] = partial(sequence_epochs, store, bs, order, serve, limit, epochs)
            warmups[row, name] = partial(sequence_epochs, store, bs, order, serve, 8, 1, 1000)

    # Runs are interleaved (run 1 of everything, then run 2, ...), in a new random order each
    # run, so that a slow moment of the machine does not land on one measurement only. Each timed
    # run follows a short untimed one of the same kind: on a small VM a core that was idle is
    # slow for a while, which would otherwise penalise whatever follows a single-threaded
    # measurement. For ChunkedSequence each run is a fresh sequence (cold cache) and other epochs.
    results: dict[tuple[str, str], list[Result]] = {k: [] for k in measurements}
    order_rng = np.random.default_rng(2)
    keys = list(measurements)
    for run in range(args.runs):
        for k in order_rng.permutation(len(keys)):
            warmups[keys[k]]()
            results[keys[k]].append(measurements[keys[k]](run))
        print(f"  run {run + 1}/{args.runs} done", flush=True)
    for f in h5_files:
        f.close()

    rows: dict[str, dict[str, float]] = {}
    decodes: dict[str, dict[str, str]] = {}
    for (row, column), res in results.items():
        rows.setdefault(row, {})[column] = statistics.median(r for r, _, _ in res)
        _, chunk_decodes, served = res[-1]
        if chunk_decodes is not None:
            per = "epoch" if served == -(-n // bs) else f"{served} batches"
            decodes.setdefault(row, {})[column] = f"{chunk_decodes} / {per}"

    base = rows[fancy]["in-RAM numpy"]
    columns = ["in-RAM numpy", *STORES]
    print(
        f"\nSamples/s (and ratio to in-RAM numpy random batches, {fmt_rate(base)} samples/s); "
        f"{n} samples, {n * sample_bytes / 1e6:.0f} MB, chunks of {chunk_len}, batch {bs}.\n"
    )
    print("| read pattern | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row, cells in rows.items():
        out = [f"{fmt_rate(cells[c])} ({cells[c] / base:.2g}x)" if c in cells else "—" for c in columns]
        print(f"| {row} | " + " | ".join(out) + " |")
    print(
        f"\nChunk decodes of field x (the store has {num_chunks} chunks; one shuffled epoch should decode each once):\n"
    )
    print("| read pattern | " + " | ".join(STORES) + " |")
    print("|---|" + "---|" * len(STORES))
    for row, cells in decodes.items():
        print(f"| {row} | " + " | ".join(cells[c] for c in STORES) + " |")
    keras_order = "ChunkedSequence, requests in random order, serve='arrival'"
    print(
        "\nSpeed-up of a ChunkedSequence epoch in Keras's call order over fancy-index batches, same store:\n"
    )
    print("| " + " | ".join(STORES) + " |")
    print("|" + "---|" * len(STORES))
    print("| " + " | ".join(f"{rows[keras_order][c] / rows[fancy][c]:.0f}x" for c in STORES) + " |")

    for store in stores.values():
        store.close()
    if not args.keep:
        for store in stores.values():
            if store.path.is_dir():
                shutil.rmtree(store.path)
            else:
                store.path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
