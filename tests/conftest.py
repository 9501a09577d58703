"""Shared test set-up: Keras backend, hypothesis profile, small index-encoding stores.

Every store made here encodes the sample index in its values, so any served batch can be
checked against the indices it claims to hold:

- ``x`` float32 ``(n, 3)``: ``x[i] = (i, i + 0.25, i + 0.5)`` (exact in float32 for i < 2**22);
- ``y`` int64 ``(n,)``: ``y[i] = i % 10``;
- ``w`` float32 ``(n,)`` (when asked for): ``w[i] = 1 + i / 1000``.
"""

from __future__ import annotations

import os

# Keras reads its backend when first imported; it must be chosen before anything imports it.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # tests must pass without a GPU

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # importable without installing the package
    sys.path.insert(0, str(REPO))

import oocseq  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FORMATS = (".zarr", ".h5")


def x_of(idx: np.ndarray) -> np.ndarray:
    """The ``x`` rows that samples ``idx`` hold."""
    idx = np.asarray(idx, dtype=np.float32)
    return np.stack([idx, idx + 0.25, idx + 0.5], axis=1).astype(np.float32)


def y_of(idx: np.ndarray) -> np.ndarray:
    return (np.asarray(idx, dtype=np.int64) % 10).astype(np.int64)


def w_of(idx: np.ndarray) -> np.ndarray:
    return (1 + np.asarray(idx, dtype=np.float32) / 1000).astype(np.float32)


def ids_of(x: np.ndarray) -> np.ndarray:
    """Sample indices decoded from a batch of ``x`` rows; checks the row is well formed."""
    x = np.asarray(x)
    ids = x[:, 0].astype(np.int64)
    np.testing.assert_array_equal(x, x_of(ids))
    return ids


def make_store(
    path: str | os.PathLike[str],
    n: int,
    chunk_len: int,
    *,
    weights: bool = False,
    compression: str | None = "lz4",
) -> oocseq.Store:
    """An index-encoding store of ``n`` samples at ``path`` (format by suffix)."""
    idx = np.arange(n)
    fields = {"x": x_of(idx), "y": y_of(idx)}
    if weights:
        fields["w"] = w_of(idx)
    return oocseq.ingest_arrays(path, fields, chunk_len=chunk_len, compression=compression, preshuffle=False)


@pytest.fixture(params=FORMATS, ids=lambda s: s.lstrip("."))
def fmt(request: pytest.FixtureRequest) -> str:
    """Store suffix: every test using it runs on Zarr and on HDF5."""
    return request.param


@pytest.fixture
def store_factory(tmp_path: Path, fmt: str):
    """``factory(n, chunk_len, **kw)`` -> a new index-encoding store in ``fmt``."""
    counter = iter(range(10**6))

    def factory(n: int, chunk_len: int, **kw) -> oocseq.Store:
        return make_store(tmp_path / f"s{next(counter)}{fmt}", n, chunk_len, **kw)

    return factory


@pytest.fixture
def store(store_factory) -> oocseq.Store:
    """103 samples in chunks of 8 (13 chunks, the last one short), with a weight field."""
    return store_factory(103, 8, weights=True)
