"""Ingest ``.npy`` files, memory-mapped and concatenated along axis 0.

Each file is opened with ``np.load(path, mmap_mode="r")`` (never unpickled) and copied one
chunk of samples at a time, so memory holds about one chunk per field whatever the files' size.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FieldLengthError, InvalidSourceError, SourceNotFoundError
from ..manifest import Compression, FieldSpec
from ..store import Store
from ._preshuffle import BlockShuffle, default_block_len
from ._progress import progress_bar
from ._writer import choose_chunk_len, field_spec, open_writer, url_options

#: One ``.npy`` path, or several (concatenated in the order given).
NpyPaths = str | os.PathLike | Sequence[str | os.PathLike]

_NPY_MAGIC = b"\x93NUMPY"


@url_options
def ingest_npy(
    paths: NpyPaths | Mapping[str, NpyPaths],
    dest: str | os.PathLike[str],
    *,
    field: str = "x",
    chunk_len: int | None = None,
    compression: str | Compression | None = "lz4",
    overwrite: bool = False,
    preshuffle: bool = True,
    seed: int = 0,
    progress: bool = False,
    resume: bool = True,
    workers: int | None = None,
    client: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Ingest one or more ``.npy`` files, concatenated along axis 0, into a new store.

    Args:
        paths: a ``.npy`` path or a list of them, stored as field ``field``; or a mapping
            ``{field_name: path_or_paths}`` for several fields, e.g.
            ``{"x": "x.npy", "y": ["y0.npy", "y1.npy"]}`` (every field needs the same total
            number of samples; files of different fields need not split the samples alike).
        dest: ``*.zarr`` or ``*.h5`` / ``*.hdf5``.
        field: the field name when ``paths`` is not a mapping.
        chunk_len: samples per chunk (default: about 4 MiB of the widest field, at most ``n``).
        compression: ``None``, ``"lz4"``, ``"zstd"`` or ``"zlib"``.
        overwrite: replace an existing store at ``dest``.
        preshuffle: store the samples in a seeded random order of short blocks of the
            concatenated files (default), so that chunks mix classes even when the files are
            one per class or sorted by label. Recorded in ``store.metadata["preshuffle"]``;
            ``store.source_index`` maps stored samples back to rows of the concatenation.
            ``False`` keeps the files' order.
        seed: seed of the pre-shuffle.
        progress: show a progress bar.
        resume: if an earlier run of the same call (same files, sizes and modification
            times, same ``dest`` and arguments) was interrupted, go on from its last written
            chunk (default); ``False`` starts over.
        workers: threads that read (and pre-shuffle) chunks from the memory-mapped files,
            checksum, compress and, for Zarr, write them, while this thread writes HDF5
            chunks (default ``None``: every core this process may use; ``1``: all in this
            process). The store is the same bytes whatever the number.
        client: a ``dask.distributed.Client``: the cluster's workers compress the chunks (and,
            for a Zarr ``dest``, write them: ``dest``'s folder must be a path every worker
            sees); this process reads the source, writes HDF5 chunks and commits. The store is
            the same bytes as without a cluster. Overrides ``workers``.
        storage_options: for a ``dest`` in object storage (``s3://bucket/x.zarr``, ``gs://``,
            ...): credentials and endpoint, as for :func:`oocseq.open_store` (default: the
            environment's). Chunks go to the bucket as they are made, the manifest last.

    Returns:
        The opened Store. Field ``name`` has shape ``(n, *sample_shape)`` and the files'
        dtype (big-endian data is stored native-endian); ``n`` is the total rows of its files.
        ``store.metadata["source"]`` is ``{"kind": "npy", "files": [{"field", "path", "rows"}, ...]}``
        in concatenation order.

    Raises:
        SourceNotFoundError: a file does not exist (the message names it).
        InvalidSourceError: a file that is not a numeric ``.npy`` array (object arrays are
            refused: reading them needs unpickling), a 0-d array, or a file whose sample shape
            or dtype differs from the field's first file (naming both files); no samples.
        FieldLengthError: fields with different total numbers of samples.
        StoreExistsError: ``dest`` exists and ``overwrite`` is false.
    """
    fields = {name: _Concatenated(name, files) for name, files in _file_lists(paths, field).items()}
    lengths = {name: len(c) for name, c in fields.items()}
    if len(set(lengths.values())) > 1:
        raise FieldLengthError(
            "fields have different numbers of samples: "
            + ", ".join(f"{name}={n} (from {len(fields[name].files)} file(s))" for name, n in lengths.items())
            + "; every field needs one entry per sample"
        )
    n = next(iter(lengths.values()))
    if n == 0:
        raise InvalidSourceError(
            f"the .npy files hold no samples: {[str(p) for c in fields.values() for p in c.files]}"
        )
    specs = {name: c.spec for name, c in fields.items()}
    if chunk_len is None:
        chunk_len = choose_chunk_len(specs, n)
    job = {
        "kind": "npy",
        "files": {name: [_file_identity(p) for p in c.files] for name, c in fields.items()},
        "preshuffle": {"seed": seed} if preshuffle else None,
    }
    with (
        open_writer(
            dest,
            specs,
            chunk_len=chunk_len,
            compression=compression,
            overwrite=overwrite,
            n=n,
            job=job,
            resume=resume,
            workers=workers,
            client=client,
        ) as w,
        progress_bar(progress, n, f"ingest {os.fspath(dest)}") as bar,
    ):
        chunk_len = w.chunk_len
        shuffle = None
        if preshuffle:
            widest = max(spec.sample_nbytes for spec in specs.values())
            shuffle = BlockShuffle(n, default_block_len(widest, chunk_len), seed)
        w.attrs["preshuffle"] = shuffle.to_json() if shuffle else None
        begin = int(w.resume_state["start"]) if w.resume_state else 0
        bar.update(begin)
        for start in range(begin, n, chunk_len):
            w.checkpoint({"start": start})
            stop = min(start + chunk_len, n)
            for name, source in fields.items():
                # Read (and pre-shuffle) in the encoding threads: the calling thread only writes.
                if shuffle is None:
                    w.append_made(name, stop - start, source.rows, start, stop)
                else:
                    w.append_made(name, stop - start, shuffle.gather, source.reader(), start, stop)
            bar.update(stop - start)
        w.attrs["source"] = {
            "kind": "npy",
            "files": [
                {"field": name, "path": str(path.resolve()), "rows": rows}
                for name, c in fields.items()
                for path, rows in zip(c.files, c.file_rows, strict=True)
            ],
        }
    return w.close()


