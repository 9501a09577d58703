"""Crash tests in the manner of SQLite's: ingestions SIGKILLed at random moments (and at aimed
ones inside the commit), disk-full runs on a small tmpfs, concurrent ingestions into one
destination.

After every kill the destination holds the old store or the new one, whole (it opens and
verifies), and re-running the same call gives a store bit-identical to an uninterrupted run
(every chunk's stored bytes, auxiliary arrays and the manifest), leaving nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import oocseq
from oocseq.ingest import _writer

sys.path.insert(0, str(Path(__file__).parent))
import _crash_jobs

REPO = Path(__file__).resolve().parents[1]
KINDS = ("arrays", "npy", "csv", "images", "dataframe")
KILLS = 20  # random kills per source kind, alternating Zarr and HDF5


class Server:
    """The fork server of ``_crash_jobs.py``: runs jobs in children the test can kill."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        # the children's errors, for debugging: OOCSEQ_CRASH_LOG=file
        self.log = open(os.environ.get("OOCSEQ_CRASH_LOG", os.devnull), "a")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_crash_jobs.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def start(self, *jobs: dict) -> list[int]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(list(jobs)) + "\n")
        self.proc.stdin.flush()
        return [int(p) for p in self.proc.stdout.readline().split()]

    def wait(self) -> list[int]:
        assert self.proc.stdout
        return [int(c) for c in self.proc.stdout.readline().split()]

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small sources of 12 chunks each."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    images = root / "images"
    rows = []
    for c in ("ant", "bee", "cat"):
        (images / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 256, (6 + i % 5, 9, 3), dtype=np.uint8)).save(
                images / c / f"{i}.png"
            )
            rows.append([f"{c}/{i}.png", c])
    (images / "rows.json").write_text(json.dumps(rows))
    npy = root / "npy"
    npy.mkdir()
    data = _crash_jobs.arrays_data(3)
    np.save(npy / "x0.npy", data["x"][:700])
    np.save(npy / "x1.npy", data["x"][700:])
    np.save(npy / "y.npy", data["y"])
    csv = root / "csv"
    csv.mkdir()
    table = rng.normal(size=(1200, 8)).round(4)
    lines = ["a,b,c,d,e,f,g,h,label"] + [",".join(map(str, r)) + f",{i % 7}" for i, r in enumerate(table)]
    (csv / "t.csv").write_text("\n".join(lines) + "\n")
    return {"arrays": "", "npy": str(npy), "csv": str(csv), "images": str(images), "dataframe": str(images)}


def digest(path: Path) -> str:
    """A digest of a store's stored bytes: every chunk as stored, the auxiliary arrays and the
    manifest. Opening it (as a user would) also recovers an interrupted commit."""
    store = oocseq.open_store(path)
    store.verify()
    h = hashlib.sha256(json.dumps(store.manifest.to_json(), sort_keys=True).encode())
    store.close()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0" + f.read_bytes())
        return h.hexdigest()
    import h5py

    with h5py.File(path, "r") as f:

        def visit(name: str, obj: object) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            h.update(name.encode())
            if obj.chunks is None or obj.dtype.kind == "O":
                h.update(np.asarray(obj[()]).astype(str if obj.dtype.kind == "O" else obj.dtype).tobytes())
                return
            for start in range(0, obj.shape[0], obj.chunks[0]):
                mask, raw = obj.id.read_direct_chunk((start,) + (0,) * (obj.ndim - 1))
                h.update(bytes([mask]) + raw)

        f.visititems(visit)
    return h.hexdigest()


def wait_for_journal(dest: Path, chunks: int, deadline: float) -> None:
    """Poll until a journal next to ``dest`` records ``chunks`` chunks (or the deadline)."""
    while time.perf_counter() < deadline:
        for j in dest.parent.glob(f".{dest.name}.*.journal"):
            with contextlib.suppress(OSError):
                if j.read_bytes().count(b"\n") > chunks:
                    return
        time.sleep(0.001)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir() if p.name != dest.name)


