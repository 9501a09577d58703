"""Photo crops for the main job's larger-than-memory stage: real pixels, learnable labels.

Every crop is 128x128x3 uint8, cut from one of scikit-learn's two sample photos (china.jpg and
flower.jpg, 427x640 each) and lying wholly inside one quadrant of it. Its label is where it came
from, one of 8 classes ``4 * photo + 2 * bottom + right`` (:data:`CLASS_NAMES`). Each crop is
jittered (brightness x0.75-1.25 in 9 steps, random horizontal flip, and its position), so no two crops of a store are the
same image. Crops are made in blocks from a seed, so any field can be regenerated block by block
without holding the dataset in memory (``ingest_arrays`` takes one iterable per field).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CROP = 128
SAMPLE_SHAPE = (CROP, CROP, 3)
SAMPLE_BYTES = CROP * CROP * 3
CLASS_NAMES = [
    f"{photo} {tb}-{lr}"
    for photo in ("china", "flower")
    for tb in ("top", "bottom")
    for lr in ("left", "right")
]
BLOCK = 512  # crops made at once (25 MB)

GAINS = np.linspace(0.75, 1.25, 9)  # brightness jitter levels
_photos: list[np.ndarray] | None = None
_variants: dict[tuple[int, int, bool], np.ndarray] = {}


def photos() -> list[np.ndarray]:
    """scikit-learn's sample photos, uint8 ``(427, 640, 3)`` each (shipped with it: offline)."""
    global _photos
    if _photos is None:
        from sklearn.datasets import load_sample_images

        _photos = [np.ascontiguousarray(p) for p in load_sample_images().images]
    return _photos


def _windows(photo: int, gain: int, flip: bool) -> np.ndarray:
    """All crops of one brightness- and mirror-jittered photo, as a view ``(rows, cols, 128,
    128, 3)``: the photos are jittered once (18 small copies), not every crop."""
    key = (photo, gain, flip)
    if key not in _variants:
        p = photos()[photo].astype(np.float32) * GAINS[gain]
        p = np.clip(p, 0, 255).astype(np.uint8)
        _variants[key] = np.ascontiguousarray(p[:, ::-1] if flip else p)
    return np.lib.stride_tricks.sliding_window_view(_variants[key], SAMPLE_SHAPE)[:, :, 0]


def _block_labels_and_corners(
    n: int, seed: int, b: int
) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    k = min(BLOCK, n - b * BLOCK)
    rng = np.random.default_rng([seed, b])
    labels = rng.integers(0, len(CLASS_NAMES), k)
    h, w = photos()[0].shape[:2]
    qh, qw = h // 2, w // 2
    top = (labels // 2) % 2 * qh + rng.integers(0, qh - CROP + 1, k)
    left = labels % 2 * qw + rng.integers(0, qw - CROP + 1, k)
    return rng, labels, np.stack([top, left], axis=1)


def labels(n: int, seed: int) -> Iterator[np.ndarray]:
    """The labels (int64, 0-7) of ``n`` crops, in blocks."""
    for b in range((n + BLOCK - 1) // BLOCK):
        yield _block_labels_and_corners(n, seed, b)[1].astype(np.int64)


def crops(n: int, seed: int) -> Iterator[np.ndarray]:
    """``n`` jittered crops, uint8 ``(k, 128, 128, 3)`` blocks, matching :func:`labels`."""
    width = photos()[0].shape[1]
    for b in range((n + BLOCK - 1) // BLOCK):
        rng, lab, corners = _block_labels_and_corners(n, seed, b)
        k = len(lab)
        gain = rng.integers(0, len(GAINS), k)
        flip = rng.random(k) < 0.5
        out = np.empty((k, *SAMPLE_SHAPE), dtype=np.uint8)
        for photo in range(2):
            for g in range(len(GAINS)):
                for f in (False, True):
                    sel = np.flatnonzero((lab // 4 == photo) & (gain == g) & (flip == f))
                    if len(sel):
                        rows, cols = corners[sel, 0], corners[sel, 1]
                        if f:  # the mirrored photo holds the same crop, mirrored, at this column
                            cols = width - CROP - cols
                        out[sel] = _windows(photo, g, f)[rows, cols]
        yield out


def ids(n: int) -> Iterator[np.ndarray]:
    """Sample ids ``0..n-1`` (int64), in blocks: which sample a served row is."""
    for start in range(0, n, BLOCK):
        yield np.arange(start, min(start + BLOCK, n), dtype=np.int64)
