"""Hypothesis strategies for oocseq: fields, stores, sequence arguments and plans.

Needs ``hypothesis`` (``pip install "oocseq[testing]"``). Example, a property of a user's own
transform over any store and any sequence arguments::

    from hypothesis import given
    from oocseq import ChunkedSequence
    from oocseq.testing import strategies as ost, assert_exactly_once

    @given(ost.index_stores(), ost.data())
    def test_my_pipeline(example, data):
        kw = data.draw(ost.sequence_kwargs(example.store))
        seq = ChunkedSequence(example.store, x={"x": "x", "id": "id"}, transform=my_transform, **kw)
        assert_exactly_once(seq, order="keras")

Stores are written to a temporary directory (removed when the process exits): every example
costs one small ingestion (a few ms).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ..ingest.arrays import ingest_arrays
from ..manifest import ALLOWED_DTYPES
from ..options import ReadOptions, ShardOptions, WorkerOptions
from ..plan import EpochPlan
from ..store import Store
from .stores import index_encoding_fields

__all__ = [
    "COMPRESSIONS",
    "DTYPES",
    "FORMATS",
    "StoreExample",
    "chunk_lens",
    "data",
    "dtypes",
    "field_arrays",
    "index_stores",
    "plans",
    "sample_shapes",
    "sequence_kwargs",
    "stores",
]

FORMATS = (".zarr", ".h5")
COMPRESSIONS = (None, "lz4", "zstd", "zlib")
#: Every dtype a field may have (the manifest's allowlist).
DTYPES = tuple(np.dtype(d) for d in sorted(ALLOWED_DTYPES))

data = st.data  # re-exported: draw sequence arguments that depend on the drawn store

_tmp: Path | None = None
_counter = iter(range(1 << 62))


def _tmpdir() -> Path:
    """One temporary directory per process for the stores of all examples."""
    global _tmp
    if _tmp is None:
        _tmp = Path(tempfile.mkdtemp(prefix="oocseq-testing-"))
        atexit.register(shutil.rmtree, _tmp, True)
    return _tmp


@dataclass
class StoreExample:
    """A store drawn by :func:`stores` / :func:`index_stores` and the arrays written into it."""

    store: Store
    arrays: dict[str, np.ndarray]
    path: Path
    chunk_len: int
    compression: str | None

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        fields = ", ".join(f"{k}: {a.dtype} {a.shape}" for k, a in self.arrays.items())
        return (
            f"StoreExample({self.path.suffix}, n={len(self.store)}, chunk_len={self.chunk_len}, "
            f"compression={self.compression!r}, {{{fields}}})"
        )


def dtypes() -> st.SearchStrategy[np.dtype]:
    """Every dtype a store field may have."""
    return st.sampled_from(DTYPES)


def sample_shapes(max_dims: int = 3, max_side: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    """The shape of one sample: ``()`` (a scalar per sample) up to ``max_dims`` axes."""
    return hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=1, max_side=max_side)


def chunk_lens(n: int) -> st.SearchStrategy[int]:
    """Chunk lengths for ``n`` samples: 1 to ``n`` (and a little more: a store may be one short
    chunk), small ones more often."""
    return st.one_of(st.integers(1, min(8, max(1, n))), st.integers(1, max(1, n) + 3))


@st.composite
def field_arrays(
    draw: st.DrawFn,
    n: int | None = None,
    *,
    max_n: int = 50,
    max_fields: int = 3,
    dtype: st.SearchStrategy[np.dtype] | None = None,
) -> dict[str, np.ndarray]:
    """Up to ``max_fields`` named arrays of ``n`` samples (drawn from 1 to ``max_n`` when None),
    any dtype and sample shape, any values (NaN and infinities included)."""
    if n is None:
        n = draw(st.integers(1, max_n))
    names = draw(
        st.lists(
            st.sampled_from(["x", "y", "w", "mask", "extra"]), min_size=1, max_size=max_fields, unique=True
        )
    )
    return {
        name: draw(hnp.arrays(draw(dtype if dtype is not None else dtypes()), (n, *draw(sample_shapes()))))
        for name in names
    }


def _write(draw: st.DrawFn, arrays: dict[str, np.ndarray], formats: Any, compressions: Any) -> StoreExample:
    n = len(next(iter(arrays.values())))
    chunk_len = draw(chunk_lens(n))
    suffix = draw(st.sampled_from(tuple(formats)))
    compression = draw(st.sampled_from(tuple(compressions)))
    path = _tmpdir() / f"s{next(_counter)}{suffix}"
    store = ingest_arrays(path, arrays, chunk_len=chunk_len, compression=compression, preshuffle=False)
    return StoreExample(store, arrays, path, chunk_len, compression)


@st.composite
def stores(
    draw: st.DrawFn,
    *,
    formats: Any = FORMATS,
    compressions: Any = COMPRESSIONS,
    max_n: int = 50,
    max_fields: int = 3,
) -> StoreExample:
    """A store of arbitrary fields (:func:`field_arrays`) in any format, chunk length and
    compression, written to a temporary directory."""
    arrays = draw(field_arrays(max_n=max_n, max_fields=max_fields))
    return _write(draw, arrays, formats, compressions)


@st.composite
def index_stores(
    draw: st.DrawFn,
    *,
    formats: Any = FORMATS,
    compressions: Any = (None, "lz4"),
    min_n: int = 1,
    max_n: int = 200,
    sample_shape: tuple[int, ...] = (3,),
) -> StoreExample:
    """A store whose fields encode the sample index (:func:`oocseq.testing.index_encoding_fields`:
    ``id``, ``x``, ``y``), so served batches can be checked sample by sample."""
    n = draw(st.integers(min_n, max_n))
    return _write(draw, index_encoding_fields(n, sample_shape=sample_shape), formats, compressions)


@st.composite
def sequence_kwargs(
    draw: st.DrawFn,
    store: Store | StoreExample,
    *,
    max_batch_size: int | None = None,
    ranks: bool = True,
    workers: bool = False,
) -> dict[str, Any]:
    """Keyword arguments of :class:`~oocseq.ChunkedSequence` valid for ``store``: batch_size,
    window (None or 1 to a few more than the chunks), seed, shuffle, drop_remainder, ``read``
    (:class:`~oocseq.ReadOptions` with a ``keras_order``) and, with ``ranks``, a ``shard`` (:class:`~oocseq.ShardOptions`, each rank holding a chunk);
    with ``workers``, thread workers (1-3) with a max_queue_size (:class:`~oocseq.WorkerOptions`)."""
    if isinstance(store, StoreExample):
        store = store.store
    n, num_chunks = len(store), store.num_chunks
    kw: dict[str, Any] = {
        "batch_size": draw(st.integers(1, max_batch_size or max(1, n + 2))),
        "window": draw(st.none() | st.integers(1, num_chunks + 2)),
        "seed": draw(st.integers(0, 2**32)),
        "shuffle": draw(st.booleans()),
        "drop_remainder": draw(st.booleans()),
        "read": ReadOptions(keras_order=draw(st.sampled_from(["plan", "index"]))),
    }
    if kw["drop_remainder"] and kw["batch_size"] > n:
        kw["drop_remainder"] = False  # no batch at all: not a sequence anyone trains on
    world_size = draw(st.integers(1, min(4, num_chunks))) if ranks else 1
    # balance="drop" needs a full chunk for every rank
    full_chunks = n // store.chunk_len
    kw["shard"] = ShardOptions(
        draw(st.integers(0, world_size - 1)),
        world_size,
        draw(st.sampled_from(["pad", "drop"])) if full_chunks >= world_size else "pad",
    )
    if workers:
        kw["workers"] = WorkerOptions(draw(st.integers(1, 3)), max_queue_size=draw(st.integers(1, 8)))
    return kw


@st.composite
def plans(draw: st.DrawFn, *, max_n: int = 5000, max_chunk_len: int = 600, max_window: int = 20) -> EpochPlan:
    """An :class:`~oocseq.EpochPlan` (pure integers, no store): any n, chunk_len, window, seed,
    epoch, shuffle, rank / world_size, remainder."""
    n = draw(st.integers(0, max_n))
    chunk_len = draw(st.integers(1, max_chunk_len))
    num_chunks = -(-n // chunk_len)
    world_size = draw(st.integers(1, max(1, min(8, num_chunks))))
    remainder = draw(st.sampled_from(["pad", "drop"])) if n // chunk_len >= world_size else "pad"
    return EpochPlan(
        n,
        chunk_len,
        draw(st.integers(1, max_window)),
        draw(st.integers(0, 2**63)),
        draw(st.integers(0, 10**4)),
        draw(st.booleans()),
        draw(st.integers(0, world_size - 1)),
        world_size,
        remainder,
    )
