"""Hostile and damaged stores are refused; no damaged sample is ever served.

A corpus of stores built to fool the reader (decompression bombs through allowed codec names,
codec configurations oocseq never writes, HDF5 links to other files, virtual datasets and
external storage, symbolic links out of a Zarr store, absurd sizes, missing checksums), each of
which must be refused with a CorruptStoreError naming the store; and the read-time checksum,
seen from every way of reading (``read_chunk``, ``read_chunk_into``, slicing,
``ChunkedSequence``, a pickled copy, ``fast=False``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numcodecs
import numpy as np
import pytest

import oocseq
from oocseq import CorruptStoreError, NotAStoreError, OocseqError
from oocseq.storage import _raw

FORMATS = [".zarr", ".h5"]
X = (np.arange(40 * 6, dtype=np.float32) * 0.5).reshape(40, 6)
Y = np.arange(40, dtype=np.int64) % 7


def make(path: Path, compression: str | None = "lz4", x: np.ndarray = X) -> oocseq.Store:
    return oocseq.ingest_arrays(
        path, {"x": x, "y": Y}, chunk_len=8, compression=compression, preshuffle=False
    )


def refused(path: Path, *needles: str, **kwargs: Any) -> CorruptStoreError:
    with pytest.raises(CorruptStoreError) as e:
        oocseq.open_store(path, **kwargs).verify()
    assert isinstance(e.value, OocseqError) and isinstance(e.value, ValueError)
    for needle in (path.name, *needles):
        assert needle in str(e.value), f"{needle!r} not in {str(e.value)!r}"
    return e.value


def zarr_meta(path: Path, field: str = "x") -> dict[str, Any]:
    return json.loads((path / field / "zarr.json").read_text())


def set_zarr_meta(path: Path, meta: dict[str, Any], field: str = "x") -> None:
    (path / field / "zarr.json").write_text(json.dumps(meta))


def edit_manifest(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    if path.suffix == ".zarr":
        meta = json.loads((path / "zarr.json").read_text())
        edit(meta["attributes"]["oocseq"])
        (path / "zarr.json").write_text(json.dumps(meta))
        return
    with h5py.File(path, "r+") as f:
        doc = json.loads(f.attrs["oocseq"])
        edit(doc)
        f.attrs["oocseq"] = json.dumps(doc)


def chunk_span(path: Path, field: str, c: int) -> tuple[Path, int, int]:
    """``(file, offset, size)`` of the stored bytes of chunk ``c``."""
    if path.suffix == ".zarr":
        f = path / field / "c" / str(c)
        for _ in zarr_meta(path, field)["shape"][1:]:
            f = f / "0"
        return f, 0, f.stat().st_size
    with h5py.File(path, "r") as h:
        ds = h[field]
        info = ds.id.get_chunk_info_by_coord((c * ds.chunks[0],) + (0,) * (ds.ndim - 1))
        return path, info.byte_offset, info.size


def flip(path: Path, field: str, c: int, at: float = 0.5) -> None:
    f, offset, size = chunk_span(path, field, c)
    with open(f, "r+b") as fh:
        fh.seek(offset + int(size * at))
        b = fh.read(1)[0]
        fh.seek(offset + int(size * at))
        fh.write(bytes([b ^ 0x5A]))


# -- a changed byte is never served --------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("compression", [None, "lz4"])
@pytest.mark.parametrize("fast", [True, False])
def test_changed_byte_refused_by_every_read(
    tmp_path: Path, fmt: str, compression: str | None, fast: bool
) -> None:
    path = tmp_path / f"s{fmt}"
    make(path, compression).close()
    # A change the codec cannot notice: inside the data of an uncompressed chunk, or a byte of
    # the lz4 stream that still decodes (found by trying; the checksum must catch it).
    flip(path, "x", 2, 0.5 if compression is None else 0.99)
    store = oocseq.Store(path, fast=fast)
    reads: list[Callable[[], Any]] = [
        lambda: store.read_chunk("x", 2),
        lambda: store.read_chunk_into("x", 2, np.empty((8, 6), np.float32)),
        lambda: store["x"][16:17],
        lambda: store["x"][[3, 20]],
        lambda: np.asarray(store["x"]),
        lambda: pickle.loads(pickle.dumps(store)).read_chunk("x", 2),
        lambda: list(oocseq.ChunkedSequence(store, 8, shuffle=False)),
        store.verify,
    ]
    for read in reads:
        with pytest.raises(CorruptStoreError) as e:
            read()
        msg = str(e.value)
        assert "chunk 2" in msg and "'x'" in msg and path.name in msg, msg
    # the other chunks and fields still read
    np.testing.assert_array_equal(store.read_chunk("x", 1), X[8:16])
    np.testing.assert_array_equal(store["y"][:], Y)


@pytest.mark.parametrize("fmt", FORMATS)
def test_checked_once_per_handles_and_always_on_request(tmp_path: Path, fmt: str) -> None:
    """The default checks a chunk the first time these handles read it; ``"always"`` at every
    read; a damage after the first check is caught by ``"always"``, by ``verify()``, and by
    the default after ``close()`` (new handles check again)."""
    path = tmp_path / f"s{fmt}"
    make(path, None).close()
    once = oocseq.open_store(path)
    always = oocseq.open_store(path, verify_checksums="always")
    for s in (once, always):
        np.testing.assert_array_equal(s.read_chunk("x", 2), X[16:24])
    flip(path, "x", 2)
    with pytest.raises(CorruptStoreError):
        always.read_chunk("x", 2)
    with pytest.raises(CorruptStoreError):
        once.verify()
    once.close()
    with pytest.raises(CorruptStoreError, match="chunk 2"):
        once.read_chunk("x", 2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_checksums_false_reads_unchecked(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"s{fmt}"
    make(path, None).close()
    flip(path, "x", 2)
    store = oocseq.open_store(path, verify_checksums=False)
    assert store.read_chunk("x", 2).shape == (8, 6)  # served: the caller asked for no check
    with pytest.raises(CorruptStoreError):
        store.verify()  # verify() always checks
    with pytest.raises(ValueError, match="verify_checksums"):
        oocseq.open_store(path, verify_checksums="sometimes")


# -- missing checksums ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("which", ["all", "one"])
def test_missing_checksums_refused(
    tmp_path: Path, fmt: str, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"s{fmt}"
    make(path).close()
    edit_manifest(path, lambda m: m.update(checksums={}) if which == "all" else m["checksums"].pop("y"))
    refused(path, "no checksums", "verify_checksums=False")
    store = oocseq.open_store(path, verify_checksums=False)  # explicit: opens, reads unchecked
    np.testing.assert_array_equal(store["x"][:], X)
    with pytest.raises(CorruptStoreError, match="cannot verify"):
        store.verify()  # never success with nothing checked
    from oocseq.cli import main

    assert main(["verify", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "OK" not in out and "checksum" in err


# -- codecs: exactly what oocseq writes ------------------------------------------------------
def _zstd_bomb(path: Path) -> None:
    meta = zarr_meta(path)
    meta["codecs"] = [meta["codecs"][0], {"name": "zstd", "configuration": {"level": 1, "checksum": False}}]
    set_zarr_meta(path, meta)
    (path / "x" / "c" / "0" / "0").write_bytes(numcodecs.Zstd(level=1).encode(np.zeros(64 << 20, np.uint8)))


def _gzip_bomb(path: Path) -> None:
    meta = zarr_meta(path)
    meta["codecs"] = [meta["codecs"][0], {"name": "gzip", "configuration": {"level": 1}}]
    set_zarr_meta(path, meta)
    (path / "x" / "c" / "0" / "0").write_bytes(numcodecs.GZip(level=1).encode(np.zeros(64 << 20, np.uint8)))


def _codec_edit(edit: Callable[[list[dict[str, Any]]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        meta = zarr_meta(path)
        edit(meta["codecs"])
        set_zarr_meta(path, meta)

    return apply


ZARR_CODEC_ATTACKS: dict[str, tuple[str | None, Callable[[Path], None]]] = {
    "zstd-bomb": (None, _zstd_bomb),
    "gzip-bomb": (None, _gzip_bomb),
    "big-endian": (None, _codec_edit(lambda c: c[0].update(configuration={"endian": "big"}))),
    "big-endian-lz4": ("lz4", _codec_edit(lambda c: c[0].update(configuration={"endian": "big"}))),
    "typesize": ("lz4", _codec_edit(lambda c: c[1]["configuration"].update(typesize=1))),
    "bitshuffle": ("lz4", _codec_edit(lambda c: c[1]["configuration"].update(shuffle="bitshuffle"))),
    "noshuffle": ("lz4", _codec_edit(lambda c: c[1]["configuration"].update(shuffle="noshuffle"))),
    "other-cname": ("lz4", _codec_edit(lambda c: c[1]["configuration"].update(cname="zstd"))),
    "blosc-dropped": ("lz4", _codec_edit(lambda c: c.pop())),
    "blosc-added": (
        None,
        _codec_edit(
            lambda c: c.append(
                {
                    "name": "blosc",
                    "configuration": {
                        "typesize": 4,
                        "cname": "lz4",
                        "clevel": 5,
                        "shuffle": "shuffle",
                        "blocksize": 0,
                    },
                }
            )
        ),
    ),
    "transpose": (
        None,
        _codec_edit(lambda c: c.insert(0, {"name": "transpose", "configuration": {"order": [1, 0]}})),
    ),
    "crc32c-codec": (None, _codec_edit(lambda c: c.append({"name": "crc32c"}))),
}


@pytest.mark.parametrize("attack", sorted(ZARR_CODEC_ATTACKS))
def test_zarr_codecs_other_than_oocseqs_refused(tmp_path: Path, attack: str) -> None:
    compression, apply = ZARR_CODEC_ATTACKS[attack]
    path = tmp_path / "s.zarr"
    make(path, compression).close()
    apply(path)
    tracemalloc.start()
    try:
        refused(path, "'x'")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # nothing was inflated


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("claim", [None, {"codec": "blosc", "cname": "zstd", "clevel": 5}])
def test_manifest_compression_must_match_codecs(tmp_path: Path, fmt: str, claim: Any) -> None:
    """The manifest says one compression, the codecs another: refused (``info`` never lies)."""
    path = tmp_path / f"s{fmt}"
    make(path, "lz4").close()
    edit_manifest(path, lambda m: m.update(compression=claim))
    refused(path, "'x'")


@pytest.mark.parametrize("fmt", FORMATS)
def test_blosc_header_bomb_refused_before_decoding(tmp_path: Path, fmt: str) -> None:
    """A Blosc frame whose header claims a huge decoded size is refused from the header."""
    path = tmp_path / f"s{fmt}"
    make(path, "lz4").close()
    f, offset, _ = chunk_span(path, "x", 1)
    with open(f, "r+b") as fh:
        fh.seek(offset + 4)
        fh.write((1 << 31).to_bytes(4, "little"))
    for fast in (True, False) if fmt == ".zarr" else (True,):
        tracemalloc.start()
        try:
            with pytest.raises(CorruptStoreError, match="chunk 1"):
                oocseq.Store(path, fast=fast).read_chunk("x", 1)
            assert tracemalloc.get_traced_memory()[1] < 16 << 20
        finally:
            tracemalloc.stop()


@pytest.mark.parametrize(
    "attack",
    [
        "gzip",
        "fletcher32",
        "shuffle-filter",
        "blosc-twice",
        "blosc-cname",
        "blosc-noshuffle",
        "blosc-for-raw",
    ],
)
def test_hdf5_filters_other_than_oocseqs_refused(tmp_path: Path, attack: str) -> None:
    import hdf5plugin

    good = tmp_path / "good.h5"
    make(good, "lz4").close()
    man = h5py.File(good, "r").attrs["oocseq"]
    path = tmp_path / "s.h5"
    kwargs: dict[str, Any] = {
        "gzip": {"compression": "gzip"},
        "fletcher32": {"fletcher32": True},
        "shuffle-filter": {"shuffle": True},
        "blosc-twice": {},
        "blosc-cname": dict(hdf5plugin.Blosc(cname="zstd", shuffle=hdf5plugin.Blosc.SHUFFLE)),
        "blosc-noshuffle": dict(hdf5plugin.Blosc(cname="lz4", shuffle=hdf5plugin.Blosc.NOSHUFFLE)),
        "blosc-for-raw": dict(hdf5plugin.Blosc(cname="lz4", shuffle=hdf5plugin.Blosc.SHUFFLE)),
    }[attack]
    with h5py.File(path, "w") as f:
        if attack == "blosc-twice":
            plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            plist.set_chunk((8, 6))
            for _ in range(2):
                plist.set_filter(32001, h5py.h5z.FLAG_OPTIONAL, (2, 2, 4, 192, 5, 1, 1))
            space = h5py.h5s.create_simple(X.shape, (h5py.h5s.UNLIMITED, 6))
            h5py.h5d.create(f.id, b"x", h5py.h5t.IEEE_F32LE, space, dcpl=plist).write(
                h5py.h5s.ALL, h5py.h5s.ALL, X
            )
        else:
            f.create_dataset("x", data=X, chunks=(8, 6), maxshape=(None, 6), **kwargs)
        f.create_dataset("y", data=Y, chunks=(8,), maxshape=(None,), **dict(hdf5plugin.Blosc(cname="lz4")))
        doc = json.loads(man)
        if attack == "blosc-for-raw":
            doc["compression"] = None
        f.attrs["oocseq"] = json.dumps(doc)
    refused(path, "'x'")


# -- HDF5: links, virtual datasets, external storage, one handle -----------------------------
def _hdf5_with_x(tmp_path: Path, put_x: Callable[[h5py.File, Path], None]) -> Path:
    good = tmp_path / "good.h5"
    other = tmp_path / "other.h5"
    make(good, None).close()
    make(other, None, x=X[::-1].copy()).close()
    man = h5py.File(good, "r").attrs["oocseq"]
    path = tmp_path / "evil.h5"
    with h5py.File(path, "w") as f:
        put_x(f, other)
        f.create_dataset("y", data=Y, chunks=(8,), maxshape=(None,))
        f.create_dataset("pad", data=np.full(200_000, 7, np.uint8))
        f.attrs["oocseq"] = man
    return path


def _external_link(f: h5py.File, other: Path) -> None:
    f["x"] = h5py.ExternalLink(str(other), "/x")


def _soft_link(f: h5py.File, other: Path) -> None:
    f.create_dataset("real", data=X, chunks=(8, 6), maxshape=(None, 6))
    f["x"] = h5py.SoftLink("/real")


def _virtual(f: h5py.File, other: Path) -> None:
    layout = h5py.VirtualLayout(shape=X.shape, dtype=X.dtype, maxshape=(None, 6))
    layout[:] = h5py.VirtualSource(str(other), "x", shape=X.shape)
    f.create_virtual_dataset("x", layout)


def _external_storage(f: h5py.File, other: Path) -> None:
    raw = other.parent / "raw.bin"
    raw.write_bytes(X.tobytes())
    f.create_dataset("x", shape=X.shape, dtype=X.dtype, external=[(str(raw), 0, X.nbytes)])


def _group_link(f: h5py.File, other: Path) -> None:
    f["x"] = h5py.ExternalLink(str(other), "/")  # a group in another file


@pytest.mark.parametrize("put_x", [_external_link, _soft_link, _virtual, _external_storage, _group_link])
def test_hdf5_links_and_foreign_storage_refused(
    tmp_path: Path, put_x: Callable[[h5py.File, Path], None]
) -> None:
    path = _hdf5_with_x(tmp_path, put_x)
    refused(path, "'x'")


def test_hdf5_fast_path_reads_the_file_h5py_opened(tmp_path: Path) -> None:
    """The file is opened once: swapping the path after opening changes nothing read."""
    path = tmp_path / "s.h5"
    make(path, None).close()
    store = oocseq.open_store(path)
    os.replace(make(tmp_path / "other.h5", None, x=X + 1).path, path)
    np.testing.assert_array_equal(store["x"][:], X)  # the file it opened, consistently
    np.testing.assert_array_equal(oocseq.open_store(path)["x"][:], X + 1)


# -- Zarr: symbolic links ----------------------------------------------------------------------
def _link(target: Path, at: Path) -> None:
    if at.is_dir():
        shutil.rmtree(at)
    else:
        at.unlink()
    os.symlink(target.resolve(), at)


SYMLINK_ATTACKS: dict[str, Callable[[Path, Path], None]] = {
    "chunk-to-other-store": lambda s, o: _link(o / "x" / "c" / "3" / "0", s / "x" / "c" / "2" / "0"),
    "chunk-to-etc": lambda s, o: _link(Path("/etc/hostname"), s / "x" / "c" / "2" / "0"),
    "chunk-dir": lambda s, o: _link(o / "x" / "c" / "2", s / "x" / "c" / "2"),
    "c-dir": lambda s, o: _link(o / "x" / "c", s / "x" / "c"),
    "field-dir": lambda s, o: _link(o / "x", s / "x"),
    "field-meta": lambda s, o: _link(o / "x" / "zarr.json", s / "x" / "zarr.json"),
    "root-meta": lambda s, o: _link(o / "zarr.json", s / "zarr.json"),
    "chunk-to-own-chunk": lambda s, o: _link(s / "x" / "c" / "2" / "0", s / "x" / "c" / "3" / "0"),
}


@pytest.mark.parametrize("attack", sorted(SYMLINK_ATTACKS))
def test_zarr_symlinks_refused(tmp_path: Path, attack: str) -> None:
    path, other = tmp_path / "s.zarr", tmp_path / "o.zarr"
    make(path, None).close()
    make(other, None).close()  # same data: only a refusal of the link can tell
    SYMLINK_ATTACKS[attack](path, other)
    err = refused(path)
    assert "link" in str(err) or "missing" in str(err), str(err)


def test_zarr_store_root_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.zarr"
    make(real, None).close()
    os.symlink(real, tmp_path / "alias.zarr")
    np.testing.assert_array_equal(oocseq.open_store(tmp_path / "alias.zarr")["x"][:], X)


def test_zarr_fifo_chunk_refused_without_hanging(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    make(path, None).close()
    chunk = path / "x" / "c" / "2" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(CorruptStoreError, match="chunk 2"):
        oocseq.open_store(path).read_chunk("x", 2)


def test_replaced_zarr_store_never_mixed_with_the_old_manifest(tmp_path: Path) -> None:
    """An old Store object of a replaced store serves its own data or an error, never the new
    store's chunks under the old manifest."""
    path = tmp_path / "s.zarr"
    make(path, None).close()
    old = oocseq.open_store(path)
    np.testing.assert_array_equal(old.read_chunk("x", 0), X[:8])  # checked once
    make(tmp_path / "new.zarr", None, x=X + 1).close()
    shutil.rmtree(path)
    os.replace(tmp_path / "new.zarr", path)
    for read in (lambda: old.read_chunk("x", 0), lambda: old.read_chunk("x", 1)):
        try:
            got = read()
        except CorruptStoreError:
            continue
        raise AssertionError(f"served {got[0]} from a replaced store")
    old.close()  # new handles: the store on disk is another one now
    with pytest.raises(CorruptStoreError, match="replaced"):
        old.read_chunk("x", 0)


