"""oocseq end to end on real data: ingest files into Zarr and HDF5, train Keras models from them,
one of them on a store several times larger than the memory its training process may use.

Three real datasets that ship inside scikit-learn, written out as a user would have them:

1. Handwritten digits (1,797 scans, 8x8, 10 classes) as a folder of PNG files, one subfolder
   per class -> ``oocseq.ingest_image_folder`` -> a small CNN trained with
   ``model.fit(ChunkedSequence(...), validation_data=ChunkedSequence(...))``.
2. Breast-cancer measurements (569 rows, 30 numeric columns, a string ``diagnosis``) as CSV
   files -> ``oocseq.ingest_csv`` -> a small MLP.

3. Larger than memory: crops of scikit-learn's two sample photos (``--big-gb``, default 3.4 GB,
   labelled by which of 8 photo quadrants they come from) streamed from a generator into an
   HDF5 store with ``oocseq.ingest_arrays``, then one epoch of a small CNN in a child process
   held to ``--memory-limit`` (default 1 GiB) by a memory cgroup that counts page cache (as
   root; else a stated budget held against its peak RssAnon), the store evicted from the page cache
   first. It prints the store size, the limit, peak RSS and cgroup usage, samples/s next to a
   hand-written ``PyDataset`` and to loading everything, a record of which samples every
   training step received, and the validation accuracy. See ``scripts/_big_stage.py``.

Digits and breast cancer are each done twice, through a Zarr store and through an HDF5 store.
The script prints the stores, the validation accuracy of every model and a summary table, and
exits with status 1 if an accuracy is below what this data reliably gives (digits 0.95, breast
cancer 0.90, photo quadrants 0.85) or a check of the larger-than-memory stage fails; with
status 2 if there is not enough disk space for it. ``--quick`` skips stage 3.

Run:  python scripts/train_demo.py [--quick] [--workdir out/demo] [--epochs 12] [--csv-epochs 40]
                                   [--big-gb 3.4] [--memory-limit-gib 1.0] [--keep]
Keras backend: JAX unless KERAS_BACKEND says otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np

import oocseq
from oocseq.cli import describe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _big_stage

if TYPE_CHECKING:
    import keras

FORMATS = {"Zarr": ".zarr", "HDF5": ".h5"}
DIGITS_MIN_ACCURACY = 0.95
CSV_MIN_ACCURACY = 0.90
VAL_FRACTION = 0.2
SEED = 0


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample indices ``(train, val)``: ``val_fraction`` of every class goes to validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = round(len(idx) * val_fraction)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def show(store: oocseq.Store) -> None:
    """Print what ``oocseq info STORE`` prints: fields, chunking, compression, classes."""
    print(textwrap.indent(describe(store), "    "))
    if store.sources is not None:  # provenance: the file every sample came from
        print(f"    sample 0 came from {str(store.sources[0])!r}")


# -- 1. digits: an image folder ---------------------------------------------------------------
def write_digit_pngs(root: Path) -> Path:
    """Write scikit-learn's digits as PNG files: ``root/{train,val}/<digit>/img_XXXX.png``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    train, val = stratified_split(digits.target, VAL_FRACTION, SEED)
    if root.exists():
        shutil.rmtree(root)
    for split, indices in (("train", train), ("val", val)):
        for i in indices:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"img_{i:04d}.png")
    print(f"wrote {len(train)} + {len(val)} PNG files under {root}/{{train,val}}/<digit>/")
    return root


