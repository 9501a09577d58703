"""Storage backends behind one contract (:mod:`oocseq.storage._base`), chosen by path suffix."""

from __future__ import annotations

from pathlib import Path

from ..errors import ArgumentError
from ._base import StorageReader, StorageWriter

ZARR_SUFFIXES = (".zarr",)
HDF5_SUFFIXES = (".h5", ".hdf5")

__all__ = ["StorageReader", "StorageWriter", "store_format", "open_reader", "create_writer"]


def store_format(path: str | Path) -> str:
    """``"zarr"`` for ``*.zarr``, ``"hdf5"`` for ``*.h5`` / ``*.hdf5``; ValueError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in ZARR_SUFFIXES:
        return "zarr"
    if suffix in HDF5_SUFFIXES:
        return "hdf5"
    raise ArgumentError(
        f"cannot tell the store format of {str(path)!r}: name it *.zarr (Zarr v3 directory) "
        "or *.h5 / *.hdf5 (HDF5 file)"
    )


def open_reader(path: Path, fmt: str, fast: bool = True) -> StorageReader:
    if fmt == "zarr":
        from ._zarr import ZarrReader

        return ZarrReader(path, fast)
    from ._hdf5 import HDF5Reader

    return HDF5Reader(path, fast)


def create_writer(path: Path, fmt: str, resume: bool = False) -> StorageWriter:
    """A writer of a new store at ``path``, or (``resume``) of the partial store there."""
    if fmt == "zarr":
        from ._zarr import ZarrWriter

        return ZarrWriter(path, resume)
    from ._hdf5 import HDF5Writer

    return HDF5Writer(path, resume)
