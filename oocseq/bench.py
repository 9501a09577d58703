"""``oocseq bench``: measure a shuffled epoch of the user's own store on their machine.

Runs one epoch in order (``seq[0], seq[1], ...``) and one in Keras's call order (a random
permutation of the batch indices, what ``model.fit(seq)`` does by default), through a
:class:`~oocseq.ChunkedSequence`, and reports samples/s, MB/s of decoded samples, chunk
decodes and peak anonymous memory (``RssAnon``: decoded data; the page cache of memory-mapped
files is ``RssFile`` and is not counted).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError
from .sequence import ChunkedSequence, ReadOptions
from .store import Store

__all__ = ["BenchResult", "bench_store", "rss_anon_bytes"]


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
    serving every field of ``store``."""
    from tqdm.auto import tqdm

    fields = list(store.fields)
    sample_bytes = sum(int(np.prod(f.shape[1:])) * f.dtype.itemsize for f in store.fields.values())
    results = []
    for order in orders:
        if order not in ("in order", "keras order"):
            raise ArgumentError(f"unknown order {order!r}: use 'in order' or 'keras order'")
        seq = ChunkedSequence(store, batch_size, x=fields, y=None, seed=seed, window=window, read=read)
        requests = np.arange(len(seq))
        if order == "keras order":
            requests = np.random.default_rng(seed).permutation(len(seq))
        seq.on_epoch_begin()  # a pass, as model.fit makes it
        base = rss_anon_bytes()
        peak = 0
        start = time.perf_counter()
        for i in tqdm(
            requests.tolist(), desc=f"bench {order}", unit="batch", disable=not progress, leave=False
        ):
            seq[i]
            peak = max(peak, rss_anon_bytes() - base)
        seconds = time.perf_counter() - start
        results.append(
            BenchResult(
                order,
                len(store),
                seconds,
                len(store) * sample_bytes,
                seq.stats["chunk_decodes"],
                store.num_chunks * len(fields),
                peak,
            )
        )
        seq.close()
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
