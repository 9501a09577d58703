"""Read-path targets 4 and 5: a store larger than the memory the process may
use, and memory that does not grow with the store.

4. Inside a memory cgroup limited to ``--limit-fraction`` (40%) of the store's size, with the
   store's pages evicted from the page cache before every measurement (so reads come from
   disk), each measurement in a fresh child process placed in a fresh cgroup:
   - a shuffled epoch through ``ChunkedSequence`` (fields x and y, batches requested in a random
     order of ``i`` as ``model.fit`` does);
   - a plain sequential read of the same store's files (the ``.h5`` file, or every file of the
     Zarr directory, x's chunks in chunk order) in 8 MiB reads;
   - ``np.memmap`` random batches ``mm[np.sort(idx)]`` from the same data saved as a ``.npy``
     (``np.load(mmap_mode="r")``; ``--memmap-batches`` batches timed);
   - once, as a check that the limit bites: ``np.load`` of the whole ``.npy`` into memory, which
     should be OOM-killed.
   Targets: ChunkedSequence >= 0.7x the sequential read and >= 50x memmap batches, and not
   OOM-killed (child exit status, ``memory.failcnt`` / OOM kills of its cgroup).
5. Peak ``RssAnon`` (sampled after every batch) of a fresh process serving one shuffled epoch
   (x and y, Keras order) of a ~1 GB and a ``--big-gb`` (8 GB) store: they differ by < 20% and
   both stay under the documented bound ``(max_resident_chunks + 2 * window) * chunk_bytes``
   (summed over the fields served) + 150 MB. The big store is ingested from a generator that
   repeats the 1 GB of crops, each repeat rolled by a few pixels, and deleted afterwards.

cgroup v1 (``memory.limit_in_bytes``) and v2 (``memory.max``) are supported; the cgroups are
made under this process's own memory cgroup where possible (else at the hierarchy's root) and
removed afterwards. Where no memory cgroup can be made (not root, read-only cgroupfs), target 4
is skipped with the reason. Needs root for that; Linux only.

Run:  python benchmarks/larger_than_ram.py [--size-mb 1000] [--runs 3] [--big-gb 8] [--skip-rss]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oocseq.storage._raw import aligned_empty

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data
from _data import (
    SAMPLE_BYTES,
    STORE_KINDS,
    LoadMeter,
    Target,
    chunk_files,
    crops_in_ram,
    environment,
    files_of,
    fmt_rate,
    fmt_ratio,
    load_summary,
    make_cold,
    median,
    num_samples,
    paired_ratios,
    remove,
    repeated,
    rss_anon,
    store_path,
    targets_table,
    wait_quiet,
    write_store,
)

READ_BYTES = 8 * 2**20  # sequential read size

# --- child processes: one measurement each ---------------------------------------------------


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    what = spec["what"]
    if what == "seq":
        return child_sequence(spec, sample_rss=False)
    if what == "rss":
        return child_sequence(spec, sample_rss=True)
    if what == "read":
        return child_read(spec)
    if what == "memmap":
        return child_memmap(spec)
    if what == "load":
        x = np.load(spec["npy"])
        return {"samples": len(x), "seconds": 0.0, "peak_rss_anon": rss_anon()}
    raise ValueError(what)


def child_sequence(spec: dict[str, Any], sample_rss: bool) -> dict[str, Any]:
    """One epoch of fields x and y in a random order of batch indices (Keras's order)."""
    import oocseq
    from oocseq.bench import time_epoch

    store = oocseq.open_store(spec["path"])
    read = oocseq.ReadOptions(**spec["read"]) if spec.get("read") else None
    seq = oocseq.ChunkedSequence(store, spec["batch_size"], x="x", y="y", seed=0, read=read)
    chunk_bytes = sum(
        store.chunk_len * int(np.prod(store.fields[f].shape[1:])) * store.fields[f].dtype.itemsize
        for f in ("x", "y")
    )
    bound = (seq.max_resident_chunks + 2 * seq.window) * chunk_bytes
    timing = time_epoch(seq, "keras", seed=7, sample_rss=sample_rss)
    peak = max(timing.rss_peak, rss_anon())
    stats = seq.stats
    seq.close()
    return {
        "samples": timing.samples,
        "seconds": timing.seconds,
        "base_rss_anon": timing.rss_before,
        "peak_rss_anon": peak,
        "chunk_decodes": stats["chunk_decodes"],
        "num_chunks": store.num_chunks,
        "fields": 2,
        "peak_resident_chunks": stats["peak_resident_chunks"],
        "max_resident_chunks": seq.max_resident_chunks,
        "window": seq.window,
        "chunk_bytes": chunk_bytes,
        "bound": bound,
        "n": len(store),
        "read": repr(seq.read),
    }


def child_read(spec: dict[str, Any]) -> dict[str, Any]:
    """Every file of the store start to end in 8 MiB reads into one reused buffer."""
    path = Path(spec["path"])
    if path.is_dir():  # Zarr: x's chunk files in chunk order, then everything else
        first = chunk_files(path, "x")
        seen = set(first)
        files = first + [p for p in files_of(path) if p not in seen]
    else:
        files = [path]
    # Page-aligned, as oocseq's buffers (see oocseq.storage._raw.ALIGNMENT: in a bytearray
    # the baseline would be slow by chance).
    view = memoryview(aligned_empty((READ_BYTES,), np.uint8))  # type: ignore[arg-type]  # numpy arrays are buffers
    total = 0
    t = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while True:
                got = f.readinto(view)
                if not got:
                    break
                total += got
    seconds = time.perf_counter() - t
    return {
        "samples": spec["n"],
        "seconds": seconds,
        "bytes": total,
        "files": len(files),
        "peak_rss_anon": rss_anon(),
    }


def child_memmap(spec: dict[str, Any]) -> dict[str, Any]:
    """Random batches ``mm[np.sort(idx)]`` of a globally shuffled order from a memory-mapped
    ``.npy``: the first ``batches`` of them, or fewer if ``max_seconds`` runs out."""
    mm = np.load(spec["npy"], mmap_mode="r")
    bs = spec["batch_size"]
    perm = np.random.default_rng(spec["seed"]).permutation(len(mm))
    batches = [np.sort(perm[s : s + bs]) for s in range(0, len(mm), bs)][: spec["batches"]]
    samples = 0
    t = time.perf_counter()
    for idx in batches:
        samples += len(np.asarray(mm[idx]))
        if time.perf_counter() - t > spec["max_seconds"]:
            break
    seconds = time.perf_counter() - t
    return {"samples": samples, "seconds": seconds, "peak_rss_anon": rss_anon()}


# --- memory cgroups --------------------------------------------------------------------------


@dataclass
class CgroupSupport:
    version: int  # 1 or 2
    parent: Path  # where the benchmark's cgroups are made


def _mounts() -> list[tuple[str, str, str]]:
    """``(mount point, fstype, super options)`` of every mount (from /proc/self/mountinfo)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) >= 5 and len(rf) >= 3:
                out.append((lf[4], rf[0], rf[2]))
    return out


def _own_cgroup(version: int) -> str:
    with open("/proc/self/cgroup") as f:
        for line in f:
            num, controllers, path = line.rstrip("\n").split(":", 2)
            if version == 1 and "memory" in controllers.split(","):
                return path
            if version == 2 and num == "0" and controllers == "":
                return path
    return "/"


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def find_cgroup_support() -> tuple[CgroupSupport | None, str]:
    """Where memory cgroups can be made, or None and why not."""
    if sys.platform != "linux":
        return None, "not Linux"
    try:
        mounts = _mounts()
    except OSError as e:
        return None, f"cannot read /proc/self/mountinfo: {e}"
    v1 = [m for m, t, o in mounts if t == "cgroup" and "memory" in o.split(",")]
    v2 = [m for m, t, _ in mounts if t == "cgroup2"]
    tried = []
    if v1:
        root = Path(v1[0])
        for parent in dict.fromkeys([root / _own_cgroup(1).lstrip("/"), root]):
            probe = parent / f"oocseq-bench-probe-{os.getpid()}"
            try:
                probe.mkdir()
                _write(probe / "memory.limit_in_bytes", str(2**30))
                probe.rmdir()
                return CgroupSupport(1, parent), f"cgroup v1 memory controller, cgroups made under {parent}"
            except OSError as e:
                tried.append(f"{parent}: {e}")
                if probe.exists():
                    probe.rmdir()
    for mount in v2:
        root = Path(mount)
        if "memory" not in (root / "cgroup.controllers").read_text().split():
            tried.append(f"{root}: cgroup v2 without the memory controller")
            continue
        for parent in dict.fromkeys([root / _own_cgroup(2).lstrip("/"), root]):
            probe = parent / f"oocseq-bench-probe-{os.getpid()}"
            try:
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    _write(parent / "cgroup.subtree_control", "+memory")
                probe.mkdir()
                _write(probe / "memory.max", str(2**30))
                probe.rmdir()
                return CgroupSupport(2, parent), f"cgroup v2, cgroups made under {parent}"
            except OSError as e:
                tried.append(f"{parent}: {e}")
                if probe.exists():
                    probe.rmdir()
    if not v1 and not v2:
        return None, "no cgroup filesystem is mounted"
    return None, "cannot make a memory cgroup (" + "; ".join(tried) + ")"


class MemoryCgroup:
    """A fresh memory cgroup with a hard limit (no swap), removed by :meth:`remove`."""

    def __init__(self, support: CgroupSupport, limit: int, tag: str) -> None:
        self.support = support
        self.path = support.parent / f"oocseq-bench-{os.getpid()}-{tag}"
        self.path.mkdir()
        if support.version == 1:
            _write(self.path / "memory.limit_in_bytes", str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                try:  # memory + swap: no escape to swap
                    _write(self.path / "memory.memsw.limit_in_bytes", str(limit))
                except OSError:
                    pass
        else:
            _write(self.path / "memory.max", str(limit))
            if (self.path / "memory.swap.max").exists():
                _write(self.path / "memory.swap.max", "0")

    def join(self) -> None:
        """Move the calling process into the cgroup (run in the child before exec)."""
        _write(self.path / "cgroup.procs", str(os.getpid()))

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def counters(self) -> dict[str, int]:
        """Peak usage (page cache included), times the limit was hit, OOM kills."""

        def keyed(text: str) -> dict[str, int]:
            return {
                k: int(v) for k, v in (line.split() for line in text.splitlines() if len(line.split()) == 2)
            }

        if self.support.version == 1:
            oom = keyed(self._read("memory.oom_control"))
            return {
                "peak_usage": int(self._read("memory.max_usage_in_bytes") or 0),
                "failcnt": int(self._read("memory.failcnt") or 0),
                "oom_kills": oom.get("oom_kill", 0),
            }
        events = keyed(self._read("memory.events"))
        return {
            "peak_usage": int(self._read("memory.peak") or 0),
            "failcnt": events.get("max", 0),
            "oom_kills": events.get("oom_kill", 0),
        }

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"  warning: could not remove cgroup {self.path}", flush=True)


@dataclass
class ChildResult:
    returncode: int
    out: dict[str, Any] = field(default_factory=dict)
    cgroup: dict[str, int] = field(default_factory=dict)
    cold: str = ""
    stderr: str = ""
    others: float = float("nan")  # cores used by other processes meanwhile

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and "seconds" in self.out

    @property
    def rate(self) -> float:
        return self.out["samples"] / self.out["seconds"] if self.ok and self.out["seconds"] > 0 else 0.0


def run_child(spec: dict[str, Any], cgroup: MemoryCgroup | None = None, timeout: float = 900) -> ChildResult:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cgroup.join if cgroup else None,
        check=False,
    )
    out: dict[str, Any] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT ") :])
    return ChildResult(proc.returncode, out, cgroup.counters() if cgroup else {}, stderr=proc.stderr[-2000:])


def in_cgroup(
    support: CgroupSupport, limit: int, spec: dict[str, Any], cold_files: list[Path], tag: str
) -> ChildResult:
    cold = make_cold(cold_files)
    cg = MemoryCgroup(support, limit, tag)
    try:
        wait_quiet()
        with LoadMeter() as m:
            res = run_child(spec, cg)
    finally:
        cg.remove()
    res.cold = cold
    res.others = m.others
    return res


def exit_status(code: int) -> str:
    if code < 0:
        import signal

        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


def read_options(args: argparse.Namespace) -> dict[str, int]:
    """Keyword arguments of ``oocseq.ReadOptions`` given on the command line."""
    return {k: v for k, v in (("threads", args.threads), ("readahead", args.readahead)) if v is not None}


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    _data.common_arguments(parser, runs=3, runs_help="runs per cgroup measurement (median)")
    parser.add_argument(
        "--limit-fraction", type=float, default=0.4, help="cgroup limit / store size (default 0.4)"
    )
    parser.add_argument("--stores", default="Zarr raw,HDF5 raw,Zarr lz4,HDF5 lz4", help="stores for target 4")
    parser.add_argument(
        "--memmap-batches", type=int, default=10, help="memmap random batches timed (default 10)"
    )
    parser.add_argument("--memmap-seconds", type=float, default=20, help="at most this long per memmap run")
    parser.add_argument(
        "--big-gb", type=float, default=8, help="size of target 5's big store in GB (default 8)"
    )
    parser.add_argument("--rss-stores", default="Zarr lz4,HDF5 raw", help="store kinds for target 5")
    parser.add_argument(
        "--rss-runs", type=int, default=2, help="runs per store for target 5 (the highest peak counts)"
    )
    parser.add_argument("--threads", type=int, help="ReadOptions.threads (default: the library's)")
    parser.add_argument("--readahead", type=int, help="ReadOptions.readahead (default: the library's)")
    parser.add_argument("--skip-cgroup", action="store_true", help="skip target 4")
    parser.add_argument("--skip-rss", action="store_true", help="skip target 5")
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child_main(json.loads(args.child))), flush=True)
        return 0
    _data.apply_arguments(args)

    t_start = time.perf_counter()
    bs = args.batch_size
    n = num_samples(args.size_mb)
    print(environment())
    print(f"data: {n} crops 64x64x3 uint8 of real photos = {n * SAMPLE_BYTES / 1e6:.0f} MB; batch {bs}")
    kinds4 = [k.strip() for k in args.stores.split(",") if k.strip()] if not args.skip_cgroup else []
    kinds5 = [k.strip() for k in args.rss_stores.split(",") if k.strip()] if not args.skip_rss else []
    for k in kinds4 + kinds5:
        if k not in STORE_KINDS:
            parser.error(f"unknown store kind {k!r}; choose from {list(STORE_KINDS)}")
    x, y = crops_in_ram(n)
    args.workdir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    targets: list[Target] = []
    lines: list[str] = []
    try:
        stores = {}
        for kind in dict.fromkeys(kinds4 + kinds5):
            path = store_path(args.workdir, kind)
            made.append(path)
            stores[kind] = write_store(path, {"x": x, "y": y}, STORE_KINDS[kind][1])
        if kinds4:
            npy = args.workdir / "crops_x.npy"
            made.append(npy)
            np.save(npy, x)
            print(f"  wrote {npy} ({npy.stat().st_size / 1e6:.0f} MB)", flush=True)
            target4(args, {k: stores[k] for k in kinds4}, npy, targets, lines)
        if kinds5:
            target5(args, x, y, {k: stores[k] for k in kinds5}, made, targets, lines)
    finally:
        for s in locals().get("stores", {}).values():
            s.close()
        if not args.keep:
            for p in made:
                remove(p)
    print("\n".join(lines))
    print(f"\nTargets ({n * SAMPLE_BYTES / 1e6:.0f} MB store, batch {bs}):\n")
    print(targets_table(targets))
    print(f"\n{time.perf_counter() - t_start:.0f} s in all")
    return 0


def target4(
    args: argparse.Namespace, stores: dict[str, Any], npy: Path, targets: list[Target], lines: list[str]
) -> None:
    support, why = find_cgroup_support()
    print(f"\ntarget 4: {why}", flush=True)
    if support is None:
        for kind in stores:
            targets.append(
                Target(f"4. {kind}: larger than RAM", "—", ">= 0.7x seq. read, >= 50x memmap", None, why)
            )
        return
    bs = args.batch_size

    # The limit: a fraction of the size of the files read (each store's, the .npy's).
    def size_of(path: Path) -> int:
        return sum(p.stat().st_size for p in files_of(path))

    limits = {kind: int(args.limit_fraction * size_of(s.path)) for kind, s in stores.items()}
    limits["npy"] = int(args.limit_fraction * size_of(npy))
    n = len(next(iter(stores.values())))
    lines.append(
        f"\nTarget 4: memory cgroup v{support.version} limited to {args.limit_fraction:.0%} of the size of the files "
        "read ("
        + ", ".join(
            f"{k} {size_of(stores[k].path) / 1e6:.0f} MB -> {v / 1e6:.0f} MB"
            for k, v in limits.items()
            if k in stores
        )
        + f", .npy {size_of(npy) / 1e6:.0f} MB -> {limits['npy'] / 1e6:.0f} MB); "
        f"store pages evicted before each run; median of {args.runs} runs, each a fresh process in a fresh cgroup.\n"
    )

    # Sanity check: does the limit bite? Loading the whole array must fail.
    res = in_cgroup(support, limits["npy"], {"what": "load", "npy": str(npy)}, [npy], "load")
    bites = res.returncode != 0
    lines.append(
        f"np.load of the whole {npy.stat().st_size / 1e6:.0f} MB .npy in the {limits['npy'] / 1e6:.0f} MB cgroup: "
        f"{exit_status(res.returncode)}, "
        f"{res.cgroup.get('oom_kills', 0)} OOM kill(s), peak usage {res.cgroup.get('peak_usage', 0) / 1e6:.0f} MB"
        + ("" if bites else " -- the limit does NOT bite: target 4 figures are not larger-than-RAM figures")
    )
    print(f"  {lines[-1]}", flush=True)

    specs: dict[tuple[str, str], tuple[dict[str, Any], list[Path]]] = {}
    for kind, store in stores.items():
        files = files_of(store.path)
        specs["seq", kind] = (
            {"what": "seq", "path": str(store.path), "batch_size": bs, "read": read_options(args)},
            files,
        )
        specs["read", kind] = ({"what": "read", "path": str(store.path), "n": n}, files)
    mm_spec = {
        "what": "memmap",
        "npy": str(npy),
        "batch_size": bs,
        "batches": args.memmap_batches,
        "max_seconds": args.memmap_seconds,
        "seed": 0,
    }
    specs["memmap", "npy"] = (mm_spec, [npy])
    results: dict[tuple[str, str], list[ChildResult]] = {k: [] for k in specs}
    rng = np.random.default_rng(4)
    keys = list(specs)
    for run in range(args.runs):
        t = time.perf_counter()
        for j in rng.permutation(len(keys)):
            key = keys[j]
            spec, files = specs[key]
            if key[0] == "memmap":
                spec = {**spec, "seed": run}
            res = in_cgroup(support, limits[key[1]], spec, files, f"{key[0]}-{run}")
            results[key].append(res)
            if not res.ok:
                print(
                    f"  {key} run {run + 1}: {exit_status(res.returncode)} {res.cgroup} {res.stderr[-500:]}",
                    flush=True,
                )
        print(f"  cgroup run {run + 1}/{args.runs} done ({time.perf_counter() - t:.0f} s)", flush=True)

    def med(key: tuple[str, str]) -> float:
        ok = [r.rate for r in results[key] if r.ok]
        return median(ok) if ok else 0.0

    lines.append(
        "\n| measurement (in the cgroup, cold cache) | samples/s, median (runs) | MB/s of store files | exit | "
        "limit hit (failcnt) | OOM kills | peak cgroup usage | peak RssAnon | page cache before |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for key, rs in results.items():
        what, kind = key
        label = {
            "seq": f"ChunkedSequence epoch, {kind}",
            "read": f"sequential read, {kind}",
            "memmap": f"np.memmap random batches ({args.memmap_batches} timed)",
        }[what]
        size = (
            npy.stat().st_size
            if what == "memmap"
            else sum(p.stat().st_size for p in files_of(stores[kind].path))
        )
        mbps = ""
        if what != "memmap":
            secs = [r.out["seconds"] for r in rs if r.ok]
            mbps = f"{size / median(secs) / 1e6:.0f}" if secs else "—"
        lines.append(
            f"| {label} | {fmt_rate(med(key))} ({', '.join(fmt_rate(r.rate) for r in rs)}) | {mbps} | "
            f"{', '.join(exit_status(r.returncode) for r in sorted(rs, key=lambda r: r.returncode))} | "
            f"{max(r.cgroup.get('failcnt', 0) for r in rs)} | {sum(r.cgroup.get('oom_kills', 0) for r in rs)} | "
            f"{max(r.cgroup.get('peak_usage', 0) for r in rs) / 1e6:.0f} MB | "
            f"{max(r.out.get('peak_rss_anon', 0) for r in rs) / 1e6:.0f} MB | {rs[-1].cold} |"
        )
    memmap_rate = med(("memmap", "npy"))
    lines.append(
        "\n" + load_summary([r.others for rs in results.values() for r in rs if r.others == r.others])
    )

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> tuple[float, str]:
        """Median over rounds of the ratio of the two runs of the same round (failed runs: 0)."""
        rs = paired_ratios([r.rate for r in results[a]], [r.rate for r in results[b]])
        return (median(rs), f"rounds {min(rs):.2f}-{max(rs):.2f}") if rs else (0.0, "no runs")

    for kind in stores:
        seq_rate, read_rate = med(("seq", kind)), med(("read", kind))
        rs = results["seq", kind]
        killed = [r for r in rs if not r.ok or r.cgroup.get("oom_kills", 0)]
        r1, rounds1 = ratio(("seq", kind), ("read", kind))
        r2, rounds2 = ratio(("seq", kind), ("memmap", "npy"))
        note = "" if bites else " (the limit did not bite)"
        targets.append(
            Target(
                f"4. {kind}, cgroup {args.limit_fraction:.0%} of store: ChunkedSequence / sequential read",
                fmt_ratio(r1),
                ">= 0.7x",
                r1 >= 0.7 and bites,
                f"{fmt_rate(seq_rate)} vs {fmt_rate(read_rate)} samples/s; {rounds1}{note}",
            )
        )
        targets.append(
            Target(
                f"4. {kind}, cgroup {args.limit_fraction:.0%} of store: ChunkedSequence / np.memmap random batches",
                fmt_ratio(r2),
                ">= 50x",
                r2 >= 50 and bites,
                f"{fmt_rate(seq_rate)} vs {fmt_rate(memmap_rate)} samples/s; {rounds2}{note}",
            )
        )
        targets.append(
            Target(
                f"4. {kind}, cgroup {args.limit_fraction:.0%} of store: ChunkedSequence not OOM-killed",
                f"{len(rs) - len(killed)}/{len(rs)} runs ok",
                "all runs",
                not killed and bites,
                "; ".join(
                    f"{exit_status(r.returncode)}, {r.cgroup.get('oom_kills', 0)} OOM kills, "
                    f"failcnt {r.cgroup.get('failcnt', 0)}"
                    for r in rs
                ),
            )
        )


def target5(
    args: argparse.Namespace,
    x: np.ndarray,
    y: np.ndarray,
    stores: dict[str, Any],
    made: list[Path],
    targets: list[Target],
    lines: list[str],
) -> None:
    big_n = num_samples(args.big_gb * 1000)
    need = big_n * (SAMPLE_BYTES + 8) * 1.1 + 2e9
    lines.append(
        f"\nTarget 5: peak RssAnon of a fresh process serving one shuffled epoch (x and y, Keras order), "
        f"sampled after every batch; the highest of {args.rss_runs} runs."
    )
    rows = []
    for kind, small in stores.items():
        free = shutil.disk_usage(args.workdir).free
        if free < need:
            why = (
                f"{free / 1e9:.0f} GB free on disk, need {need / 1e9:.0f} GB for the {args.big_gb:g} GB store"
            )
            print(f"  target 5 {kind}: skipped: {why}", flush=True)
            targets.append(
                Target(f"5. {kind}: peak RssAnon, {args.big_gb:g} GB vs 1 GB store", "—", "< 20%", None, why)
            )
            continue
        big_path = store_path(args.workdir, kind, tag=f"_{args.big_gb:g}gb")
        made.append(big_path)
        print(f"  target 5 {kind}: writing {big_n} samples ({big_n * SAMPLE_BYTES / 1e9:.1f} GB)", flush=True)
        big = write_store(
            big_path,
            {"x": repeated(x, big_n, roll=True), "y": repeated(y, big_n, roll=False)},
            STORE_KINDS[kind][1],
        )
        big.close()
        res = {}
        for label, path in (("small", small.path), ("big", big_path)):
            spec = {
                "what": "rss",
                "path": str(path),
                "batch_size": args.batch_size,
                "read": read_options(args),
            }
            rs = [run_child(spec) for _ in range(args.rss_runs)]
            bad = [r for r in rs if not r.ok]
            if bad:
                raise RuntimeError(
                    f"target 5 child failed: {exit_status(bad[0].returncode)}\n{bad[0].stderr}"
                )
            res[label] = max(rs, key=lambda r: r.out["peak_rss_anon"])
            o = res[label].out
            rows.append(
                f"| {kind}, {o['n'] * SAMPLE_BYTES / 1e9:.1f} GB ({o['n']} samples, {o['num_chunks']} chunks) | "
                f"{fmt_rate(median(r.rate for r in rs))} | {o['base_rss_anon'] / 1e6:.0f} MB | {o['peak_rss_anon'] / 1e6:.0f} MB | "
                f"{(o['peak_rss_anon'] - o['base_rss_anon']) / 1e6:.0f} MB | {o['bound'] / 1e6:.0f} MB "
                f"(({o['max_resident_chunks']} + 2x{o['window']}) x {o['chunk_bytes'] / 2**20:.2f} MiB) | "
                f"{o['peak_resident_chunks']} | {o['chunk_decodes'] // o['fields']} |"
            )
            print(f"  {rows[-1]}", flush=True)
        if not args.keep:
            remove(big_path)
        s, b = res["small"].out, res["big"].out
        diff = abs(b["peak_rss_anon"] - s["peak_rss_anon"]) / s["peak_rss_anon"]
        targets.append(
            Target(
                f"5. {kind}: peak RssAnon, {b['n'] * SAMPLE_BYTES / 1e9:.1f} GB vs {s['n'] * SAMPLE_BYTES / 1e9:.1f} GB store",
                f"{diff:+.1%}",
                "< 20%",
                diff < 0.2,
                f"{b['peak_rss_anon'] / 1e6:.0f} MB vs {s['peak_rss_anon'] / 1e6:.0f} MB",
            )
        )
        for o in (s, b):
            label = f"{o['n'] * SAMPLE_BYTES / 1e9:.1f} GB"
            limit = o["bound"] + 150e6
            targets.append(
                Target(
                    f"5. {kind}, {label} store: peak RssAnon / (documented bound + 150 MB)",
                    f"{o['peak_rss_anon'] / limit:.2f}",
                    "<= 1",
                    o["peak_rss_anon"] <= limit,
                    f"{o['peak_rss_anon'] / 1e6:.0f} MB vs {o['bound'] / 1e6:.0f} + 150 MB",
                )
            )
    lines.append(
        "\n| store | samples/s | RssAnon before the first batch | peak RssAnon | peak - before | documented bound "
        "(decoded chunks) | peak resident chunks (x and y) | chunk decodes per field |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    lines.extend(rows)


if __name__ == "__main__":
    sys.exit(main())
