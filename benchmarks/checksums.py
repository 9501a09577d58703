"""The cost of checking chunk checksums on read, next to the read path without it, in one run.

Uncompressed stores (Zarr and HDF5) of ``--size`` MB of random uint8 samples 64x64x3, chunks of
4 MiB, page cache warm (written, then read once untimed). One shuffled ``ChunkedSequence``
epoch of batch 128 (field ``x`` only, default window and read options) is timed for each way of
checking:

- ``off``: ``verify_checksums=False`` (no check: the baseline);
- ``once``: ``verify_checksums=True``, the default (a chunk is checked the first time a process
  reads it through its handles; a committed store is immutable);
- ``always``: ``verify_checksums="always"`` (every read checked).

Each round opens a fresh ``Store`` per way (nothing checked yet), times its first epoch, then a
later epoch (``set_epoch(1)``) on the same object. Rounds are interleaved: one run of every
(store, way) per round, the ways of one store back to back, in a new random order. A figure is the median over rounds of the
ratio time(way) / time(off) of the same round (1.00 = free); also the same ratio of process
CPU time, and that of the fastest run of each way over all rounds (on a shared machine other
load only adds time, so the fastest runs are the least disturbed). Targets: later epochs <= 1.05,
first epoch <= 1.30. Also printed: the checksum functions' throughput on one core (4 MiB
chunks).

Run:  python benchmarks/checksums.py [--size 1000] [--rounds 5] [--workdir out/bench]
      python benchmarks/checksums.py --size 20 --rounds 2      # a quick look (CI)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import oocseq
from oocseq.bench import time_epoch
from oocseq.checksum import chunk_checksum

WAYS = {"off": False, "once": True, "always": "always"}
SAMPLE = (64, 64, 3)
CHUNK_LEN = (4 << 20) // int(np.prod(SAMPLE))  # 341 samples, ~4 MiB


def checksum_rates(nbytes: int = 4 << 20, reps: int = 50) -> dict[str, float]:
    """GB/s of each checksum over a ``nbytes`` chunk, one core, best of 3."""
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    fns = {
        "zlib CRC-32": lambda: zlib.crc32(data),
        "google-crc32c CRC32C": lambda: chunk_checksum(data, "crc32c"),
        "memcpy of the same chunk (reference)": lambda: np.copyto(np.empty_like(data), data),
    }
    out = {}
    for name, fn in fns.items():
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, time.perf_counter() - t)
        out[name] = nbytes * reps / best / 1e9
    return out


def write_store(path: Path, n: int) -> None:
    rng = np.random.default_rng(1)

    def batches():
        for s in range(0, n, 4096):
            yield rng.integers(0, 256, (min(4096, n - s), *SAMPLE), dtype=np.uint8)

    oocseq.ingest_arrays(
        path, {"x": batches()}, chunk_len=CHUNK_LEN, compression=None, overwrite=True
    ).close()


def epoch(seq: oocseq.ChunkedSequence, e: int) -> tuple[float, float]:
    """Wall and process CPU seconds of one epoch, requests in order."""
    seq.set_epoch(e)
    timing = time_epoch(seq, "in order")
    return timing.seconds, timing.cpu_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=1000, help="MB of data per store (default 1000)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default="out/bench")
    ap.add_argument("--formats", default="zarr,h5")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    args = ap.parse_args()

    n = max(CHUNK_LEN, int(args.size * 1e6) // int(np.prod(SAMPLE)))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"# checksums on read: {n} samples 64x64x3 uint8 ({n * np.prod(SAMPLE) / 1e6:.0f} MB), uncompressed, "
    )
    print(
        f"# chunks of {CHUNK_LEN}, batch 128, {args.rounds} rounds, {os.cpu_count()} cores, oocseq {oocseq.__version__}"
    )
    print()
    print("| checksum, one core, 4 MiB chunks | GB/s |")
    print("|---|---|")
    for name, rate in checksum_rates().items():
        print(f"| {name} | {rate:.2f} |")
    print()

    paths = {}
    for fmt in args.formats.split(","):
        path = work / f"checksums.{fmt}"
        write_store(path, n)
        paths[fmt] = path
        seq = oocseq.ChunkedSequence(oocseq.open_store(path, verify_checksums=False), 128, y=None)
        epoch(seq, 0)  # warm the page cache
        seq.close()

    times: dict[tuple[str, str, str], list[float]] = {}
    cpu: dict[tuple[str, str, str], list[float]] = {}
    rng = random.Random(0)
    for r in range(args.rounds):
        # The ways compared run back to back, in a new order each round: close in time, so
        # that other load disturbs them alike.
        jobs = [
            (fmt, way) for fmt in rng.sample(list(paths), len(paths)) for way in rng.sample(list(WAYS), 3)
        ]
        for fmt, way in jobs:
            store = oocseq.open_store(paths[fmt], verify_checksums=WAYS[way])
            seq = oocseq.ChunkedSequence(store, 128, y=None, seed=r)
            for when, e in (("first", 0), ("later", 1)):
                w, c = epoch(seq, e)
                times.setdefault((fmt, way, when), []).append(w)
                cpu.setdefault((fmt, way, when), []).append(c)
            seq.close()
            store.close()
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    head = "| store | epoch | off: samples/s | wall: once / off | wall: always / off"
    head += " | CPU: once / off | CPU: always / off | best wall: once / off | best wall: always / off |"
    print(head)
    print("|---|---|---|---|---|---|---|---|---|")

    def ratio(of: dict[tuple[str, str, str], list[float]], fmt: str, way: str, when: str) -> str:
        rs = [t / b for t, b in zip(of[(fmt, way, when)], of[(fmt, "off", when)], strict=True)]
        return f"{statistics.median(rs):.3f} ({min(rs):.2f}-{max(rs):.2f})"

    def best(fmt: str, way: str, when: str) -> str:
        return f"{min(times[(fmt, way, when)]) / min(times[(fmt, 'off', when)]):.3f}"

    for fmt in paths:
        for when in ("first", "later"):
            rate = n / statistics.median(times[(fmt, "off", when)])
            cells = [ratio(times, fmt, "once", when), ratio(times, fmt, "always", when)]
            cells += [ratio(cpu, fmt, "once", when), ratio(cpu, fmt, "always", when)]
            cells += [best(fmt, "once", when), best(fmt, "always", when)]
            print(f"| {fmt} raw | {when} | {rate / 1e3:.1f} k | " + " | ".join(cells) + " |")
    print()
    print("wall, CPU: median over rounds of the ratio in the same round (range in brackets); CPU is the")
    print("process CPU time (all threads), which other load on the machine disturbs less than wall time;")
    print("best wall: the fastest run of each way over all rounds (other load only ever adds time).")
    print("targets: 'once' later epochs <= 1.05, first epoch <= 1.30")
    if not args.keep:
        for path in paths.values():
            shutil.rmtree(path) if path.is_dir() else path.unlink()


if __name__ == "__main__":
    main()