def _file_identity(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _file_lists(paths: NpyPaths | Mapping[str, NpyPaths], field: str) -> dict[str, list[Path]]:
    groups = dict(paths) if isinstance(paths, Mapping) else {field: paths}
    if not groups:
        raise InvalidSourceError("ingest_npy needs at least one field")
    out = {}
    for name, group in groups.items():
        files = [Path(group)] if isinstance(group, (str, os.PathLike)) else [Path(p) for p in group]
        if not files:
            raise InvalidSourceError(f"field {name!r}: no .npy files given")
        out[name] = files
    return out


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map one ``.npy`` file read-only (never unpickling).

    Raises SourceNotFoundError if it does not exist, InvalidSourceError if it is not a numeric
    ``.npy`` array with a sample axis."""
    if not path.is_file():
        raise SourceNotFoundError(f".npy file {str(path)!r} does not exist or is not a file")
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        raise InvalidSourceError(
            f"{str(path)!r} is not a .npy file (an .npz archive or another format?); save each array "
            "with np.save"
        )
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise InvalidSourceError(
            f"cannot memory-map {str(path)!r} as a .npy array ({e}). oocseq reads numeric arrays only and "
            "never unpickles (object arrays are refused): save the data with a numeric dtype, e.g. "
            "np.save(path, arr.astype('float32'))"
        ) from e
    if arr.ndim == 0:
        raise InvalidSourceError(
            f"{str(path)!r} holds a scalar; a .npy source needs one entry per sample along axis 0"
        )
    return arr


def _native(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("=") if dtype.byteorder == ">" else dtype


class _Concatenated:
    """The memory-mapped files of one field, read as one array concatenated along axis 0."""

    def __init__(self, name: str, files: list[Path]) -> None:
        self.files = files
        self.arrays = [_open_npy(p) for p in files]
        first = self.arrays[0]
        try:
            self.spec: FieldSpec = field_spec(name, first.shape[1:], _native(first.dtype))
        except InvalidSourceError as e:
            raise InvalidSourceError(f"{str(files[0])!r}: {e}") from None
        for path, arr in zip(files[1:], self.arrays[1:], strict=True):
            if arr.shape[1:] != self.spec.sample_shape or _native(arr.dtype) != self.spec.dtype:
                raise InvalidSourceError(
                    f"{str(path)!r} holds samples of shape {arr.shape[1:]} and dtype {arr.dtype}, but "
                    f"{str(files[0])!r}, the first file of field {name!r}, holds shape {self.spec.sample_shape} "
                    f"and dtype {first.dtype}; every file of a field needs the same sample shape and dtype"
                )
        self.file_rows = [int(a.shape[0]) for a in self.arrays]
        self.offsets = np.cumsum([0, *self.file_rows]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def reader(self) -> Any:
        """What :meth:`BlockShuffle.gather` reads from: the memory map of a single file, else
        :meth:`rows`."""
        return self.arrays[0] if len(self.arrays) == 1 else self.rows

    def rows(self, start: int, stop: int) -> Any:
        """Samples ``[start, stop)``: a view into one file's memory map, or a copy joining the
        pieces of several files."""
        pieces = []
        i = bisect.bisect_right(self.offsets, start) - 1
        while start < stop:
            lo = self.offsets[i]
            take = min(stop, self.offsets[i + 1]) - start
            if take > 0:
                pieces.append(self.arrays[i][start - lo : start - lo + take])
                start += take
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