# -- absurd sizes ------------------------------------------------------------------------------
def _absurd_consistent(path: Path) -> None:
    """n = chunk_len = 10**12 in the manifest and in the arrays' own metadata."""

    def edit(m: dict[str, Any]) -> None:
        m.update(n=10**12, chunk_len=10**12)
        m.pop("checksums")

    edit_manifest(path, edit)
    for field in ("x", "y"):
        meta = zarr_meta(path, field)
        meta["shape"][0] = 10**12
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 10**12
        set_zarr_meta(path, meta, field)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda m: m.update(n=10**15), id="n"),
        pytest.param(lambda m: m.update(n=10**15, chunk_len=16), id="chunks"),
        pytest.param(lambda m: m["fields"]["x"].update(shape=[10**15]), id="sample-shape"),
        pytest.param(lambda m: m["fields"]["x"].update(shape=[2**20, 2**20]), id="chunk-bytes"),
    ],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_absurd_sizes_refused_at_open(
    tmp_path: Path, fmt: str, edit: Callable[[dict[str, Any]], None]
) -> None:
    path = tmp_path / f"s{fmt}"
    make(path).close()
    edit_manifest(path, edit)
    err = refused(path, verify_checksums=False)
    assert "implausible" in str(err) and "checksum" not in str(err)


