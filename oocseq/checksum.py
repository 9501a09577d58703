"""Per-chunk checksums: the one place that computes them, for the writer and the reader.

A chunk's checksum covers its decoded samples as C-order bytes (``chunk.tobytes()``), so it
checks the whole read path (stored bytes, decompression, byte order) and does not depend on
the compression. Format version 2 stores CRC32C (hardware-accelerated through
``google-crc32c``: about 5x zlib's CRC-32 on one core); version 1 stores zlib's CRC-32.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import google_crc32c
import numpy as np

__all__ = ["CHECKSUMS", "DEFAULT_CHECKSUM", "chunk_checksum"]


def _crc32c(data: np.ndarray) -> int:
    return int(google_crc32c.value(data))


def _crc32(data: np.ndarray) -> int:
    return zlib.crc32(data.data)


#: Checksum algorithm name (as recorded in the manifest) -> function of a C-contiguous uint8
#: array, returning an unsigned 32-bit int.
CHECKSUMS: dict[str, Callable[[np.ndarray], int]] = {"crc32c": _crc32c, "crc32": _crc32}
#: What new stores use.
DEFAULT_CHECKSUM = "crc32c"


def chunk_checksum(chunk: np.ndarray, algorithm: str = DEFAULT_CHECKSUM) -> int:
    """Checksum of ``chunk``'s values as C-order bytes (unsigned 32-bit int).

    Reads the array in place when it is C-contiguous (no copy). Raises KeyError for an
    unknown ``algorithm`` (names: :data:`CHECKSUMS`)."""
    fn = CHECKSUMS[algorithm]
    data = np.ascontiguousarray(chunk)
    # A flat uint8 view: the C extension reads the buffer without a copy.
    return fn(data.reshape(-1).view(np.uint8) if data.size else np.empty(0, np.uint8))
