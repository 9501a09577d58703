"""Ingest images: a folder with one subfolder per class, or a DataFrame of paths and labels.

Images are decoded with Pillow in a thread pool (Pillow releases the GIL while decoding and
resizing), in deterministic order, and written chunk by chunk. Fields: ``x`` uint8
``(n, H, W, C)`` and ``y`` (int64 class index, or the label values as given).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArgumentError, ImageDecodeError, InvalidSourceError, SourceNotFoundError
from ..manifest import Compression
from ..plan import permutation
from ..store import Store
from ._progress import progress_bar
from ._writer import StoreWriter, choose_chunk_len, field_spec

#: Extensions read from an image folder, as Keras ``image_dataset_from_directory`` reads them.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
_MODES = {"rgb": ("RGB", 3), "grayscale": ("L", 1), "rgba": ("RGBA", 4)}
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


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

    Raises ImageDecodeError (naming ``path``) for a missing, unreadable or corrupt file."""
    from PIL import Image

    mode = _MODES[options.color_mode][0]
    h, w = options.image_size
    try:
        with Image.open(path) as img:
            img.load()  # decode fully here: truncated files fail now, with their path
            img = img.convert(mode)
            if img.size != (w, h):
                img = img.resize((w, h), getattr(Image.Resampling, options.interpolation.upper()))
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from e
    return arr[..., None] if arr.ndim == 2 else arr


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ArgumentError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _write_images(
    paths: Sequence[str],
    labels: np.ndarray,
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
    progress: bool,
) -> Store:
    """Decode ``paths`` in parallel (in order) and write ``x``, ``y`` and the ``source`` of
    every sample. Memory: about three chunks of decoded images."""
    _check_on_error(on_error)
    order = permutation(len(paths), seed) if preshuffle else np.arange(len(paths))
    specs = {
        "x": field_spec("x", options.sample_shape, np.uint8),
        "y": field_spec("y", (), labels.dtype),
    }
    if chunk_len is None:
        chunk_len = choose_chunk_len(specs, len(paths))
    block = chunk_len
    skipped: list[dict[str, str]] = []
    kept_sources: list[str] = []
    workers = workers or os.cpu_count() or 1
    with (
        StoreWriter(dest, specs, chunk_len=chunk_len, compression=compression, overwrite=overwrite) as w,
        ThreadPoolExecutor(workers, thread_name_prefix="oocseq-decode") as pool,
        progress_bar(progress, len(paths), f"ingest {os.fspath(dest)}", unit="img") as bar,
    ):
        pending: deque[tuple[np.ndarray, list[Future[np.ndarray]]]] = deque()
        starts = iter(range(0, len(order), block))

        def submit() -> None:
            start = next(starts, None)
            if start is not None:
                sel = order[start : start + block]
                pending.append((sel, [pool.submit(decode_image, paths[i], options) for i in sel]))

        submit()
        submit()  # decode one block ahead of the one being written
        try:
            while pending:
                sel, futures = pending.popleft()
                submit()
                images, keep = [], []
                for i, fut in zip(sel.tolist(), futures, strict=True):
                    try:
                        images.append(fut.result())
                    except ImageDecodeError as e:
                        if on_error == "raise":
                            raise
                        skipped.append({"path": sources[i], "error": e.reason})
                        continue
                    keep.append(i)
                    kept_sources.append(sources[i])
                if images:
                    w.append("x", np.stack(images))
                    w.append("y", labels[keep])
                bar.update(len(sel))
        except BaseException:
            for _, futures in pending:
                for fut in futures:
                    fut.cancel()
            raise
        if not kept_sources:
            raise InvalidSourceError(f"no image could be decoded ({len(skipped)} skipped); nothing to write")
        w.attrs.update(attrs)
        w.attrs["image_size"] = list(options.image_size)
        w.attrs["color_mode"] = options.color_mode
        w.attrs["preshuffle"] = {"seed": seed} if preshuffle else None
        w.attrs["skipped"] = skipped
        w.set_aux("source", np.asarray(kept_sources, dtype=str))
    if skipped:
        import warnings

        warnings.warn(
            f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['path']!r}: "
            f"{skipped[0]['error']}; all are listed in store.metadata['skipped']",
            stacklevel=3,
        )
    return w.close()


