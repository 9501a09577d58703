"""Shuffle quality: the pre-shuffle at ingestion, the shuffle report and the clustering warning.

The targets on a class-sorted store are counts computed from seeded, deterministic plans, so
they are tested here; throughput and training parity are in ``benchmarks/shuffle.py``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import oocseq
from oocseq.errors import CorruptStoreError, ShuffleWarning
from oocseq.ingest._preshuffle import BlockShuffle, default_block_len
from oocseq.mixing import label_clustering

FORMATS = (".zarr", ".h5")


# -- the block pre-shuffle -------------------------------------------------------------------
@given(n=st.integers(0, 500), block_len=st.integers(1, 40), seed=st.integers(0, 2**40), data=st.data())
def test_block_shuffle_is_a_permutation_in_blocks(n: int, block_len: int, seed: int, data) -> None:
    shuffle = BlockShuffle(n, block_len, seed)
    order = shuffle.source_index()
    np.testing.assert_array_equal(np.sort(order), np.arange(n))  # nothing lost or repeated
    # every source block stays contiguous and in order
    for lo in range(0, n, block_len):
        hi = min(lo + block_len, n)
        at = int(np.flatnonzero(order == lo)[0])
        np.testing.assert_array_equal(order[at : at + hi - lo], np.arange(lo, hi))
    # any range of stored positions: source_ranges, source_index and gather agree
    start = data.draw(st.integers(0, n), label="start")
    stop = data.draw(st.integers(start, n), label="stop")
    expected = order[start:stop]
    ranges = shuffle.source_ranges(start, stop)
    got = np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, np.int64)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(shuffle.source_index(start, stop), expected)
    if stop > start:
        src = np.arange(n * 2, dtype=np.int32).reshape(n, 2)
        reads = []

        def read(lo: int, hi: int) -> np.ndarray:
            reads.append(lo)
            return src[lo:hi]

        np.testing.assert_array_equal(shuffle.gather(read, start, stop), src[expected])
        assert reads == sorted(reads)  # the source is read in increasing order
        # a numpy array is sliced directly: the same samples
        np.testing.assert_array_equal(shuffle.gather(src, start, stop), src[expected])
    # a pure function of (n, block_len, seed)
    np.testing.assert_array_equal(BlockShuffle(n, block_len, seed).source_index(), order)


def test_block_shuffle_seeds_differ_and_are_pinned() -> None:
    a = BlockShuffle(1000, 10, 0).source_index()
    b = BlockShuffle(1000, 10, 1).source_index()
    assert not np.array_equal(a, b)
    # pinned: the stored order of a pre-shuffled store must not change between versions
    assert BlockShuffle(50, 4, 0).source_index()[:12].tolist() == [24, 25, 26, 27, 28, 29, 30, 31, 0, 1, 2, 3]


def test_default_block_len() -> None:
    assert default_block_len(3072, 1365) == 11  # 32 KiB of 3 KiB samples
    assert default_block_len(4, 10**6) == 8192  # tiny samples: 32 KiB
    assert default_block_len(4, 100_000) == 1562  # at least 64 blocks per chunk
    assert default_block_len(4, 1000) == 15  # at least 64 blocks per chunk
    assert default_block_len(10**9, 10) == 1


@pytest.mark.parametrize(
    "meta", [{"algorithm": "nope"}, {"algorithm": "blocks-v1", "seed": 0}, {"seed": "x"}]
)
def test_malformed_preshuffle_record_is_refused(meta: dict) -> None:
    with pytest.raises(CorruptStoreError, match="pre-shuffle"):
        BlockShuffle.from_json(10, meta)


@pytest.mark.parametrize("fmt", FORMATS)
def test_preshuffled_ingestion_is_deterministic_for_a_seed(tmp_path: Path, fmt: str) -> None:
    """Same source, same seed: the same chunk bytes (what resuming an ingestion relies on)."""
    x = np.arange(3000, dtype=np.float32).reshape(1000, 3)
    y = np.arange(1000) // 100
    a = oocseq.ingest_arrays(tmp_path / f"a{fmt}", {"x": x, "y": y}, chunk_len=64, seed=3)
    b = oocseq.ingest_arrays(tmp_path / f"b{fmt}", {"x": x, "y": y}, chunk_len=64, seed=3)
    c = oocseq.ingest_arrays(tmp_path / f"c{fmt}", {"x": x, "y": y}, chunk_len=64, seed=4)
    assert a.metadata["preshuffle"] == {"algorithm": "blocks-v1", "seed": 3, "block_len": 1}
    for name in ("x", "y"):
        for k in range(a.num_chunks):
            np.testing.assert_array_equal(a.read_chunk(name, k), b.read_chunk(name, k))
    assert not np.array_equal(a["y"][:], c["y"][:])
    np.testing.assert_array_equal(a["x"][:], x[a.source_index])
    np.testing.assert_array_equal(a["y"][:], y[a.source_index])


@pytest.mark.parametrize("fmt", FORMATS)
def test_streams_are_spooled_and_preshuffled(tmp_path: Path, fmt: str) -> None:
    """An iterable of batches (not random access) is spooled to disk and read back in the same
    block order as the same data given as arrays; the spool is removed."""
    x = np.arange(6000, dtype=np.float64).reshape(2000, 3)
    y = np.repeat(np.arange(10), 200)

    def batches(a: np.ndarray, size: int):
        for start in range(0, len(a), size):
            yield a[start : start + size]

    streamed = oocseq.ingest_arrays(
        tmp_path / f"s{fmt}", {"x": batches(x, 97), "y": y}, chunk_len=128, seed=2
    )
    from_arrays = oocseq.ingest_arrays(tmp_path / f"a{fmt}", {"x": x, "y": y}, chunk_len=128, seed=2)
    assert streamed.metadata["preshuffle"] == from_arrays.metadata["preshuffle"] is not None
    np.testing.assert_array_equal(streamed.source_index, from_arrays.source_index)
    np.testing.assert_array_equal(streamed["x"][:], x[streamed.source_index])
    np.testing.assert_array_equal(streamed["y"][:], y[streamed.source_index])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a{fmt}", f"s{fmt}"]  # no spool left


def test_stream_of_wrong_length_is_refused_and_spool_removed(tmp_path: Path) -> None:
    from oocseq.errors import FieldLengthError

    with pytest.raises(FieldLengthError):
        oocseq.ingest_arrays(tmp_path / "s.zarr", {"x": (np.zeros(10) for _ in range(3)), "y": np.zeros(31)})
    assert list(tmp_path.iterdir()) == []


def test_stale_spool_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    from oocseq.ingest._spool import Spool

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".s.zarr.spool-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "0.raw").write_bytes(b"x" * 100)
    with Spool(tmp_path / "s.zarr") as spool:
        assert not stale.exists() and spool.dir.exists()
    assert not spool.dir.exists()


def test_opt_out_keeps_source_order(tmp_path: Path) -> None:
    y = np.repeat(np.arange(4), 50)
    store = oocseq.ingest_arrays(tmp_path / "s.h5", {"y": y}, chunk_len=16, preshuffle=False)
    assert store.metadata["preshuffle"] is None
    np.testing.assert_array_equal(store["y"][:], y)


# -- class-sorted sources: the targets ---------------------------------------------------------
N, CLASSES, CHUNK_LEN = 60_000, 10, 1365  # the measured case: 44 chunks, default window 8


@pytest.fixture(scope="module")
def sorted_stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, oocseq.Store]:
    d = tmp_path_factory.mktemp("mix")
    y = np.repeat(np.arange(CLASSES), N // CLASSES)
    x = np.arange(N, dtype=np.int32)
    shuffled = oocseq.ingest_arrays(d / "pre.zarr", {"x": x, "y": y}, chunk_len=CHUNK_LEN)
    # small samples: the longest blocks the default allows (64 per chunk), the worst case for mixing
    assert shuffled.metadata["preshuffle"]["block_len"] == CHUNK_LEN // 64
    parts = []
    for k in range(CLASSES):  # one .npy per class, the usual layout
        np.save(d / f"class{k}.npy", np.full(N // CLASSES, k, dtype=np.int64))
        parts.append(d / f"class{k}.npy")
    return {
        "sorted": oocseq.ingest_arrays(
            d / "sorted.h5", {"x": x, "y": y}, chunk_len=CHUNK_LEN, preshuffle=False
        ),
        "arrays": shuffled,
        "npy": oocseq.ingest_npy({"y": parts}, d / "npy.zarr", chunk_len=CHUNK_LEN),
    }


@pytest.mark.parametrize("kind", ["arrays", "npy"])
@pytest.mark.parametrize(("batch_size", "ratio"), [(32, 0.95), (128, 0.97), (512, 0.97)])
def test_default_pipeline_mixes_like_iid(sorted_stores, kind: str, batch_size: int, ratio: float) -> None:
    store = sorted_stores[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShuffleWarning)  # a pre-shuffled store raises no warning
        seq = oocseq.ChunkedSequence(store, batch_size, x="y", y="y", seed=0)
    report = seq.shuffle_report(max_batches=10**6)
    assert report.num_classes == CLASSES and report.batches == -(-N // batch_size)
    assert report.entropy_ratio >= ratio, str(report)
    if batch_size == 128:
        assert report.classes_per_batch >= 9.5, str(report)


def test_sorted_store_warns_and_reports(sorted_stores) -> None:
    store = sorted_stores["sorted"]
    with pytest.warns(ShuffleWarning, match="preshuffle=True") as caught:
        seq = oocseq.ChunkedSequence(store, 128, seed=0)
    assert "'y'" in str(caught[0].message) and str(store.path) in str(caught[0].message)
    report = seq.shuffle_report()
    assert report.entropy_ratio < 0.8 and report.classes_per_batch < 8, str(report)
    assert report.window == 8 and report.num_chunks == 44
    assert report.window_share == pytest.approx(8 / 44)
    assert 1 <= report.chunks_per_batch <= report.max_chunks_per_batch <= 2 * 8 + 1
    text = str(report)
    assert "entropy per batch" in text and "ordered by label" in text
    # an unshuffled sequence keeps the store's order on purpose: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShuffleWarning)
        oocseq.ChunkedSequence(store, 128, shuffle=False)


def test_label_clustering(sorted_stores, tmp_path: Path) -> None:
    assert label_clustering(sorted_stores["sorted"]) < 0.2
    assert label_clustering(sorted_stores["arrays"]) > 0.9
    assert label_clustering(sorted_stores["arrays"], label="nope") is None
    one_chunk = oocseq.ingest_arrays(tmp_path / "one.zarr", {"y": np.arange(10)}, chunk_len=10)
    assert label_clustering(one_chunk) is None
    floats = oocseq.ingest_arrays(tmp_path / "f.zarr", {"y": np.linspace(0, 1, 40)}, chunk_len=4)
    assert label_clustering(floats) is None


def test_report_without_labels(sorted_stores) -> None:
    seq = oocseq.ChunkedSequence(sorted_stores["arrays"], 64, x="x", y=None)
    report = seq.shuffle_report(max_batches=5)
    assert report.label is None and report.entropy_ratio is None and report.batches == 5
    assert "no integer label field" in str(report)


def test_cli_info_shuffle(sorted_stores) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "oocseq", "info", str(sorted_stores["sorted"].path), "--shuffle"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "shuffle report" in out.stdout and "iid shuffle" in out.stdout
    assert "pre-shuffled at ingestion: no" in out.stdout


def test_class_sorted_csv_is_preshuffled(tmp_path: Path) -> None:
    """A table exported in class order, ingested with defaults, mixes like an iid shuffle."""
    n = 20_000
    y = np.repeat(np.array(["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen", "ibis", "jay"]), n // 10)
    feats = np.arange(n * 3, dtype=np.float64).reshape(n, 3)
    csv = tmp_path / "sorted.csv"
    with open(csv, "w") as f:
        f.write("a,b,c,label\n")
        for row, label in zip(feats, y, strict=True):
            f.write(f"{row[0]:g},{row[1]:g},{row[2]:g},{label}\n")
    store = oocseq.ingest_csv(csv, tmp_path / "t.zarr", label_column="label", chunk_len=500)
    assert store.metadata["preshuffle"]["algorithm"] == "blocks-v1"
    order = store.source_index
    np.testing.assert_array_equal(store["x"][:], feats[order].astype(np.float32))  # row provenance
    names = store.metadata["class_names"]
    assert [names[k] for k in store["y"][:]] == y[order].tolist()
    assert sorted(tmp_path.iterdir()) == sorted([csv, tmp_path / "t.zarr"])  # no spool left
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShuffleWarning)
        seq = oocseq.ChunkedSequence(store, 128, seed=0)
    report = seq.shuffle_report(max_batches=10**6)
    assert report.entropy_ratio >= 0.97 and report.classes_per_batch >= 9.5, str(report)
    plain = oocseq.ingest_csv(csv, tmp_path / "p.zarr", label_column="label", chunk_len=500, preshuffle=False)
    with pytest.warns(ShuffleWarning):
        seq = oocseq.ChunkedSequence(plain, 128, seed=0)
    assert seq.shuffle_report().entropy_ratio < 0.8
