"""Gather samples from whole chunks into a preallocated array (one copy per sample)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def gather(idx: np.ndarray, chunk_len: int, get_chunk: Callable[[int], np.ndarray], out: np.ndarray) -> None:
    """Fill ``out[k] = sample idx[k]`` for every ``k``, calling ``get_chunk(c)`` once per
    distinct chunk ``c`` that ``idx`` touches (in increasing ``c``)."""
    if len(idx) == 0:
        return
    chunk_of = idx // chunk_len
    order = np.argsort(chunk_of, kind="stable")
    sorted_chunks = chunk_of[order]
    starts = np.flatnonzero(np.r_[True, sorted_chunks[1:] != sorted_chunks[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        c = int(sorted_chunks[s])
        pos = order[s:e]
        chunk = get_chunk(c)
        out[pos] = chunk[idx[pos] - c * chunk_len]
