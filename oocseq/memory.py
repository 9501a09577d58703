"""In-memory arrays as a chunked source: :class:`ArraySource` reads like a :class:`~oocseq.Store`
(fields, ``chunk_len``, ``read_chunk_into``), so a dict of numpy arrays is served by the same
plan, cache and batch code as a store on disk, with the same guarantees."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from .errors import ArgumentError, FieldLengthError, FieldNotFoundError
from .manifest import FieldSpec
from .storage._raw import SCATTER_MIN_BYTES, check_positions

__all__ = ["ArraySource"]

#: Bytes of one sample of all fields per chunk when no chunk_len is given (about 1 MiB).
_CHUNK_BYTES = 1 << 20


class ArraySource:
    """A dict of equal-length numpy arrays, cut into chunks of ``chunk_len`` samples along
    axis 0. Nothing is copied until a batch is served.

    Args:
        arrays: ``{field: array}``; every array has the same length ``n`` along axis 0 (numeric
            or bool dtypes).
        chunk_len: samples per chunk (the unit of the shuffle, as in a store); default: about
            1 MiB of samples of all fields together.

    Raises:
        ArgumentError: no arrays, a scalar, a non-numeric dtype or a bad ``chunk_len``.
        FieldLengthError: arrays of different lengths.
    """

    format = "memory"
    path = "<in-memory arrays>"

    def __init__(self, arrays: Mapping[str, Any], chunk_len: int | None = None) -> None:
        if not isinstance(arrays, Mapping) or not arrays:
            raise ArgumentError("in-memory data must be a non-empty dict {field: array}")
        self._arrays: dict[str, np.ndarray] = {}
        for name, value in arrays.items():
            if not isinstance(name, str):
                raise ArgumentError(f"field names must be str, got {name!r}")
            a = np.asarray(value)
            if a.ndim == 0:
                raise ArgumentError(f"field {name!r} is a scalar; give an array of samples along axis 0")
            if a.dtype.kind not in "biuf":
                raise ArgumentError(
                    f"field {name!r} has dtype {a.dtype}; numeric and bool dtypes only "
                    "(encode strings as class indices or tokens first)"
                )
            self._arrays[name] = a
        lengths = {name: len(a) for name, a in self._arrays.items()}
        if len(set(lengths.values())) > 1:
            raise FieldLengthError(f"in-memory fields differ in length: {lengths}; give equal lengths")
        self._n = next(iter(lengths.values()))
        if chunk_len is None:
            sample_bytes = sum(a.itemsize * int(np.prod(a.shape[1:])) for a in self._arrays.values())
            chunk_len = max(1, min(max(self._n, 1), _CHUNK_BYTES // max(1, sample_bytes)))
        if not isinstance(chunk_len, int) or isinstance(chunk_len, bool) or chunk_len < 1:
            raise ArgumentError(f"chunk_len must be an int >= 1, got {chunk_len!r}")
        self._chunk_len = chunk_len
        self._fields = {name: FieldSpec(a.shape[1:], a.dtype, len(a)) for name, a in self._arrays.items()}

    # -- the read contract of a store -------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def fields(self) -> dict[str, FieldSpec]:
        return dict(self._fields)

    @property
    def chunk_len(self) -> int:
        return self._chunk_len

    @property
    def num_chunks(self) -> int:
        return -(-self._n // self._chunk_len)

    @property
    def metadata(self) -> dict[str, Any]:
        return {}

    @property
    def compressed(self) -> bool:
        return False

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def _check(self, name: str, c: int) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None:
            raise FieldNotFoundError(
                f"no field {name!r} in the in-memory arrays; fields: {sorted(self._arrays)}"
            )
        if not 0 <= c < self.num_chunks:
            raise ArgumentError(f"chunk {c} out of range [0, {self.num_chunks})")
        return a

    def read_chunk(self, name: str, c: int) -> np.ndarray:
        """Chunk ``c`` of ``name`` (a copy), shape ``(rows, *sample_shape)``."""
        a = self._check(name, c)
        return a[c * self._chunk_len : (c + 1) * self._chunk_len].copy()

    def read_chunk_into(
        self, name: str, c: int, out: np.ndarray, positions: np.ndarray | None = None
    ) -> None:
        """Copy chunk ``c`` of ``name`` into ``out`` (of the chunk's shape), or with
        ``positions`` (one per sample of the chunk) sample ``k`` into ``out[positions[k]]``."""
        a = self._check(name, c)
        chunk = a[c * self._chunk_len : (c + 1) * self._chunk_len]
        if positions is None:
            out[...] = chunk
        else:
            check_positions(out, positions, len(chunk))
            out[positions] = chunk

    def scatters(self, name: str) -> bool:
        """As :meth:`oocseq.Store.scatters`: samples of at least a page are copied straight
        to the positions they are served at."""
        return self._fields[name].sample_nbytes >= SCATTER_MIN_BYTES

    def advise_chunks(self, name: str, chunks: np.ndarray) -> None:
        """Nothing to read ahead in memory."""

    def close(self) -> None:
        """Nothing to release (the arrays are the caller's); here for the store contract."""

    def fingerprint(self) -> int:
        """CRC-32 of the fields' shapes and dtypes and ``chunk_len`` (not of the values: a
        state saved on these arrays is accepted for arrays of the same layout)."""
        doc = {name: [list(f.shape), f.dtype.str] for name, f in self._fields.items()}
        return zlib.crc32(json.dumps([doc, self._chunk_len], sort_keys=True).encode())

    def __repr__(self) -> str:
        return f"<oocseq.ArraySource n={self._n} chunk_len={self._chunk_len} fields={sorted(self._arrays)}>"
