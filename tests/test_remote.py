"""Stores in object storage, against a real S3-compatible server on localhost (moto's server
mode, behind a counting proxy: :mod:`oocseq.testing.s3`). Nothing reaches beyond localhost.

Stores encode the sample index in their values (``oocseq.testing.stores``), so every served
batch checks itself.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

pytest.importorskip("obstore")
pytest.importorskip("moto.server")

import oocseq
from oocseq import ChunkedSequence, RemoteOptions, ShardOptions
from oocseq.errors import ArgumentError, CorruptStoreError, StoreNotFoundError, StoreReadError
from oocseq.testing.s3 import S3Server
from oocseq.testing.stores import write_index_store

pytestmark = [
    pytest.mark.timeout(180),
    # JAX (imported by the Keras tests of the same session) warns at every fork
    pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
]

N, CHUNK, BATCH, WINDOW = 1000, 32, 24, 4  # 32 chunks (the last one short)
BUCKET = "data"


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.create_bucket(BUCKET, public=True)  # public: also read through plain http:// URLs
        yield server
    settle()


def settle(timeout: float = 10.0) -> None:
    """Wait until this process's connections to the stopped server are closed (obstore closes
    them in its own threads), so that later tests count file descriptors from a still state."""
    import gc
    import os

    gc.collect()
    deadline = time.monotonic() + timeout
    last, still = -1, 0
    while time.monotonic() < deadline and still < 5:
        now = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
        still = still + 1 if now == last else 0
        last = now
        time.sleep(0.1)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return write_index_store(tmp_path_factory.mktemp("remote") / "idx.zarr", N, CHUNK)


@pytest.fixture(scope="module")
def url(s3, local):
    s3.upload(local.path, BUCKET, "stores/idx.zarr")
    return f"s3://{BUCKET}/stores/idx.zarr"


def fresh_copy(s3, local, compression="lz4"):
    """A store of its own in the bucket (tests that damage it): its URL and key prefix."""
    prefix = f"copies/{uuid.uuid4().hex}.zarr"
    src = local
    if compression != "lz4":
        src = write_index_store(local.path.parent / f"{uuid.uuid4().hex}.zarr", N, CHUNK, compression=None)
    s3.upload(src.path, BUCKET, prefix)
    return f"s3://{BUCKET}/{prefix}", prefix


def seq_of(source, **kw):
    return ChunkedSequence(source, BATCH, x="x", y="y", seed=3, window=WINDOW, **kw)


def chunk_gets(s3) -> dict[str, int]:
    return {p: k for p, k in s3.proxy.requests.items() if "/c/" in p}


def test_an_epoch_from_s3_equals_the_local_one_batch_for_batch(url, local, s3):
    remote = seq_of(url)
    here = seq_of(local)
    assert len(remote) == len(here)
    for epoch in (0, 1):
        remote.set_epoch(epoch)
        here.set_epoch(epoch)
        served = []
        for i in range(len(remote)):
            (xr, yr), (xl, yl) = remote[i], here[i]
            np.testing.assert_array_equal(xr, xl)
            np.testing.assert_array_equal(yr, yl)
            served.extend(np.round(xr[:, 0]).astype(int).tolist())
        assert sorted(served) == list(range(N)), "not every sample exactly once"
    assert remote.store.location == url
    assert repr(remote.store).startswith(f"<oocseq.Store {url!r}")


def test_an_epoch_fetches_each_chunk_once(url, local, s3):
    store = oocseq.open_store(url)
    seq = seq_of(store)
    s3.proxy.reset()
    for i in range(len(seq)):
        seq[i]
    gets = chunk_gets(s3)
    assert len(gets) == store.num_chunks * 2  # fields x and y
    assert max(gets.values()) == 1
    fetched = s3.proxy.bytes_out
    stored = local.stored_nbytes("x") + local.stored_nbytes("y")
    assert fetched <= 1.05 * stored


def test_the_whole_store_reads_and_verifies(url, local):
    store = oocseq.open_store(url)
    for name in local.fields:
        np.testing.assert_array_equal(store[name][:], local[name][:])
    assert store.verify() == local.num_chunks * len(local.fields)
    assert store.stored_nbytes("x") == local.stored_nbytes("x")
    assert store.metadata == local.metadata


def test_storage_options_instead_of_the_environment(url, s3, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3.endpoint, "region_name": "us-east-1"},
    }
    store = oocseq.open_store(url, storage_options=options)
    seq = seq_of(store)  # a Store opened with storage_options, passed on
    assert len(seq[0][0]) == BATCH
    # the options travel with the store to other processes
    import pickle

    again = pickle.loads(pickle.dumps(store))
    assert again.storage_options == options
    np.testing.assert_array_equal(again["x"][5:9], store["x"][5:9])


def test_unknown_storage_option_is_a_clear_error(url):
    with pytest.raises(ArgumentError, match=r"storage_options|object storage"):
        oocseq.open_store(url, storage_options={"no_such_option": 1})


def test_plain_http_url_reads_the_same(url, local, s3):
    http = f"{s3.endpoint}/{BUCKET}/stores/idx.zarr"
    store = oocseq.open_store(http)
    np.testing.assert_array_equal(store["x"][:], local["x"][:])


def test_file_url_is_a_local_path(local):
    store = oocseq.open_store(local.path.resolve().as_uri())
    assert store.url is None and store.path == local.path.resolve()
    np.testing.assert_array_equal(store["y"][:], local["y"][:])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("ftp://host/x.zarr", "unsupported URL scheme"),
        ("s3://data/stores/x.h5", "oocseq convert"),
        ("gs://bucket/x.hdf5", "oocseq convert"),
        ("s3://data/stores/x.txt", "cannot tell the store format"),
        ("file://otherhost/x.zarr", "local path"),
    ],
)
def test_urls_refused_before_any_request(bad, match):
    with pytest.raises(ArgumentError, match=match):
        oocseq.open_store(bad)


def test_storage_options_for_a_local_path_are_refused(local):
    with pytest.raises(ArgumentError, match="object storage"):
        oocseq.open_store(local.path, storage_options={"key": "k"})


def test_no_store_at_the_url(s3):
    with pytest.raises(StoreNotFoundError, match="no store at"):
        oocseq.open_store(f"s3://{BUCKET}/nothing/here.zarr")


@pytest.mark.parametrize("compression", ["lz4", None])
def test_a_changed_byte_in_a_remote_chunk_is_caught(s3, local, compression):
    url, prefix = fresh_copy(s3, local, compression)
    store = oocseq.open_store(url)
    seq = seq_of(store)
    for i in range(len(seq)):  # a clean epoch first: every chunk read and checked once
        seq[i]
    key = f"{prefix}/x/c/5/0"
    data = bytearray(s3.get(BUCKET, key))
    data[len(data) // 2] ^= 0x10
    s3.put(BUCKET, key, bytes(data))
    # each read downloads again, so the damage is caught after the chunk was checked once
    with pytest.raises(CorruptStoreError, match=r"chunk 5 of field 'x'") as e:
        for i in range(len(seq)):
            seq[i]
    assert f"{url}/x/c/5/0" in str(e.value)
    with pytest.raises(CorruptStoreError, match="chunk 5 of field 'x'"):
        oocseq.open_store(url).verify()


def test_a_missing_or_oversized_remote_chunk_is_caught(s3, local):
    url, prefix = fresh_copy(s3, local)
    s3.put(BUCKET, f"{prefix}/x/c/3/0", b"\0" * (CHUNK * 3 * 4 + 100))
    with pytest.raises(CorruptStoreError, match=r"chunk 3 of field 'x'.*more than"):
        oocseq.open_store(url)["x"][3 * CHUNK]
    url, prefix = fresh_copy(s3, local)
    import obstore

    obstore.delete(s3._store(BUCKET), f"{prefix}/y/c/7")
    with pytest.raises(CorruptStoreError, match=r"chunk 7 of field 'y'.*missing"):
        oocseq.open_store(url)["y"][7 * CHUNK]


def test_a_server_gone_mid_epoch_is_a_clear_error_not_a_hang(local):
    with S3Server() as server:
        server.create_bucket(BUCKET)
        server.upload(local.path, BUCKET, "idx.zarr")
        options = RemoteOptions(retries=2, retry_timeout=3.0, timeout=3.0)
        seq = seq_of(oocseq.open_store(f"s3://{BUCKET}/idx.zarr", remote=options))
        for i in range(3):
            seq[i]
        server.proxy.stop()
        t0 = time.monotonic()
        with pytest.raises(
            StoreReadError, match=r"s3://data/idx.zarr/[xy]/c/\d+.*(fetch failed|no answer)"
        ) as e:
            for i in range(3, len(seq)):
                seq[i]
        assert time.monotonic() - t0 < 90
        assert "retries" in str(e.value) or "network" in str(e.value)


@pytest.mark.parametrize("balance", ["drop", "pad"])
def test_ranks_fetch_only_their_share(url, s3, balance):
    world = 3
    seen: list[set[str]] = []
    for rank in range(world):
        seq = seq_of(oocseq.open_store(url), shard=ShardOptions(rank, world, balance))
        s3.proxy.reset()
        for i in range(len(seq)):
            seq[i]
        gets = chunk_gets(s3)
        # the chunk reads the plan makes (as from local disk); "pad" reads a rank's padding
        # chunk again, and its read-ahead may fetch it once more
        decodes = seq.core._local.cache.decodes
        if balance == "drop":
            assert max(gets.values()) == 1
            assert sum(gets.values()) == decodes
        else:
            assert decodes <= sum(gets.values()) <= decodes + 2
        seen.append(set(gets))
    for a in range(world):
        for b in range(a + 1, world):
            assert not seen[a] & seen[b], "two ranks fetched the same chunk"
    if balance == "pad":  # every chunk of both fields is fetched by exactly one rank
        assert sum(len(s) for s in seen) == 2 * (-(-N // CHUNK))


def test_dataloader_workers_fetch_only_their_share(url, s3):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from oocseq.adapters.torch import TorchBatches

    workers = 2
    ds = TorchBatches(seq_of(oocseq.open_store(url)), as_tensors=False)
    s3.proxy.reset()
    loader = DataLoader(ds, batch_size=None, num_workers=workers, multiprocessing_context="spawn")
    served = [round(v) for x, _ in loader for v in np.asarray(x)[:, 0]]
    assert sorted(served) == list(range(N))
    gets = chunk_gets(s3)
    num_chunks = -(-N // CHUNK)
    # Beyond its own chunks, a worker reads only the window its range shares with the next
    # worker's (its read-ahead stops at its range's end).
    assert len(gets) == 2 * num_chunks
    assert sum(gets.values()) <= 2 * (num_chunks + WINDOW * (workers - 1))


def test_a_forked_worker_is_refused_clearly_not_hung(url):
    pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from oocseq.adapters.torch import TorchBatches

    ds = TorchBatches(seq_of(oocseq.open_store(url)), as_tensors=False)
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(StoreReadError, match=r"forked.*spawn"):
        next(iter(loader))


def test_remote_options_are_validated():
    with pytest.raises(ArgumentError, match="max_requests"):
        RemoteOptions(max_requests=0)
    with pytest.raises(ArgumentError, match="max_bytes_in_flight"):
        RemoteOptions(max_bytes_in_flight=10)
    with pytest.raises(ArgumentError, match="retry_timeout"):
        RemoteOptions(retry_timeout=0)
    with pytest.raises(ArgumentError, match="remote must be"):
        oocseq.open_store("s3://data/x.zarr", remote={"retries": 1})  # type: ignore[arg-type]


@pytest.mark.parametrize("dest_suffix", [".h5", ".zarr"])
def test_convert_between_formats_keeps_every_sample_and_checksum(local, tmp_path, dest_suffix):
    h5 = oocseq.convert_store(local, tmp_path / "a.h5")
    back = oocseq.convert_store(h5, tmp_path / f"b{dest_suffix}")
    for store in (h5, back):
        assert store.manifest.checksums == local.manifest.checksums
        assert store.metadata == local.metadata
        for name in local.fields:
            np.testing.assert_array_equal(store[name][:], local[name][:])


def test_convert_from_a_url_and_the_cli(url, local, tmp_path):
    from oocseq.cli import main

    assert main(["convert", url, str(tmp_path / "c.h5")]) in (0, None)
    h5 = oocseq.open_store(tmp_path / "c.h5")
    np.testing.assert_array_equal(h5["x"][:], local["x"][:])
    assert main(["verify", url]) in (0, None)
    assert main(["info", url]) in (0, None)
    assert main(["bench", url, "-q", "--batch-size", "32"]) in (0, None)


def test_convert_refuses_a_damaged_source(local, tmp_path):
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(local.path, bad)
    chunk = bad / "x" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=r"chunk 2 of field 'x'"):
        oocseq.convert_store(bad, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_disk_cache_serves_the_second_epoch_and_stays_within_its_limit(url, local, s3, tmp_path):
    cache = tmp_path / "cache"
    options = RemoteOptions(cache_dir=str(cache))
    seq = seq_of(oocseq.open_store(url, remote=options))
    here = seq_of(local)
    s3.proxy.reset()
    for i in range(len(seq)):
        seq[i]
    first = sum(chunk_gets(s3).values())
    assert 0 < first <= 2 * local.num_chunks  # (the y chunks read at construction are cached)
    s3.proxy.reset()
    seq.set_epoch(1)
    here.set_epoch(1)
    for i in range(len(seq)):
        (xr, yr), (xl, yl) = seq[i], here[i]
        np.testing.assert_array_equal(xr, xl)
        np.testing.assert_array_equal(yr, yl)
    assert chunk_gets(s3) == {}, "the second epoch went to the server"
    # a new process (a reopened store) finds the cache too
    again = oocseq.open_store(url, remote=options)
    np.testing.assert_array_equal(again["x"][:], local["x"][:])
    assert chunk_gets(s3) == {}
    # a limit smaller than the store: evicted down to the limit
    limit = local.stored_nbytes("x") // 3
    small = oocseq.open_store(url, remote=RemoteOptions(cache_dir=str(tmp_path / "small"), cache_limit=limit))
    small["x"][:]
    held = sum(p.stat().st_size for p in (tmp_path / "small").rglob("*") if p.is_file())
    assert 0 < held <= limit


def test_a_damaged_cached_copy_is_caught_and_dropped(url, local, tmp_path):
    cache = tmp_path / "cache"
    options = RemoteOptions(cache_dir=str(cache))
    oocseq.open_store(url, remote=options)["x"][:]
    files = sorted(p for p in cache.rglob("*") if p.is_file() and "x%2Fc%2F4%2F0" in p.name)
    assert len(files) == 1
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0x04
    files[0].write_bytes(bytes(data))
    store = oocseq.open_store(url, remote=options)
    with pytest.raises(CorruptStoreError, match=r"chunk 4 of field 'x'.*cached copy"):
        store["x"][4 * CHUNK]
    assert not files[0].exists()
    np.testing.assert_array_equal(store["x"][4 * CHUNK], local["x"][4 * CHUNK])  # fetched again


def test_ingest_straight_to_s3_with_the_manifest_last(s3, local):
    from oocseq.errors import StoreExistsError
    from oocseq.testing.stores import index_encoding_fields

    dest = f"s3://{BUCKET}/ingested/{uuid.uuid4().hex}.zarr"
    s3.proxy.reset()
    store = oocseq.ingest_arrays(dest, index_encoding_fields(N), chunk_len=CHUNK, preshuffle=False)
    assert store.location == dest
    puts = [path for method, path in s3.proxy.log if method == "PUT"]
    root = f"/{dest.removeprefix('s3://')}/zarr.json"
    assert puts[-1] == root and puts.count(root) == 1, "the manifest must land last"
    assert store.manifest.checksums == local.manifest.checksums
    here, there = seq_of(local), seq_of(store)
    for i in range(len(here)):
        np.testing.assert_array_equal(here[i][0], there[i][0])
    with pytest.raises(StoreExistsError, match="already exists"):
        oocseq.ingest_arrays(dest, index_encoding_fields(N), chunk_len=CHUNK)
    # replaced by a smaller store: the old store's extra chunks are deleted
    small = oocseq.ingest_arrays(dest, index_encoding_fields(100), chunk_len=CHUNK, overwrite=True)
    assert len(oocseq.open_store(dest)) == 100 == len(small)
    with pytest.raises(FileNotFoundError):  # the old store's extra chunks are deleted
        s3.get(BUCKET, f"{dest.removeprefix(f's3://{BUCKET}/')}/x/c/20/0")


def test_a_cluster_ingesting_to_s3_sends_chunks_back(s3, local):
    """With a URL destination the store is staged on this machine, which a cluster's other
    machines do not see: cluster workers return encoded chunks instead of writing files."""
    distributed = pytest.importorskip("distributed")
    from oocseq.ingest._writer import StoreWriter, field_spec
    from oocseq.testing.stores import index_encoding_fields

    dest = f"s3://{BUCKET}/cluster/{uuid.uuid4().hex}.zarr"
    w = StoreWriter(dest, {"x": field_spec("x", (3,), np.float32)}, chunk_len=4)
    try:
        assert w.encode_args("x", 0)[3] is None
    finally:
        w.abort()
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as c,
        distributed.Client(c) as client,
    ):
        store = oocseq.ingest_arrays(
            dest, index_encoding_fields(N), chunk_len=CHUNK, preshuffle=False, client=client
        )
    assert store.manifest.checksums == local.manifest.checksums
    store.close()


def test_hdf5_cannot_be_ingested_to_object_storage():
    from oocseq.testing.stores import index_encoding_fields

    with pytest.raises(ArgumentError, match=r"\*\.zarr"):
        oocseq.ingest_arrays(f"s3://{BUCKET}/x.h5", index_encoding_fields(10))


def test_worker_processes_started_by_spawn_serve_the_epoch(url, local):
    from oocseq import WorkerOptions

    workers = WorkerOptions(workers=2, use_multiprocessing=True, start_method="spawn")
    remote = seq_of(oocseq.open_store(url), workers=workers)
    here = seq_of(local)
    try:
        for i in range(len(remote)):
            np.testing.assert_array_equal(remote[i][0], here[i][0])
    finally:
        remote.close()


class _Watched:
    """An array source that calls ``seen()`` at every read (to look at the world mid-ingestion)."""

    def __init__(self, data, seen):
        self.data, self.seen = data, seen
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, key):
        self.seen()
        return self.data[key]

    def __len__(self):
        return len(self.data)


def _objects(s3, prefix: str) -> list[str]:
    import obstore

    return [m["path"] for batch in obstore.list(s3._store(BUCKET), prefix=prefix) for m in batch]


def test_ingest_to_s3_streams_chunks_and_stages_no_chunk_locally(s3, local, tmp_path, monkeypatch):
    import tempfile

    from oocseq.testing.stores import index_encoding_fields

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the writer stages metadata
    dest = f"s3://{BUCKET}/streamed/{uuid.uuid4().hex}.zarr"
    key = dest.removeprefix(f"s3://{BUCKET}/")
    fields = index_encoding_fields(N)
    reads, staged = [], []

    def seen():
        staged.append([p for p in tmp_path.rglob("*") if p.is_file() and "/c/" in p.as_posix()])
        reads.append(sum(1 for method, path in s3.proxy.log if method == "PUT" and "/c/" in path))
        assert not any(m == "PUT" and p.endswith(f"{key}/zarr.json") for m, p in s3.proxy.log)

    s3.proxy.reset()
    fields["x"] = _Watched(fields["x"], seen)
    store = oocseq.ingest_arrays(dest, fields, chunk_len=CHUNK, preshuffle=False)
    assert len(reads) >= local.num_chunks  # (and a few reads that identify the source)
    assert reads[-1] > 0, "no chunk reached the bucket before the source was read to its end"
    assert all(files == [] for files in staged), "chunks were staged on local disk"
    assert list(tmp_path.iterdir()) == [], "the staging folder is left behind"
    puts = [path for method, path in s3.proxy.log if method == "PUT"]
    assert puts[-1] == f"/{BUCKET}/{key}/zarr.json" and puts.count(puts[-1]) == 1
    assert sum("/c/" in p for p in puts) == 3 * local.num_chunks  # id, x, y: each chunk once
    assert store.manifest.checksums["x"] == local.manifest.checksums["x"]
    remote, here = seq_of(oocseq.open_store(dest)), seq_of(local)
    for epoch in (0, 1):
        remote.set_epoch(epoch)
        here.set_epoch(epoch)
        for i in range(len(here)):
            for a, b in zip(remote[i], here[i], strict=True):
                np.testing.assert_array_equal(a, b)


def test_the_chunks_in_flight_stay_within_their_byte_bound(s3):
    from oocseq.storage._remote import ChunkUploader

    url = f"s3://{BUCKET}/bounded/{uuid.uuid4().hex}.zarr"
    uploader = ChunkUploader(url, None, RemoteOptions(max_requests=8, max_bytes_in_flight=1 << 20))
    try:
        for i in range(12):
            uploader.put(f"x/c/{i}/0", bytes([i]) * (300 << 10))
        uploader.wait()
        assert 0 < uploader.peak_bytes <= 1 << 20
        assert uploader.bytes == 12 * (300 << 10)
    finally:
        uploader.close()
    assert s3.get(BUCKET, f"{url.removeprefix(f's3://{BUCKET}/')}/x/c/11/0") == bytes([11]) * (300 << 10)


def test_a_failed_ingestion_to_s3_leaves_no_store(s3, local, tmp_path, monkeypatch):
    import tempfile

    from oocseq.testing.stores import index_encoding_fields

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dest = f"s3://{BUCKET}/failed/{uuid.uuid4().hex}.zarr"
    reads = []

    def seen():
        reads.append(1)
        if len(reads) == 10:
            raise OSError("the source's disk failed")

    fields = index_encoding_fields(N)
    fields["x"] = _Watched(fields["x"], seen)
    with pytest.raises(OSError, match="disk failed"):
        oocseq.ingest_arrays(dest, fields, chunk_len=CHUNK, preshuffle=False)
    with pytest.raises(StoreNotFoundError):
        oocseq.open_store(dest)
    assert _objects(s3, dest.removeprefix(f"s3://{BUCKET}/")) == [], "chunks sent are deleted"
    assert list(tmp_path.iterdir()) == []


def _run_killed(script: str, s3, key: str, tmp_path, objects: int = 4) -> None:
    """Run ``script`` in a new process (temporary folder ``tmp_path``) and kill it once
    ``objects`` objects are under ``key``."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(oocseq.__file__).parents[1]), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(_objects(s3, key)) < objects and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the ingestion ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_ingestion_to_s3_leaves_no_store_and_a_new_one_replaces_its_chunks(
    s3, local, tmp_path, monkeypatch
):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dest = f"s3://{BUCKET}/killed/{uuid.uuid4().hex}.zarr"
    key = dest.removeprefix(f"s3://{BUCKET}/")
    script = (
        "import time, oocseq\n"
        "from oocseq.testing.stores import index_encoding_fields\n"
        f"f = index_encoding_fields({N})\n"
        "def slow(x):\n"
        f"    for i in range(0, len(x), {CHUNK}):\n"
        "        time.sleep(0.2)\n"
        f"        yield x[i:i + {CHUNK}]\n"
        f"oocseq.ingest_arrays({dest!r}, {{'x': slow(f['x'])}}, chunk_len={CHUNK}, preshuffle=False)\n"
    )
    _run_killed(script, s3, key, tmp_path)
    left = _objects(s3, key)
    assert len(left) >= 4 and not any(p.endswith("zarr.json") for p in left)
    with pytest.raises(StoreNotFoundError):
        oocseq.open_store(dest)
    # a new ingestion there needs no overwrite (there is no store) and leaves only its own objects
    with pytest.warns(UserWarning, match="discarding the partial store of an interrupted ingestion"):
        store = oocseq.ingest_arrays(dest, {"x": np.zeros((40, 3), np.float32)}, chunk_len=CHUNK)
    assert len(store) == 40
    assert list(tmp_path.iterdir()) == [], "the staging folder is left behind"
    assert all(p.endswith("zarr.json") or p.startswith(f"{key}/x/c/") for p in _objects(s3, key))
    assert len([p for p in _objects(s3, key) if "/c/" in p]) == 2