class TakeOvers:
    """Counts ingestions that resumed an interrupted one (and the chunks they took over)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chunks: list[int] = []
        real = _writer.StoreWriter._take_over

        def spy(writer: _writer.StoreWriter, *args: object) -> bool:
            ok = real(writer, *args)
            if ok:
                self.chunks.append(writer.resumed_chunks)
            return ok

        monkeypatch.setattr(_writer.StoreWriter, "_take_over", spy)


def copy_store(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


@pytest.fixture(scope="module")
def olds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    """A small old store per format (to be replaced with overwrite=True), and its digest."""
    root = tmp_path_factory.mktemp("old")
    out = {}
    for fmt in (".zarr", ".h5"):
        path = root / f"old{fmt}"
        oocseq.ingest_arrays(path, {"x": np.full((50, 4), 7.0, np.float32)}, chunk_len=10).close()
        out[fmt] = (path, digest(path))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_random_sigkills_leave_old_or_new_and_resume_bit_identical(
    kind: str, server: Server, sources: dict[str, str], olds: dict, tmp_path: Path, monkeypatch
) -> None:
    warnings.simplefilter("ignore")  # "discarding the partial store ..." when a kill came early
    rng = np.random.default_rng(list(KINDS).index(kind))
    reference, duration = {}, {}
    for fmt in (".zarr", ".h5"):
        ref = tmp_path / f"ref{fmt}" / f"s{fmt}"
        _crash_jobs.run({"kind": kind, "src": sources[kind], "dest": str(ref)}).close()
        reference[fmt] = digest(ref)
        # The same job in a child, uninterrupted: how long a run takes there, and the same store.
        child = tmp_path / f"child{fmt}" / f"s{fmt}"
        t0 = time.perf_counter()
        server.start({"kind": kind, "src": sources[kind], "dest": str(child)})
        assert server.wait() == [0]
        duration[fmt] = time.perf_counter() - t0
        assert digest(child) == reference[fmt]
    takeovers = TakeOvers(monkeypatch)
    outcomes = {"old": 0, "new": 0}
    for trial in range(KILLS):
        fmt = (".zarr", ".h5")[trial % 2]
        dest = tmp_path / f"t{trial}" / f"s{fmt}"
        copy_store(olds[fmt][0], dest)
        job = {"kind": kind, "src": sources[kind], "dest": str(dest)}
        (pid,) = server.start(job)
        if trial % 4 < 2:  # at a random moment
            time.sleep(rng.uniform(0, duration[fmt]))
        else:  # once the journal holds a random number of chunks (watched from outside)
            wait_for_journal(dest, int(rng.integers(1, 12)), time.perf_counter() + 2 * duration[fmt])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        server.wait()
        after = digest(dest)
        assert after in (olds[fmt][1], reference[fmt]), (
            f"trial {trial}: dest is neither the old nor the new store"
        )
        outcomes["old" if after == olds[fmt][1] else "new"] += 1
        if after == olds[fmt][1]:
            _crash_jobs.run(job).close()  # the same call again
        assert digest(dest) == reference[fmt], f"trial {trial}: the rerun differs from an uninterrupted run"
        assert leftovers(dest) == [], f"trial {trial}"
    print(f"{kind}: {outcomes}, resumed {len(takeovers.chunks)} times, chunks taken over {takeovers.chunks}")
    assert outcomes["old"] > 0
    assert len(takeovers.chunks) >= KILLS // 4, "too few kills fell after the first chunk"


@pytest.mark.parametrize(("kind", "fmt"), [("npy", ".zarr"), ("images", ".h5")])
def test_sigkilled_cluster_ingestion_resumes_bit_identical(
    kind: str, fmt: str, server: Server, sources: dict[str, str], tmp_path: Path, monkeypatch
) -> None:
    """An ingestion on a Dask cluster (worker processes encode the chunks; for Zarr they also
    write them into the partial store) whose client process is SIGKILLed mid-way: the next
    run, on the same cluster, takes over the partial store and ends bit-identical to an
    uninterrupted run without a cluster."""
    distributed = pytest.importorskip("distributed")
    ref = tmp_path / "ref" / f"s{fmt}"
    _crash_jobs.run({"kind": kind, "src": sources[kind], "dest": str(ref)}).close()
    reference = digest(ref)
    takeovers = TakeOvers(monkeypatch)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        for trial, chunks in enumerate((2, 7)):
            dest = tmp_path / f"t{trial}" / f"s{fmt}"
            dest.parent.mkdir()
            job = {
                "kind": kind,
                "src": sources[kind],
                "dest": str(dest),
                "scheduler": cluster.scheduler_address,
            }
            (pid,) = server.start(job)
            wait_for_journal(dest, chunks, time.perf_counter() + 60)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            assert server.wait() == [-signal.SIGKILL], "the ingestion ended before it was killed"
            assert not dest.exists()
            # The dead client's units still running on the workers finish (the scheduler drops
            # the rest once it notices the client is gone).
            deadline = time.perf_counter() + 30
            while any(client.processing().values()) and time.perf_counter() < deadline:
                time.sleep(0.05)
            _crash_jobs.run(
                {"kind": kind, "src": sources[kind], "dest": str(dest), "kw": {"client": client}}
            ).close()
            assert digest(dest) == reference, f"trial {trial}: the resumed store differs"
            assert leftovers(dest) == [], f"trial {trial}"
    assert len(takeovers.chunks) == 2 and min(takeovers.chunks) >= 2, takeovers.chunks


AIMS = [  # (where the child kills itself, what the destination must then hold)
    ({"at": "rename", "k": 1}, "old"),  # before the old store is moved aside
    ({"at": "rename", "k": 1, "after": True}, "old"),  # old store aside, the new one not in place
    ({"at": "rename", "k": 2}, "old"),  # the same moment, seen from the second rename
    ({"at": "rename", "k": 2, "after": True}, "new"),  # new store in place, old one not deleted
    ({"at": "remove_old"}, "new"),
]


@pytest.mark.parametrize("fmt", [".zarr", ".h5"])
def test_kills_aimed_at_each_commit_step(fmt: str, server: Server, olds: dict, tmp_path: Path) -> None:
    ref = tmp_path / "ref" / f"s{fmt}"
    _crash_jobs.run({"kind": "arrays", "dest": str(ref)}).close()
    new = digest(ref)
    old_path, old = olds[fmt]
    for i, (aim, expect) in enumerate(AIMS):
        dest = tmp_path / f"a{i}" / f"s{fmt}"
        copy_store(old_path, dest)
        server.start({"kind": "arrays", "dest": str(dest), "aim": aim})
        assert server.wait() == [-signal.SIGKILL], aim
        if aim.get("after") and aim["k"] == 1:
            assert not dest.exists()  # the instant the old code lost the store
        assert digest(dest) == {"old": old, "new": new}[expect], aim  # opening recovers
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _crash_jobs.run({"kind": "arrays", "dest": str(dest)}).close()
        assert digest(dest) == new
        assert leftovers(dest) == [], aim


@pytest.mark.parametrize("fmt", [".zarr", ".h5"])
def test_concurrent_ingestions_exactly_one_wins_without_overwrite(
    fmt: str, server: Server, tmp_path: Path
) -> None:
    refs = {}
    for seed in (1, 2):
        ref = tmp_path / f"ref{seed}" / f"s{fmt}"
        _crash_jobs.run({"kind": "arrays", "dest": str(ref), "seed": seed}).close()
        refs[digest(ref)] = seed
    for trial in range(3):
        dest = tmp_path / f"c{trial}" / f"s{fmt}"
        dest.parent.mkdir()
        jobs = [{"kind": "arrays", "dest": str(dest), "seed": s, "kw": {"overwrite": False}} for s in (1, 2)]
        server.start(*jobs)
        codes = server.wait()
        assert sorted(codes) == [0, 3], codes  # 3: StoreExistsError
        winner = (1, 2)[codes.index(0)]
        assert refs[digest(dest)] == winner
        assert leftovers(dest) == []
        # With overwrite=True both succeed (one after the other), no raw OSError.
        jobs = [{"kind": "arrays", "dest": str(dest), "seed": s} for s in (1, 2)]
        server.start(*jobs)
        assert server.wait() == [0, 0]
        assert digest(dest) in refs
        assert leftovers(dest) == []


def test_a_dead_owners_partial_is_cleaned_a_live_ones_kept(
    server: Server, olds: dict, tmp_path: Path
) -> None:
    dest = tmp_path / "d" / "s.zarr"
    copy_store(olds[".zarr"][0], dest)
    server.start({"kind": "arrays", "dest": str(dest), "aim": {"at": "rename", "k": 1}})
    assert server.wait() == [-signal.SIGKILL]
    assert any(p.endswith(".partial") for p in leftovers(dest))
    # A live ingestion's leftovers (lock held by this process) are not touched.
    from oocseq.storage import _commit

    live = _commit.OwnerLock.create(dest, "livejob")
    _commit.sibling(dest, "livejob", "partial").mkdir()
    with pytest.warns(UserWarning, match="resume=False"):
        oocseq.ingest_arrays(
            dest, _crash_jobs.arrays_data(1), chunk_len=100, overwrite=True, resume=False
        ).close()
    assert leftovers(dest) == [".s.zarr.livejob.lock", ".s.zarr.livejob.partial"]
    live.release(delete=False)
    # Once its owner is gone, the next ingestion (other arguments: not resumable) removes it.
    with pytest.warns(UserWarning, match="differ"):
        oocseq.ingest_arrays(dest, _crash_jobs.arrays_data(1), chunk_len=50, overwrite=True).close()
    assert leftovers(dest) == []


def test_a_changed_source_is_not_resumed(server: Server, tmp_path: Path) -> None:
    """Same shapes, other values in the last written chunk (rows the fingerprint does not
    sample): the re-derived chunk differs from the journal's, so the run stops and the next
    one starts over."""
    dest = tmp_path / "s.h5"
    data = _crash_jobs.arrays_data(1)
    # In source order, so that row 1150 is in the last written chunk (chunks 0-11 of 100).
    job = {"kind": "arrays", "dest": str(dest), "kw": {"preshuffle": False}, "aim": {"at": "rename", "k": 1}}
    server.start(job)
    assert server.wait() == [-signal.SIGKILL]
    data["x"][1150] += 1
    with pytest.raises(oocseq.InvalidSourceError, match="source changed"):
        oocseq.ingest_arrays(dest, data, chunk_len=100, preshuffle=False)
    assert leftovers(dest) == [] and not dest.exists()
    oocseq.ingest_arrays(dest, data, chunk_len=100, preshuffle=False).close()
    np.testing.assert_array_equal(oocseq.open_store(dest)["x"][:], data["x"])


# -- disk full --------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 3 MiB tmpfs (root only; skipped where it cannot be mounted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_fraction(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail / st.f_blocks


def open_deleted_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.endswith("(deleted)") and ".partial" in target:
                out.append(target)
    return out


@pytest.mark.parametrize("fmt", [".zarr", ".h5"])
def test_disk_full_leaves_nothing_and_frees_the_space(fmt: str, small_fs: Path) -> None:
    big = {"x": np.random.default_rng(0).random((100_000, 16)).astype(np.float32)}  # 6.4 MB
    small = {"x": np.arange(400, dtype=np.float32).reshape(100, 4)}
    dest = small_fs / f"s{fmt}"
    with pytest.raises(oocseq.StoreWriteError) as info:
        oocseq.ingest_arrays(dest, big, chunk_len=5000, compression=None)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert os.listdir(small_fs) == []
    assert open_deleted_files() == []
    assert free_fraction(small_fs) > 0.9
    # The space is there for the next ingestion; a failed overwrite keeps the old store.
    oocseq.ingest_arrays(dest, small, chunk_len=10).close()
    before = digest(dest)
    with pytest.raises(oocseq.StoreWriteError):
        oocseq.ingest_arrays(dest, big, chunk_len=5000, compression=None, overwrite=True)
    assert digest(dest) == before
    assert leftovers(dest) == []
    assert free_fraction(small_fs) > 0.85