def digits_model(image_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    import keras

    model = keras.Sequential(
        [
            keras.Input(shape=image_shape),
            keras.layers.Rescaling(1 / 255),  # the store keeps uint8 pixels
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.25),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def train_digits(png_root: Path, workdir: Path, suffix: str, epochs: int) -> dict[str, float]:
    import keras  # before building a ChunkedSequence: it then is a keras.utils.PyDataset

    stores = {}
    for split in ("train", "val"):
        stores[split] = oocseq.ingest_image_folder(
            png_root / split,
            workdir / f"digits_{split}{suffix}",
            image_size=(32, 32),
            color_mode="grayscale",
            # Tiny chunks, so that this small dataset spans several chunks and windows and the
            # chunk-aligned shuffle is exercised. Leave chunk_len out for real data (~4 MiB chunks).
            chunk_len=64,
            overwrite=True,
        )
    show(stores["train"])
    print(f"    validation: {stores['val']}")

    keras.utils.set_random_seed(SEED)
    train = oocseq.ChunkedSequence(stores["train"], batch_size=64, seed=SEED)
    val = oocseq.ChunkedSequence(stores["val"], batch_size=256, shuffle=False)
    model = digits_model(stores["train"].fields["x"].shape[1:], len(stores["train"].metadata["class_names"]))
    # fit asks for batches in a random order (its shuffle=True); the sequence hands out its own
    # chunk-aligned shuffled plan in the order requests arrive, so each chunk is decoded once per epoch.
    model.fit(train, validation_data=val, epochs=epochs, verbose=2)
    accuracy = model.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    return {"train": len(stores["train"]), "val": len(stores["val"]), "accuracy": float(accuracy)}


# -- 2. breast cancer: a CSV table ------------------------------------------------------------
def write_cancer_csvs(root: Path) -> tuple[Path, Path]:
    """Write scikit-learn's breast-cancer data as ``root/{train,val}.csv``: 30 numeric
    columns and a string column ``diagnosis`` ("malignant" / "benign")."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    df = data.data.copy()
    df["diagnosis"] = data.target_names[data.target.to_numpy()]
    train, val = stratified_split(data.target.to_numpy(), VAL_FRACTION, SEED)
    root.mkdir(parents=True, exist_ok=True)
    paths = root / "train.csv", root / "val.csv"
    df.iloc[train].to_csv(paths[0], index=False)
    df.iloc[val].to_csv(paths[1], index=False)
    print(f"wrote {len(train)} + {len(val)} rows to {paths[0]} and {paths[1]}")
    return paths


def cancer_model(train_x: np.ndarray, num_classes: int) -> keras.Model:
    import keras

    normalize = keras.layers.Normalization()
    normalize.adapt(train_x)  # per-column mean and variance of the training features
    model = keras.Sequential(
        [
            keras.Input(shape=train_x.shape[1:]),
            normalize,
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def train_cancer(csvs: tuple[Path, Path], workdir: Path, suffix: str, epochs: int) -> dict[str, float]:
    import keras

    stores = {}
    for split, src in zip(("train", "val"), csvs, strict=True):
        stores[split] = oocseq.ingest_csv(
            src, workdir / f"cancer_{split}{suffix}", label_column="diagnosis", overwrite=True
        )
    show(stores["train"])
    print(f"    validation: {stores['val']}")

    keras.utils.set_random_seed(SEED)
    train = oocseq.ChunkedSequence(stores["train"], batch_size=32, seed=SEED)
    val = oocseq.ChunkedSequence(stores["val"], batch_size=256, shuffle=False)
    # The training features are small here: read them whole to adapt the Normalization layer.
    model = cancer_model(stores["train"]["x"][:], len(stores["train"].metadata["class_names"]))
    model.fit(train, validation_data=val, epochs=epochs, verbose=0)
    accuracy = model.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    return {"train": len(stores["train"]), "val": len(stores["val"]), "accuracy": float(accuracy)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("out/demo"), help="where files and stores go")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of the digits CNN (default: 12)")
    parser.add_argument("--csv-epochs", type=int, default=40, help="epochs of the CSV MLP (default: 40)")
    parser.add_argument(
        "--quick", action="store_true", help="skip the larger-than-memory stage (and its disk space)"
    )
    parser.add_argument(
        "--big-gb", type=float, default=3.4, help="size of the larger-than-memory store in GB (default: 3.4)"
    )
    parser.add_argument(
        "--memory-limit-gib",
        type=float,
        default=1.0,
        help="memory the larger-than-memory stage's training process may use, in GiB (default: 1.0)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the larger-than-memory stores afterwards")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"oocseq {oocseq.__version__}, work directory {workdir}")

    results = []  # (dataset, format, result, minimum accuracy, seconds)
    big_problems: list[str] = []
    if not args.quick:
        # First, while this process holds no ML framework: the training runs in a child process
        # whose memory is limited, and this process's own memory counts in any limit around both.
        print(
            "\n== larger than memory: photo crops -> ingest_arrays (HDF5) -> CNN in a memory-limited process =="
        )
        t = time.perf_counter()
        try:
            big = _big_stage.run(workdir, args.big_gb, int(args.memory_limit_gib * 2**30), args.keep)
        except _big_stage.NotEnoughDisk as e:
            print(f"\n{e}", file=sys.stderr)
            return 2
        seconds = time.perf_counter() - t
        r = {"train": big["n"], "val": big["val_n"], "accuracy": big["accuracy"]}
        big_problems = big["problems"]
        results.append(("photo crops (larger than memory)", "HDF5", r, _big_stage.MIN_ACCURACY, seconds))

    import keras

    print(f"\nKeras {keras.__version__} on {keras.backend.backend()}")
    print("\n== digits: PNG folder -> ingest_image_folder -> CNN ==")
    png_root = write_digit_pngs(workdir / "digits_png")
    for fmt, suffix in FORMATS.items():
        print(f"\n-- digits via {fmt} --")
        t = time.perf_counter()
        r = train_digits(png_root, workdir, suffix, args.epochs)
        seconds = time.perf_counter() - t
        print(f"digits ({fmt}): validation accuracy {r['accuracy']:.4f}")
        results.append(("digits (PNG folder)", fmt, r, DIGITS_MIN_ACCURACY, seconds))

    print("\n== breast cancer: CSV -> ingest_csv -> MLP ==")
    csvs = write_cancer_csvs(workdir / "cancer_csv")
    for fmt, suffix in FORMATS.items():
        print(f"\n-- breast cancer via {fmt} --")
        t = time.perf_counter()
        r = train_cancer(csvs, workdir, suffix, args.csv_epochs)
        seconds = time.perf_counter() - t
        print(f"breast cancer ({fmt}): validation accuracy {r['accuracy']:.4f}")
        results.append(("breast cancer (CSV)", fmt, r, CSV_MIN_ACCURACY, seconds))

    print("\n| dataset | format | train / val samples | val accuracy | expected | seconds (ingest + train) |")
    print("|---|---|---|---|---|---|")
    failed = []
    for dataset, fmt, r, minimum, seconds in results:
        ok = r["accuracy"] >= minimum
        if not ok:
            failed.append(f"{dataset} via {fmt}")
        print(
            f"| {dataset} | {fmt} | {r['train']} / {r['val']} | {r['accuracy']:.4f} | "
            f">= {minimum:.2f}{'' if ok else '  FAILED'} | {seconds:.1f} |"
        )
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    print(
        f"\n{time.perf_counter() - started:.0f} s in all ({cpu:.0f} s of CPU time, this process and its children)"
    )
    if big_problems:
        print(f"\nlarger-than-memory stage: {'; '.join(big_problems)}", file=sys.stderr)
    if failed:
        print(f"\naccuracy below the expected minimum: {', '.join(failed)}", file=sys.stderr)
    if failed or big_problems:
        return 1
    print(
        "all accuracies reached their expected minimum"
        + ("" if args.quick else "; every check of the larger-than-memory stage passed")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