def test_a_server_gone_mid_ingestion_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    import tempfile

    from oocseq.errors import StoreWriteError
    from oocseq.ingest._writer import StoreWriter, field_spec

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with S3Server() as server:
        server.create_bucket(BUCKET)
        options = RemoteOptions(retries=1, retry_timeout=2.0, timeout=2.0)
        dest = f"s3://{BUCKET}/gone.zarr"
        t0 = time.monotonic()
        with (
            pytest.raises(StoreWriteError, match=r"s3://data/gone.zarr/x/c/\d+/0.*run the ingestion again"),
            StoreWriter(dest, {"x": field_spec("x", (64,), np.float32)}, chunk_len=16, remote=options) as w,
        ):
            for i in range(200):
                if i == 3:
                    server.proxy.stop()
                w.append("x", np.full((16, 64), i, np.float32))
        assert time.monotonic() - t0 < 90
        assert list(tmp_path.iterdir()) == []


def test_storage_options_for_writes_instead_of_the_environment(s3, local, tmp_path, monkeypatch):
    from oocseq.testing.stores import index_encoding_fields

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3.endpoint, "region_name": "us-east-1"},
    }
    dest = f"s3://{BUCKET}/options/{uuid.uuid4().hex}.zarr"
    store = oocseq.ingest_arrays(
        dest, index_encoding_fields(N), chunk_len=CHUNK, preshuffle=False, storage_options=options
    )
    assert store.storage_options == options
    assert store.manifest.checksums["x"] == local.manifest.checksums["x"]
    np.save(tmp_path / "a.npy", np.arange(50, dtype=np.int32))
    npy = oocseq.ingest_npy(tmp_path / "a.npy", dest + "-npy.zarr", storage_options=options)
    assert sorted(npy["x"][:].tolist()) == list(range(50))
    copy = oocseq.convert_store(local, dest + "-copy.zarr", storage_options=options)
    assert copy.manifest.checksums == local.manifest.checksums
    back = oocseq.convert_store(copy, tmp_path / "back.h5")  # from a URL store to a local file
    assert back.manifest.checksums == local.manifest.checksums
    with pytest.raises(ArgumentError, match="storage_options apply to"):
        oocseq.ingest_arrays(tmp_path / "l.zarr", {"x": np.zeros(4)}, storage_options=options)


