"""Versioned store metadata (the *manifest*) and its validation.

The manifest is one JSON object kept in the store itself (Zarr: the root group's attribute
``"oocseq"``; HDF5: the root attribute ``"oocseq"``, a JSON string). It is written last, when an
ingestion completes, so a store without one is not complete. A manifest read from disk is
untrusted: :func:`Manifest.from_json` checks every field and refuses anything unexpected.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from .checksum import CHECKSUMS, DEFAULT_CHECKSUM
from .errors import ArgumentError, CorruptStoreError, NotAStoreError

FORMAT_NAME = "oocseq"
#: Version written. 2: per-chunk CRC32C checksums, named in ``"checksum"``; 1: zlib CRC-32.
FORMAT_VERSION = 2
#: Versions read, and the checksum algorithm each one implies when the manifest names none.
READ_VERSIONS = {1: "crc32", 2: None}
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
#: Sanity bounds checked at open, so that a damaged or hostile manifest is refused with a clear
#: error instead of asking for terabytes later. Decoded bytes of one chunk (what oocseq's
#: writer and Blosc accept), samples, and chunks.
MAX_CHUNK_BYTES = 1 << 31
MAX_SAMPLES = 1 << 48
MAX_CHUNKS = 1 << 26
_FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")
_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,255}$")


def check_field_name(name: object) -> str:
    """Return ``name`` if it is a valid field name (letters, digits, ``_.-``; a letter first)."""
    if not isinstance(name, str) or not _FIELD_NAME.match(name):
        raise ArgumentError(
            f"invalid field name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter"
        )
    return name


@dataclass(frozen=True, repr=False)
class FieldSpec:
    """What one field holds: samples of shape ``sample_shape`` and dtype ``dtype``; ``n``
    samples when known (a field of a store or of in-memory arrays; not while it is written).
    ``dims``: a name for every axis of the field, axis 0 (the sample axis) first, as Zarr's
    ``dimension_names`` and HDF5 dimension scales record them for xarray; ``None`` in stores
    written before oocseq recorded them. Not part of equality.

    The one description of a field, used by ingestion, the storage backends, the manifest and
    the reader. ``Store.fields`` gives them with ``n``: ``store.fields["x"].shape`` is the
    field's full shape ``(n, *sample_shape)``.

    Attributes:
        sample_shape: shape of one sample (``()`` for a scalar per sample).
        dtype: numpy dtype of the stored values.
        n: number of samples, or None where it is not known yet.
    """

    sample_shape: tuple[int, ...]
    dtype: np.dtype
    n: int | None = None
    dims: tuple[str, ...] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.n is not None and (
            not isinstance(self.n, (int, np.integer)) or isinstance(self.n, bool) or self.n < 0
        ):
            raise ArgumentError(f"FieldSpec n must be None or a sample count (int >= 0), not {self.n!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The field's full shape ``(n, *sample_shape)``.

        Raises:
            ArgumentError: ``n`` is not known (a field spec of samples only).
        """
        if self.n is None:
            raise ArgumentError(
                f"this field spec has no sample count; its samples are {self.sample_shape} {self.dtype}"
            )
        return (self.n, *self.sample_shape)

    @property
    def sample_nbytes(self) -> int:
        """Bytes of one decoded sample."""
        return int(math.prod(self.sample_shape)) * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        """The manifest's entry (the sample count is the manifest's ``n``)."""
        doc: dict[str, Any] = {"shape": list(self.sample_shape), "dtype": self.dtype.name}
        if self.dims is not None:
            doc["dims"] = list(self.dims)
        return doc

    def __repr__(self) -> str:
        if self.n is None:
            return f"FieldSpec(sample_shape={self.sample_shape}, dtype={self.dtype})"
        return f"FieldSpec(shape={self.shape}, dtype={self.dtype})"


#: The name of axis 0 of every field (unless a field is itself named so: see :func:`with_dims`).
SAMPLE_DIM = "sample"


