"""The ``oocseq`` command line: ingest files into a store, describe a store, verify it.

::

    oocseq ingest images SRC DEST --size 32x32     # one subfolder per class
    oocseq ingest csv SRC DEST --label COLUMN      # numeric features -> x, labels -> y
    oocseq ingest npy SRC [SRC ...] DEST           # .npy files concatenated along axis 0
    oocseq info STORE                              # fields, chunking, compression, classes
    oocseq verify STORE                            # read every chunk, check its checksum
    oocseq bench STORE                             # samples/s of a shuffled epoch here

Errors print ``oocseq: error: <message>`` on stderr and exit with status 1 (2 for a wrong
command line). Importing this module imports no ML framework; each command imports what it
needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from .errors import OocseqError

__all__ = ["main", "build_parser", "describe", "parse_size"]

_COMPRESSIONS = ("lz4", "zstd", "zlib", "none")
#: Feature names listed by ``oocseq info`` before it abbreviates.
_MAX_NAMES_SHOWN = 20
#: Skipped files listed one per line by ``oocseq ingest`` before it abbreviates.
_MAX_SKIPPED_SHOWN = 5


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``oocseq`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit
    status: 0 on success, 1 on an error, 2 for a wrong command line."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits after --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    try:
        with contextlib.ExitStack() as stack:
            if getattr(args, "scheduler", None):
                args.client = stack.enter_context(_connect(args.scheduler))
            args.run(args)
    except (OocseqError, ValueError, OSError) as e:
        print(f"oocseq: error: {cli_message(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("oocseq: interrupted", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oocseq",
        description="Ingest files into chunked Zarr v3 / HDF5 stores and inspect them.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = commands.add_parser("ingest", help="convert files into a store (DEST: *.zarr, *.h5 or *.hdf5)")
    sources = ingest.add_subparsers(dest="source", required=True, metavar="SOURCE")
    common = _ingest_options()
    _add_images(sources, common)
    _add_csv(sources, common)
    _add_npy(sources, common)

    info = commands.add_parser("info", help="describe a store: fields, chunking, compression, classes")
    info.add_argument("store", metavar="STORE")
    info.add_argument(
        "--shuffle",
        action="store_true",
        help="also report how a shuffled epoch mixes: chunks and label entropy per batch against iid",
    )
    info.add_argument(
        "--batch-size",
        type=_positive_int,
        default=128,
        help="batch size of the --shuffle report (default 128)",
    )
    info.add_argument("--window", type=_positive_int, default=None, help="chunks per window for --shuffle")
    info.set_defaults(run=_run_info)

    verify = commands.add_parser("verify", help="read every chunk of a store and check its checksum")
    verify.add_argument("store", metavar="STORE")
    verify.set_defaults(run=_run_verify)

    convert = commands.add_parser(
        "convert",
        help="write a store again in the other format (*.h5 <-> *.zarr), checking every chunk",
    )
    convert.add_argument("src", metavar="SRC", help="a store: path or URL (s3://..., https://...)")
    convert.add_argument("dest", metavar="DEST", help="the new store: *.zarr, *.h5 or *.hdf5")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing oocseq store at DEST")
    convert.set_defaults(run=_run_convert)

    bench = commands.add_parser(
        "bench", help="time a shuffled epoch of a store: samples/s, MB/s, chunk decodes, memory"
    )
    bench.add_argument("store", metavar="STORE")
    bench.add_argument(
        "--batch-size", type=_positive_int, default=128, help="samples per batch (default 128)"
    )
    bench.add_argument("--window", type=_positive_int, default=None, help="chunks per shuffle window")
    bench.add_argument(
        "--threads", type=int, default=None, help="decoding threads (default: cores - 1, 1 to 4)"
    )
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(run=_run_bench)
    return parser


# -- error messages in the command line's words ----------------------------------------------

#: How the library's messages name its keyword arguments, and what the command line calls
#: them; applied in order to the messages of errors raised under the command.
_FLAG_NAMES: tuple[tuple[str, str], ...] = (
    (r"\boverwrite=True\b", "--overwrite"),
    (r"\ballow_missing=True\b", "--allow-missing"),
    (r"\bon_error='skip'", "--on-error skip"),
    (r"\bexclude=\[([^\]]*)\]", "--exclude {cols}"),
    (r"\bfeature_columns=\[([^\]]*)\]", "--features {cols}"),
    (r"\bdelimiter=('[^']*'|\"[^\"]*\")", "--delimiter {value}"),
    (r"\bencoding=('[^']*'|\"[^\"]*\")", "--encoding {value}"),
    (r"\bchunk_len=(\d+)", "--chunk-len {value}"),
    # bare names only where the message names an argument, never inside a path
    (r"\((label_column|feature_columns|exclude)\)", "({flag})"),
    (r"\b(?<=the )label_column\b", "--label"),
    (r"\b(?<=in )(feature_columns|exclude)\b", "{flag}"),
)


_ARG_FLAGS = {"label_column": "--label", "feature_columns": "--features", "exclude": "--exclude"}


def cli_message(message: str) -> str:
    """An error message of the library with its keyword arguments named as the command line's
    flags (``overwrite=True`` -> ``--overwrite``, ``exclude=['id']`` -> ``--exclude id``)."""
    import re

    def flag(template: str) -> Any:
        def sub(m: re.Match[str]) -> str:
            if "{cols}" in template:
                cols = ",".join(c.strip().strip("'\"") for c in m.group(1).split(",") if c.strip())
                return template.format(cols=cols or "A,B")
            if "{value}" in template:
                return template.format(value=m.group(1))
            if "{flag}" in template:
                return template.format(flag=_ARG_FLAGS[m.group(1)])
            return template

        return sub

    for pattern, template in _FLAG_NAMES:
        message = re.sub(pattern, flag(template), message)
    return message


# -- argument types ---------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """``"HEIGHTxWIDTH"`` (e.g. ``"32x48"``) or ``"N"`` (square) -> ``(height, width)``.

    Raises argparse.ArgumentTypeError (argparse shows its message) for anything else."""
    try:
        numbers = [int(part) for part in text.lower().split("x")]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH in pixels, e.g. 32x32; got {text!r}")
    return numbers[0], numbers[-1]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _column_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return names


# -- ingest ------------------------------------------------------------------------------------


def _ingest_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--chunk-len",
        type=_positive_int,
        metavar="N",
        help="samples per chunk (default: about 4 MiB of the widest field)",
    )
    common.add_argument(
        "--compression", choices=_COMPRESSIONS, default="lz4", help="Blosc codec of the chunks (default: lz4)"
    )
    common.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    common.add_argument(
        "--no-preshuffle",
        dest="preshuffle",
        action="store_false",
        help="keep the source's order instead of a seeded shuffle (a source sorted by label then "
        "gives batches of few classes)",
    )
    common.add_argument("--seed", type=int, default=0, help="seed of the pre-shuffle (default: 0)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="processes/threads that decode, compress and write at once (default: all cores; 1: none)",
    )
    common.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="a Dask scheduler (e.g. tcp://host:8786): its workers decode and compress the chunks; "
        "DEST's folder and the sources must be paths every worker sees",
    )
    return common


def _connect(address: str) -> Any:
    """A Dask client of the scheduler at ``address`` (closed on leaving)."""
    from ._optional import require

    distributed = require("distributed", "--scheduler")
    try:
        return distributed.Client(address, timeout=30)
    except (OSError, TimeoutError) as e:
        raise OocseqError(
            f"cannot connect to the Dask scheduler at {address!r} ({type(e).__name__}: {e}); start one "
            "with `dask scheduler` and workers with `dask worker ADDRESS`, or leave out --scheduler"
        ) from None


def _writer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "chunk_len": args.chunk_len,
        "compression": None if args.compression == "none" else args.compression,
        "overwrite": args.overwrite,
        "preshuffle": args.preshuffle,
        "seed": args.seed,
        "progress": not args.quiet,
        "workers": args.workers,
        "client": getattr(args, "client", None),
    }


def _add_images(sources: Any, common: argparse.ArgumentParser) -> None:
    p = sources.add_parser("images", parents=[common], help="a folder with one subfolder of images per class")
    p.add_argument("src", metavar="SRC", help="the folder: SRC/<class name>/<image files>")
    p.add_argument("dest", metavar="DEST")
    p.add_argument(
        "--size",
        type=parse_size,
        required=True,
        metavar="HxW",
        help="resize every image to HEIGHTxWIDTH pixels, e.g. 32x32",
    )
    p.add_argument("--color-mode", choices=("rgb", "grayscale", "rgba"), default="rgb")
    p.add_argument(
        "--interpolation",
        default="bilinear",
        choices=("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"),
    )
    p.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="stop at an unreadable image (default), or skip and list it in the metadata",
    )
    p.set_defaults(run=_run_ingest_images)


def _reports(unit: str) -> Any:
    """Decorate an ingest command (which returns the store it wrote): time it and print what it
    did (:func:`ingest_report`). Skipped images are reported there, not as Python warnings."""

    def wrap(run: Any) -> Any:
        @functools.wraps(run)
        def timed(args: argparse.Namespace) -> None:
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"skipped \d+ image file", UserWarning)
                store = run(args)
            print(ingest_report(store, time.perf_counter() - started, unit))

        return timed

    return wrap


@_reports("images")
def _run_ingest_images(args: argparse.Namespace) -> Any:
    from .ingest.images import ingest_image_folder

    store = ingest_image_folder(
        args.src,
        args.dest,
        image_size=args.size,
        color_mode=args.color_mode,
        interpolation=args.interpolation,
        on_error=args.on_error,
        **_writer_kwargs(args),
    )
    return store


def _add_csv(sources: Any, common: argparse.ArgumentParser) -> None:
    p = sources.add_parser("csv", parents=[common], help="a CSV table with a header line")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--label", metavar="COLUMN", help="the label column, stored as y (default: no labels)")
    p.add_argument(
        "--features",
        type=_column_list,
        metavar="A,B,C",
        help="feature columns, stored as x in this order (default: all but the label)",
    )
    p.add_argument(
        "--exclude",
        type=_column_list,
        metavar="A,B",
        help="columns left out (e.g. an id or a date), so the others need not be listed in --features",
    )
    p.add_argument("--allow-missing", action="store_true", help="store empty feature cells as NaN")
    p.add_argument("--delimiter", default=",", help="field separator (default: ',')")
    p.add_argument("--encoding", default="utf-8", help="text encoding (default: utf-8)")
    p.add_argument(
        "--block-rows",
        type=_positive_int,
        default=65536,
        metavar="N",
        help="rows read at a time (default: 65536)",
    )
    p.set_defaults(run=_run_ingest_csv)


@_reports("rows")
def _run_ingest_csv(args: argparse.Namespace) -> Any:
    from .ingest.csv import ingest_csv

    store = ingest_csv(
        args.src,
        args.dest,
        label_column=args.label,
        feature_columns=args.features,
        exclude=args.exclude,
        allow_missing=args.allow_missing,
        delimiter=args.delimiter,
        encoding=args.encoding,
        block_rows=args.block_rows,
        **_writer_kwargs(args),
    )
    return store


def _add_npy(sources: Any, common: argparse.ArgumentParser) -> None:
    p = sources.add_parser("npy", parents=[common], help=".npy files, concatenated along axis 0")
    p.add_argument("src", nargs="+", metavar="SRC", help=".npy files, in order")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--field", default="x", help="the field name (default: x)")
    p.set_defaults(run=_run_ingest_npy)


@_reports("samples")
def _run_ingest_npy(args: argparse.Namespace) -> Any:
    from .ingest.npy import ingest_npy

    return ingest_npy(args.src, args.dest, field=args.field, **_writer_kwargs(args))


def ingest_report(store: Any, seconds: float, unit: str = "samples") -> str:
    """What ``oocseq ingest`` prints: the store written, its samples and fields; bytes read
    from the source and written (and uncompressed, with the compression ratio); the time and
    rate (``unit`` per second, MB/s read); the files skipped and why.

    Bytes read are the sizes of the source files now (images: the files written and those
    skipped; a CSV or .npy: the whole files)."""
    n = len(store)
    fields = ", ".join(f"{name} {_shape(info.shape)} {info.dtype}" for name, info in store.fields.items())
    raw = sum(math.prod(info.shape) * info.dtype.itemsize for info in store.fields.values())
    stored = sum(store.stored_nbytes(name) for name in store.fields)
    files, read = _source_bytes(store)
    skipped = store.metadata.get("skipped") or []
    ratio = f"ratio {raw / stored:.2f}x" if stored else "no chunks"
    source = f"read {_bytes(read)} from {files} file{'' if files == 1 else 's'}; " if files else ""
    rate = n / seconds if seconds > 0 else float("inf")
    lines = [
        f"wrote {store.location} ({store.format}): {n} samples; {fields}",
        f"  {source}wrote {_bytes(stored)} of chunks ({_bytes(raw)} uncompressed, {ratio}"
        + ("" if store.url is not None else f"; {_bytes(_disk_bytes(store.path))} on disk")
        + ")",
        f"  {seconds:.1f} s: {rate:,.0f} {unit}/s"
        + (f", {_bytes(int(read / seconds))}/s read" if files and seconds > 0 else ""),
    ]
    if skipped:
        reasons: dict[str, int] = {}
        for entry in skipped:
            why = str(entry.get("error", "?")).split(":")[0]
            reasons[why] = reasons.get(why, 0) + 1
        lines.append(
            f"  skipped {len(skipped)} file{'' if len(skipped) == 1 else 's'}: "
            + "; ".join(f"{count} {why}" for why, count in sorted(reasons.items(), key=lambda kv: -kv[1]))
        )
        for entry in skipped[:_MAX_SKIPPED_SHOWN]:
            lines.append(f"    {entry.get('path')}: {entry.get('error')}")
        if len(skipped) > _MAX_SKIPPED_SHOWN:
            lines.append(f"    ... ({len(skipped) - _MAX_SKIPPED_SHOWN} more)")
        lines.append('    (all are listed in the store\'s metadata, key "skipped")')
    return "\n".join(lines)


def _source_bytes(store: Any) -> tuple[int, int]:
    """``(files, bytes)`` of the source the store's metadata names (0, 0 if unknown)."""
    import os

    source = store.metadata.get("source") or {}
    kind = source.get("kind")
    paths: list[str] = []
    if kind == "csv" and source.get("path"):
        paths = [source["path"]]
    elif kind == "npy":
        paths = [str(f.get("path")) for f in source.get("files", []) if isinstance(f, dict)]
    elif kind == "image_folder" and source.get("root"):
        root = source["root"]
        listed = [str(s) for s in (store.sources if store.sources is not None else [])]
        listed += [str(e.get("path")) for e in store.metadata.get("skipped") or []]
        paths = [os.path.join(root, p) for p in listed]
    total = 0
    for p in paths:
        try:
            total += os.stat(p).st_size
        except (OSError, TypeError, ValueError):
            continue
    return len(paths), total


