"""Shared by the benchmark scripts: the data (crops of real photos), the stores, timing,
page-cache control and the markdown tables.

Not a public module of oocseq: the scripts in this folder import it as ``_data`` (they put
their own folder on ``sys.path``, which ``python benchmarks/x.py`` does anyway).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import os
import platform
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

SAMPLE_SHAPE = (64, 64, 3)
SAMPLE_BYTES = int(np.prod(SAMPLE_SHAPE))

# --- data ---------------------------------------------------------------------------------


def num_samples(size_mb: float) -> int:
    """Crops in ``size_mb`` MB (10**6 bytes) of data."""
    return max(1, int(size_mb * 1e6) // SAMPLE_BYTES)


def photo_crops(n: int, seed: int = 0, block: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``n`` random 64x64 crops (uint8, in blocks of ``block``) of scikit-learn's two
    sample photos (china.jpg, flower.jpg), and the index of the photo each came from (int64,
    the label). Real photos, so chunks compress as real images do."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # 427x640x3 each
    views = [np.lib.stride_tricks.sliding_window_view(p, SAMPLE_SHAPE)[:, :, 0] for p in photos]
    rng = np.random.default_rng(seed)
    for start in range(0, n, block):
        k = min(block, n - start)
        which = rng.integers(0, len(photos), k)
        x = np.empty((k, *SAMPLE_SHAPE), dtype=np.uint8)
        for p, view in enumerate(views):
            sel = np.flatnonzero(which == p)
            rows = rng.integers(0, view.shape[0], len(sel))
            cols = rng.integers(0, view.shape[1], len(sel))
            x[sel] = view[rows, cols]
        yield x, which.astype(np.int64)


def crops_in_ram(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` crops and their labels as two arrays in memory."""
    blocks = list(photo_crops(n, seed))
    x = np.concatenate([b for b, _ in blocks])
    y = np.concatenate([c for _, c in blocks])
    return x, y


def repeated(a: np.ndarray, n: int, roll: bool, block: int = 4096) -> Iterator[np.ndarray]:
    """Batches of ``n`` samples made of ``a`` repeated; with ``roll``, each repeat after the first
    rolled by a few pixels along axes 1 and 2 (so that repeats are not byte-identical chunks):
    a store of any size from 1 GB in memory."""
    k = rep = 0
    while k < n:
        for start in range(0, len(a), block):
            take = min(block, len(a) - start, n - k)
            if take <= 0:
                break
            b = a[start : start + take]
            yield np.roll(b, (3 * rep, 5 * rep), axis=(1, 2)) if roll and rep else b
            k += take
        rep += 1


# --- stores -------------------------------------------------------------------------------

#: name -> (file suffix, compression). "raw" = uncompressed.
STORE_KINDS = {
    "Zarr raw": (".zarr", None),
    "HDF5 raw": (".h5", None),
    "Zarr lz4": (".zarr", "lz4"),
    "HDF5 lz4": (".h5", "lz4"),
}


def store_path(workdir: Path, kind: str, tag: str = "") -> Path:
    suffix, compression = STORE_KINDS[kind]
    return workdir / f"crops{tag}_{compression or 'raw'}{suffix}"


def write_store(path: Path, fields: dict[str, Any], compression: str | None) -> Any:
    """Ingest ``fields`` (arrays or iterables of batches) with oocseq's default chunking."""
    import oocseq

    t = time.perf_counter()
    store = oocseq.ingest_arrays(path, fields, compression=compression, overwrite=True)
    ratio = len(store) * SAMPLE_BYTES / max(1, store.stored_nbytes("x"))
    print(f"  wrote {store} in {time.perf_counter() - t:.1f} s (x compresses {ratio:.2f}x)", flush=True)
    return store


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def files_of(path: Path) -> list[Path]:
    """The files of a store (a directory's files, sorted) or the file itself."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def chunk_files(store_dir: Path, field: str = "x") -> list[Path]:
    """A Zarr store's chunk files of ``field`` in chunk order."""
    root = store_dir / field / "c"
    files = [p for p in root.rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: tuple(int(s) for s in p.relative_to(root).parts))


# --- page cache ---------------------------------------------------------------------------


def drop_from_page_cache(paths: Iterable[Path]) -> None:
    """Write back and evict the pages of ``paths`` from the page cache (``fsync`` then
    ``posix_fadvise(POSIX_FADV_DONTNEED)``): later reads come from disk. Only these files,
    unlike ``/proc/sys/vm/drop_caches``, so other work on the machine keeps its cache."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_all_caches() -> bool:
    """``echo 1 > /proc/sys/vm/drop_caches`` (root only); whether it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


