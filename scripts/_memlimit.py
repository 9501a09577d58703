"""Memory limits for the main job's larger-than-memory stage: a memory cgroup around a child
process (Linux, root), page-cache eviction, and the memory figures of a process.

A memory cgroup counts the page cache its processes fault in as well as their own memory, so a
process in a 1 GiB cgroup cannot keep more than 1 GiB of a store cached: a larger store is truly
larger than the memory it has. cgroup v1 (``memory.limit_in_bytes``) and v2 (``memory.max``) are
both handled; the cgroup is made under this process's own memory cgroup where possible (so it
nests inside a limit the caller already runs under), else at the hierarchy's root.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _mounts() -> list[tuple[str, str, str]]:
    """``(mount point, fstype, super options)`` of every mount (``/proc/self/mountinfo``)."""
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


class MemoryCgroup:
    """A new memory cgroup with a hard limit in bytes (no swap). :meth:`join` moves the calling
    process in (use it as ``preexec_fn``); :meth:`remove` deletes it once its processes ended."""

    def __init__(self, version: int, parent: Path, limit: int, tag: str) -> None:
        self.version = version
        self.limit = limit
        self.path = parent / f"oocseq-demo-{os.getpid()}-{tag}"
        self.path.mkdir()
        try:
            if version == 1:
                _write(self.path / "memory.limit_in_bytes", str(limit))
                if (self.path / "memory.memsw.limit_in_bytes").exists():
                    try:  # memory + swap: no escape into swap
                        _write(self.path / "memory.memsw.limit_in_bytes", str(limit))
                    except OSError:
                        pass
            else:
                _write(self.path / "memory.max", str(limit))
                if (self.path / "memory.swap.max").exists():
                    _write(self.path / "memory.swap.max", "0")
        except OSError:
            self.path.rmdir()
            raise

    def join(self) -> None:
        _write(self.path / "cgroup.procs", str(os.getpid()))

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def counters(self) -> dict[str, int]:
        """``peak_usage`` (bytes, page cache included), ``oom_kills``."""

        def keyed(text: str) -> dict[str, int]:
            pairs = (line.split() for line in text.splitlines())
            return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}

        if self.version == 1:
            oom = keyed(self._read("memory.oom_control"))
            return {
                "peak_usage": int(self._read("memory.max_usage_in_bytes") or 0),
                "oom_kills": oom.get("oom_kill", 0),
            }
        events = keyed(self._read("memory.events"))
        return {"peak_usage": int(self._read("memory.peak") or 0), "oom_kills": events.get("oom_kill", 0)}

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove the memory cgroup {self.path}", file=sys.stderr)


def make_cgroup(limit: int, tag: str) -> tuple[MemoryCgroup | None, str]:
    """A memory cgroup limited to ``limit`` bytes, or None and the reason none can be made."""
    if sys.platform != "linux":
        return None, "not Linux"
    try:
        mounts = _mounts()
    except OSError as e:
        return None, f"cannot read /proc/self/mountinfo: {e}"
    tried = []
    for m, fstype, opts in mounts:
        if fstype == "cgroup" and "memory" in opts.split(","):
            version = 1
        elif fstype == "cgroup2":
            version = 2
            try:
                if "memory" not in (Path(m) / "cgroup.controllers").read_text().split():
                    tried.append(f"{m}: cgroup v2 without the memory controller")
                    continue
            except OSError as e:
                tried.append(f"{m}: {e}")
                continue
        else:
            continue
        root = Path(m)
        for parent in dict.fromkeys([root / _own_cgroup(version).lstrip("/"), root]):
            try:
                if version == 2:
                    control = parent / "cgroup.subtree_control"
                    if "memory" not in control.read_text().split():
                        _write(control, "+memory")
                return MemoryCgroup(version, parent, limit, tag), f"cgroup v{version} under {parent}"
            except OSError as e:
                tried.append(f"{parent}: {e.strerror or e}")
    if not tried:
        return None, "no memory cgroup filesystem is mounted"
    return None, "cannot make a memory cgroup (" + "; ".join(tried) + ")"


# -- page cache --------------------------------------------------------------------------------
_libc: Any = None


def resident_bytes(paths: Iterable[Path]) -> int | None:
    """Bytes of ``paths`` held in the page cache (``mincore``), or None where unknown."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        if name is None:
            return None
        _libc = ctypes.CDLL(name, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    total = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
            addr = np.frombuffer(m, dtype=np.uint8).ctypes.data
            vec = np.zeros((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE, dtype=np.uint8)
            if _libc.mincore(
                ctypes.c_void_p(addr), ctypes.c_size_t(size), vec.ctypes.data_as(ctypes.c_void_p)
            ):
                return None
            del addr
            total += int(np.count_nonzero(vec & 1)) * mmap.PAGESIZE
    return total


def evict(paths: Iterable[Path]) -> str:
    """Write back and drop ``paths`` from the page cache, so that reads come from disk: each
    file's pages (``posix_fadvise(DONTNEED)``), then, if some stay cached and this is root,
    the whole page cache (``/proc/sys/vm/drop_caches``). Says what was done and what is left."""
    paths = list(paths)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    how = "posix_fadvise(DONTNEED)"
    size = sum(p.stat().st_size for p in paths)
    left = resident_bytes(paths) if sys.platform == "linux" else None
    if left is not None and left > 0.05 * size:
        try:
            os.sync()
            _write(Path("/proc/sys/vm/drop_caches"), "1\n")
            how += " + drop_caches"
            left = resident_bytes(paths)
        except OSError:
            pass
    if left is None:
        return f"{how}; residency unknown"
    return f"{how}; {left / max(1, size):.1%} of it still cached"


# -- this process's memory -----------------------------------------------------------------------
def proc_status(key: str) -> int:
    """A ``kB`` figure of ``/proc/self/status`` (``VmHWM``: peak RSS; ``RssAnon``), in bytes;
    0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_total() -> int:
    """Physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def exit_status(code: int) -> str:
    if code < 0:
        import signal

        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"
