"""Ingestion speed beside the fastest well-kept way to produce the same output, in one run.

* Image folder: JPEG photo crops of 96-256 px (``scripts/_photo_crops.py``: real pixels from
  scikit-learn's sample photos), 8 class folders, to 64x64 RGB. Baseline: Pillow open +
  convert + resize in ``os.cpu_count()`` processes into one uint8 array (no store at all).
  oocseq: ``ingest_image_folder`` to Zarr (lz4, pre-shuffled, checksummed, committed).
* CSV: ``--csv-rows`` rows of 50 float columns and a string label. Baseline:
  ``pyarrow.csv.read_csv`` (multi-threaded) into a float32 matrix and int64 class codes.
  oocseq: ``ingest_csv`` to HDF5 and to Zarr.
* NPY: one ``.npy`` of ``--npy-mb`` MiB of float32. Baseline: read it sequentially and
  write the same bytes to a new file, then ``fsync`` it (the commit makes a store durable).
  oocseq: ``ingest_npy`` (lz4) to Zarr and HDF5.

Rounds are interleaved (baseline, then oocseq, for each source, every round); a ratio is the
median of the per-round ratios baseline_time / oocseq_time (above 1: oocseq is faster).

Run:  python benchmarks/ingest.py [--images 4000] [--csv-rows 200000] [--npy-mb 512] [--runs 3] [--only npy]
      [--workdir out/bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import oocseq  # noqa: E402

SIZE = (64, 64)


def make_images(root: Path, n: int) -> None:
    import _photo_crops as pc
    from PIL import Image

    if root.exists():
        return
    rng = np.random.default_rng(0)
    i = 0
    for block, labels in zip(pc.crops(n, 0), pc.labels(n, 0), strict=True):
        for img, label in zip(block, labels.tolist(), strict=True):
            side = int(rng.integers(96, 257))
            folder = root / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).resize((side, side)).save(folder / f"{i:07d}.jpg", quality=90)
            i += 1


def _pillow(paths: list[str]) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(paths), *SIZE, 3), dtype=np.uint8)
    for j, p in enumerate(paths):
        with Image.open(p) as img:
            out[j] = np.asarray(img.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR))
    return out


def pillow_baseline(root: Path) -> None:
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    workers = os.cpu_count() or 1
    step = 64
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_pillow, [paths[i : i + step] for i in range(0, len(paths), step)]))
    np.concatenate(parts)


def make_csv(path: Path, rows: int) -> None:
    if path.exists():
        return
    rng = np.random.default_rng(0)
    cols = [f"f{j}" for j in range(50)]
    with open(path, "w") as f:
        f.write(",".join([*cols, "label"]) + "\n")
        for start in range(0, rows, 10000):
            k = min(10000, rows - start)
            x = rng.standard_normal((k, 50)).astype(np.float32)
            labels = rng.choice(["cat", "dog", "bird", "fish"], k)
            f.writelines(
                ",".join(f"{v:.6g}" for v in row) + f",{lab}\n" for row, lab in zip(x, labels, strict=True)
            )


def arrow_baseline(path: Path) -> None:
    import pyarrow.compute as pc
    from pyarrow import csv

    table = csv.read_csv(path)
    x = np.column_stack([table.column(j).to_numpy().astype(np.float32) for j in range(50)])
    codes = pc.dictionary_encode(table.column("label")).combine_chunks().indices.to_numpy()
    assert len(x) == len(codes)


def make_npy(path: Path, mb: int) -> None:
    if not path.exists():
        rows = (mb << 20) // (64 * 4)  # samples of 64 float32
        np.save(path, np.random.default_rng(0).standard_normal((rows, 64), dtype=np.float32))


def copy_baseline(src: Path, dest: Path) -> None:
    arr = np.load(src, mmap_mode="r")
    step = max(1, (4 << 20) // arr[0].nbytes)
    with open(dest, "wb") as f:
        for i in range(0, len(arr), step):
            f.write(np.ascontiguousarray(arr[i : i + step]).data)
        # On disk, as a committed store is (deleting a file still in the page cache would
        # spare it the disk altogether).
        f.flush()
        os.fsync(f.fileno())
    dest.unlink()


def timed(fn, *args, **kw) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--csv-rows", type=int, default=200_000)
    ap.add_argument("--npy-mb", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="out/bench")
    ap.add_argument("--only", default="", help="run the cases whose name contains this, e.g. 'npy'")
    args = ap.parse_args()
    work = Path(args.workdir) / "ingest"
    work.mkdir(parents=True, exist_ok=True)
    images, table, npy = (
        work / f"img{args.images}",
        work / f"t{args.csv_rows}.csv",
        work / f"a{args.npy_mb}.npy",
    )
    make_images(images, args.images)
    make_csv(table, args.csv_rows)
    make_npy(npy, args.npy_mb)
    n_img = sum(1 for _ in images.rglob("*.jpg"))
    cases = {
        "images -> zarr": (
            lambda: pillow_baseline(images),
            lambda: oocseq.ingest_image_folder(images, work / "i.zarr", image_size=SIZE, overwrite=True),
            f"{n_img} img",
            n_img,
        ),
        "csv -> h5": (
            lambda: arrow_baseline(table),
            lambda: oocseq.ingest_csv(table, work / "c.h5", label_column="label", overwrite=True),
            f"{args.csv_rows} rows",
            args.csv_rows,
        ),
        "csv -> zarr": (
            lambda: arrow_baseline(table),
            lambda: oocseq.ingest_csv(table, work / "c.zarr", label_column="label", overwrite=True),
            f"{args.csv_rows} rows",
            args.csv_rows,
        ),
        "npy -> zarr": (
            lambda: copy_baseline(npy, work / "copy.bin"),
            lambda: oocseq.ingest_npy(npy, work / "n.zarr", overwrite=True),
            f"{args.npy_mb} MiB",
            args.npy_mb,
        ),
        "npy -> h5": (
            lambda: copy_baseline(npy, work / "copy.bin"),
            lambda: oocseq.ingest_npy(npy, work / "n.h5", overwrite=True),
            f"{args.npy_mb} MiB",
            args.npy_mb,
        ),
    }
    cases = {k: v for k, v in cases.items() if args.only in k}
    ratios: dict[str, list[float]] = {k: [] for k in cases}
    rates: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for _ in range(args.runs):
        for name, (base, ours, _, amount) in cases.items():
            # Each timed run starts with no dirty pages: otherwise the one after a large write
            # pays for that write's writeback (rounds then ranged 0.5-2.7x).
            os.sync()
            tb = timed(base)
            os.sync()
            to = timed(lambda o=ours: o().close())
            ratios[name].append(tb / to)
            rates[name].append((amount / tb, amount / to))
    print(
        f"ingestion vs baseline, {os.cpu_count()} cores, {args.runs} interleaved rounds (ratio > 1: oocseq faster)"
    )
    print(f"{'source':<16}{'size':>14}{'baseline /s':>14}{'oocseq /s':>14}{'ratio':>8}{'rounds':>14}")
    for name, (_, _, size, _) in cases.items():
        b = statistics.median(r[0] for r in rates[name])
        o = statistics.median(r[1] for r in rates[name])
        spread = f"{min(ratios[name]):.2f}-{max(ratios[name]):.2f}"
        print(f"{name:<16}{size:>14}{b:>14.1f}{o:>14.1f}{statistics.median(ratios[name]):>7.2f}x{spread:>14}")
    for p in ("i.zarr", "c.h5", "c.zarr", "n.zarr", "n.h5"):
        target = work / p
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


if __name__ == "__main__":
    main()
