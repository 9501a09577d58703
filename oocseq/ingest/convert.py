"""Convert a store to the other format (Zarr v3 <-> HDF5), chunk for chunk."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import CorruptStoreError
from ..store import Store, open_store
from ._writer import StoreWriter

__all__ = ["convert_store"]


def convert_store(
    src: str | os.PathLike[str] | Store,
    dest: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    dest_storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Write the store ``src`` again at ``dest`` (``*.zarr`` or ``*.h5`` / ``*.hdf5``): same
    samples, fields, chunk length, compression, metadata and per-sample sources. Every chunk
    of ``src`` is checked against its checksum as it is read, and the checksums the writer
    computes must equal the source's.

    Use it to move an HDF5 file to object storage (``dest`` a URL such as
    ``s3://bucket/x.zarr``: chunks are sent as they are made, the manifest last) or to get an
    HDF5 file of a Zarr store (``src`` a URL). ``storage_options``: credentials and endpoint
    for ``src`` and ``dest`` where they are in object storage, as for
    :func:`oocseq.open_store`; ``dest_storage_options``: other ones for ``dest``.

    Returns:
        The new store, opened.

    Raises:
        as :func:`oocseq.open_store` for ``src``; StoreExistsError (``dest`` exists and not
        ``overwrite``); CorruptStoreError (a chunk of ``src`` fails its checksum, or the copy's
        checksums differ from the source's).
    """
    if isinstance(src, Store):
        store = src
    else:
        store = open_store(src, storage_options=storage_options if _in_object_storage(src) else None)
    if dest_storage_options is None and _in_object_storage(dest):
        dest_storage_options = storage_options
    manifest = store.manifest
    w = StoreWriter(
        dest,
        dict(manifest.fields),
        chunk_len=manifest.chunk_len,
        compression=manifest.compression,
        overwrite=overwrite,
        n=manifest.n,
        resume=False,
        storage_options=dest_storage_options,
    )
    try:
        w.attrs.update(dict(manifest.attrs))
        if store.url is not None:  # fetch ahead, concurrently (bounded by bytes in flight)
            for name in manifest.fields:
                store.advise_chunks(name, np.arange(manifest.num_chunks))
        for c in range(manifest.num_chunks):
            for name in manifest.fields:
                w.append(name, store.read_chunk(name, c))
        for name in manifest.aux:  # every per-sample record (sources, a DataFrame's index ...)
            w.set_aux(name, _aux_values(store, name))
    except BaseException:
        w.abort()
        raise
    out = w.close()
    if out.manifest.checksum == manifest.checksum and out.manifest.checksums != manifest.checksums:
        raise CorruptStoreError(
            f"{dest}: the copy's checksums differ from those of {store.location}; the copy is not faithful"
        )
    return out


def _aux_values(store: Store, name: str) -> np.ndarray:
    """An auxiliary array as the store serves it (the known ones with their types normalised:
    Zarr and HDF5 return strings differently)."""
    if name == "source":
        values = store.sources
    elif name == "dataframe_index":
        values = store.dataframe_index
    else:
        values = store._open().read_aux(name)
    if values is None:  # listed in the manifest, so the reader has it
        raise CorruptStoreError(f"{store.location}: auxiliary array {name!r} is listed but missing")
    return values


def _in_object_storage(path: str | os.PathLike[str]) -> bool:
    from ..storage._remote import is_url, local_path_of

    return is_url(path) and local_path_of(str(path)) is None
