"""The oocseq error hierarchy.

Every error oocseq raises derives from :class:`OocseqError` and also from the matching
built-in exception, so ``except FileNotFoundError`` or ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "KerasIteratorWarning",
    "ShuffleWarning",
    "OocseqError",
    "ArgumentTypeError",
    "StoreNotFoundError",
    "NotAStoreError",
    "CorruptStoreError",
    "StoreExistsError",
    "StoreReadError",
    "StoreWriteError",
    "FieldNotFoundError",
    "SourceNotFoundError",
    "InvalidSourceError",
    "ImageDecodeError",
    "CSVValueError",
    "FieldLengthError",
    "BatchIndexError",
    "ArgumentError",
    "OutOfRangeError",
    "TransformError",
    "StateError",
    "MissingDependencyError",
]


class OocseqError(Exception):
    """Base class of every error raised by oocseq."""


class StoreNotFoundError(OocseqError, FileNotFoundError):
    """A store path does not exist."""


class NotAStoreError(OocseqError, ValueError):
    """A path exists but is not a complete oocseq store (or its format is unknown)."""


class CorruptStoreError(OocseqError, ValueError):
    """A store's metadata or chunks are inconsistent, missing or fail their checksum."""


class StoreReadError(OocseqError, OSError):
    """The operating system refused a read of a store (too many open files, an I/O error).
    ``errno`` is the system's error number; the message names the store and the file."""


class StoreExistsError(OocseqError, FileExistsError):
    """The destination of an ingestion already exists and ``overwrite`` was not given."""


class FieldNotFoundError(OocseqError, KeyError):
    """A field name that the store does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class SourceNotFoundError(OocseqError, FileNotFoundError):
    """A source file or folder of an ingestion does not exist or is empty."""


class InvalidSourceError(OocseqError, ValueError):
    """Source data that cannot be ingested as given."""


class ImageDecodeError(InvalidSourceError):
    """An image file that cannot be read or decoded. ``path`` names it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(
            f"cannot decode image {path!r}: {reason}. Remove or replace the file, or pass "
            "on_error='skip' to skip unreadable images (they are listed in the store's metadata)."
        )
        self.path = path
        self.reason = reason


class CSVValueError(InvalidSourceError):
    """A CSV cell that is not what its column needs. ``row`` is 0-based over data rows."""

    def __init__(self, path: str, row: int, column: str, value: object, expected: str) -> None:
        super().__init__(
            f"{path}: row {row} (line {row + 2} of the file), column {column!r}: "
            f"value {value!r} is not {expected}. Fix the value, or leave the column out with "
            f"exclude=[{column!r}]."
        )
        self.path = path
        self.row = row
        self.column = column
        self.value = value


class FieldLengthError(InvalidSourceError):
    """Fields given to an ingestion do not have the same number of samples."""


class ArgumentError(OocseqError, ValueError):
    """An argument oocseq cannot accept (a negative batch size, an unknown option, ...)."""


class OutOfRangeError(OocseqError, IndexError):
    """An index (sample, chunk, batch) outside its range."""


class BatchIndexError(OutOfRangeError):
    """A batch index outside ``range(len(seq))``."""


class TransformError(OocseqError, RuntimeError):
    """A user ``transform`` raised; the message names the samples and the store."""


class StateError(OocseqError, ValueError):
    """A ``state_dict`` that does not belong to this sequence (other store, other plan)."""


class StoreWriteError(OocseqError, OSError):
    """Writing or committing a store failed in the operating system (disk full, permissions,
    ...). ``errno`` is the system's error number; nothing is left at the destination."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type (a dict where a field name was expected, ...)."""


class ShuffleWarning(UserWarning):
    """The configured shuffle mixes batches far less than an iid shuffle would (for example, a
    store written in label order and not pre-shuffled). A warning, not an error: training still
    runs, but usually converges worse."""


class MissingDependencyError(OocseqError, ImportError):
    """An optional dependency a function needs is not installed (Pillow for images, pandas for
    CSV tables); the message names the extra to install."""


class KerasIteratorWarning(UserWarning):
    """oocseq could not see how Keras drives a pass (its ``steps_per_epoch``): a Keras version
    whose internals changed. Whole epochs are still served right."""