_libc: Any = None


def resident_bytes(paths: Iterable[Path]) -> int | None:
    """Bytes of ``paths`` in the page cache (``mincore``), or None where it cannot be asked."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if name is None:
            return None
        _libc = ctypes.CDLL(name, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    total = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
            addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
            vec = np.zeros((size + page - 1) // page, dtype=np.uint8)
            if _libc.mincore(
                ctypes.c_void_p(addr), ctypes.c_size_t(size), vec.ctypes.data_as(ctypes.c_void_p)
            ):
                return None
            total += int(np.count_nonzero(vec & 1)) * page
    return total


def make_cold(paths: Sequence[Path]) -> str:
    """Evict ``paths`` from the page cache and say how much of them is still cached."""
    drop_from_page_cache(paths)
    size = sum(p.stat().st_size for p in paths)
    left = resident_bytes(paths)
    how = "fadvise"
    if left is not None and left > 0.05 * size and drop_all_caches():
        how = "fadvise + drop_caches"
        left = resident_bytes(paths)
    if left is None:
        return f"{how}; residency unknown"
    return f"{how}; {left / max(1, size):.1%} still cached"


# --- memory -------------------------------------------------------------------------------


def rss_anon() -> int:
    """This process's ``RssAnon`` in bytes (0 where there is none)."""
    from oocseq.bench import rss_anon_bytes

    return rss_anon_bytes()


# --- timing -------------------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds spent busy by the whole machine, all cores (``/proc/stat``)."""
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _own_cpu() -> float:
    """CPU seconds of this process and its waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class LoadMeter:
    """Cores used by *other* processes while it runs: the machine's busy time minus ours."""

    def __enter__(self) -> LoadMeter:
        self.others = float("nan")
        try:
            self._busy = _busy_seconds()
        except OSError:
            self._busy = None
        self._own = _own_cpu()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._busy is not None:
            wall = time.perf_counter() - self._t
            self.others = max(
                0.0, (_busy_seconds() - self._busy - (_own_cpu() - self._own)) / max(wall, 1e-9)
            )


#: Before each timed measurement, wait up to QUIET_WAIT seconds until other processes use less
#: than QUIET_CORES cores, as long as the total waited stays under QUIET_BUDGET seconds (then
#: measure anyway). The scripts set QUIET_WAIT from ``--quiet-wait`` (0: never wait).
QUIET_WAIT = 10.0
QUIET_CORES = 0.3
QUIET_BUDGET = 120.0
quiet_waited = 0.0  # seconds waited so far


def wait_quiet(max_wait: float | None = None, probe: float = 0.5) -> float:
    """Sleep until other processes use less than :data:`QUIET_CORES` cores (sampled over
    ``probe`` seconds), at most ``max_wait`` seconds and within the budget; the last load
    seen (nan where it cannot be measured)."""
    global quiet_waited
    max_wait = QUIET_WAIT if max_wait is None else max_wait
    max_wait = min(max_wait, QUIET_BUDGET - quiet_waited)
    start = time.perf_counter()
    load = float("nan")
    while max_wait > 0:
        with LoadMeter() as m:
            time.sleep(probe)
        load = m.others
        if not load >= QUIET_CORES or time.perf_counter() - start > max_wait:  # (nan: cannot tell)
            break
    quiet_waited += time.perf_counter() - start
    return load


def common_arguments(
    parser: argparse.ArgumentParser,
    *,
    size_mb: float = 1000,
    runs: int = 5,
    runs_help: str = "interleaved rounds; medians over them",
    quiet_wait: float = 10,
) -> argparse.ArgumentParser:
    """The arguments every benchmark script takes: ``--size-mb``, ``--batch-size``, ``--runs``,
    ``--quiet-wait``, ``--workdir``, ``--keep``. Call :func:`apply_arguments` after parsing."""
    parser.add_argument(
        "--size-mb", type=float, default=size_mb, help=f"data size in MB (default {size_mb:g})"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=runs, help=f"{runs_help} (default {runs})")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=quiet_wait,
        help="before each timed run, wait up to this many seconds for other processes to go quiet",
    )
    parser.add_argument("--workdir", type=Path, default=Path("out/bench"), help="where the stores go")
    parser.add_argument("--keep", action="store_true", help="keep the stores (default: delete them)")
    return parser


