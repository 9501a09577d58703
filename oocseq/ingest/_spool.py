"""External-memory pre-shuffle of a stream: spool it to disk, then read it back shuffled.

A stream (an iterable of batches, a CSV table read block by block) cannot be read in a random
order, and it may be larger than memory. So it is written once, in source order, to temporary
uncompressed files (one per field, raw samples back to back, next to the destination), which
are then memory-mapped and ingested as random-access arrays with the block pre-shuffle of
:mod:`._preshuffle`. Memory stays bounded (a batch while spooling, a chunk and the page cache
while reading back); the disk holds one uncompressed copy until the store is written. The
output is a pure function of the source and the seed, as for arrays.

A crash leaves a hidden ``.<dest name>.spool-<pid>-<random>`` folder beside the destination;
the next spool for the same destination removes those whose process is gone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import InvalidSourceError, StoreExistsError, StoreWriteError
from ..storage import store_format

__all__ = ["Spool"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    """Samples appended field by field, kept in temporary files until :meth:`close`.

    Args:
        dest: the store being ingested (the spool goes in its parent folder, so on the same
            file system, and is named after it).
        overwrite: whether ``dest`` may exist (checked now, before the source is read; the
            writer checks again when it commits).

    Raises:
        ArgumentError: ``dest`` is not named ``*.zarr``, ``*.h5`` or ``*.hdf5``.
        StoreExistsError: ``dest`` exists and ``overwrite`` is false.
    """

    def __init__(self, dest: str | os.PathLike[str], overwrite: bool = False) -> None:
        from urllib.parse import urlsplit

        from ..storage._remote import is_url, local_path_of

        remote = False
        if is_url(dest):  # a store in object storage: spool in the local temporary folder
            local = local_path_of(str(dest))
            remote = local is None
            dest = (
                local
                if local is not None
                else Path(tempfile.gettempdir()) / Path(urlsplit(str(dest)).path).name
            )
        dest = Path(dest)
        store_format(dest)  # refuse a bad destination before reading the source
        if not overwrite and not remote and dest.exists():
            raise StoreExistsError(f"{dest} already exists; pass overwrite=True to replace it")
        parent = dest.parent if str(dest.parent) else Path(".")
        prefix = f".{dest.name}.spool-"
        try:
            parent.mkdir(parents=True, exist_ok=True)  # as the writer does
        except OSError as e:
            raise StoreWriteError(
                e.errno, f"cannot create the folder {parent} for {dest}: {e.strerror}"
            ) from e
        for old in parent.glob(prefix + "*"):
            try:
                pid = int(old.name[len(prefix) :].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _alive(pid):
                shutil.rmtree(old, ignore_errors=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
        self._files: dict[str, BinaryIO] = {}
        self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._rows: dict[str, int] = {}

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, name: str, data: Any) -> None:
        """Append samples ``data`` (shape ``(k, *sample_shape)``) to field ``name``.

        Raises:
            InvalidSourceError: the sample shape or dtype differs from the field's first batch.
        """
        a = np.asarray(data)
        if a.ndim == 0:
            raise InvalidSourceError(f"field {name!r}: batches must have a sample axis, got a scalar")
        layout = (tuple(a.shape[1:]), a.dtype)
        if name not in self._files:
            self._files[name] = open(self.dir / f"{len(self._files)}.raw", "wb")  # closed by close()
            self._layout[name] = layout
            self._rows[name] = 0
        elif layout != self._layout[name]:
            shape, dtype = self._layout[name]
            raise InvalidSourceError(
                f"field {name!r}: a batch of samples of shape {layout[0]} and dtype {layout[1]} after "
                f"samples of shape {shape} and dtype {dtype}; every batch needs the same sample shape and dtype"
            )
        try:
            self._files[name].write(np.ascontiguousarray(a).data)
        except OSError as e:  # e.g. the disk is full: the spool is removed by close()
            raise StoreWriteError(
                e.errno, f"cannot write the pre-shuffle spool of {name!r} in {self.dir}: {e.strerror}"
            ) from e
        self._rows[name] += len(a)

    def arrays(self) -> dict[str, np.ndarray]:
        """The spooled fields as read-only memory maps of shape ``(rows, *sample_shape)``, in
        the order they were first appended."""
        out = {}
        for name, f in self._files.items():
            f.flush()
            shape, dtype = self._layout[name]
            rows = self._rows[name]
            if rows == 0 or dtype.itemsize * int(np.prod(shape)) == 0:
                out[name] = np.zeros((rows, *shape), dtype=dtype)
            else:
                out[name] = np.memmap(f.name, dtype=dtype, mode="r", shape=(rows, *shape))
        return out

    def close(self) -> None:
        """Delete the temporary files (memory maps handed out stay valid until dropped)."""
        for f in self._files.values():
            f.close()
        self._files.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