def test_absurd_sizes_consistent_with_the_arrays_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    make(path).close()
    _absurd_consistent(path)
    refused(path, "implausible", verify_checksums=False)


# -- format versions -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_version_1_store_with_crc32_still_read_and_checked(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store written by oocseq 1 (format version 1, zlib CRC-32 checksums, no "checksum"
    key) opens, reads, verifies, and says which checksum it has."""
    path = tmp_path / f"s{fmt}"
    make(path, None).close()

    def to_v1(m: dict[str, Any]) -> None:
        m["format_version"] = 1
        del m["checksum"]
        xs, ys = X.reshape(5, 8, 6), Y.reshape(5, 8)
        m["checksums"] = {
            "x": [zlib.crc32(c.tobytes()) for c in xs],
            "y": [zlib.crc32(c.tobytes()) for c in ys],
        }

    edit_manifest(path, to_v1)
    store = oocseq.open_store(path)
    assert store.manifest.format_version == 1 and store.metadata["checksum"] == "crc32"
    assert "checksum" not in store.manifest.to_json()  # a v1 manifest stays what it was
    np.testing.assert_array_equal(store["x"][:], X)
    assert store.verify() == 10
    from oocseq.cli import main

    assert main(["info", str(path)]) == 0
    assert "CRC32 " in capsys.readouterr().out
    flip(path, "x", 3)
    with pytest.raises(CorruptStoreError, match="crc32 checksum"):
        oocseq.open_store(path).read_chunk("x", 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_checksum_name_checked(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"s{fmt}"
    make(path).close()
    edit_manifest(path, lambda m: m.update(checksum="md5"))
    refused(path, "checksum")
    edit_manifest(path, lambda m: m.update(checksum="crc32"))  # the wrong algorithm: every chunk fails
    with pytest.raises(CorruptStoreError, match="chunk 0"):
        oocseq.open_store(path).read_chunk("x", 0)


# -- SIGBUS: returned arrays own their memory ------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_chunk_survives_truncation(tmp_path: Path, fmt: str) -> None:
    """A chunk returned before its file is truncated stays valid (no view of a memory map);
    run in a child process, since the failure is a SIGBUS."""
    path = tmp_path / f"s{fmt}"
    oocseq.ingest_arrays(
        path, {"x": np.random.rand(4096, 64).astype("f4")}, chunk_len=256, compression=None, preshuffle=False
    )
    target = path if fmt == ".h5" else path / "x" / "c" / "15" / "0"
    code = f"""