def test_a_chunk_waited_for_goes_before_chunks_fetched_ahead():
    import asyncio
    import threading

    from oocseq.storage._remote import _Loop

    loop = _Loop(4)
    started: list[str] = []
    release = threading.Event()

    def request(name):
        async def run():
            started.append(name)
            while not release.is_set():
                await asyncio.sleep(0.001)
            return name

        return run

    def wait_for(cond):
        deadline = time.monotonic() + 10
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert cond()

    try:
        ahead = [loop.submit(request(f"a{i}")) for i in range(8)]
        wait_for(lambda: len(started) == 4)
        time.sleep(0.05)
        assert started == ["a0", "a1", "a2", "a3"], "at most max_requests at once"
        now = loop.submit(request("now"), urgent=True)
        wait_for(lambda: "now" in started)  # at once, although every place is taken
        loop.hurry(ahead[6])  # fetched ahead, then waited for: it starts too
        wait_for(lambda: "a6" in started)
        time.sleep(0.05)
        assert started[4:] == ["now", "a6"], "nothing else starts while places are full"
        release.set()
        assert [f.result(timeout=10) for f in ahead] == [f"a{i}" for i in range(8)]
        assert now.result(timeout=10) == "now"
        assert sorted(started) == sorted([*(f"a{i}" for i in range(8)), "now"])
    finally:
        release.set()
        loop.close()


