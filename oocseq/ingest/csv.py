"""Ingest a CSV table: numeric feature columns -> ``x``, a label column -> ``y``.

The file is read once, in blocks, by ``pyarrow.csv`` (its threads parse and convert the next
blocks while this one stores the last): the label kind (integers, numbers, or class names mapped
to indices of the sorted names) is found on the way, so labels are kept as values or
first-seen codes in the temporary spool and typed at the end. Anything the fast path does not
take exactly as it is (a cell that is not a clean number, a missing value, a row with extra
fields, labels that are numbers for a while and then text) goes to the reference path, which
reads the file with ``pandas.read_csv(chunksize=...)``: a first pass over the label column
decides how labels are stored, the second writes the samples; it stores the same bytes, or
raises the error naming the row and column.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._optional import require
from ..errors import ArgumentError, CSVValueError, InvalidSourceError, SourceNotFoundError
from ..manifest import Compression
from ..store import Store
from ._progress import progress_bar
from ._spool import Spool
from ._writer import choose_chunk_len, field_spec, open_writer, url_options
from .arrays import _write

if TYPE_CHECKING:
    import pandas as pd

#: Cell texts that mean "no value" (pandas' default missing-value markers); surrounding
#: whitespace is ignored. Any other text that is not a number is an error.
MISSING_MARKERS = frozenset(
    [
        "",
        "NA",
        "N/A",
        "n/a",
        "NaN",
        "nan",
        "-NaN",
        "-nan",
        "NULL",
        "null",
        "None",
        "<NA>",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "1.#IND",
        "-1.#IND",
        "1.#QNAN",
        "-1.#QNAN",
    ]
)
#: Name of the feature axis of ``x`` (xarray's dimension).
FEATURE_DIMS = ("feature",)
_FLOAT32_RANGE = "a number within float32's range (magnitude at most 3.4e38)"
_MISSING_HINT = (
    "a number: the cell is empty or a missing-value marker; pass allow_missing=True to store "
    "missing features as NaN"
)


@dataclass(frozen=True)
class _Reader:
    """Where and how to read the CSV file."""

    path: Path
    delimiter: str
    encoding: str
    block_rows: int
    progress: bool = False

    def header(self) -> tuple[list[str], int]:
        """Column names and the number of data rows in the first line after the header (0 or
        1). Raises SourceNotFoundError for an empty file, InvalidSourceError if unparsable."""
        import pandas as pd

        try:
            # index_col=None lets pandas show a first row with one field too many (as an index)
            head = self._read(nrows=1, dtype=str, index_col=None)
        except pd.errors.EmptyDataError:
            raise SourceNotFoundError(f"CSV file {str(self.path)!r} is empty (no header line)") from None
        header = [str(c) for c in head.columns]
        if not isinstance(head.index, pd.RangeIndex):  # pandas took the extra first field as an index
            raise InvalidSourceError(
                f"{str(self.path)!r}: row 0 (line 2 of the file) has more fields than the header's "
                f"{len(header)} columns {header}; quote values that contain {self.delimiter!r}, or check "
                f"delimiter={self.delimiter!r}"
            )
        return header, len(head)

    def blocks(
        self, usecols: list[str] | None = None, dtype: Any = None
    ) -> Iterator[tuple[int, pd.DataFrame]]:
        """``(first_row, block)`` for consecutive blocks of up to ``block_rows`` data rows; cells
        are kept as written (no missing-value conversion). Rows are 0-based over data rows.

        Only without ``usecols`` does pandas check that no row has more fields than the header
        (with it, extra fields are dropped silently)."""
        start = 0
        with self._read(usecols=usecols, dtype=dtype, chunksize=self.block_rows) as reader:
            for block in self._translate_errors(reader):
                yield start, block
                start += len(block)

    def _read(self, **kwargs: Any) -> Any:
        import pandas as pd

        kwargs = {"index_col": False, "na_filter": False, **kwargs}
        try:
            return pd.read_csv(self.path, sep=self.delimiter, encoding=self.encoding, **kwargs)
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise self._parse_error(e) from e

    def _translate_errors(self, reader: Any) -> Iterator[pd.DataFrame]:
        import pandas as pd

        try:
            yield from reader
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            raise self._parse_error(e) from e

    def _parse_error(self, e: Exception) -> InvalidSourceError:
        return InvalidSourceError(
            f"cannot read {str(self.path)!r} as CSV ({type(e).__name__}: {str(e).strip()}); check "
            f"delimiter={self.delimiter!r} and encoding={self.encoding!r}, and quote values that "
            "contain the delimiter"
        )


@dataclass(frozen=True)
class _Labels:
    """How the label column is stored: ``kind`` is ``"int"`` (int64 as written), ``"float"``
    (float32, regression targets) or ``"class"`` (int64 index into ``class_names``)."""

    column: str
    kind: str
    class_names: tuple[str, ...] = ()
    rows: int = 0

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32 if self.kind == "float" else np.int64)

    def encode(self, values: pd.Series, start: int = 0, path: str = "") -> np.ndarray:
        import pandas as pd

        if self.kind == "class":
            codes = pd.Categorical(values, categories=list(self.class_names)).codes.astype(np.int64)
            if (codes < 0).any():
                raise InvalidSourceError(
                    f"label column {self.column!r} holds a value that its first reading did not: "
                    "the file changed while being ingested"
                )
            return codes
        wide = pd.to_numeric(values).to_numpy(np.float64 if self.kind == "float" else self.dtype)
        if self.kind != "float":
            return wide
        with np.errstate(over="ignore"):
            out = wide.astype(self.dtype)
        overflow = np.isinf(out) & np.isfinite(wide)
        if overflow.any():
            i = int(np.argmax(overflow))
            raise CSVValueError(path, start + i, self.column, str(values.iloc[i]), _FLOAT32_RANGE)
        return out


@url_options
def ingest_csv(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    label_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_missing: bool = False,
    delimiter: str = ",",
    encoding: str = "utf-8",
    block_rows: int = 65536,
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
    """Ingest a CSV file with a header line: feature columns -> ``x``, the label column -> ``y``.

    Sample ``i`` is data row ``store.source_index[i]`` of the file (0-based, the header line
    not counted; line ``row + 2`` when no quoted cell spans lines), so no per-sample provenance
    array is stored: ``store.metadata["source"]`` names the file and its number of rows.

    Args:
        src: the CSV file; its first line names the columns.
        dest: ``*.zarr`` or ``*.h5`` / ``*.hdf5``.
        label_column: the column stored as ``y``; ``None`` for unlabeled data (``x`` only).
            Labels are stored as written if every label is an integer (``y`` int64), as
            float32 if every label is a number (regression), and otherwise as class names:
            ``y`` int64 is the index of the label in the sorted unique names
            (``metadata["class_names"]``, ``metadata["label_mapping"]``; note that string
            sorting puts ``"10"`` before ``"2"``).
        feature_columns: the columns stored as ``x``, in this order; default: every column
            but the label column and the ``exclude`` columns, in file order.
        exclude: columns left out (e.g. a string ``id`` or a date column), so that the others
            need not be listed in ``feature_columns``. Each must be in the header.
        allow_missing: store missing feature cells (empty, or a marker in
            :data:`MISSING_MARKERS` such as ``NA`` or ``NaN``) as NaN instead of raising.
        delimiter: the field separator.
        encoding: the file's text encoding.
        block_rows: about the rows read and converted at a time (memory is about a few
            blocks per parsing thread).
        chunk_len: samples per chunk (default: about 4 MiB of ``x``; with a label column, at
            most the number of rows).
        compression: ``None``, ``"lz4"``, ``"zstd"`` or ``"zlib"``.
        overwrite: replace an existing store at ``dest``.
        preshuffle: store the rows in a seeded random order of short blocks of rows (default),
            so that chunks mix labels even when the table is sorted by label, date or group.
            The table is read once into temporary uncompressed files beside ``dest`` (about
            ``4 * rows * (features + 1)`` bytes of disk, bounded memory), then written
            shuffled. ``False`` keeps the file's row order; it needs the temporary space only
            with a ``label_column`` (the labels are typed once the whole column was read, so
            the rows wait in the spool until then).
        seed: seed of the pre-shuffle.
        progress: show a progress bar.
        resume: if an earlier run of the same call (same file, size and modification time,
            same ``dest`` and arguments) was interrupted, go on from its last written chunk
            (default); ``False`` starts over.
        workers: threads that checksum, compress and write chunks while the file is parsed
            (default ``None``: every core this process may use; ``1``: all in this process).
            The store is the same bytes whatever the number.
        client: a ``dask.distributed.Client``: the cluster's workers compress the chunks (and,
            for a Zarr ``dest``, write them: ``dest``'s folder must be a path every worker
            sees); this process reads the source, writes HDF5 chunks and commits. The store is
            the same bytes as without a cluster. Overrides ``workers``.
        storage_options: for a ``dest`` in object storage (``s3://bucket/x.zarr``, ``gs://``,
            ...): credentials and endpoint, as for :func:`oocseq.open_store` (default: the
            environment's). Chunks go to the bucket as they are made, the manifest last.

    Returns:
        The opened Store: ``x`` float32 ``(n, len(feature_columns))``; ``y`` ``(n,)`` int64 or
        float32 when ``label_column`` is given. Metadata: ``feature_names``, ``label_column``,
        ``label_kind`` (``"int"``, ``"float"``, ``"class"``), ``class_names`` and
        ``label_mapping`` (class labels only), and ``source`` =
        ``{"kind": "csv", "path": <absolute path>, "rows": n}``.

    Raises:
        SourceNotFoundError: ``src`` does not exist, is empty, or has no data rows.
        InvalidSourceError: ``label_column`` or a feature column is not in the header (the
            message lists the header), the file cannot be parsed, or a label is missing
            (naming the row).
        CSVValueError: a feature cell is not a number, is missing without
            ``allow_missing``, or is out of float32's range (e.g. ``1e39``; naming the file,
            the 0-based data row and the column); the same for a float label.
        StoreExistsError: ``dest`` exists and ``overwrite`` is false.
    """
    require("pandas", "ingest_csv")
    if not isinstance(block_rows, int) or isinstance(block_rows, bool) or block_rows < 1:
        raise ArgumentError(f"block_rows must be a positive int, got {block_rows!r}")
    path = Path(src)
    if not path.is_file():
        raise SourceNotFoundError(f"CSV file {str(path)!r} does not exist or is not a file")
    reader = _Reader(path, delimiter, encoding, block_rows, progress)
    header, first_rows = reader.header()
    if first_rows == 0:
        raise SourceNotFoundError(f"CSV file {str(path)!r} has a header line but no data rows")
    feature_columns = _excluded(path, header, label_column, feature_columns, exclude)
    features = _feature_columns(path, header, label_column, feature_columns)
    st = path.stat()
    job = {
        "kind": "csv",
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "label_column": label_column,
        "features": features,
        "allow_missing": allow_missing,
        "delimiter": delimiter,
        "encoding": encoding,
        "block_rows": block_rows,
        "preshuffle": {"seed": seed} if preshuffle else None,
    }
    write_args: dict[str, Any] = {
        "chunk_len": chunk_len,
        "compression": compression,
        "overwrite": overwrite,
        "seed": seed,
        "progress": progress,
        "job": job,
        "resume": resume,
        "workers": workers,
        "client": client,
    }
    if _arrow_available():
        try:
            return _ingest_arrow(reader, dest, features, label_column, allow_missing, preshuffle, write_args)
        except _SlowPath:
            pass  # a table the fast path does not take as it is: read it as below, exactly
    labels = _scan_labels(reader, label_column) if label_column is not None else None

    specs = {"x": field_spec("x", (len(features),), np.float32, FEATURE_DIMS)}
    if labels is not None:
        specs["y"] = field_spec("y", (), labels.dtype)
        if chunk_len is None:  # a small table is one chunk of its own size, not a padded 4 MiB one
            chunk_len = choose_chunk_len(specs, labels.rows)
    dtype = {label_column: str} if label_column is not None else None
    rows = 0
    total = labels.rows if labels is not None else None
    if preshuffle:
        # The rows go to a spool on disk, then in a shuffled order to the store. Resumable: the
        # spool is made again from the file, and the order is a function of the seed.
        with (
            Spool(dest, overwrite) as spool,
            progress_bar(progress, total, f"read {path.name}", unit="row") as bar,
        ):
            for start, block in reader.blocks(dtype=dtype):  # all columns, so extra fields are errors
                spool.append("x", _features(block, features, start, str(path), allow_missing))
                if labels is not None:
                    spool.append("y", labels.encode(block[labels.column], start, str(path)))
                rows = start + len(block)
                bar.update(len(block))
            return _write(
                dest,
                spool.arrays(),
                {},
                chunk_len=chunk_len,
                compression=compression,
                overwrite=overwrite,
                metadata=_attrs(path, rows, features, labels),
                preshuffle=True,
                seed=seed,
                progress=progress,
                job=job,
                resume=resume,
                dims={"x": FEATURE_DIMS},
                workers=workers,
                client=client,
                before_commit=[spool.close],
            )
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
        progress_bar(progress, total, f"ingest {os.fspath(dest)}", unit="row") as bar,
    ):
        begin = int(w.resume_state["row"]) if w.resume_state else 0
        for start, block in reader.blocks(dtype=dtype):  # all columns, so extra fields are errors
            rows = start + len(block)
            if start < begin:  # written before the interruption (checkpoints are block starts)
                bar.update(len(block))
                continue
            w.checkpoint({"row": start})
            w.append("x", _features(block, features, start, str(path), allow_missing))
            if labels is not None:
                w.append("y", labels.encode(block[labels.column], start, str(path)))
            bar.update(len(block))
        w.attrs.update(_attrs(path, rows, features, labels))
        w.attrs["preshuffle"] = None  # as every ingestion records it
    return w.close()


class _SlowPath(Exception):
    """The fast path cannot store this table exactly as the reference path would (a cell that
    is not a clean number, a missing value, labels that change kind mid-file, a parse error):
    the table is read again by the reference path, which stores it or names the problem."""


def _arrow_available() -> bool:
    try:
        import pyarrow.csv  # noqa: F401
    except ImportError:
        return False
    return True


def _block_bytes(reader: _Reader) -> int:
    """Bytes of the file that hold about ``block_rows`` rows (from the first MiB's lines), at
    at most 16 MiB (the pieces parsed on all cores, one piece ahead of the one stored)."""
    with open(reader.path, "rb") as f:
        head = f.read(1 << 20)
    lines = max(1, head.count(b"\n") - 1)
    per_row = max(1, len(head) // (lines + 1))
    return int(min(max(reader.block_rows * per_row, 1 << 16), 1 << 24))


def _splits_at_bytes(encoding: str) -> bool:
    """Whether a line end and a quote are the bytes ``\n`` and ``"`` in ``encoding`` and no
    other character contains those bytes (UTF-8, Latin-1 and the other ASCII-based ones)."""
    try:  # UTF-16 and UTF-32 (any byte order) encode these two characters otherwise
        return '\n"'.encode(encoding) == b'\n"'
    except LookupError:
        return False


def _row_end_after_header(data: bytes) -> int:
    """Index just past the first line end of ``data`` outside quotes, or 0 if none."""
    start, quotes = 0, 0
    while (nl := data.find(b"\n", start)) >= 0:
        quotes += data.count(b'"', start, nl)
        if quotes % 2 == 0:
            return nl + 1
        start = nl + 1
    return 0


def _last_row_end(data: bytes) -> int:
    """Index just past the last line end of ``data`` outside quotes (an even number of quote
    characters before it, which holds for doubled quotes too), or 0 if none."""
    quotes, end = data.count(b'"'), len(data)
    while (nl := data.rfind(b"\n", 0, end)) >= 0:
        quotes -= data.count(b'"', nl + 1, end)
        if quotes % 2 == 0:
            return nl + 1
        end = nl
    return 0


def _text_pieces(path: Path, size: int) -> Generator[bytes, None, None]:
    """The file as pieces of whole rows, about ``size`` bytes each, every one starting with the
    header line so that it parses alone. A piece ends at a line end outside quoted cells (by
    the parity of the quote characters before it), so a well-formed quoted cell that holds a
    line end is not cut. (A quote character inside an unquoted cell breaks the parity; the
    pieces then usually fail to parse and the reference path reads the file, as for a quoted
    line end that pyarrow's own block splitting cuts: it runs with ``newlines_in_values``
    off, its default.)"""
    header = b""
    pending = b""
    with open(path, "rb") as f:
        while block := f.read(size):
            data = pending + block if pending else block
            if not header:
                cut = _row_end_after_header(data)
                if not cut:
                    pending = data
                    continue
                header, data = data[:cut], data[cut:]
            cut = _last_row_end(data)
            if not cut:
                pending = data
                continue
            yield header + data[:cut]
            pending = data[cut:]
    if pending or not header:
        yield header + pending


def _arrow_tables(
    reader: _Reader, read_options: Any, parse_options: Any, convert_options: Any
) -> Generator[Any, None, None]:
    """The file as pyarrow tables (or record batches), one per piece of about
    ``_block_bytes(reader)``. Where the encoding allows, pieces of whole rows are each parsed
    by ``pyarrow.csv.read_csv`` (all cores) in a helper thread, the next one while the caller
    stores this one: ``open_csv``'s streaming reader uses about one core. Other encodings
    (UTF-16, UTF-32) take the streaming reader. Raises what pyarrow raises."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    size = _block_bytes(reader)
    if not _splits_at_bytes(reader.encoding):
        # Blocks of at most 4 MiB: the streaming reader parses one block on each thread.
        options = pcsv.ReadOptions(use_threads=True, block_size=min(size, 1 << 22), encoding=reader.encoding)
        with pcsv.open_csv(
            reader.path, read_options=options, parse_options=parse_options, convert_options=convert_options
        ) as stream:
            yield from stream
        return
    pieces = _text_pieces(reader.path, size)

    def parse_next() -> Any:
        piece = next(pieces, None)
        if piece is None:
            return None
        return pcsv.read_csv(
            pa.py_buffer(piece),
            read_options=read_options,
            parse_options=parse_options,
            convert_options=convert_options,
        )

    # The pool is left first (waiting for a parse under way), then the file is closed.
    with closing(pieces), ThreadPoolExecutor(1, thread_name_prefix="oocseq-csv") as pool:
        future = pool.submit(parse_next)
        try:
            while (table := future.result()) is not None:
                future = pool.submit(parse_next)
                yield table
        finally:
            future.cancel()


def _arrow_blocks(
    reader: _Reader, features: list[str], label_column: str | None, allow_missing: bool
) -> Iterator[tuple[int, np.ndarray, Any]]:
    """``(first_row, x, labels)`` per piece of the file read by ``pyarrow.csv`` (the next
    piece parsed while this one is stored): ``x`` float32 ``(rows, len(features))``,
    ``labels`` the label texts (a pyarrow string array) or ``None``. Raises
    :class:`_SlowPath` for anything but clean numbers and labels."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    types = dict.fromkeys(features, pa.float64())
    if label_column is not None:
        types[label_column] = pa.string()
    try:
        tables = _arrow_tables(
            reader,
            pcsv.ReadOptions(use_threads=True, encoding=reader.encoding),
            pcsv.ParseOptions(delimiter=reader.delimiter),
            pcsv.ConvertOptions(
                column_types=types,
                include_columns=list(types),
                null_values=sorted(MISSING_MARKERS),
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowException, ValueError, TypeError, LookupError) as e:
        raise _SlowPath from e
    markers = pa.array(sorted(MISSING_MARKERS))
    start = 0
    with closing(tables):
        while True:
            try:
                batch = next(tables)
            except StopIteration:
                return
            except (pa.ArrowException, ValueError, TypeError, LookupError, UnicodeDecodeError) as e:
                raise _SlowPath from e
            k = batch.num_rows
            # Column by column into contiguous rows of the transpose, then one transposing copy:
            # quicker than writing each column with a stride of a whole row.
            xt = np.empty((len(features), k), dtype=np.float32)
            columns = [batch.column(name) for name in features]
            if not allow_missing and any(col.null_count for col in columns):
                raise _SlowPath  # the reference path names the missing cell
            with np.errstate(over="ignore"):
                for j, col in enumerate(columns):
                    _float32_into(xt[j], col)
            if np.isinf(xt).any() and any(_overflows(xt[j], col) for j, col in enumerate(columns)):
                raise _SlowPath  # float32 overflow: named with the cell's text there
            x = np.ascontiguousarray(xt.T)
            labels = None
            if label_column is not None:
                labels = batch.column(label_column)
                if pc.any(pc.is_in(pc.utf8_trim_whitespace(labels), value_set=markers)).as_py():
                    raise _SlowPath  # a row without a label: named there
            yield start, x, labels
            start += k


def _float32_into(out: np.ndarray, col: Any) -> None:
    """Write a float64 pyarrow column (an array or a chunked array) into float32 ``out``,
    chunk by chunk (no float64 copy of the whole column)."""
    at = 0
    for chunk in getattr(col, "chunks", [col]):
        values = chunk.to_numpy(zero_copy_only=False)
        out[at : at + len(values)] = values
        at += len(values)


def _overflows(out: np.ndarray, col: Any) -> bool:
    """Whether float32 ``out`` holds an infinity where float64 ``col`` holds a finite value."""
    inf = np.isinf(out)
    return bool(inf.any() and (inf & np.isfinite(col.to_numpy(zero_copy_only=False))).any())


class _LabelCodes:
    """Label texts turned into numbers in one pass. The first block decides: integers
    (``"int"``, int64 values), numbers (``"float"``, float64 values), or text (``"class"``,
    int64 codes in first-seen order, remapped to the sorted names at the end). A later block
    of another kind raises :class:`_SlowPath` (the reference path reads the labels twice)."""

    def __init__(self, column: str) -> None:
        self.column = column
        self.kind: str | None = None
        self.first_seen: dict[str, int] = {}

    def encode(self, texts: Any) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        for kind, arrow_type in (("int", pa.int64()), ("float", pa.float64())):
            if self.kind in (None, kind):
                try:
                    values = pc.cast(texts, arrow_type).to_numpy(zero_copy_only=False)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    continue
                self.kind = kind
                return values
        if self.kind not in (None, "class"):
            raise _SlowPath  # numbers first, text later: the labels are class names after all
        self.kind = "class"
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        encoded = pc.dictionary_encode(texts)
        ids = np.asarray(
            [self.first_seen.setdefault(t, len(self.first_seen)) for t in encoded.dictionary.to_pylist()],
            dtype=np.int64,
        )
        return ids[encoded.indices.to_numpy(zero_copy_only=False)]

    def finish(self, rows: int) -> tuple[_Labels, Any]:
        """The labels' description and ``remap(values) -> y`` for the spooled values."""
        import pandas as pd

        if self.kind == "class":
            names = sorted(self.first_seen)
            if pd.to_numeric(pd.Series(names, dtype=object), errors="coerce").notna().all():
                raise _SlowPath  # numbers pyarrow did not parse (e.g. " 3"): pandas's rules decide
            rank = np.empty(len(names), dtype=np.int64)
            order = {name: i for i, name in enumerate(names)}
            for text, i in self.first_seen.items():
                rank[i] = order[text]
            return _Labels(self.column, "class", tuple(names), rows=rows), lambda v: rank[np.asarray(v)]
        if self.kind == "float":

            def to_float32(v: Any) -> np.ndarray:
                wide = np.asarray(v, dtype=np.float64)
                with np.errstate(over="ignore"):
                    out = wide.astype(np.float32)
                if (np.isinf(out) & np.isfinite(wide)).any():
                    raise _SlowPath  # float32 overflow: named with the cell's text there
                return out

            return _Labels(self.column, "float", rows=rows), to_float32
        return _Labels(self.column, "int", rows=rows), lambda v: np.asarray(v, dtype=np.int64)


class _Mapped:
    """An array-like (shape, dtype, slicing) whose rows are ``fn(base[rows])``."""

    def __init__(self, base: Any, fn: Any, dtype: np.dtype) -> None:
        self.base, self.fn, self.dtype = base, fn, np.dtype(dtype)
        self.shape = tuple(base.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.fn(self.base[key])


def _ingest_arrow(
    reader: _Reader,
    dest: str | os.PathLike[str],
    features: list[str],
    label_column: str | None,
    allow_missing: bool,
    preshuffle: bool,
    write_args: dict[str, Any],
) -> Store:
    """One pass of ``pyarrow.csv`` over the file. Without labels and pre-shuffle, rows go
    straight to the store; otherwise to a spool (labels are typed only at the end of the pass,
    and a pre-shuffle reads rows out of order), then to the store. Raises _SlowPath."""
    path = reader.path
    progress = write_args["progress"]
    if label_column is None and not preshuffle:
        specs = {"x": field_spec("x", (len(features),), np.float32, FEATURE_DIMS)}
        with (
            open_writer(
                dest,
                specs,
                chunk_len=write_args["chunk_len"],
                compression=write_args["compression"],
                overwrite=write_args["overwrite"],
                job=write_args["job"],
                resume=write_args["resume"],
                workers=write_args["workers"],
                client=write_args["client"],
            ) as w,
            progress_bar(progress, None, f"ingest {os.fspath(dest)}", unit="row") as bar,
        ):
            begin = int(w.resume_state["row"]) if w.resume_state else 0
            rows = 0
            for start, x, _ in _arrow_blocks(reader, features, None, allow_missing):
                rows = start + len(x)
                if start >= begin:  # else written before the interruption (checkpoints: block starts)
                    w.checkpoint({"row": start})
                    w.append("x", x)
                bar.update(len(x))
            w.attrs.update(_attrs(path, rows, features, None))
            w.attrs["preshuffle"] = None
        return w.close()
    codes = _LabelCodes(label_column) if label_column is not None else None
    rows = 0
    with (
        Spool(dest, write_args["overwrite"]) as spool,
        progress_bar(progress, None, f"read {path.name}", unit="row") as bar,
    ):
        for start, x, texts in _arrow_blocks(reader, features, label_column, allow_missing):
            if not len(x):
                continue
            spool.append("x", x)
            if codes is not None:
                spool.append("y", codes.encode(texts))
            rows = start + len(x)
            bar.update(len(x))
        arrays: dict[str, Any] = spool.arrays()
        labels = None
        if codes is not None:
            labels, remap = codes.finish(rows)
            arrays["y"] = _Mapped(arrays["y"], remap, labels.dtype)
        return _write(
            dest,
            arrays,
            {},
            metadata=_attrs(path, rows, features, labels),
            preshuffle=preshuffle,
            before_commit=[spool.close],
            dims={"x": FEATURE_DIMS},
            **write_args,
        )


def _feature_columns(
    path: Path, header: list[str], label_column: str | None, feature_columns: Sequence[str] | None
) -> list[str]:
    """Validate ``label_column`` and ``feature_columns`` against the header."""
    if label_column is not None and label_column not in header:
        raise InvalidSourceError(
            f"{str(path)!r} has no column {label_column!r} (label_column); its header is {header}"
        )
    if feature_columns is None:
        features = [c for c in header if c != label_column]
    else:
        features = [feature_columns] if isinstance(feature_columns, str) else list(feature_columns)
        unknown = [c for c in features if c not in header]
        if unknown:
            raise InvalidSourceError(
                f"{str(path)!r} has no column(s) {unknown} (feature_columns); its header is {header}"
            )
        duplicates = sorted({c for c in features if features.count(c) > 1})
        if duplicates:
            raise InvalidSourceError(f"feature_columns lists {duplicates} more than once")
        if label_column in features:
            raise InvalidSourceError(f"column {label_column!r} is both the label_column and a feature column")
    if not features:
        raise InvalidSourceError(f"{str(path)!r}: no feature columns to store; its header is {header}")
    return features


def _excluded(
    path: Path,
    header: list[str],
    label_column: str | None,
    feature_columns: Sequence[str] | None,
    exclude: Sequence[str] | None,
) -> Sequence[str] | None:
    """The feature columns given ``exclude``: ``feature_columns``, or the header's columns but
    the label and the excluded ones. Raises InvalidSourceError for an excluded column not in
    the header, or one that ``feature_columns`` or ``label_column`` also names."""
    if exclude is None:
        return feature_columns
    dropped = [exclude] if isinstance(exclude, str) else list(exclude)
    unknown = [c for c in dropped if c not in header]
    if unknown:
        raise InvalidSourceError(
            f"{str(path)!r} has no column(s) {unknown} (exclude); its header is {header}"
        )
    if feature_columns is not None:
        chosen = [feature_columns] if isinstance(feature_columns, str) else list(feature_columns)
        both = [c for c in chosen if c in dropped]
        if both:
            raise InvalidSourceError(f"column(s) {both} are both in feature_columns and in exclude")
        return chosen
    if label_column in dropped:
        raise InvalidSourceError(f"column {label_column!r} is both the label_column and in exclude")
    return [c for c in header if c not in dropped and c != label_column]


def _missing(text: pd.Series) -> np.ndarray:
    """Boolean mask of the cells of a text column that hold no value."""
    return (text.isna() | text.str.strip().isin(MISSING_MARKERS)).to_numpy(bool)


def _label_blocks(reader: _Reader, column: str) -> Iterator[tuple[int, pd.Series]]:
    """``(first_row, label texts)`` per block. Raises InvalidSourceError naming the first row
    without a label."""
    with progress_bar(reader.progress, None, f"scan labels {column!r}", unit="row") as bar:
        yield from _counted(_checked_labels(reader, column), bar)


def _counted(blocks: Iterator[tuple[int, pd.Series]], bar: Any) -> Iterator[tuple[int, pd.Series]]:
    for start, text in blocks:
        bar.update(len(text))
        yield start, text


def _checked_labels(reader: _Reader, column: str) -> Iterator[tuple[int, pd.Series]]:
    for start, block in reader.blocks([column], dtype=str):
        text = block[column]
        missing = _missing(text)
        if missing.any():
            row = start + int(np.argmax(missing))
            raise InvalidSourceError(
                f"{str(reader.path)!r}: row {row} (line {row + 2} of the file) has no label in column "
                f"{column!r} (value {text.iloc[row - start]!r}). Every row needs a label: fill it in or "
                "remove the row."
            )
        yield start, text


def _scan_labels(reader: _Reader, column: str) -> _Labels:
    """Read the label column alone to decide the label kind (and the class names).

    Numeric labels need one pass, class labels a second one that collects the names: only
    class labels are gathered in memory, never a regression target's values."""
    import pandas as pd

    all_int = True
    rows = 0
    for start, text in _label_blocks(reader, column):
        numbers = pd.to_numeric(text, errors="coerce")
        if numbers.isna().any():
            return _class_labels(reader, column)
        all_int = all_int and numbers.dtype.kind == "i"
        rows = start + len(text)
    return _Labels(column, "int" if all_int else "float", rows=rows)


def _class_labels(reader: _Reader, column: str) -> _Labels:
    names: set[str] = set()
    rows = 0
    for start, text in _label_blocks(reader, column):
        names.update(text.unique().tolist())
        rows = start + len(text)
    return _Labels(column, "class", tuple(sorted(names)), rows=rows)


def _features(
    block: pd.DataFrame, features: list[str], start: int, path: str, allow_missing: bool
) -> np.ndarray:
    """The block's feature columns as float32 ``(rows, len(features))``.

    Raises CSVValueError for the first (by row, then column) cell that is not a number, is
    missing while ``allow_missing`` is false, or overflows float32 (a finite value that would
    be stored as ``inf``)."""
    out = np.empty((len(block), len(features)), dtype=np.float32)
    first: tuple[int, int, str] | None = None  # (row in block, column index, what is expected)
    for j, name in enumerate(features):
        values, missing, bad = _numeric_column(block[name])
        problem = bad | missing if not allow_missing else bad
        with np.errstate(over="ignore"):
            out[:, j] = values
        overflow = np.isinf(out[:, j]) & np.isfinite(values)
        problem = problem | overflow
        if problem.any():
            i = int(np.argmax(problem))
            if first is None or (i, j) < first[:2]:
                expected = _MISSING_HINT if missing[i] else _FLOAT32_RANGE if overflow[i] else "a number"
                first = (i, j, expected)
    if first is not None:
        i, j, expected = first
        value = block[features[j]].iloc[i]
        raise CSVValueError(path, start + i, features[j], "" if _is_na(value) else str(value), expected)
    return out


def _numeric_column(col: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, missing, bad)`` of one feature column: float64 values (NaN where missing or
    bad) and boolean masks of missing cells and of cells that are not numbers."""
    import pandas as pd

    if col.dtype.kind in "iuf":  # pandas parsed every cell as a number (a short row gives NaN)
        values = col.to_numpy(np.float64)
        missing = np.isnan(values)
        return values, missing, np.zeros(len(col), dtype=bool)
    text = col.astype(str).where(col.notna())  # True/False are text here, not numbers
    values = pd.to_numeric(text, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    missing = _missing(text)
    return values, missing, np.isnan(values) & ~missing


def _is_na(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _attrs(path: Path, rows: int, features: list[str], labels: _Labels | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "feature_names": features,
        "label_column": None if labels is None else labels.column,
        "label_kind": None if labels is None else labels.kind,
        "source": {"kind": "csv", "path": str(path.resolve()), "rows": rows},
    }
    if labels is not None and labels.kind == "class":
        attrs["class_names"] = list(labels.class_names)
        attrs["label_mapping"] = {name: i for i, name in enumerate(labels.class_names)}
    return attrs
