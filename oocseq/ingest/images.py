"""Ingest images: a folder with one subfolder per class, or a DataFrame of paths and labels.

Images are decoded with Pillow in a thread pool (Pillow releases the GIL while decoding and
resizing), in deterministic order, and written chunk by chunk. Fields: ``x`` uint8
``(n, H, W, C)`` and ``y`` (int64 class index, or the label values as given).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._optional import require
from ..errors import ArgumentError, ImageDecodeError, InvalidSourceError, SourceNotFoundError
from ..manifest import Compression, check_field_name
from ..plan import permutation
from ..store import Store
from ._parallel import make_executor, ordered
from ._progress import progress_bar
from ._writer import choose_chunk_len, encode_chunk, field_spec, open_writer, url_options

#: Extensions read from an image folder, as Keras ``image_dataset_from_directory`` reads them.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
_MODES = {"rgb": ("RGB", 3), "grayscale": ("L", 1), "rgba": ("RGBA", 4)}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
#: Names of the sample axes of an image field (xarray's dimensions).
IMAGE_DIMS = ("height", "width", "channel")


@dataclass(frozen=True)
class ImageOptions:
    """How images are decoded.

    Attributes:
        image_size: ``(height, width)`` in pixels every image is resized to.
        color_mode: ``"rgb"`` (3 channels), ``"grayscale"`` (1) or ``"rgba"`` (4).
        interpolation: Pillow resampling filter name (Keras's default is ``"bilinear"``).
    """

    image_size: tuple[int, int]
    color_mode: str = "rgb"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        size = tuple(self.image_size) if isinstance(self.image_size, (tuple, list)) else None
        if size is None or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ArgumentError(f"image_size must be (height, width) in pixels, got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        if self.color_mode not in _MODES:
            raise ArgumentError(f"color_mode must be one of {sorted(_MODES)}, got {self.color_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ArgumentError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        h, w = self.image_size
        return (h, w, _MODES[self.color_mode][1])


def decode_image(path: str, options: ImageOptions) -> np.ndarray:
    """Decode, convert and resize one image: uint8 array of shape ``options.sample_shape``.

    16-bit images are scaled to 0..255 (``round(v * 255 / 65535)``), never clipped; EXIF
    orientation is not applied (as Keras's ``load_img``). Raises ImageDecodeError (naming
    ``path``) for a missing, unreadable or corrupt file, one that is not a regular file (a FIFO
    or device: opened without blocking, never read), or floating-point pixels."""
    from PIL import Image

    mode = _MODES[options.color_mode][0]
    h, w = options.image_size
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ImageDecodeError(path, "not a regular file (a FIFO, device or socket)")
        try:
            with Image.open(f) as img:
                img.load()  # decode fully here: truncated files fail now, with their path
                img = _to_8bit(img, path)
                img = img.convert(mode)
                if img.size != (w, h):
                    img = img.resize((w, h), getattr(Image.Resampling, options.interpolation.upper()))
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # Pillow names the file object it was given; name the path (stable across runs).
            raise ImageDecodeError(path, f"{type(e).__name__}: {str(e).replace(repr(f), repr(path))}") from e
    return arr[..., None] if arr.ndim == 2 else arr


def _to_8bit(img: Any, path: str) -> Any:
    """16-bit grayscale (Pillow modes ``I;16*`` and ``I``) scaled to 8 bits; Pillow's own
    ``convert`` would clip every value above 255."""
    from PIL import Image

    if img.mode == "F":
        raise ImageDecodeError(
            path, "floating-point pixels (mode F) have no uint8 scale; save the image with 8 or 16 bits"
        )
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    a = np.asarray(img)
    if a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
        raise ImageDecodeError(
            path,
            f"32-bit pixels ({int(a.min())}..{int(a.max())}) outside 0..65535; save it with 8 or 16 bits",
        )
    scaled = (a.astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8), "L")


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ArgumentError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _write_images(
    paths: Sequence[str],
    columns: dict[str, np.ndarray],
    sources: Sequence[str],
    dest: str | os.PathLike[str],
    *,
    options: ImageOptions,
    attrs: dict[str, Any],
    preshuffle: bool,
    seed: int,
    chunk_len: int | None,
    compression: str | Compression | None,
    on_error: str,
    overwrite: bool,
    workers: int | None,
    client: Any,
    progress: bool,
    job: dict[str, Any],
    resume: bool,
    special: Sequence[str] = (),
    row_aux: dict[str, np.ndarray] | None = None,
) -> Store:
    """Decode ``paths`` in parallel (in order) and write ``x``, the fields in ``columns``
    (field name -> one value per path) and the ``source`` of every sample. Memory: about three
    chunks of decoded images. ``special``: files left out unopened (not regular files),
    reported as skipped. ``row_aux``: auxiliary arrays with one entry per path, stored for the
    samples kept."""
    _check_on_error(on_error)
    order = permutation(len(paths), seed) if preshuffle else np.arange(len(paths))
    specs = {"x": field_spec("x", options.sample_shape, np.uint8, IMAGE_DIMS), **_column_specs(columns)}
    if chunk_len is None:
        chunk_len = choose_chunk_len(specs, len(paths))
    job = {**job, "options": [list(options.image_size), options.color_mode, options.interpolation]}
    job.update(preshuffle=preshuffle, seed=seed, on_error=on_error)
    not_regular = [{"path": p, "error": "not a regular file (a FIFO, device or socket)"} for p in special]
    with contextlib.ExitStack() as stack:
        # Images are decoded in worker processes (Pillow holds the GIL for part of its work:
        # two threads decode 1.2x as fast as one, two processes 1.4x); chunks are encoded in
        # threads (Blosc and CRC32C release the GIL) or, with a client, on the cluster.
        decoder = stack.enter_context(make_executor(workers, client, kind="process"))
        w = stack.enter_context(
            open_writer(
                dest,
                specs,
                chunk_len=chunk_len,
                compression=compression,
                overwrite=overwrite,
                n=len(paths),
                job=job,
                resume=resume,
                workers=workers,
                client=client,
            )
        )
        bar = stack.enter_context(progress_bar(progress, len(paths), f"ingest {os.fspath(dest)}", unit="img"))
        block = w.chunk_len
        # Skipped images as (index into paths, reason): what a resumed run needs to rebuild
        # the sources of the samples written before the interruption.
        skipped_at: list[list[Any]] = []
        first_block = 0
        if w.resume_state is not None:
            first_block = int(w.resume_state["block"])
            skipped_at = [list(e) for e in w.resume_state["skipped"]]
        gone = {int(i) for i, _ in skipped_at}
        kept_sources = [sources[i] for i in order[: first_block * block].tolist() if i not in gone]
        bar.update(first_block * block)
        # A Dask cluster decodes and encodes whole chunks (Zarr: writes them too), so images
        # do not travel to this process; with on_error="skip" a skipped image shifts the
        # chunks, so they come back decoded and are encoded in order here.
        fused = decoder.remote and on_error == "raise"
        unit = block if fused else max(1, min(block, -(-block // (2 * decoder.workers)), 256))
        units = [
            (b, lo, order[lo : min(lo + unit, (b + 1) * block, len(order))])
            for b in range(first_block, -(-len(order) // block))
            for lo in range(b * block, min((b + 1) * block, len(order)), unit)
        ]

        def work(b: int, sel: np.ndarray) -> tuple[Any, ...]:
            chosen = [paths[i] for i in sel.tolist()]
            if fused:
                return (_decode_encode, chosen, options, w.encode_args("x", b))
            return (_decode_many, chosen, options)

        in_flight = max(2 * decoder.workers, -(-2 * block // unit))
        results = ordered(decoder, _call, (work(b, sel) for b, _, sel in units), in_flight)
        try:
            for (b, lo, sel), result in zip(units, results, strict=True):
                if lo == b * block:
                    w.checkpoint({"block": b, "skipped": skipped_at})
                kind, images, errors, encoded = result
                if errors:
                    if on_error == "raise":
                        j, reason = errors[0]
                        raise ImageDecodeError(paths[int(sel[j])], reason)
                    bad = {j for j, _ in errors}
                    skipped_at = [*skipped_at, *([int(sel[j]), reason] for j, reason in errors)]
                    keep = [int(i) for j, i in enumerate(sel.tolist()) if j not in bad]
                else:
                    keep = sel.tolist()
                kept_sources.extend(sources[i] for i in keep)
                if keep:
                    if kind == "encoded":
                        w.append_encoded("x", len(keep), encoded)
                    else:
                        w.append("x", images)
                    for name, values in columns.items():
                        w.append(name, values[keep])
                bar.update(len(sel))
        finally:
            results.close()
        skipped = not_regular + [{"path": sources[i], "error": reason} for i, reason in skipped_at]
        if not kept_sources:
            raise InvalidSourceError(f"no image could be decoded ({len(skipped)} skipped); nothing to write")
        w.attrs.update(attrs)
        w.attrs["image_size"] = list(options.image_size)
        w.attrs["color_mode"] = options.color_mode
        w.attrs["preshuffle"] = {"seed": seed} if preshuffle else None
        w.attrs["skipped"] = skipped
        w.set_aux("source", np.asarray(kept_sources, dtype=str))
        for name, values in _kept_rows(row_aux or {}, order, skipped_at).items():
            w.set_aux(name, values)
    if skipped:
        import warnings

        warnings.warn(
            f"skipped {len(skipped)} image file(s), e.g. {skipped[0]['path']!r}: "
            f"{skipped[0]['error']}; all are listed in store.metadata['skipped']",
            stacklevel=3,
        )
    return w.close()


def _column_specs(columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """Specs of the fields stored from per-row values: one value (``(n,)``) or a row of
    several columns (``(n, k)``, its axis named ``"<field>_feature"``)."""
    return {
        name: field_spec(name, v.shape[1:], v.dtype, (f"{name}_feature",) if v.ndim == 2 else None)
        for name, v in columns.items()
    }


def _kept_rows(
    row_aux: dict[str, np.ndarray], order: np.ndarray, skipped_at: list[list[Any]]
) -> dict[str, np.ndarray]:
    """The entries of each per-row array for the samples written: rows in stored order, less
    the skipped ones."""
    gone = {int(i) for i, _ in skipped_at}
    kept = np.asarray([i for i in order.tolist() if i not in gone], dtype=np.int64)
    return {name: values[kept] for name, values in row_aux.items()}


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _decode_many(paths: Sequence[str], options: ImageOptions) -> tuple[str, np.ndarray, list[Any], None]:
    """Decode ``paths`` (a work unit): ``("decoded", images, errors, None)``, ``images`` uint8
    ``(k, H, W, C)`` of the decodable ones in order, ``errors`` ``[(position, reason)]``."""
    out = np.empty((len(paths), *options.sample_shape), dtype=np.uint8)
    errors: list[Any] = []
    for j, path in enumerate(paths):
        try:
            out[j] = decode_image(path, options)
        except ImageDecodeError as e:  # reported as data: the error class does not pickle
            errors.append((j, e.reason))
    if errors:
        bad = {j for j, _ in errors}
        out = out[[j for j in range(len(paths)) if j not in bad]]
    return "decoded", out, errors, None


def _decode_encode(
    paths: Sequence[str], options: ImageOptions, encode_args: tuple[Any, ...]
) -> tuple[Any, ...]:
    """Decode one chunk's images and encode the chunk (a cluster's work unit): as
    :func:`_decode_many`, with ``("encoded", None, [], encode_chunk(...))`` when all decode."""
    kind, images, errors, _ = _decode_many(paths, options)
    if errors:
        return kind, images, errors, None
    return "encoded", None, [], encode_chunk(images, *encode_args)


def _files_identity(paths: Sequence[str], progress: bool = False) -> str:
    """A digest of every file's path, size and modification time (a missing file counts)."""
    h = hashlib.sha256()
    with progress_bar(progress, len(paths), "check files", unit="file") as bar:
        for p in paths:
            _stat_into(h, p)
            bar.update(1)
    return h.hexdigest()


