"""Index-encoding stores: every value says which sample it belongs to, so any served batch can
be checked against the samples it claims to hold. No hypothesis, no Keras."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..ingest.arrays import ingest_arrays
from ..store import Store

__all__ = ["decode_x", "index_encoding_fields", "write_index_store"]


def index_encoding_fields(n: int, *, sample_shape: tuple[int, ...] = (3,)) -> dict[str, np.ndarray]:
    """Fields of ``n`` samples that encode their index ``i``:

    - ``id``: int64 ``(n,)``, ``i``;
    - ``x``: float32 ``(n, *sample_shape)``, ``i + k / 4`` at flat position ``k`` of the sample
      (exact in float32 for ``i < 2**22`` and up to 8 values per sample; see :func:`decode_x`);
    - ``y``: int64 ``(n,)``, ``i % 10``.
    """
    ids = np.arange(n, dtype=np.int64)
    size = int(np.prod(sample_shape))
    x = ids[:, None].astype(np.float32) + (np.arange(size, dtype=np.float32) / 4)[None, :]
    return {"id": ids, "x": x.reshape(n, *sample_shape).astype(np.float32), "y": ids % 10}


def decode_x(x: Any) -> np.ndarray:
    """Sample indices (int64) of a batch of :func:`index_encoding_fields` ``x`` rows; raises
    ``AssertionError`` (a test failure) if a row is not one such sample, whole."""
    x = np.asarray(x)
    ids = np.floor(x.reshape(len(x), -1)[:, 0]).astype(np.int64)
    size = int(np.prod(x.shape[1:]))
    want = (ids[:, None].astype(np.float32) + (np.arange(size, dtype=np.float32) / 4)[None, :]).reshape(
        x.shape
    )
    np.testing.assert_array_equal(x, want, err_msg="served x rows are not whole index-encoding samples")
    return ids


def write_index_store(
    path: str | os.PathLike[str],
    n: int,
    chunk_len: int | None = None,
    *,
    compression: str | None = "lz4",
    sample_shape: tuple[int, ...] = (3,),
    overwrite: bool = False,
) -> Store:
    """An index-encoding store (:func:`index_encoding_fields`) of ``n`` samples at ``path``
    (``.zarr`` or ``.h5``), written with :func:`oocseq.ingest_arrays`."""
    return ingest_arrays(
        path,
        index_encoding_fields(n, sample_shape=sample_shape),
        chunk_len=chunk_len,
        compression=compression,
        overwrite=overwrite,
        preshuffle=False,
    )