import os, sys, numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import oocseq
st = oocseq.open_store({str(path)!r})
c = st.read_chunk("x", 15)
before = float(c.sum())
os.truncate({str(target)!r}, 0)
assert float(c.sum()) == before
c[0, 0] = 1.0  # memory of its own
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])
    with pytest.raises((CorruptStoreError, NotAStoreError)):
        oocseq.open_store(path).read_chunk("x", 15)


def test_zarr_aux_zstd_bomb_refused_before_inflating(tmp_path: Path) -> None:
    from PIL import Image

    for k in range(3):
        (tmp_path / "src" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (k, 0, 0)).save(tmp_path / "src" / "a" / f"{k}.png")
    path = tmp_path / "i.zarr"
    oocseq.ingest_image_folder(tmp_path / "src", path, image_size=(4, 4)).close()
    assert len(oocseq.open_store(path).sources) == 3
    (path / "_oocseq" / "source" / "c" / "0").write_bytes(
        numcodecs.Zstd(level=1).encode(np.zeros(256 << 20, np.uint8))
    )
    tracemalloc.start()
    try:
        with pytest.raises(CorruptStoreError, match="auxiliary array 'source'"):
            _ = oocseq.open_store(path).sources
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("fmt", FORMATS)
def test_worker_processes_check_chunks_too(tmp_path: Path, fmt: str) -> None:
    """Worker processes reopen the store and check what they read."""
    path = tmp_path / f"s{fmt}"
    make(path, None).close()
    flip(path, "x", 2)
    workers = oocseq.WorkerOptions(workers=2, use_multiprocessing=True, start_method="forkserver")
    seq = oocseq.ChunkedSequence(path, 8, shuffle=False, workers=workers)
    try:
        with pytest.raises(CorruptStoreError) as e:
            for i in range(len(seq)):
                seq[i]
        assert "chunk 2" in str(e.value) and "'x'" in str(e.value)
    finally:
        seq.close()


