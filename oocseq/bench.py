"""``oocseq bench`` and the one epoch timer of oocseq's benchmarks.

:func:`time_epoch` times one pass over an epoch of a :class:`~oocseq.ChunkedSequence` the way
Keras makes it: ``on_epoch_begin``, then ``seq[i]`` for the requests in order
(``predict``, ``evaluate``, ``fit(shuffle=False)``) or in a random permutation of ``i``
(``fit``'s default ``shuffle=True``). :func:`bench_store` runs it on the user's own store and
reports samples/s, MB/s of decoded samples, chunk decodes and peak anonymous memory
(``RssAnon``: decoded data; the page cache of memory-mapped files is ``RssFile`` and is not
counted).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError
from .options import ReadOptions
from .sequence import ChunkedSequence
from .store import Store

__all__ = ["ORDERS", "BenchResult", "EpochTiming", "bench_store", "rss_anon_bytes", "time_epoch"]

#: Request orders of :func:`time_epoch`: Keras's ``predict`` / ``evaluate`` / ``fit(shuffle=False)``
#: ask ``0, 1, 2, ...``; ``fit`` (``shuffle=True``) asks a random permutation.
ORDERS = ("in order", "keras")


@dataclass(frozen=True)
class EpochTiming:
    """One timed pass (:func:`time_epoch`).

    Attributes:
        epoch: the plan epoch served.
        samples, batches: served.
        seconds: wall time of the requests (the request order is drawn before the clock starts).
        cpu_seconds: CPU time of this process, all threads, over the same span.
        chunk_decodes: chunks of one field decoded in that span (this process).
        rss_before, rss_peak: ``RssAnon`` bytes when the clock started and the most seen after
            any batch (sampled only with ``sample_rss``; else both the value at the start).
    """

    epoch: int
    samples: int
    batches: int
    seconds: float
    cpu_seconds: float
    chunk_decodes: int
    rss_before: int
    rss_peak: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("inf")

    @property
    def cpu_us_per_sample(self) -> float:
        """CPU microseconds per sample (all threads)."""
        return self.cpu_seconds / self.samples * 1e6 if self.samples else 0.0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rows(batch: object) -> int:
    """Samples in a batch: the leading length of its first array (tuples and dicts nest)."""
    while not hasattr(batch, "shape"):
        if isinstance(batch, dict):
            batch = next(iter(batch.values()))
        elif isinstance(batch, (tuple, list)):
            batch = batch[0]
        else:
            return 0
    return len(batch)  # type: ignore[arg-type]


def time_epoch(
    seq: ChunkedSequence,
    order: str = "in order",
    *,
    max_batches: int | None = None,
    seed: int = 0,
    sample_rss: bool = False,
) -> EpochTiming:
    """Time one pass over the current epoch of ``seq``, as a Keras pass makes it, then move
    ``seq`` to the next epoch (also after a pass cut short by ``max_batches``).

    Args:
        order: ``"in order"`` (requests ``0, 1, ...``) or ``"keras"`` (a random permutation of
            the batch indices, drawn from ``seed`` and the epoch; ``"keras order"`` too).
        max_batches: time only the first this many requests.
        sample_rss: read ``RssAnon`` after every batch (costs ~20 us a batch).

    Raises:
        ArgumentError: an unknown ``order``.
    """
    if order == "keras order":
        order = "keras"
    if order not in ORDERS:
        raise ArgumentError(f"unknown order {order!r}: use one of {ORDERS}")
    seq.on_epoch_begin()  # a pass, as model.fit / evaluate / predict make it
    epoch = seq.epoch
    requests = np.arange(len(seq))
    if order == "keras":
        requests = np.random.default_rng((seed, epoch)).permutation(len(seq))
    requests = requests[:max_batches].tolist()
    decodes = seq.stats["chunk_decodes"]
    samples = 0
    base = peak = rss_anon_bytes()
    c, t = _cpu(), time.perf_counter()
    for i in requests:
        batch = seq[i]
        samples += _rows(batch)
        if sample_rss:
            peak = max(peak, rss_anon_bytes())
    seconds, cpu = time.perf_counter() - t, _cpu() - c
    decodes = seq.stats["chunk_decodes"] - decodes
    seq.set_epoch(epoch + 1)  # (on_epoch_end would not count a pass cut short)
    return EpochTiming(epoch, samples, len(requests), seconds, cpu, decodes, base, peak)


@dataclass(frozen=True)
class BenchResult:
    """One measured epoch. ``seconds`` is wall time; ``peak_rss_anon`` bytes (0 if unknown)."""

    order: str
    samples: int
    seconds: float
    decoded_bytes: int
    chunk_decodes: int
    num_chunks: int
    peak_rss_anon: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mb_per_s(self) -> float:
        return self.decoded_bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def rss_anon_bytes() -> int:
    """This process's ``RssAnon`` from ``/proc/self/status`` (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def bench_store(
    store: Store,
    *,
    batch_size: int = 128,
    window: int | None = None,
    seed: int = 0,
    read: ReadOptions | None = None,
    orders: tuple[str, ...] = ("in order", "keras order"),
    progress: bool = False,
) -> list[BenchResult]:
    """Time one shuffled epoch per call order in ``orders`` (``"in order"``, ``"keras order"``),
    serving every field of ``store`` (:func:`time_epoch`, a fresh sequence each); with
    ``progress``, a line on stderr before each."""
    fields = list(store.fields)
    sample_bytes = sum(f.sample_nbytes for f in store.fields.values())
    results = []
    for order in orders:
        if order not in ("in order", "keras order", "keras"):
            raise ArgumentError(f"unknown order {order!r}: use 'in order' or 'keras order'")
        seq = ChunkedSequence(store, batch_size, x=fields, y=None, seed=seed, window=window, read=read)
        if progress:
            print(f"bench: one epoch, requests {order} ({len(seq)} batches) ...", file=sys.stderr, flush=True)
        try:
            timing = time_epoch(seq, order, seed=seed, sample_rss=True)
        finally:
            seq.close()
        results.append(
            BenchResult(
                order,
                timing.samples,
                timing.seconds,
                timing.samples * sample_bytes,
                timing.chunk_decodes,
                store.num_chunks * len(fields),
                max(0, timing.rss_peak - timing.rss_before),
            )
        )
    return results


def format_results(store: Store, results: list[BenchResult]) -> str:
    """A plain-text table of ``results``."""
    lines = [
        f"{store.location}: {len(store)} samples, {store.num_chunks} chunks of {store.chunk_len}, "
        f"{os.cpu_count()} cores",
        f"{'order':<12} {'samples/s':>12} {'MB/s':>9} {'chunk decodes':>14} {'peak RssAnon':>13}",
    ]
    for r in results:
        lines.append(
            f"{r.order:<12} {r.samples_per_s:>12,.0f} {r.mb_per_s:>9,.0f} "
            f"{r.chunk_decodes:>7}/{r.num_chunks:<6} {r.peak_rss_anon / 1e6:>10,.0f} MB"
        )
    return "\n".join(lines)