def apply_arguments(args: argparse.Namespace) -> None:
    """Settings of this module from :func:`common_arguments`'s arguments."""
    global QUIET_WAIT
    QUIET_WAIT = args.quiet_wait


K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


@dataclass
class Runs:
    """What :func:`interleaved` returns: results per key, and the cores other processes used
    during each timed run."""

    results: dict[Any, list[Any]]
    others: dict[Any, list[float]]

    def all_others(self) -> list[float]:
        return [v for vs in self.others.values() for v in vs if v == v]


def interleaved(
    measurements: dict[K, Callable[[int], R]],
    warmups: dict[K, Callable[[], object]],
    runs: int,
    seed: int = 2,
    label: str = "",
    group: Callable[[Any], Hashable] | None = None,
) -> Runs:
    """Run every measurement ``runs`` times, interleaved: one run of each, in a new random
    order every round, so that a slow moment of this shared machine does not land on one
    measurement only, and ratios can be taken between runs of the same round. Each timed run
    waits for the machine to be quiet (:func:`wait_quiet`) and follows an untimed warm-up of
    the same kind (a core that was idle is slow for a while on a small VM).
    ``measurements[k](run)`` returns a result.

    ``group(k)``: measurements of one group run one after another in each round (the groups,
    and the measurements within each, in a new random order every round), so that the two
    sides of a ratio taken within a group run seconds apart, not a whole round apart: the
    machine's speed drifts over a round, which spread those ratios."""
    out = Runs({k: [] for k in measurements}, {k: [] for k in measurements})
    keys = list(measurements)
    groups: dict[Hashable, list[Any]] = {}
    for k in keys:
        groups.setdefault(group(k) if group is not None else k, []).append(k)
    blocks = list(groups.values())
    rng = np.random.default_rng(seed)
    for run in range(runs):
        t = time.perf_counter()
        if group is None:
            order = [keys[j] for j in rng.permutation(len(keys))]
        else:
            order = []
            for i in rng.permutation(len(blocks)):
                order += [blocks[i][j] for j in rng.permutation(len(blocks[i]))]
        for k in order:
            wait_quiet()
            if k in warmups:
                warmups[k]()
            with LoadMeter() as m:
                out.results[k].append(measurements[k](run))
            out.others[k].append(m.others)
        print(f"  {label}run {run + 1}/{runs} done ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[i] / b[i]`` for runs of the same round."""
    return [x / y for x, y in zip(a, b, strict=True) if y]


def load_summary(others: Sequence[float]) -> str:
    if not others:
        return "load of other processes: unknown"
    return (
        f"other processes used {median(others):.2f} cores (median; max {max(others):.2f}) during the timed runs "
        f"(waited {quiet_waited:.0f} s in all for quiet moments)"
    )


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def fmt_rate(r: float) -> str:
    if r >= 1e6:
        return f"{r / 1e6:.2f} M"
    if r >= 1e4:
        return f"{r / 1e3:.0f} k"
    if r >= 1e3:
        return f"{r / 1e3:.1f} k"
    return f"{r:.0f}"


def fmt_ratio(r: float) -> str:
    if r >= 10:
        return f"{r:.0f}x"
    return f"{r:.2f}x"


def spread(values: Sequence[float]) -> str:
    """``min-max`` of runs, as rates."""
    return f"{fmt_rate(min(values))}-{fmt_rate(max(values))}"


# --- reporting ----------------------------------------------------------------------------


@dataclass
class Target:
    """One row of the targets table."""

    target: str
    measured: str
    required: str
    met: bool | None  # None: not measured (skipped)
    figures: str


def targets_table(rows: Sequence[Target]) -> str:
    lines = ["| target | measured | required | met? | absolute figures |", "|---|---|---|---|---|"]
    for r in rows:
        met = "skipped" if r.met is None else "yes" if r.met else "**NO**"
        lines.append(f"| {r.target} | {r.measured} | {r.required} | {met} | {r.figures} |")
    return "\n".join(lines)


def git_commit() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "oocseq"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip() + (" (oocseq/ modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> str:
    import h5py
    import numcodecs
    import zarr

    import oocseq

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"oocseq {oocseq.__version__} at commit {git_commit()}; numpy {np.__version__}, zarr {zarr.__version__}, "
        f"h5py {h5py.__version__}, numcodecs {numcodecs.__version__}; Python {platform.python_version()}; "
        f"{os.cpu_count()} cores, {mem:.0f} GiB RAM; {time.strftime('%Y-%m-%d %H:%M')}"
    )