def _stat_into(h: Any, p: str) -> None:
    try:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
        h.update(f"{p}\0missing\n".encode())


def list_image_folder(
    src: str | os.PathLike[str],
    follow_links: bool = False,
    special: list[str] | None = None,
    progress: bool = False,
) -> tuple[list[str], list[str], np.ndarray]:
    """``(class_names, relative_paths, labels)`` of an image folder, in sorted order.

    Files with an image extension that are not regular files (FIFOs, devices, sockets,
    folders) are left out without being opened; their relative paths are appended to
    ``special`` if given. Raises SourceNotFoundError for a missing folder, one without class
    subfolders, or one without images."""
    root = Path(src)
    if not root.is_dir():
        raise SourceNotFoundError(f"image folder {str(root)!r} does not exist or is not a folder")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise SourceNotFoundError(
            f"image folder {str(root)!r} has no class subfolders; expected {root}/<class_name>/<image files>"
        )
    rel: list[str] = []
    labels: list[int] = []
    bar = progress_bar(progress, None, f"list {root}", unit="file")
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=follow_links):
            dirnames.sort()
            for f in filenames:
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    full = os.path.join(dirpath, f)
                    try:
                        regular = stat.S_ISREG(os.stat(full).st_mode)
                    except OSError:  # e.g. a dangling symlink: kept, so decoding reports it
                        regular = True
                    bar.update(1)
                    if regular:
                        found.append(os.path.relpath(full, root))
                    elif special is not None:
                        special.append(os.path.relpath(full, root))
        found.sort()
        rel.extend(found)
        labels.extend([label] * len(found))
    bar.close()
    if not rel:
        raise SourceNotFoundError(
            f"image folder {str(root)!r} has class subfolders {class_names} but no images "
            f"with extensions {IMAGE_EXTENSIONS}"
        )
    return class_names, rel, np.asarray(labels, dtype=np.int64)