@pytest.fixture(params=["openat2", "walk"])
def chunk_opener(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Chunk files opened by one ``openat2`` call where the kernel has it, or by the walk one
    path component at a time: both refuse the same files."""
    if request.param == "walk":
        monkeypatch.setattr(_raw, "_OPENAT2", [None])
    elif _raw._OPENAT2[0] is None:
        pytest.skip("no openat2 here")
    return str(request.param)


@pytest.mark.parametrize("attack", sorted(SYMLINK_ATTACKS))
def test_zarr_links_refused_by_either_opener(tmp_path: Path, attack: str, chunk_opener: str) -> None:
    """As above, by either way of opening chunk files; a chunk file reached through a link is
    refused when it is read, also after a read-ahead hint opened the others for their reads,
    and every other chunk is served right."""
    path, other = tmp_path / "s.zarr", tmp_path / "o.zarr"
    make(path, None).close()
    make(other, None).close()
    SYMLINK_ATTACKS[attack](path, other)
    err = refused(path)
    assert "link" in str(err) or "missing" in str(err), str(err)
    if not attack.startswith("chunk"):
        return
    bad = 3 if attack == "chunk-to-own-chunk" else 2
    with oocseq.open_store(path) as store:
        store.advise_chunks("x", np.arange(store.num_chunks))
        for c in range(store.num_chunks):
            if c == bad:
                with pytest.raises(CorruptStoreError, match=f"chunk {c} .*link"):
                    store.read_chunk("x", c)
            else:
                np.testing.assert_array_equal(store.read_chunk("x", c), X[c * 8 : (c + 1) * 8])
