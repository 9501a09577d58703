"""Versioned store metadata (the *manifest*) and its validation.

The manifest is one JSON object kept in the store itself (Zarr: the root group's attribute
``"oocseq"``; HDF5: the root attribute ``"oocseq"``, a JSON string). It is written last, when an
ingestion completes, so a store without one is not complete. A manifest read from disk is
untrusted: :func:`Manifest.from_json` checks every field and refuses anything unexpected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ArgumentError, CorruptStoreError, NotAStoreError

FORMAT_NAME = "oocseq"
FORMAT_VERSION = 1
ATTR_KEY = "oocseq"
AUX_GROUP = "_oocseq"

#: dtypes a field may have. Object, string and structured dtypes are refused: they would need
#: pickling or per-sample Python objects, and cannot be served as batches.
ALLOWED_DTYPES = frozenset(
    [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
)
#: Compression codecs oocseq writes and reads (all Blosc, through numcodecs / hdf5plugin).
COMPRESSIONS = ("lz4", "zstd", "zlib")
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")


def check_field_name(name: object) -> str:
    """Return ``name`` if it is a valid field name (letters, digits, ``_.-``; a letter first)."""
    if not isinstance(name, str) or not _FIELD_NAME.match(name):
        raise ArgumentError(
            f"invalid field name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter"
        )
    return name


@dataclass(frozen=True)
class FieldSpec:
    """Shape of one sample of a field and its dtype. The field's shape is ``(n, *shape)``."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one decoded sample."""
        return int(math.prod(self.shape)) * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype.name}


@dataclass(frozen=True)
class Compression:
    """Blosc compression settings: ``cname`` in :data:`COMPRESSIONS`, ``clevel`` 0-9."""

    cname: str
    clevel: int = 5

    def __post_init__(self) -> None:
        if self.cname not in COMPRESSIONS:
            raise ArgumentError(f"compression must be None or one of {COMPRESSIONS}, not {self.cname!r}")
        if not isinstance(self.clevel, int) or not 0 <= self.clevel <= 9:
            raise ArgumentError(f"compression level must be an int in 0..9, not {self.clevel!r}")

    @classmethod
    def parse(cls, value: str | Compression | None, level: int | None = None) -> Compression | None:
        """``None`` (no compression), a codec name (``"lz4"``, ``"zstd"``, ``"zlib"``) or an instance."""
        if value is None or isinstance(value, Compression):
            return value
        if not isinstance(value, str):
            raise ArgumentError(f"compression must be None or one of {COMPRESSIONS}, not {value!r}")
        return cls(value, 5 if level is None else level)

    def to_json(self) -> dict[str, Any]:
        return {"codec": "blosc", "cname": self.cname, "clevel": self.clevel}


@dataclass(frozen=True)
class Manifest:
    """Everything oocseq needs to know about a store, validated.

    Attributes:
        n: number of samples (length of axis 0 of every field).
        chunk_len: samples per chunk; chunk ``c`` covers ``[c*chunk_len, min((c+1)*chunk_len, n))``.
        fields: field name -> :class:`FieldSpec`, in the order they were written.
        compression: Blosc settings, or ``None`` for uncompressed chunks.
        checksums: field name -> CRC-32 of each chunk's decoded C-order bytes.
        attrs: JSON metadata for users (class names, feature names, provenance summary, ...).
        aux: names of auxiliary per-sample arrays (e.g. ``"source"``: where each sample came from).
    """

    n: int
    chunk_len: int
    fields: dict[str, FieldSpec]
    compression: Compression | None
    checksums: dict[str, list[int]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    aux: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def num_chunks(self) -> int:
        return -(-self.n // self.chunk_len)

    def chunk_bounds(self, c: int) -> tuple[int, int]:
        """``(start, stop)`` sample range of chunk ``c``."""
        start = c * self.chunk_len
        return start, min(start + self.chunk_len, self.n)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "complete": True,
            "n": self.n,
            "chunk_len": self.chunk_len,
            "fields": {k: v.to_json() for k, v in self.fields.items()},
            "compression": None if self.compression is None else self.compression.to_json(),
            "checksums": {k: list(v) for k, v in self.checksums.items()},
            "attrs": self.attrs,
            "aux": list(self.aux),
        }

    @classmethod
    def from_json(cls, doc: Any, where: str) -> Manifest:
        """Validate an untrusted manifest read from the store at ``where``.

        Raises:
            NotAStoreError: no oocseq manifest, an unfinished ingestion, or an unknown version.
            CorruptStoreError: a manifest that is present but malformed.
        """
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise NotAStoreError(
                f"{where} is not an oocseq store (no oocseq manifest). Create one with "
                "oocseq.ingest_arrays / ingest_image_folder / ingest_csv / ingest_npy."
            )
        if doc.get("complete") is not True:
            raise NotAStoreError(f"{where}: ingestion did not complete; ingest again")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise NotAStoreError(
                f"{where}: store format version {version!r}; this oocseq reads version "
                f"{FORMAT_VERSION}. Upgrade oocseq or ingest again."
            )

        def bad(what: str) -> CorruptStoreError:
            return CorruptStoreError(f"{where}: corrupt manifest: {what}")

        n, chunk_len = doc.get("n"), doc.get("chunk_len")
        if not _is_int(n) or n < 0:
            raise bad(f"'n' must be a non-negative int, got {n!r}")
        if not _is_int(chunk_len) or chunk_len < 1:
            raise bad(f"'chunk_len' must be a positive int, got {chunk_len!r}")
        raw_fields = doc.get("fields")
        if not isinstance(raw_fields, dict) or not raw_fields:
            raise bad("'fields' must be a non-empty object")
        fields: dict[str, FieldSpec] = {}
        for name, spec in raw_fields.items():
            try:
                check_field_name(name)
            except ValueError as e:
                raise bad(str(e)) from None
            if not isinstance(spec, dict):
                raise bad(f"field {name!r} must be an object")
            shape, dtype = spec.get("shape"), spec.get("dtype")
            if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
                raise bad(f"field {name!r}: 'shape' must be a list of non-negative ints")
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
                raise bad(f"field {name!r}: dtype {dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
            fields[name] = FieldSpec(tuple(shape), np.dtype(dtype))
        comp = doc.get("compression")
        compression = None
        if comp is not None:
            if not isinstance(comp, dict) or comp.get("codec") != "blosc":
                raise bad(f"unsupported compression {comp!r}")
            try:
                compression = Compression(comp.get("cname"), comp.get("clevel"))  # type: ignore[arg-type]
            except ValueError as e:
                raise bad(str(e)) from None
        num_chunks = -(-n // chunk_len)
        checksums = doc.get("checksums", {})
        if not isinstance(checksums, dict):
            raise bad("'checksums' must be an object")
        for name, sums in checksums.items():
            if name not in fields:
                raise bad(f"checksums for unknown field {name!r}")
            if (
                not isinstance(sums, list)
                or len(sums) != num_chunks
                or not all(_is_int(s) and 0 <= s < 2**32 for s in sums)
            ):
                raise bad(f"checksums of field {name!r} must be {num_chunks} CRC-32 values")
        attrs = doc.get("attrs", {})
        if not isinstance(attrs, dict):
            raise bad("'attrs' must be an object")
        aux = doc.get("aux", [])
        if not isinstance(aux, list) or not all(isinstance(a, str) and _FIELD_NAME.match(a) for a in aux):
            raise bad("'aux' must be a list of names")
        return cls(n, chunk_len, fields, compression, dict(checksums), attrs, tuple(aux), version)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