def list_image_folder(
    src: str | os.PathLike[str], follow_links: bool = False
) -> tuple[list[str], list[str], np.ndarray]:
    """``(class_names, relative_paths, labels)`` of an image folder, in sorted order.

    Raises SourceNotFoundError for a missing folder, one without class subfolders, or one
    without images."""
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
    for label, name in enumerate(class_names):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=follow_links):
            dirnames.sort()
            for f in filenames:
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    found.append(os.path.relpath(os.path.join(dirpath, f), root))
        found.sort()
        rel.extend(found)
        labels.extend([label] * len(found))
    if not rel:
        raise SourceNotFoundError(
            f"image folder {str(root)!r} has class subfolders {class_names} but no images "
            f"with extensions {IMAGE_EXTENSIONS}"
        )
    return class_names, rel, np.asarray(labels, dtype=np.int64)


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
            it out, warns, and lists it in ``store.metadata["skipped"]``.
        workers: decoding threads (default: all cores).
        progress: show a progress bar.

    Returns:
        The opened Store: ``x`` uint8 ``(n, H, W, C)``, ``y`` int64 ``(n,)``; metadata
        ``class_names``, ``image_size``, ``color_mode``, ``preshuffle``, ``source``.

    Raises:
        SourceNotFoundError, ImageDecodeError (naming the file), StoreExistsError.
    """
    options = ImageOptions(image_size, color_mode, interpolation)
    class_names, rel, labels = list_image_folder(src, follow_links)
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
        labels,
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
        progress=progress,
    )


def ingest_dataframe(
    df: Any,
    dest: str | os.PathLike[str],
    *,
    x_col: str = "filename",
    y_col: str = "class",
    directory: str | os.PathLike[str] | None = None,
    image_size: tuple[int, int],
    color_mode: str = "rgb",
    interpolation: str = "bilinear",
    classes: Sequence[str] | None = None,
    preshuffle: bool = True,
    seed: int = 0,
    chunk_len: int | None = None,
    compression: str | Compression | None = "lz4",
    on_error: str = "raise",
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = False,
) -> Store:
    """Ingest a pandas DataFrame of image paths and labels, as Keras ``flow_from_dataframe``
    takes it.

    Args:
        df: DataFrame with a column of paths (``x_col``) and one of labels (``y_col``).
        x_col: column of image paths, relative to ``directory`` if given.
        y_col: column of labels: strings (class names, mapped to the index of the sorted
            names or of ``classes``), integers (kept), or floats (kept, stored float32).
        directory: folder the paths are relative to.
        classes: class names in label order (default: sorted unique string labels). A label
            not in ``classes`` is an error naming its row.
        preshuffle: store rows in a seeded random order (default), so that chunks mix classes
            even when the DataFrame is grouped by class, patient or date; ``store.sources``
            keeps each sample's path. ``False`` keeps the DataFrame's order.
        Other arguments: as :func:`ingest_image_folder`.

    Returns:
        The opened Store: ``x`` uint8 ``(n, H, W, C)`` and ``y``; ``store.sources`` gives each
        sample's path as written in ``x_col``.

    Raises:
        InvalidSourceError for a missing column or a missing/unknown label (naming the row),
        ImageDecodeError for an unreadable image (naming the file).
    """
    options = ImageOptions(image_size, color_mode, interpolation)
    for col in (x_col, y_col):
        if col not in df.columns:
            raise InvalidSourceError(f"DataFrame has no column {col!r}; its columns are {list(df.columns)}")
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
    attrs: dict[str, Any] = {
        "source": {
            "kind": "dataframe",
            "directory": None if base is None else str(base.resolve()),
            "x_col": x_col,
            "y_col": y_col,
            "rows": len(df),
        }
    }
    labels, class_names = _labels(df, y_col, classes)
    if class_names is not None:
        attrs["class_names"] = class_names
    return _write_images(
        paths,
        labels,
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
        progress=progress,
    )


def _labels(df: Any, y_col: str, classes: Sequence[str] | None) -> tuple[np.ndarray, list[str] | None]:
    import pandas as pd

    col = df[y_col]
    missing = np.flatnonzero(col.isna().to_numpy())
    if len(missing):
        r = int(missing[0])
        raise InvalidSourceError(f"DataFrame row {r} (index {df.index[r]!r}): column {y_col!r} has no label")
    if classes is None and pd.api.types.is_integer_dtype(col):
        return col.to_numpy(dtype=np.int64), None
    if classes is None and pd.api.types.is_float_dtype(col):
        return col.to_numpy(dtype=np.float32), None
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
