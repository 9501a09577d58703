"""oocseq: train on datasets larger than RAM.

Ingest raw files into chunked Zarr v3 / HDF5 stores, then serve shuffled, chunk-aligned
batches with :class:`ChunkedSequence` (a ``keras.utils.PyDataset`` when Keras is in use), from a
stateless batch core (:class:`ChunkedBatches`).
Importing oocseq imports no ML framework.
"""

from __future__ import annotations

from . import transforms
from .batches import ChunkedBatches
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    BatchIndexError,
    CorruptStoreError,
    CSVValueError,
    FieldLengthError,
    FieldNotFoundError,
    ImageDecodeError,
    InvalidSourceError,
    KerasIteratorWarning,
    MissingDependencyError,
    NotAStoreError,
    OocseqError,
    OutOfRangeError,
    SourceNotFoundError,
    StateError,
    StoreExistsError,
    StoreNotFoundError,
    StoreReadError,
    StoreWriteError,
    TransformError,
)
from .ingest.arrays import ingest_arrays
from .ingest.convert import convert_store
from .ingest.csv import ingest_csv
from .ingest.images import ingest_dataframe, ingest_image_folder
from .ingest.npy import ingest_npy
from .manifest import FieldSpec
from .memory import ArraySource
from .options import ReadOptions, RemoteOptions, ShardOptions, WorkerOptions
from .plan import EpochPlan, epoch_order
from .sequence import ChunkedSequence
from .store import FieldInfo, FieldView, Store, open_store

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ArraySource",
    "BatchIndexError",
    "CSVValueError",
    "ChunkedBatches",
    "ChunkedSequence",
    "CorruptStoreError",
    "EpochPlan",
    "FieldInfo",
    "FieldSpec",
    "FieldLengthError",
    "FieldNotFoundError",
    "FieldView",
    "ImageDecodeError",
    "InvalidSourceError",
    "KerasIteratorWarning",
    "NotAStoreError",
    "OocseqError",
    "OutOfRangeError",
    "ReadOptions",
    "RemoteOptions",
    "ShardOptions",
    "SourceNotFoundError",
    "Store",
    "StoreExistsError",
    "StoreReadError",
    "StateError",
    "StoreNotFoundError",
    "StoreWriteError",
    "MissingDependencyError",
    "TransformError",
    "WorkerOptions",
    "__version__",
    "epoch_order",
    "convert_store",
    "ingest_arrays",
    "ingest_csv",
    "ingest_dataframe",
    "ingest_image_folder",
    "ingest_npy",
    "open_store",
    "transforms",
]
