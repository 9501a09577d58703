"""Ingest in-memory or memory-mapped arrays, or iterables of batches."""

from __future__ import annotations

import contextlib
import itertools
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import FieldLengthError, InvalidSourceError
from ..manifest import Compression
from ..store import Store
from ._preshuffle import BlockShuffle, default_block_len
from ._progress import progress_bar
from ._spool import Spool
from ._writer import choose_chunk_len, field_spec, open_writer, url_options


def _is_array(obj: Any) -> bool:
    return hasattr(obj, "shape") and hasattr(obj, "dtype") and hasattr(obj, "__getitem__")


@url_options
def ingest_arrays(
    dest: str | os.PathLike[str],
    fields: Mapping[str, Any],
    *,
    chunk_len: int | None = None,
    compression: str | Compression | None = "lz4",
    overwrite: bool = False,
    metadata: Mapping[str, Any] | None = None,
    preshuffle: bool = True,
    seed: int = 0,
    progress: bool = False,
    resume: bool = True,
    workers: int | None = None,
    client: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Write arrays (or iterables of batches) into a new store at ``dest``.

    Args:
        dest: ``*.zarr`` (Zarr v3 directory) or ``*.h5`` / ``*.hdf5`` (HDF5 file).
        fields: field name -> data. Data is anything with ``shape``, ``dtype`` and slicing
            (numpy arrays, ``np.memmap``, h5py / zarr arrays: read one chunk at a time), a list
            or tuple (converted with ``np.asarray``), or any other iterable yielding batches of
            shape ``(k, *sample_shape)`` (streamed; ``k`` may vary). All fields must have the
            same number of samples. Dtypes: bool, (u)int8-64, float16/32/64, complex.
        chunk_len: samples per chunk; ``None`` gives about 4 MiB per chunk of the widest field
            (at most the number of samples, also for a stream shorter than one chunk).
        compression: ``None``, ``"lz4"`` (default), ``"zstd"`` or ``"zlib"`` (Blosc).
        overwrite: replace an existing store at ``dest``.
        metadata: JSON-serialisable user metadata kept in ``store.metadata``.
        preshuffle: store the samples in a seeded random order of short source blocks
            (default), so that chunks mix whatever the source order (a source sorted by label
            would otherwise give batches of a few classes). Recorded in
            ``store.metadata["preshuffle"]``; ``store.source_index`` maps stored samples back
            to source rows. Iterables of batches are first spooled to temporary uncompressed
            files beside ``dest`` (one copy of the data on disk, bounded memory), then read
            back shuffled. ``False`` keeps the order given.
        seed: seed of the pre-shuffle.
        progress: show a progress bar.
        resume: if an earlier run of the same call (same arrays, ``dest`` and arguments) was
            interrupted, go on from its last written chunk (default); ``False`` starts over.
            Only arrays can be resumed: with an iterable of batches the ingestion starts over
            (with a warning), as a stream cannot be replayed.
        workers: threads that checksum, compress and, for Zarr, write chunks, and read them
            from numpy arrays (other array types, such as h5py or zarr arrays, are read by this
            thread; HDF5 chunks are written by it) (default ``None``: every core this process
            may use; ``1``: all in this process). The store is the same bytes whatever the
            number.
        client: a ``dask.distributed.Client``: the cluster's workers compress the chunks (and,
            for a Zarr ``dest``, write them: ``dest``'s folder must be a path every worker
            sees); this process reads the source, writes HDF5 chunks and commits. The store is
            the same bytes as without a cluster. Overrides ``workers``.
        storage_options: for a ``dest`` in object storage (``s3://bucket/x.zarr``, ``gs://``,
            ...): credentials and endpoint, as for :func:`oocseq.open_store` (default: the
            environment's). Chunks go to the bucket as they are made, the manifest last.

    Returns:
        The opened :class:`~oocseq.Store`.

    Raises:
        FieldLengthError: fields differ in length. InvalidSourceError: unsupported dtype, an
        empty batch iterable, or batches whose shape or dtype changes. StoreExistsError.
        NotAStoreError: ``overwrite`` is true and ``dest`` is not an oocseq store.
        ArgumentError: a ``chunk_len`` over 2 GiB per chunk. StoreWriteError: disk full ...
    """
    if not fields:
        raise InvalidSourceError("ingest_arrays needs at least one field")
    if metadata is not None:
        import json

        from ._writer import _jsonable

        try:
            json.dumps(_jsonable(dict(metadata)))
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata must be JSON-serialisable: {e}") from None
    sources: dict[str, Any] = {}
    first: dict[str, np.ndarray] = {}
    for name, data in fields.items():
        if isinstance(data, (list, tuple)):
            data = np.asarray(data)
        if _is_array(data):
            if len(data.shape) == 0:
                raise InvalidSourceError(f"field {name!r} is a scalar; give one entry per sample")
            sources[name] = data
            continue
        if not isinstance(data, Iterable):
            raise InvalidSourceError(
                f"field {name!r}: expected an array or an iterable of batches, got {type(data).__name__}"
            )
        it = iter(data)
        try:
            head = np.asarray(next(it))
        except StopIteration:
            raise InvalidSourceError(f"field {name!r}: the iterable of batches is empty") from None
        if head.ndim == 0:
            raise InvalidSourceError(f"field {name!r}: batches must have a sample axis, got a scalar")
        first[name] = head
        sources[name] = itertools.chain([head], it)

    # Arrays can be replayed, so an interrupted ingestion of them can resume; streams cannot.
    job = None
    before_commit: list[Callable[[], None]] = []
    if not first:
        job = {
            "kind": "arrays",
            "fields": {name: _identity(src) for name, src in sources.items()},
            "metadata": dict(metadata or {}),
            "preshuffle": {"seed": seed} if preshuffle else None,
        }
    with contextlib.ExitStack() as stack:
        if preshuffle and first:
            # Streams cannot be read in a random order: spool them to disk, then read them
            # back shuffled as memory-mapped arrays (bounded memory; see _spool.py).
            spool = stack.enter_context(Spool(dest, overwrite))
            for name in first:
                with progress_bar(progress, None, f"spool {name}") as bar:
                    for batch in sources[name]:
                        spool.append(name, batch)
                        bar.update(len(batch))
            sources.update(spool.arrays())
            first = {}
            before_commit = [spool.close]
        return _write(
            dest,
            sources,
            first,
            chunk_len=chunk_len,
            compression=compression,
            overwrite=overwrite,
            metadata=metadata,
            preshuffle=preshuffle,
            seed=seed,
            progress=progress,
            job=job,
            resume=resume,
            workers=workers,
            client=client,
            before_commit=before_commit,
        )


def _write(
    dest: str | os.PathLike[str],
    sources: dict[str, Any],
    first: dict[str, np.ndarray],
    *,
    chunk_len: int | None,
    compression: str | Compression | None,
    overwrite: bool,
    metadata: Mapping[str, Any] | None,
    preshuffle: bool,
    seed: int,
    progress: bool,
    job: dict[str, Any] | None,
    resume: bool,
    dims: Mapping[str, tuple[str, ...]] | None = None,
    workers: int | None = None,
    client: Any = None,
    before_commit: list[Callable[[], None]] | None = None,
) -> Store:
    """Write ``sources`` (arrays, or streams named in ``first`` with their first batch);
    ``job`` identifies a replayable source for resuming (``None``: start over); ``dims``:
    names of the sample axes of some fields (see :func:`~oocseq.ingest._writer.field_spec`)."""
    lengths = {k: int(v.shape[0]) for k, v in sources.items() if _is_array(v)}
    if len(set(lengths.values())) > 1:
        raise FieldLengthError(
            "fields have different numbers of samples: " + ", ".join(f"{k}={v}" for k, v in lengths.items())
        )
    specs = {
        name: field_spec(
            name,
            tuple(first[name].shape[1:] if name in first else src.shape[1:]),
            first[name].dtype if name in first else src.dtype,
            (dims or {}).get(name),
        )
        for name, src in sources.items()
    }
    total = next(iter(lengths.values())) if lengths else None
    if chunk_len is None and total is not None:
        chunk_len = choose_chunk_len(specs, total)
    # Unknown length and no chunk_len: the writer picks one, shrunk to the data if it is shorter.
    with (
        open_writer(
            dest,
            specs,
            chunk_len=chunk_len,
            compression=compression,
            overwrite=overwrite,
            n=total,
            job=job,
            resume=resume,
            workers=workers,
            client=client,
        ) as w,
    ):
        w.before_commit.extend(before_commit or ())
        chunk_len = w.chunk_len
        w.attrs.update(dict(metadata or {}))
        w.attrs.setdefault("source", {"kind": "arrays"})
        shuffle = None
        if preshuffle and not first and total:
            widest = max(spec.sample_nbytes for spec in specs.values())
            shuffle = BlockShuffle(total, default_block_len(widest, chunk_len), seed)
        w.attrs["preshuffle"] = shuffle.to_json() if shuffle else None
        with progress_bar(progress, total, f"ingest {os.fspath(dest)}") as bar:
            if not first:  # all arrays: read chunk-sized slices, all fields in step
                begin = int(w.resume_state["start"]) if w.resume_state else 0
                bar.update(begin)
                for start in range(begin, total or 0, chunk_len):
                    w.checkpoint({"start": start})
                    stop = min(start + chunk_len, total or 0)
                    for name, src in sources.items():
                        if isinstance(src, np.ndarray):  # read in the encoding threads
                            make = _rows if shuffle is None else shuffle.gather
                            w.append_made(name, stop - start, make, src, start, stop)
                        elif shuffle is None:  # h5py, zarr, dask...: read in this thread only
                            w.append(name, np.asarray(src[start:stop]))
                        else:
                            w.append(name, shuffle.gather(_slicer(src), start, stop), copy=False)
                    bar.update(stop - start)
            else:
                for name, src in sources.items():
                    for batch in _batches(src, chunk_len):
                        w.append(name, batch)
                        if name == next(iter(sources)):
                            bar.update(len(batch))
    return w.close()  # already closed by the with block: returns the opened store


def _rows(src: np.ndarray, start: int, stop: int) -> np.ndarray:
    return src[start:stop]


def _slicer(src: Any) -> Callable[[int, int], Any] | np.ndarray:
    """What :meth:`BlockShuffle.gather` reads from: a numpy array itself, else
    ``read(lo, hi)`` -> rows ``[lo, hi)`` of the array-like."""
    if isinstance(src, np.ndarray):
        return src
    return lambda lo, hi: src[lo:hi]


def _batches(src: Any, chunk_len: int) -> Iterator[np.ndarray]:
    if _is_array(src):
        for start in range(0, src.shape[0], chunk_len):
            yield np.asarray(src[start : start + chunk_len])
    else:
        for batch in src:
            yield np.asarray(batch)


def _identity(src: Any) -> dict[str, Any]:
    """What identifies an array across runs: its file (for a memory map) or its shape, dtype
    and a checksum of a few rows (the first chunk re-derived on resume checks the rest)."""
    out: dict[str, Any] = {"shape": list(src.shape), "dtype": str(np.dtype(src.dtype))}
    filename = getattr(src, "filename", None)
    if isinstance(src, np.memmap) and filename:
        st = os.stat(filename)
        out.update(
            file=os.path.abspath(filename), size=st.st_size, mtime_ns=st.st_mtime_ns, offset=src.offset
        )
        return out
    n = int(src.shape[0])
    rows = sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, 17))}) if n else []
    crc = 0
    for i in rows:
        crc = zlib.crc32(np.ascontiguousarray(src[i]).tobytes(), crc)
    out["rows_crc"] = crc
    return out