def _disk_bytes(path: Any) -> int:
    """Bytes of a store's files (a directory's, or a file's)."""
    from pathlib import Path

    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


# -- info, verify ------------------------------------------------------------------------------


def _run_info(args: argparse.Namespace) -> None:
    from .store import open_store

    store = open_store(args.store)
    print(describe(store))
    if args.shuffle:
        print()
        print(_shuffle_report(store, args.batch_size, args.window))


def _shuffle_report(store: Any, batch_size: int, window: int | None) -> Any:
    """The shuffle report of a default shuffled sequence over ``store`` (epoch 0)."""
    import warnings

    from .sequence import ChunkedSequence

    label = _label_field(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report says it in full
        x = next((name for name in store.fields if name != label), label)
        seq = ChunkedSequence(store, batch_size, x=x, y=label, window=window)
    try:
        return seq.shuffle_report()
    finally:
        seq.close()


def _label_field(store: Any) -> str | None:
    """The field the shuffle report measures: ``y``, else the first field of class indices
    (a multi-output DataFrame's ``y_col=[...]``), else none."""
    if "y" in store.fields:
        return "y"
    per_field = store.metadata.get("field_class_names")
    if isinstance(per_field, dict):
        for name in per_field:
            if name in store.fields and store.fields[name].dtype.kind in "iu":
                return str(name)
    return None


def _run_verify(args: argparse.Namespace) -> None:
    from .store import open_store

    store = open_store(args.store)
    checked = store.verify()
    print(
        f"OK {store.location}: all {checked} chunks ({store.num_chunks} per field, {len(store.fields)} "
        f"field(s)) match their {store.manifest.checksum} checksums"
    )


def _run_convert(args: argparse.Namespace) -> None:
    from .ingest.convert import convert_store

    store = convert_store(args.src, args.dest, overwrite=args.overwrite)
    print(
        f"wrote {store.location} ({store.format}): {len(store)} samples, {store.num_chunks} chunks "
        f"per field, every chunk checked against {args.src}'s checksums"
    )


def _run_bench(args: argparse.Namespace) -> None:
    from .bench import bench_store, format_results
    from .sequence import ReadOptions
    from .store import open_store

    store = open_store(args.store)
    results = bench_store(
        store,
        batch_size=args.batch_size,
        window=args.window,
        read=ReadOptions(threads=args.threads),
        progress=not args.quiet,
    )
    print(format_results(store, results))
    print()
    print(_shuffle_report(store, args.batch_size, args.window))


def describe(store: Any) -> str:
    """What ``oocseq info`` prints about an opened :class:`~oocseq.store.Store`.

    Reads the ``y`` field chunk by chunk to count the samples of each class when the store
    has class names."""
    meta = store.metadata
    lines = [
        f"store:        {store.location}",
        f"format:       {store.format} (oocseq format version {meta['format_version']})",
        f"samples:      {len(store)}",
        f"chunk_len:    {store.chunk_len} ({store.num_chunks} chunk{'' if store.num_chunks == 1 else 's'})",
        f"compression:  {_compression(meta['compression'])}",
        f"checksums:    {meta['checksum'].upper()} per chunk, checked when a chunk is "
        + ("read (every read: object storage)" if store.url else "first read"),
        "",
        *_field_table(store),
    ]
    class_names = meta.get("class_names")
    if class_names and "y" in store.fields and store.fields["y"].dtype.kind in "iu":
        lines += ["", *_class_table(store, list(class_names))]
    per_field = meta.get("field_class_names")
    if isinstance(per_field, dict):
        for name, names in per_field.items():
            if name != "y" and isinstance(names, list):
                lines += ["", f"classes of {name} ({len(names)}): {_abbreviate(names)}"]
    feature_names = meta.get("feature_names")
    if feature_names:
        lines += ["", f"features ({len(feature_names)}): {_abbreviate(feature_names)}"]
    source = meta.get("source")
    if isinstance(source, dict):
        lines += ["", f"source:       {_source(source)}"]
    return "\n".join(lines)


def _field_table(store: Any) -> list[str]:
    rows = [("field", "shape", "dtype", "stored", "uncompressed", "ratio")]
    for name, info in store.fields.items():
        raw = math.prod(info.shape) * info.dtype.itemsize
        stored = store.stored_nbytes(name)
        ratio = f"{raw / stored:.2f}x" if stored else "-"
        rows.append((name, _shape(info.shape), str(info.dtype), _bytes(stored), _bytes(raw), ratio))
    return _table(rows, right=(3, 4, 5))


def _class_table(store: Any, class_names: list[str]) -> list[str]:
    import numpy as np

    k = len(class_names)
    counts = np.zeros(k, dtype=np.int64)
    outside = 0
    for c in range(store.num_chunks):
        y = store.read_chunk("y", c).astype(np.int64, copy=False)
        valid = (y >= 0) & (y < k)
        counts += np.bincount(y[valid], minlength=k)
        outside += int(y.size - valid.sum())
    rows = [("label", "class", "samples")]
    rows += [
        (str(i), str(name), str(int(n))) for i, (name, n) in enumerate(zip(class_names, counts, strict=True))
    ]
    lines = [f"classes ({k}):", *_table(rows, right=(0, 2))]
    if outside:
        lines.append(f"  {outside} sample(s) have a label outside 0..{k - 1}")
    return lines


def _table(rows: Sequence[tuple[str, ...]], right: tuple[int, ...]) -> list[str]:
    widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.rjust(w) if j in right else cell.ljust(w)
            for j, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _compression(comp: Any) -> str:
    if not comp:
        return "none"
    return f"{comp.get('codec')} {comp.get('cname')} (level {comp.get('clevel')})"


def _abbreviate(names: list[Any]) -> str:
    shown = ", ".join(str(n) for n in names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _source(source: dict[str, Any]) -> str:
    """One line: the source's kind, path or folder, and how many rows or files."""
    parts = [str(source.get("kind", "?"))]
    for key in ("path", "root", "directory"):
        if source.get(key):
            parts.append(str(source[key]))
    if "rows" in source:
        parts.append(f"{source['rows']} rows")
    files = source.get("files")
    if isinstance(files, list):
        parts.append(f"{len(files)} file(s)")
    elif isinstance(files, int):
        parts.append(f"{files} files")
    return ", ".join(parts)