def test_a_killed_ingestion_to_s3_resumes_without_sending_its_chunks_again(s3, local, tmp_path, monkeypatch):
    import tempfile

    from oocseq.testing.stores import index_encoding_fields

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dest = f"s3://{BUCKET}/resumed/{uuid.uuid4().hex}.zarr"
    key = dest.removeprefix(f"s3://{BUCKET}/")
    script = (
        "import time, oocseq\n"
        "from oocseq.testing.stores import index_encoding_fields\n"
        "class Slow:\n"
        "    def __init__(self, a): self.a, self.shape, self.dtype = a, a.shape, a.dtype\n"
        "    def __getitem__(self, k):\n"
        "        if isinstance(k, slice): time.sleep(0.15)\n"
        "        return self.a[k]\n"
        f"f = index_encoding_fields({N})\n"
        "f['x'] = Slow(f['x'])\n"
        f"oocseq.ingest_arrays({dest!r}, f, chunk_len={CHUNK}, preshuffle=False)\n"
    )
    _run_killed(script, s3, key, tmp_path, objects=3 * 8)
    with pytest.raises(StoreNotFoundError):
        oocseq.open_store(dest)
    s3.proxy.reset()
    store = oocseq.ingest_arrays(dest, index_encoding_fields(N), chunk_len=CHUNK, preshuffle=False)
    sent = [p for m, p in s3.proxy.log if m == "PUT" and "/x/c/" in p]
    assert len(sent) <= local.num_chunks - 5, "the chunks of the interrupted run were sent again"
    assert store.manifest.checksums["x"] == local.manifest.checksums["x"]
    assert list(tmp_path.iterdir()) == []
    remote, here = seq_of(oocseq.open_store(dest)), seq_of(local)
    for i in range(len(here)):
        for a, b in zip(remote[i], here[i], strict=True):
            np.testing.assert_array_equal(a, b)
