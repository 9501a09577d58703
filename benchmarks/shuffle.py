"""Shuffle quality on a class-sorted source: label mixing, throughput, ingestion cost, training.

The data: 32x32x3 uint8 crops (3,072 bytes, as in the measured case) of scikit-learn's two
sample photos, labelled by where they come from (photo x 5 horizontal bands = 10 classes), and
written **sorted by label**, as one ``.npy`` per class or a table exported in class order is.

It prints, from one run:

1. **Mixing**: mean label entropy and classes per batch of oocseq's default pipeline
   (pre-shuffled ingestion, default window) against an iid shuffle, at batch sizes 32, 128 and
   512, and the same without the pre-shuffle (``preshuffle=False``). Counts from seeded plans:
   no timing. Targets: entropy >= 0.97x iid at 128 and 512 (>= 0.95x at 32), >= 9.5 of 10
   classes per 128-batch.
2. **Ingestion cost**: ``ingest_arrays`` with the pre-shuffle / without it, interleaved rounds,
   median of per-round ratios. Target <= 1.5x.
3. **Throughput**: a warm shuffled epoch (Keras call order) of the default sequence over the
   pre-shuffled store / over the store in source order (the same bytes, the same memory bound).
   Target >= 0.9x.
4. **Training parity** (``--train-seeds``, 0 skips it): a small CNN, ``model.fit`` on the
   pre-shuffled store with oocseq's defaults, against ``model.fit`` on the same arrays in RAM with
   Keras's global shuffle, and on the class-sorted store without the pre-shuffle; final
   validation accuracy, mean over seeds, and the per-epoch curves. Target: within 0.5 points.
   The data (``--task``): jittered 32x32 digits sorted by label (default: a task that
   converges, so 3 seeds separate a gap from noise), or the crops above.

Run from the repository root: ``python benchmarks/shuffle.py`` (about 15 minutes on 2 cores);
``--samples 4000 --rounds 1 --train-seeds 0`` is a quick check.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data
import numpy as np

import oocseq
from oocseq.bench import time_epoch
from oocseq.errors import ShuffleWarning

CLASSES = 10
SHAPE = (32, 32, 3)


def sorted_crops(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` crops sorted by label; label = photo * 5 + band of the crop's top row."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    per = n // CLASSES
    xs, ys = [], []
    for label in range(CLASSES):
        photo = photos[label // 5]
        band = label % 5
        h = photo.shape[0] - SHAPE[0]
        lo, hi = band * h // 5, (band + 1) * h // 5
        k = per + (1 if label < n % CLASSES else 0)
        rows = rng.integers(lo, hi, k)
        cols = rng.integers(0, photo.shape[1] - SHAPE[1], k)
        xs.append(
            np.stack([photo[r : r + SHAPE[0], c : c + SHAPE[1]] for r, c in zip(rows, cols, strict=True)])
        )
        ys.append(np.full(k, label, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def sorted_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` jittered 32x32x1 copies of scikit-learn's 8x8 digits, sorted by label, and the
    index of the original digit each copy comes from (a held-out set must not share
    originals with the training set)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    src = np.sort(rng.integers(0, len(digits.target), n))
    src = src[np.argsort(digits.target[src], kind="stable")]
    big = np.kron(digits.images[src], np.ones((4, 4))) * (255 / 16)  # 8x8 -> 32x32
    shifts = rng.integers(-3, 4, (n, 2))
    out = np.empty((n, 32, 32, 1), np.uint8)
    for i, (image, (dy, dx)) in enumerate(zip(big, shifts, strict=True)):
        moved = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
        noisy = moved + rng.normal(0, 24, moved.shape)
        out[i, :, :, 0] = np.clip(noisy, 0, 255)
    return out, digits.target[src].astype(np.int64), src


def mixing(stores: dict[str, oocseq.Store]) -> tuple[list[str], dict[str, float]]:
    lines = [
        "| store | batch | entropy (bits) | iid | ratio | classes per batch | iid |",
        "|---|---|---|---|---|---|---|",
    ]
    figures = {}
    for name, store in stores.items():
        for batch_size in (32, 128, 512):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ShuffleWarning)
                seq = oocseq.ChunkedSequence(store, batch_size, seed=0)
            r = seq.shuffle_report(max_batches=10**9)
            figures[f"{name} {batch_size}"] = r.entropy_ratio
            figures[f"{name} {batch_size} classes"] = r.classes_per_batch
            lines.append(
                f"| {name} | {batch_size} | {r.label_entropy:.3f} | {r.iid_label_entropy:.3f} | "
                f"{r.entropy_ratio:.3f} | {r.classes_per_batch:.2f} | {r.iid_classes_per_batch:.2f} |"
            )
            seq.close()
    return lines, figures


def ingestion_cost(x: np.ndarray, y: np.ndarray, workdir: Path, rounds: int) -> tuple[float, list[float]]:
    def ingest(preshuffle: bool):
        def run(_: int) -> float:
            path = workdir / f"cost_{preshuffle}.zarr"
            t = time.perf_counter()
            oocseq.ingest_arrays(path, {"x": x, "y": y}, preshuffle=preshuffle, overwrite=True).close()
            return time.perf_counter() - t

        return run

    runs = _data.interleaved({True: ingest(True), False: ingest(False)}, {}, rounds, label="ingestion ")
    ratios = _data.paired_ratios(runs.results[True], runs.results[False])
    return _data.median(ratios), ratios


def throughput(stores: dict[str, oocseq.Store], rounds: int) -> tuple[float, dict[str, float]]:
    def epoch(store: oocseq.Store):
        def run(_: int) -> float:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ShuffleWarning)
                seq = oocseq.ChunkedSequence(store, 128, seed=0)
            timing = time_epoch(seq, "keras")  # as model.fit does: a pass, served in plan order
            seq.close()
            return timing.samples_per_s

        return run

    kinds = {"pre-shuffled": stores["pre-shuffled (default)"], "source order": stores["class-sorted"]}
    runs = _data.interleaved({k: epoch(s) for k, s in kinds.items()}, {}, rounds, label="throughput ")
    ratios = _data.paired_ratios(runs.results["pre-shuffled"], runs.results["source order"])
    return _data.median(ratios), {k: _data.median(v) for k, v in runs.results.items()}


def training(task: str, workdir: Path, seeds: int, epochs: int, samples: int) -> tuple[list[str], float]:
    import keras

    rng = np.random.default_rng(123)
    if task == "digits":
        x, y, src = sorted_digits(samples)
        # Held out: every copy of one original in six, so no original is on both sides.
        held = rng.permutation(int(src.max()) + 1)[: (int(src.max()) + 1) // 6]
        is_val = np.isin(src, held)
    else:
        x, y = sorted_crops(samples)
        is_val = np.zeros(len(x), bool)
        is_val[rng.permutation(len(x))[: len(x) // 6]] = True
    xt, yt = x[~is_val], y[~is_val]  # still sorted by label
    xv, yv = x[is_val], y[is_val]
    # As many chunks as the 60,000-crop store has (44), so that a window is the same share of
    # the store as there: with default chunks a small training set fits in one window, and any
    # order trains like a global shuffle.
    chunk_len = max(1, -(-len(xt) // 44))
    pre = oocseq.ingest_arrays(
        workdir / "train_pre.zarr", {"x": xt, "y": yt}, overwrite=True, chunk_len=chunk_len
    )
    plain = oocseq.ingest_arrays(
        workdir / "train_sorted.zarr",
        {"x": xt, "y": yt},
        overwrite=True,
        preshuffle=False,
        chunk_len=chunk_len,
    )

    def model(seed: int) -> keras.Model:
        keras.utils.set_random_seed(seed)
        m = keras.Sequential(
            [
                keras.Input(x.shape[1:]),
                keras.layers.Rescaling(1 / 255),
                keras.layers.Conv2D(16, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(),
                keras.layers.Flatten(),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(CLASSES, activation="softmax"),
            ]
        )
        m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        return m

    curves: dict[str, list[list[float]]] = {
        "in RAM, global shuffle": [],
        "oocseq defaults": [],
        "no pre-shuffle": [],
    }
    for seed in range(seeds):
        h = model(seed).fit(
            xt, yt, batch_size=128, epochs=epochs, shuffle=True, validation_data=(xv, yv), verbose=0
        )
        curves["in RAM, global shuffle"].append(h.history["val_accuracy"])
        for name, store in (("oocseq defaults", pre), ("no pre-shuffle", plain)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ShuffleWarning)
                seq = oocseq.ChunkedSequence(store, 128, seed=seed)
            h = model(seed).fit(seq, epochs=epochs, validation_data=(xv, yv), verbose=0)
            curves[name].append(h.history["val_accuracy"])
            seq.close()
        print(f"  training seed {seed + 1}/{seeds} done", flush=True)
    lines = [
        f"{len(xt)} training samples in {pre.num_chunks} chunks of {pre.chunk_len}, {len(xv)} held out",
        "",
        "| pipeline | val accuracy per epoch (mean over seeds) | final |",
        "|---|---|---|",
    ]
    finals = {}
    for name, runs in curves.items():
        mean = np.mean(np.array(runs), axis=0)
        finals[name] = float(mean[-1])
        lines.append(f"| {name} | {' '.join(f'{a:.3f}' for a in mean)} | {mean[-1]:.3f} |")
    gap = 100 * (finals["in RAM, global shuffle"] - finals["oocseq defaults"])
    return lines, gap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=60_000, help="crops (default 60,000: 184 MB)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the timed parts")
    p.add_argument("--train-seeds", type=int, default=3, help="seeds of the training parity (0: skip)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of each training run")
    p.add_argument("--train-samples", type=int, default=20_000, help="samples the training parity uses")
    p.add_argument(
        "--task",
        choices=("digits", "crops"),
        default="digits",
        help="training parity data: jittered 32x32 digits (default) or the photo crops (band labels)",
    )
    p.add_argument(
        "--quiet-wait", type=float, default=10.0, help="seconds to wait for a quiet machine per run"
    )
    p.add_argument("--workdir", type=Path, default=None, help="where stores go (default: a temporary folder)")
    args = p.parse_args()
    _data.QUIET_WAIT = args.quiet_wait
    print(_data.environment(), flush=True)
    x, y = sorted_crops(args.samples)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        stores = {
            "pre-shuffled (default)": oocseq.ingest_arrays(workdir / "pre.zarr", {"x": x, "y": y}),
            "class-sorted": oocseq.ingest_arrays(workdir / "sorted.zarr", {"x": x, "y": y}, preshuffle=False),
        }
        s = stores["pre-shuffled (default)"]
        print(
            f"{len(s)} samples of {x[0].nbytes} bytes, sorted by label ({CLASSES} classes); "
            f"{s.num_chunks} chunks of {s.chunk_len}; pre-shuffle {s.metadata['preshuffle']}",
            flush=True,
        )
        table, figures = mixing(stores)
        cost, cost_runs = ingestion_cost(x, y, workdir, args.rounds)
        speed, rates = throughput(stores, args.rounds)
        train_lines, gap = (
            training(args.task, workdir, args.train_seeds, args.epochs, args.train_samples)
            if args.train_seeds
            else ([], None)
        )
        print("\n## Mixing (default window, seed 0, every batch of epoch 0)\n")
        print("\n".join(table))
        print("\n## Targets\n")
        rows = [
            _data.Target(
                "entropy / iid, batch 32",
                f"{figures['pre-shuffled (default) 32']:.3f}",
                ">= 0.95",
                figures["pre-shuffled (default) 32"] >= 0.95,
                f"without pre-shuffle {figures['class-sorted 32']:.3f}",
            ),
            *[
                _data.Target(
                    f"entropy / iid, batch {b}",
                    f"{figures[f'pre-shuffled (default) {b}']:.3f}",
                    ">= 0.97",
                    figures[f"pre-shuffled (default) {b}"] >= 0.97,
                    f"without pre-shuffle {figures[f'class-sorted {b}']:.3f}",
                )
                for b in (128, 512)
            ],
            _data.Target(
                "classes per 128-batch",
                f"{figures['pre-shuffled (default) 128 classes']:.2f}",
                ">= 9.5",
                figures["pre-shuffled (default) 128 classes"] >= 9.5,
                f"without pre-shuffle {figures['class-sorted 128 classes']:.2f}",
            ),
            _data.Target(
                "pre-shuffled / plain ingestion time",
                _data.fmt_ratio(cost),
                "<= 1.5x",
                cost <= 1.5,
                "rounds " + ", ".join(f"{r:.2f}" for r in cost_runs),
            ),
            _data.Target(
                "warm epoch, pre-shuffled / source order",
                _data.fmt_ratio(speed),
                ">= 0.9x",
                speed >= 0.9,
                ", ".join(f"{k} {_data.fmt_rate(v)} samples/s" for k, v in rates.items()),
            ),
        ]
        if gap is not None:
            rows.append(
                _data.Target(
                    f"val accuracy, in RAM - oocseq ({args.train_seeds} seeds)",
                    f"{gap:+.2f} points",
                    "<= 0.5 points",
                    gap <= 0.5,
                    "curves below",
                )
            )
        print(_data.targets_table(rows))
        if train_lines:
            print(
                f"\n## Training parity ({args.train_samples} {args.task}, 1/6 held out; {args.train_seeds} seeds, "
                f"{args.epochs} epochs, batch 128)\n"
            )
            print("\n".join(train_lines))
        for store in stores.values():
            store.close()


if __name__ == "__main__":
    main()
