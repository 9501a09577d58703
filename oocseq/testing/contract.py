"""``StoreContract``: a conformance suite that a store format, a storage backend, a reading path
or a transform runs by subclassing it in a pytest test module::

    from oocseq.testing import StoreContract

    class TestMyStores(StoreContract):
        suffix = ".h5"          # the format under test
        compression = "zstd"

        def write(self, path, fields, chunk_len):   # optional: how stores are made
            return my_ingest(path, fields, chunk_len=chunk_len)

Every ``test_*`` method then runs against stores made by :meth:`StoreContract.write` and opened
by :meth:`StoreContract.open` (``Store(path, fast=self.fast)``): round trips of any dtype and
shape, chunk reads, fancy indexing, pickling across processes, metadata, the missing-field error,
and every sample served exactly once and equal to its source through ``ChunkedSequence`` (through
:meth:`StoreContract.sequence`, which a transform under test overrides). Needs pytest and
hypothesis.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ..errors import FieldNotFoundError
from ..ingest.arrays import ingest_arrays
from ..sequence import ChunkedSequence
from ..store import Store
from . import strategies as ost
from .assertions import assert_exactly_once, assert_matches_source
from .stores import index_encoding_fields

__all__ = ["StoreContract"]


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


class StoreContract:
    """Subclass it in a test module (name it ``Test...``) to run the suite; set the class
    attributes or override the hooks. ``max_examples`` bounds each property's examples."""

    suffix: str = ".zarr"
    compression: str | None = "lz4"
    fast: bool = True
    max_examples: int = 25

    # -- hooks --------------------------------------------------------------------------------
    def write(self, path: Path, fields: Mapping[str, np.ndarray], chunk_len: int) -> Any:
        """Write ``fields`` (name -> array, axis 0 the samples) to a new store at ``path``."""
        return ingest_arrays(
            path, fields, chunk_len=chunk_len, compression=self.compression, preshuffle=False
        )

    def open(self, path: Path) -> Store:
        """Open the store written at ``path``."""
        return Store(path, fast=self.fast)

    def sequence(self, store: Store, **kwargs: Any) -> Any:
        """The sequence under test (override to add a transform or use a subclass)."""
        return ChunkedSequence(store, **kwargs)

    # -- helpers ------------------------------------------------------------------------------
    @contextmanager
    def _written(self, fields: Mapping[str, np.ndarray], chunk_len: int) -> Iterator[Store]:
        tmp = Path(tempfile.mkdtemp(prefix="oocseq-contract-"))
        try:
            written = self.write(tmp / f"store{self.suffix}", fields, chunk_len)
            if hasattr(written, "close"):
                written.close()
            store = self.open(tmp / f"store{self.suffix}")
            try:
                yield store
            finally:
                store.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _settings(self) -> settings:
        return settings(max_examples=self.max_examples, deadline=None)

    # -- the contract -------------------------------------------------------------------------
    def test_round_trip_any_dtype_and_shape(self) -> None:
        """What is written is read back bit for bit: whole fields, every chunk, shapes, dtypes."""

        @self._settings()
        @given(ost.field_arrays(max_n=40), st.data())
        def check(arrays: dict[str, np.ndarray], data: st.DataObject) -> None:
            n = len(next(iter(arrays.values())))
            chunk_len = data.draw(ost.chunk_lens(n), label="chunk_len")
            with self._written(arrays, chunk_len) as store:
                assert len(store) == n
                assert store.num_chunks == -(-n // store.chunk_len)
                assert set(store.fields) == set(arrays)
                for name, a in arrays.items():
                    info = store.fields[name]
                    assert (tuple(info.shape), np.dtype(info.dtype)) == (a.shape, a.dtype), name
                    assert _equal(store[name][:], a), f"field {name!r} read back differs"
                    for c in range(store.num_chunks):
                        part = a[c * store.chunk_len : (c + 1) * store.chunk_len]
                        assert _equal(np.asarray(store.read_chunk(name, c)), part), f"{name!r} chunk {c}"

        check()

    def test_indexing_matches_numpy(self) -> None:
        """``store[field][key]`` equals numpy's for ints, slices and (unsorted, repeated) index arrays."""

        @self._settings()
        @given(st.integers(1, 80), st.data())
        def check(n: int, data: st.DataObject) -> None:
            a = index_encoding_fields(n)["x"]
            with self._written({"x": a}, data.draw(ost.chunk_lens(n), label="chunk_len")) as store:
                view = store["x"]
                i = data.draw(st.integers(-n, n - 1), label="i")
                assert _equal(np.asarray(view[i]), a[i])
                s = data.draw(st.slices(n), label="slice")
                assert _equal(view[s], a[s])
                idx = np.array(
                    data.draw(st.lists(st.integers(0, n - 1), max_size=30), label="idx"), dtype=np.int64
                )
                assert _equal(view[idx], a[idx])

        check()

    def test_served_exactly_once_and_equal_to_source(self) -> None:
        """Through :meth:`sequence`, in Keras's random request order, every sample is served as
        often as the plan says (once, with one rank) and equals its source row."""

        @self._settings()
        @given(st.integers(1, 150), st.data())
        def check(n: int, data: st.DataObject) -> None:
            fields = index_encoding_fields(n)
            with self._written(fields, data.draw(ost.chunk_lens(n), label="chunk_len")) as store:
                kw = data.draw(ost.sequence_kwargs(store), label="sequence kwargs")
                seq = self.sequence(store, x={"x": "x", "id": "id"}, y="y", **kw)
                try:
                    assert_exactly_once(seq, 0, order="keras")
                    assert_matches_source(seq, fields, 1, order="keras")
                finally:
                    seq.close()

        check()

    def test_pickles_across_processes(self) -> None:
        """A pickled store (what crosses to worker processes) reads the same."""
        fields = index_encoding_fields(37)
        with self._written(fields, 5) as store:
            store["x"][:3]  # open handles first: they must not travel
            clone = pickle.loads(pickle.dumps(store))
            try:
                assert _equal(clone["x"][:], fields["x"]) and _equal(clone["id"][:], fields["id"])
            finally:
                clone.close()

    def test_metadata_round_trip(self) -> None:
        meta = {"class_names": ["a", "b"], "note": "é", "nested": {"k": [1, 2.5, None]}}
        tmp = Path(tempfile.mkdtemp(prefix="oocseq-contract-"))
        try:
            path = tmp / f"m{self.suffix}"
            ingest_arrays(
                path, {"x": np.arange(10)}, compression=self.compression, metadata=meta, preshuffle=False
            ).close()
            with self.open(path) as store:
                for k, v in meta.items():
                    assert store.metadata[k] == v, k
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def test_missing_field_is_a_clear_error(self) -> None:
        with self._written(index_encoding_fields(10), 4) as store:
            for call in (lambda: store["nope"], lambda: store.read_chunk("nope", 0)):
                try:
                    call()
                except FieldNotFoundError as e:
                    assert "nope" in str(e) and isinstance(e, KeyError)
                else:
                    raise AssertionError("reading a missing field did not raise FieldNotFoundError")

    def test_verify_passes_on_a_fresh_store(self) -> None:
        with self._written(index_encoding_fields(23), 4) as store:
            store.verify()
            assert os.fspath(store.path).endswith(self.suffix)