def with_dims(fields: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
    """``fields`` with every axis named: axis 0 ``"sample"``, then the names given in each
    spec's ``dims`` for its sample axes (e.g. ``("height", "width", "channel")``), else
    ``"<field>_dim1"``, ``"<field>_dim2"`` ...

    xarray makes a field named like a dimension that dimension's coordinate, and one
    dimension has one size: a name taken by a field, or used by another field with another
    size, becomes ``"<field>_<name>"`` (``"_<name>"`` for the sample axis; field names never
    start with ``_``). A spec's ``dims`` may name the sample axes only (``len(sample_shape)`` names)
    or all axes (the first is then replaced)."""
    sample = SAMPLE_DIM if SAMPLE_DIM not in fields else "_" + SAMPLE_DIM
    sizes: dict[str, int] = {}
    out: dict[str, FieldSpec] = {}
    for name, spec in fields.items():
        given = list(spec.dims) if spec.dims is not None else []
        if len(given) == len(spec.sample_shape) + 1:
            given = given[1:]
        if len(given) != len(spec.sample_shape):
            given = [f"{name}_dim{k}" for k in range(1, len(spec.sample_shape) + 1)]
        dims = [sample]
        for dim, size in zip(given, spec.sample_shape, strict=True):
            if dim in fields or dim == sample or sizes.get(dim, size) != size or dim in dims:
                dim = f"{name}_{dim}"
            while dim in fields or dim in dims or sizes.get(dim, size) != size:
                dim = "_" + dim
            sizes[dim] = size
            dims.append(dim)
        out[name] = dataclasses.replace(spec, dims=tuple(dims))
    return out


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
        checksums: field name -> checksum of each chunk's decoded C-order bytes
            (:func:`oocseq.checksum.chunk_checksum`); empty only for a store opened with
            ``verify_checksums=False`` whose manifest has none.
        attrs: JSON metadata for users (class names, feature names, provenance summary, ...).
        aux: names of auxiliary per-sample arrays (e.g. ``"source"``: where each sample came from).
        format_version: 1 (CRC-32 checksums) or 2 (CRC32C).
        checksum: the checksum algorithm, ``"crc32c"`` or ``"crc32"`` (a name in
            :data:`oocseq.checksum.CHECKSUMS`).
    """

    n: int
    chunk_len: int
    fields: dict[str, FieldSpec]
    compression: Compression | None
    checksums: dict[str, list[int]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    aux: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    checksum: str = DEFAULT_CHECKSUM

    @property
    def num_chunks(self) -> int:
        return -(-self.n // self.chunk_len)

    def chunk_bounds(self, c: int) -> tuple[int, int]:
        """``(start, stop)`` sample range of chunk ``c``."""
        start = c * self.chunk_len
        return start, min(start + self.chunk_len, self.n)

    def has_checksums(self) -> bool:
        """Whether every field has a checksum for every chunk."""
        return all(name in self.checksums for name in self.fields)

    def to_json(self) -> dict[str, Any]:
        doc = {
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
        if self.format_version >= 2:  # version 1 documents name no checksum (always CRC-32)
            doc["checksum"] = self.checksum
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str, *, require_checksums: bool = True) -> Manifest:
        """Validate an untrusted manifest read from the store at ``where``.

        ``require_checksums=False`` accepts a manifest without checksums (or without those of
        some fields); oocseq always writes them, so their absence means damage.

        Raises:
            NotAStoreError: no oocseq manifest, an unfinished ingestion, or an unknown version.
            CorruptStoreError: a manifest that is present but malformed, implausible sizes, or
                missing checksums (unless ``require_checksums`` is false).
        """
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise NotAStoreError(
                f"{where} is not an oocseq store (no oocseq manifest). Create one with "
                "oocseq.ingest_arrays / ingest_image_folder / ingest_csv / ingest_npy."
            )
        if doc.get("complete") is not True:
            raise NotAStoreError(f"{where}: ingestion did not complete; ingest again")
        version = doc.get("format_version")
        if not _is_int(version) or version not in READ_VERSIONS:
            raise NotAStoreError(
                f"{where}: store format version {version!r}; this oocseq reads versions "
                f"{sorted(READ_VERSIONS)}. Upgrade oocseq or ingest again."
            )

        def bad(what: str) -> CorruptStoreError:
            return CorruptStoreError(f"{where}: corrupt manifest: {what}")

        n, chunk_len = doc.get("n"), doc.get("chunk_len")
        if not _is_int(n) or n < 0:
            raise bad(f"'n' must be a non-negative int, got {n!r}")
        if not _is_int(chunk_len) or chunk_len < 1:
            raise bad(f"'chunk_len' must be a positive int, got {chunk_len!r}")
        if n > MAX_SAMPLES or chunk_len > MAX_SAMPLES:
            raise bad(f"implausible sizes n={n}, chunk_len={chunk_len} (at most {MAX_SAMPLES} each)")
        if -(-n // chunk_len) > MAX_CHUNKS:
            raise bad(
                f"implausible {-(-n // chunk_len)} chunks (n={n}, chunk_len={chunk_len}); "
                f"oocseq reads at most {MAX_CHUNKS}"
            )
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
            if (
                any(s > MAX_CHUNK_BYTES for s in shape)
                or chunk_len * fields[name].sample_nbytes > MAX_CHUNK_BYTES
            ):
                raise bad(
                    f"field {name!r}: a chunk of {chunk_len} samples of shape {tuple(shape)} {dtype} "
                    f"would decode to more than {MAX_CHUNK_BYTES} bytes (implausible sizes)"
                )
            dims = spec.get("dims")
            if dims is not None:
                if (
                    not isinstance(dims, list)
                    or len(dims) != len(shape) + 1
                    or not all(isinstance(d, str) and _DIM_NAME.match(d) for d in dims)
                ):
                    raise bad(f"field {name!r}: 'dims' must be {len(shape) + 1} axis names")
                fields[name] = FieldSpec(tuple(shape), np.dtype(dtype), dims=tuple(dims))
        comp = doc.get("compression")
        compression = None
        if comp is not None:
            if not isinstance(comp, dict) or comp.get("codec") != "blosc":
                raise bad(f"unsupported compression {comp!r}")
            try:
                compression = Compression(comp.get("cname"), comp.get("clevel"))  # type: ignore[arg-type]
            except ValueError as e:
                raise bad(str(e)) from None
        algorithm = READ_VERSIONS[version] or doc.get("checksum")
        if version == 1 and "checksum" in doc and doc["checksum"] != algorithm:
            raise bad(f"format version 1 stores CRC-32 checksums, the manifest says {doc['checksum']!r}")
        if not isinstance(algorithm, str) or algorithm not in CHECKSUMS:
            raise bad(f"unknown checksum {algorithm!r} (known: {sorted(CHECKSUMS)})")
        num_chunks = -(-n // chunk_len)
        checksums = doc.get("checksums", {})
        if not isinstance(checksums, dict):
            raise bad("'checksums' must be an object")
        missing = [name for name in fields if name not in checksums]
        if require_checksums and missing:
            raise CorruptStoreError(
                f"{where}: the manifest has no checksums for field(s) {missing}; oocseq writes one "
                "per chunk, so the store is damaged or was not written by oocseq, and its chunks "
                "cannot be checked. Ingest it again, or open it with verify_checksums=False to "
                "read it unchecked."
            )
        for name, sums in checksums.items():
            if name not in fields:
                raise bad(f"checksums for unknown field {name!r}")
            if (
                not isinstance(sums, list)
                or len(sums) != num_chunks
                or not all(_is_int(s) and 0 <= s < 2**32 for s in sums)
            ):
                raise bad(f"checksums of field {name!r} must be {num_chunks} unsigned 32-bit ints")
        attrs = doc.get("attrs", {})
        if not isinstance(attrs, dict):
            raise bad("'attrs' must be an object")
        aux = doc.get("aux", [])
        if not isinstance(aux, list) or not all(isinstance(a, str) and _FIELD_NAME.match(a) for a in aux):
            raise bad("'aux' must be a list of names")
        return cls(n, chunk_len, fields, compression, dict(checksums), attrs, tuple(aux), version, algorithm)


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)