@url_options
def ingest_image_folder(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    image_size: tuple[int, int],
    color_mode: str = "rgb",
    interpolation: str = "bilinear",
    preshuffle: bool = True,
    seed: int = 0,
    chunk_len: int | None = None,
    compression: str | Compression | None = "lz4",
    on_error: str = "raise",
    follow_links: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = False,
    resume: bool = True,
    client: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Ingest a folder with one subfolder per class, as Keras ``image_dataset_from_directory``
    reads it: class names are the sorted subfolder names, the label is the class's index.

    Args:
        src: the folder; images are ``src/<class>/**/<file>.{bmp,gif,jpeg,jpg,png}``.
        dest: ``*.zarr`` or ``*.h5`` / ``*.hdf5``.
        image_size: ``(height, width)`` every image is resized to.
        color_mode: ``"rgb"``, ``"grayscale"`` or ``"rgba"``.
        interpolation: resampling filter (``"bilinear"``, as Keras).
        preshuffle: store samples in a seeded random order (default), so that chunks are not
            single-class; ``store.sources`` keeps each sample's file.
        seed: seed of the pre-shuffle.
        chunk_len: samples per chunk (default: about 4 MiB of ``x``).
        compression: ``None``, ``"lz4"``, ``"zstd"``, ``"zlib"``.
        on_error: ``"raise"`` (default) stops at the first unreadable image; ``"skip"`` leaves
            it out, warns, and lists it in ``store.metadata["skipped"]``. Files with an image
            extension that are not regular files (FIFOs, devices) are never opened: they are
            left out, with a warning, and listed there too.
        workers: processes that decode images, and threads that compress, checksum and
            write chunks, at once (default ``None``: every core this process may use; ``1``:
            all in this process). The store is the same bytes whatever the number.
        client: a ``dask.distributed.Client``: the cluster's workers decode and compress the
            chunks (and, for a Zarr ``dest``, write them: ``dest``'s folder must be a path
            every worker sees, and the image paths too); this process writes HDF5 chunks and
            commits. The store is the same bytes as without a cluster. Overrides ``workers``.
        progress: show a progress bar.
        resume: if an earlier run of the same call (same files, sizes and modification
            times, same ``dest`` and arguments) was interrupted, go on from its last written
            chunk (default); ``False`` starts over.
        storage_options: for a ``dest`` in object storage (``s3://bucket/x.zarr``, ``gs://``,
            ...): credentials and endpoint, as for :func:`oocseq.open_store` (default: the
            environment's). Chunks go to the bucket as they are made, the manifest last.

    Returns:
        The opened Store: ``x`` uint8 ``(n, H, W, C)``, ``y`` int64 ``(n,)``; metadata
        ``class_names``, ``image_size``, ``color_mode``, ``preshuffle``, ``source``.

    Raises:
        SourceNotFoundError, ImageDecodeError (naming the file), StoreExistsError.
    """
    require("PIL", "ingest_image_folder")
    options = ImageOptions(image_size, color_mode, interpolation)
    special: list[str] = []
    class_names, rel, labels = list_image_folder(src, follow_links, special, progress)
    root = Path(src).resolve()
    paths = [str(root / r) for r in rel]
    counts = np.bincount(labels, minlength=len(class_names)).tolist()
    attrs = {
        "class_names": class_names,
        "source": {
            "kind": "image_folder",
            "root": str(root),
            "files": len(rel),
            "files_per_class": dict(zip(class_names, counts, strict=True)),
        },
    }
    return _write_images(
        paths,
        {"y": labels},
        rel,
        dest,
        options=options,
        attrs=attrs,
        preshuffle=preshuffle,
        seed=seed,
        chunk_len=chunk_len,
        compression=compression,
        on_error=on_error,
        overwrite=overwrite,
        workers=workers,
        client=client,
        progress=progress,
        job={"kind": "image_folder", "root": str(root), "files": _files_identity(paths, progress)},
        resume=resume,
        special=special,
    )


@url_options
def ingest_dataframe(
    df: Any,
    dest: str | os.PathLike[str],
    *,
    x_col: str = "filename",
    y_col: str | Sequence[str] | None = "class",
    extra_cols: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    weight_col: str | None = None,
    directory: str | os.PathLike[str] | None = None,
    image_size: tuple[int, int],
    color_mode: str = "rgb",
    interpolation: str = "bilinear",
    classes: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    preshuffle: bool = True,
    seed: int = 0,
    chunk_len: int | None = None,
    compression: str | Compression | None = "lz4",
    on_error: str = "raise",
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = False,
    resume: bool = True,
    client: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Ingest a pandas DataFrame of image paths, labels and other columns, as Keras
    ``flow_from_dataframe`` takes it, in one pass.

    Args:
        df: DataFrame with a column of image paths (``x_col``) and the columns named below.
        x_col: column of image paths, relative to ``directory`` if given; stored as ``x``.
        y_col: the label column(s):

            - one column name: stored as field ``y``;
            - a list of names (Keras's ``class_mode="multi_output"``): one field per column,
              named after the column (rename columns that are not valid field names);
            - ``None``: unlabeled images (no label field; Keras's ``class_mode=None``).

            A label column of strings (or other non-numbers) is stored as int64 class indices
            into its sorted unique values (or ``classes``); integers are kept (int64); floats
            are stored float32. A missing label is an error naming its row.
        extra_cols: more columns stored as fields in the same pass (multi-modal inputs, e.g.
            image + tabular): a list of column names (one field per column, named after it,
            stored like a label column: numbers kept, strings as class indices; NaN in a float
            column is stored as NaN), or a dict ``{field: [columns]}`` (one float32 field of
            shape ``(n, len(columns))`` per entry: numeric columns only).
        weight_col: a column of per-sample weights, stored float32 as a field named after it
            (serve it with ``ChunkedSequence(..., sample_weight=weight_col)``).
        directory: folder the paths are relative to.
        classes: class names in label order for a string label column (default: its sorted
            unique values): a list (with one ``y_col``), or a dict ``{column: [names]}``. A
            label not in its ``classes`` is an error naming its row.
        preshuffle: store rows in a seeded random order (default), as
            :func:`ingest_image_folder` does, so that chunks mix classes even when the
            DataFrame is grouped by class, patient or date; every field of a sample comes from
            the same row. ``False`` keeps the DataFrame's order.
        Other arguments: as :func:`ingest_image_folder`.

    Returns:
        The opened Store: ``x`` uint8 ``(n, H, W, C)`` and one field per label, extra and
        weight column. ``store.sources`` gives each sample's path as written in ``x_col``, and
        ``store.dataframe_index`` its row's index label (int64 for an integer index, else the
        labels as strings). Metadata: ``class_names`` (of ``y``, for one string ``y_col``),
        ``field_class_names`` (``{field: [names]}`` for every field of class indices) and
        ``columns`` (``{field: column or [columns]}``).

    Raises:
        InvalidSourceError for a missing column, a column that cannot be a field name, a field
        named twice, a non-numeric column in a dict ``extra_cols``, or a missing/unknown label
        (naming the row); ImageDecodeError for an unreadable image (naming the file).
    """
    require("PIL", "ingest_dataframe")
    options = ImageOptions(image_size, color_mode, interpolation)
    layout = _frame_layout(df, x_col, y_col, extra_cols, weight_col)
    if len(df) == 0:
        raise SourceNotFoundError("the DataFrame has no rows")
    base = Path(directory) if directory is not None else None
    rel = [str(p) for p in df[x_col].tolist()]
    for row, p in enumerate(rel):
        if not p or p == "nan":
            raise InvalidSourceError(
                f"DataFrame row {row} (index {df.index[row]!r}): column {x_col!r} has no path"
            )
    paths = [str(base / p) if base is not None else p for p in rel]
    columns, class_names = _frame_fields(df, layout, y_col, classes)
    index, index_kind = _frame_index(df)
    attrs: dict[str, Any] = {
        "source": {
            "kind": "dataframe",
            "directory": None if base is None else str(base.resolve()),
            "x_col": x_col,
            "y_col": list(y_col) if isinstance(y_col, (list, tuple)) else y_col,
            "extra_cols": extra_cols if isinstance(extra_cols, Mapping) else _names(extra_cols),
            "weight_col": weight_col,
            "index": {"name": _jsonable_name(df.index.names), "kind": index_kind},
            "rows": len(df),
        },
        "columns": {"x": x_col, **{field: cols for field, (cols, _) in layout.items()}},
        "field_class_names": class_names,
    }
    if isinstance(y_col, str) and "y" in class_names:
        attrs["class_names"] = class_names["y"]
    digest = hashlib.sha256()
    for name, values in columns.items():
        digest.update(name.encode() + b"\0" + np.ascontiguousarray(values).tobytes())
    digest.update(index.astype(str).tobytes() if index.dtype.kind != "i" else index.tobytes())
    return _write_images(
        paths,
        columns,
        [f"{p}" for p in rel],
        dest,
        options=options,
        attrs=attrs,
        preshuffle=preshuffle,
        seed=seed,
        chunk_len=chunk_len,
        compression=compression,
        on_error=on_error,
        overwrite=overwrite,
        workers=workers,
        client=client,
        progress=progress,
        job={
            "kind": "dataframe",
            "files": _files_identity(paths, progress),
            "labels": digest.hexdigest(),
            "attrs": attrs,
        },
        resume=resume,
        row_aux={"dataframe_index": index},
    )


def _names(cols: str | Sequence[str] | None) -> list[str]:
    if cols is None:
        return []
    return [cols] if isinstance(cols, str) else list(cols)


def _jsonable_name(names: Any) -> Any:
    out = [None if n is None else str(n) for n in names]
    return out[0] if len(out) == 1 else out


def _frame_layout(
    df: Any,
    x_col: str,
    y_col: str | Sequence[str] | None,
    extra_cols: Sequence[str] | Mapping[str, Sequence[str]] | None,
    weight_col: str | None,
) -> dict[str, tuple[Any, str]]:
    """``{field: (column or [columns], argument)}`` of the fields stored from columns (``x``
    aside), in order: labels, extras, weight. Raises InvalidSourceError for a missing column, a column
    that cannot be a field name, or a field named twice."""
    roles: list[tuple[str, Any, str]] = []  # (field, column(s), argument)
    if isinstance(y_col, str):
        roles.append(("y", y_col, "y_col"))
    else:
        roles += [(c, c, "y_col") for c in _names(y_col)]
    if isinstance(extra_cols, Mapping):
        for field, cols in extra_cols.items():
            cols = _names(cols)
            if not cols:
                raise InvalidSourceError(f"extra_cols[{field!r}] lists no columns")
            roles.append((field, cols, "extra_cols"))
    else:
        roles += [(c, c, "extra_cols") for c in _names(extra_cols)]
    if weight_col is not None:
        roles.append((weight_col, weight_col, "weight_col"))
    for col in [x_col, *(c for _, cols, _ in roles for c in _names(cols))]:
        if col not in df.columns:
            raise InvalidSourceError(f"DataFrame has no column {col!r}; its columns are {list(df.columns)}")
    layout: dict[str, tuple[Any, str]] = {}
    for field, cols, arg in roles:
        if not isinstance(field, str) or not _valid_field_name(field):
            raise InvalidSourceError(
                f"{arg}: column {field!r} cannot name a field (use 1-128 letters, digits, '_', '.' or "
                "'-', starting with a letter); rename it first, e.g. df.rename(columns={...})"
            )
        if field == "x" or field in layout:
            raise InvalidSourceError(
                f"{arg}: field {field!r} would be stored twice ({'the images' if field == 'x' else 'named again'}); "
                "each column is stored once and 'x' holds the images"
            )
        layout[field] = (cols, arg)
    return layout


def _valid_field_name(name: str) -> bool:
    try:
        check_field_name(name)
    except ArgumentError:
        return False
    return True


def _frame_fields(
    df: Any,
    layout: dict[str, tuple[Any, str]],
    y_col: str | Sequence[str] | None,
    classes: Sequence[str] | Mapping[str, Sequence[str]] | None,
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """The values of every field stored from columns, and the class names of those stored as
    class indices."""
    if classes is not None and not isinstance(classes, Mapping):
        if not isinstance(y_col, str):
            raise ArgumentError(
                "classes as a list needs one y_col; with several label columns give "
                "classes={column: [names], ...}"
            )
        classes = {y_col: list(classes)}
    classes = dict(classes or {})
    unknown = sorted(set(classes) - {c for cols, _ in layout.values() for c in _names(cols)})
    if unknown:
        raise ArgumentError(f"classes names column(s) {unknown} that are not stored as fields")
    columns: dict[str, np.ndarray] = {}
    class_names: dict[str, list[str]] = {}
    for field, (cols, arg) in layout.items():
        if isinstance(cols, list):  # a dict entry of extra_cols: numeric columns side by side
            columns[field] = np.stack([_numeric(df, c, arg) for c in cols], axis=1)
        elif arg == "weight_col":
            columns[field] = _numeric(df, cols, arg)
        else:
            values, names = _labels(df, cols, classes.get(cols), nan_ok=arg == "extra_cols")
            columns[field] = values
            if names is not None:
                class_names[field] = names
    return columns, class_names


def _numeric(df: Any, col: str, arg: str) -> np.ndarray:
    """A numeric or boolean column as float32 (NaN kept)."""
    import pandas as pd

    series = df[col]
    if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
        raise InvalidSourceError(
            f"{arg}: column {col!r} is {series.dtype}, not numeric; store it as class indices with "
            "extra_cols=[...] (a list), or convert it first"
        )
    return _float32(series.to_numpy(dtype=np.float64, na_value=np.nan), df, col)


def _float32(wide: np.ndarray, df: Any, col: str) -> np.ndarray:
    """float64 values as float32; raises InvalidSourceError naming the row of a finite value
    out of float32's range (it would be stored as inf)."""
    with np.errstate(over="ignore"):
        out = wide.astype(np.float32)
    overflow = np.isinf(out) & np.isfinite(wide)
    if overflow.any():
        r = int(np.argmax(overflow))
        raise InvalidSourceError(
            f"DataFrame row {r} (index {df.index[r]!r}): column {col!r} holds {wide[r]!r}, outside "
            "float32's range (magnitude at most 3.4e38)"
        )
    return out


def _frame_index(df: Any) -> tuple[np.ndarray, str]:
    """The DataFrame's index labels: ``(int64 array, "int")`` for an integer index, else
    ``(str array, "str")`` of each label's ``str()``."""
    import pandas as pd

    if pd.api.types.is_integer_dtype(df.index.dtype):
        return df.index.to_numpy(dtype=np.int64), "int"
    return np.asarray([str(v) for v in df.index.tolist()], dtype=str), "str"


def _labels(
    df: Any, y_col: str, classes: Sequence[str] | None, nan_ok: bool = False
) -> tuple[np.ndarray, list[str] | None]:
    """A label column as int64 (integers), float32 (floats; NaN kept if ``nan_ok``) or int64
    class indices with the class names (anything else, or any column with ``classes``)."""
    import pandas as pd

    col = df[y_col]
    if nan_ok and classes is None and pd.api.types.is_float_dtype(col):
        return _float32(col.to_numpy(dtype=np.float64, na_value=np.nan), df, y_col), None
    missing = np.flatnonzero(col.isna().to_numpy())
    if len(missing):
        r = int(missing[0])
        raise InvalidSourceError(f"DataFrame row {r} (index {df.index[r]!r}): column {y_col!r} has no label")
    if classes is None and pd.api.types.is_integer_dtype(col):
        return col.to_numpy(dtype=np.int64), None
    if classes is None and pd.api.types.is_float_dtype(col):
        return _float32(col.to_numpy(dtype=np.float64), df, y_col), None
    values = col.astype(str).tolist()
    names = list(classes) if classes is not None else sorted(set(values))
    index = {name: i for i, name in enumerate(names)}
    labels = np.empty(len(values), dtype=np.int64)
    for r, v in enumerate(values):
        if v not in index:
            raise InvalidSourceError(
                f"DataFrame row {r} (index {df.index[r]!r}): label {v!r} in column {y_col!r} is not one of classes={names}"
            )
        labels[r] = index[v]
    return labels, names
