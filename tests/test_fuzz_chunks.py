"""Fuzzed chunks: random byte changes in stored chunks, both formats, every codec. Not one
read may serve data other than what was written: each read returns the original chunk (the
change was undone by chance, or fell in padding) or raises CorruptStoreError naming the chunk.

Chunks are changed in place and restored after each trial; the store is read with
``verify_checksums="always"`` so every trial is checked afresh.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

import oocseq
from oocseq import CorruptStoreError

TRIALS = 400


def _spans(path: Path, field: str, num_chunks: int) -> list[tuple[Path, int, int]]:
    """``(file, offset, size)`` of every chunk's stored bytes."""
    if path.suffix == ".zarr":
        out = []
        for c in range(num_chunks):
            f = path / field / "c" / str(c) / "0"  # x is (n, k): one more key level
            out.append((f, 0, f.stat().st_size))
        return out
    with h5py.File(path, "r") as h:
        ds = h[field]
        infos = [ds.id.get_chunk_info_by_coord((c * ds.chunks[0], 0)) for c in range(num_chunks)]
    return [(path, i.byte_offset, i.size) for i in infos]


@pytest.mark.parametrize("fmt", [".zarr", ".h5"])
@pytest.mark.parametrize("compression", [None, "lz4", "zstd", "zlib"])
def test_fuzzed_chunks_never_served(tmp_path: Path, fmt: str, compression: str | None) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{fmt} {compression}".encode()))  # seeded per case
    # Smooth, compressible values: many changed bytes still decode (as in real data).
    x = (np.sin(np.arange(64 * 16) / 7.0) * 100).astype(np.float32).reshape(64, 16)
    path = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(path, {"x": x}, chunk_len=16, compression=compression, preshuffle=False).close()
    spans = _spans(path, "x", 4)
    fast = oocseq.open_store(path, verify_checksums="always")
    # The library path (zarr's own decode) too; h5py's Blosc filter is not fed fuzzed frames.
    slow = oocseq.Store(path, fast=False, verify_checksums="always") if fmt == ".zarr" else None
    unchecked = oocseq.open_store(path, verify_checksums=False)
    served_wrong = caught = intact = decoded_wrong = 0
    for _ in range(TRIALS):
        c = int(rng.integers(4))
        f, offset, size = spans[c]
        k = int(rng.integers(1, 9))
        where = offset + rng.choice(size, size=min(k, size), replace=False)
        with open(f, "r+b") as fh:
            saved = []
            for pos in where.tolist():
                fh.seek(pos)
                b = fh.read(1)[0]
                saved.append((pos, b))
                fh.seek(pos)
                fh.write(bytes([b ^ int(rng.integers(1, 256))]))
        try:
            try:  # what a reader without checksums would have served
                decoded_wrong += unchecked.read_chunk("x", c).tobytes() != x[c * 16 : (c + 1) * 16].tobytes()
            except CorruptStoreError:
                pass
            for store in (fast, slow):
                if store is None:
                    continue
                try:
                    got = store.read_chunk("x", c)
                except CorruptStoreError as e:
                    assert f"chunk {c}" in str(e) and "'x'" in str(e), str(e)
                    caught += 1
                else:
                    if got.tobytes() != x[c * 16 : (c + 1) * 16].tobytes():
                        served_wrong += 1
                    else:
                        intact += 1
        finally:
            with open(f, "r+b") as fh:
                for pos, b in saved:
                    fh.seek(pos)
                    fh.write(bytes([b]))
    assert served_wrong == 0
    # The codec alone lets damaged chunks through; the checksum is what catches them.
    assert decoded_wrong > 0 and caught >= decoded_wrong
    # restored: every chunk reads again
    np.testing.assert_array_equal(fast["x"][:], x)
