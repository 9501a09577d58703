"""Shuffle quality: how well the batches of an epoch plan mix, measured on the store's labels.

A chunk-aligned shuffle mixes only the chunks of one window. If a store was written in label
order (and not pre-shuffled at ingestion), a window holds a few classes and so does every batch;
nothing fails, the model just trains worse. This module makes that visible:

- :func:`shuffle_report` measures, for a plan and batch size: distinct chunks per batch, the
  window's share of the store, and for an integer label field the mean label entropy and the
  classes per batch next to an iid shuffle of the same labels. It reads the label field only.
- :func:`label_clustering` is the cheap check behind the warning at construction: the mean
  label entropy inside a chunk against the entropy of the labels of those chunks together,
  from a few chunks spread over the store.

Entropy is the plug-in (empirical) Shannon entropy of a batch's label histogram, in bits. The
iid reference applies the same estimator to batches drawn without replacement from a uniformly
shuffled copy of the same labels, so both figures share its small-sample bias.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ArgumentError
from .plan import EpochPlan

__all__ = ["CLUSTERED_BELOW", "ShuffleReport", "label_clustering", "shuffle_report"]

#: :func:`label_clustering` below this: a sequence warns at construction (ShuffleWarning).
#: An unsorted store measures about 1.0, a class-sorted one with a few classes per chunk
#: 0.0-0.3.
CLUSTERED_BELOW = 0.5

#: Batches of the epoch a report measures, at most (it reads their labels).
DEFAULT_MAX_BATCHES = 2000
#: Chunks :func:`label_clustering` reads, at most.
_PROBE_CHUNKS = 16
#: The iid reference's seed (any fixed value: the reference must not vary between calls).
_IID_SEED = 0x5EED


@dataclass(frozen=True)
class ShuffleReport:
    """How the batches of one epoch mix. Figures are means over the ``batches`` measured.

    Attributes:
        batch_size, window, num_chunks: the configuration measured.
        window_share: chunks per window / chunks of the store (or of the rank's share), <= 1.
        batches: batches measured (the first ones of the epoch, at most ``max_batches``).
        chunks_per_batch, max_chunks_per_batch: distinct chunks a batch draws from.
        label: the label field measured, or ``None`` (no integer label field).
        num_classes: distinct labels in the measured batches.
        label_entropy, iid_label_entropy: mean label entropy per batch (bits), and the same
            for an iid shuffle.
        classes_per_batch, iid_classes_per_batch: mean distinct labels per batch.
        preshuffle: the store's pre-shuffle record (``store.metadata["preshuffle"]``).
    """

    batch_size: int
    window: int
    num_chunks: int
    window_share: float
    batches: int
    chunks_per_batch: float
    max_chunks_per_batch: int
    label: str | None = None
    num_classes: int | None = None
    label_entropy: float | None = None
    iid_label_entropy: float | None = None
    classes_per_batch: float | None = None
    iid_classes_per_batch: float | None = None
    preshuffle: Any = None

    @property
    def entropy_ratio(self) -> float | None:
        """``label_entropy / iid_label_entropy`` (1.0: mixes like an iid shuffle)."""
        if self.label_entropy is None or not self.iid_label_entropy:
            return None
        return self.label_entropy / self.iid_label_entropy

    def __str__(self) -> str:
        lines = [
            f"shuffle report: batches of {self.batch_size}, windows of {self.window} of "
            f"{self.num_chunks} chunks ({self.window_share:.1%} of the store), "
            f"{self.batches} batches measured",
            f"  distinct chunks per batch: {self.chunks_per_batch:.1f} (max {self.max_chunks_per_batch})",
            f"  pre-shuffled at ingestion: {_describe_preshuffle(self.preshuffle)}",
        ]
        if (
            self.label is None
            or self.label_entropy is None
            or self.iid_label_entropy is None
            or self.entropy_ratio is None
            or self.classes_per_batch is None
            or not self.iid_classes_per_batch
        ):
            lines.append("  labels: no integer label field to measure")
            return "\n".join(lines)
        lines += [
            f"  labels ({self.label!r}, {self.num_classes} classes)    this plan    iid shuffle    ratio",
            f"    entropy per batch (bits)  {self.label_entropy:10.3f}  {self.iid_label_entropy:12.3f}"
            f"  {self.entropy_ratio:8.3f}",
            f"    classes per batch         {self.classes_per_batch:10.2f}  {self.iid_classes_per_batch:12.2f}"
            f"  {self.classes_per_batch / self.iid_classes_per_batch:8.3f}",
        ]
        if self.entropy_ratio is not None and self.entropy_ratio < 0.9:
            lines.append(
                "  batches mix far less than an iid shuffle: the store is ordered by label. Re-ingest "
                "with the default preshuffle=True, or use a larger window"
            )
        return "\n".join(lines)


def _describe_preshuffle(record: Any) -> str:
    if not record:
        return "no"
    if isinstance(record, dict):
        return "yes (" + ", ".join(f"{k}={v}" for k, v in record.items()) + ")"
    return "yes"


def _batch_stats(labels: np.ndarray, batch_size: int, num_classes: int) -> tuple[float, float]:
    """Mean plug-in entropy (bits) and mean distinct labels over full batches of ``labels``."""
    nb = len(labels) // batch_size
    if nb == 0:
        nb, batch_size = 1, len(labels)
    rows = labels[: nb * batch_size].reshape(nb, batch_size)
    counts = np.zeros((nb, num_classes), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(nb), batch_size), rows.ravel()), 1)
    p = counts / batch_size
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
    return float(h.mean()), float((counts > 0).sum(axis=1).mean())


def _label_field(store: Any, label: str | None) -> str | None:
    if label is None:
        return None
    if label not in store.fields:
        return None
    info = store.fields[label]
    if info.dtype.kind not in "iub" or len(info.shape) != 1:
        return None
    return label


def shuffle_report(
    store: Any,
    plan: EpochPlan,
    batch_size: int,
    *,
    label: str | None = "y",
    max_batches: int = DEFAULT_MAX_BATCHES,
) -> ShuffleReport:
    """Measure how the batches of ``plan`` mix (see :class:`ShuffleReport`).

    Args:
        store: an opened :class:`~oocseq.Store`, or in-memory arrays (anything with
            ``fields``, ``metadata`` and ``read_chunk``).
        plan: the epoch plan, e.g. ``seq.plan``.
        batch_size: samples per batch (>= 1).
        label: an integer field of shape ``(n,)`` to measure label mixing on; ``None`` or a
            field that is not one skips the label figures.
        max_batches: measure the first ``max_batches`` batches of the epoch (reads their
            labels: ``max_batches * batch_size`` integers).

    Raises:
        ArgumentError: ``batch_size`` or ``max_batches`` < 1. FieldNotFoundError is never
        raised: a missing label field only leaves the label figures out.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ArgumentError(f"max_batches must be an int >= 1, got {max_batches!r}")
    total = -(-len(plan) // batch_size)
    batches = min(total, max_batches)
    stop = min(len(plan), batches * batch_size)
    idx = plan.indices(0, stop)
    chunks = idx // plan.chunk_len
    distinct = [len(np.unique(chunks[s : s + batch_size])) for s in range(0, stop, batch_size)]
    own_chunks = max(1, len(plan.chunk_order))
    report: dict[str, Any] = {
        "batch_size": batch_size,
        "window": plan.window,
        "num_chunks": own_chunks,
        "window_share": min(1.0, plan.window / own_chunks),
        "batches": batches,
        "chunks_per_batch": float(np.mean(distinct)) if distinct else 0.0,
        "max_chunks_per_batch": int(max(distinct, default=0)),
        "preshuffle": store.metadata.get("preshuffle"),
    }
    name = _label_field(store, label)
    if name is not None and stop:
        labels = np.empty(stop, dtype=np.int64)
        for c in np.unique(chunks).tolist():  # label chunks are small: read each once
            at = np.flatnonzero(chunks == c)
            labels[at] = np.asarray(store.read_chunk(name, c))[idx[at] - c * plan.chunk_len]
        classes, labels = np.unique(labels, return_inverse=True)
        k = len(classes)
        h, c = _batch_stats(labels, batch_size, k)
        iid = np.random.default_rng(_IID_SEED).permutation(labels)
        h_iid, c_iid = _batch_stats(iid, batch_size, k)
        report.update(
            label=name,
            num_classes=k,
            label_entropy=h,
            iid_label_entropy=h_iid,
            classes_per_batch=c,
            iid_classes_per_batch=c_iid,
        )
    return ShuffleReport(**report)


def label_clustering(store: Any, label: str = "y", probe_chunks: int = _PROBE_CHUNKS) -> float | None:
    """How much an integer label field is clustered by chunk: the mean label entropy inside a
    chunk, divided by the mean entropy of pieces of the same sizes drawn at random from the same
    labels (about 1.0: a chunk holds the label mix of the whole; near 0: one label per chunk).
    Comparing with random pieces of the chunk's own size keeps small chunks (fewer samples than
    classes) from looking clustered. Reads at most ``probe_chunks`` chunks, spread evenly over
    the store. ``None`` if there is no integer label field of shape ``(n,)``, fewer than two
    chunks, a single label, or chunks too small to hold more than one label.

    Raises:
        The store's own read errors (e.g. CorruptStoreError); a missing ``label`` field
        returns ``None``.
    """
    name = _label_field(store, label)
    if name is None or store.num_chunks < 2:
        return None
    probes = np.unique(np.linspace(0, store.num_chunks - 1, min(probe_chunks, store.num_chunks)).astype(int))
    parts = [np.asarray(store.read_chunk(name, int(c)), dtype=np.int64) for c in probes]
    classes, joined = np.unique(np.concatenate(parts), return_inverse=True)
    if len(classes) < 2:
        return None
    k = len(classes)
    bounds = np.cumsum([0] + [len(p) for p in parts])

    def mean_entropy(values: np.ndarray) -> float:
        out = []
        for a, b in itertools.pairwise(bounds):
            p = np.bincount(values[a:b], minlength=k) / (b - a)
            p = p[p > 0]
            out.append(float(-(p * np.log2(p)).sum()))
        return float(np.mean(out))

    reference = mean_entropy(np.random.default_rng(_IID_SEED).permutation(joined))
    if reference < 1e-9:
        return None
    return mean_entropy(joined) / reference
