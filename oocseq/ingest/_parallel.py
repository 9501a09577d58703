"""Executors for ingestion: chunk-sized work units mapped in parallel, results taken in order.

An ingestion cuts its work into units whose results go to the store in a fixed order: "decode
images ``i..j``", "encode and checksum chunk ``c``". An :class:`Executor` runs them (in this
process, a thread pool, a process pool, or a Dask cluster) and :func:`ordered` hands the
results back in submission order with a bounded number of units in flight, so memory stays
bounded and the writer writes chunks in order: the store is the same bytes whatever runs the
units. Work functions must be module-level (picklable) and deterministic.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Executor as _FuturesExecutor
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from ..errors import ArgumentError

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["Executor", "check_workers", "default_workers", "make_executor", "ordered"]


class _Handle(Protocol):
    def result(self) -> Any: ...
    def cancel(self) -> Any: ...


class _Done:
    """The result of a unit run in this process, as a future."""

    __slots__ = ("_error", "_value")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        try:
            self._value = fn(*args)
        except Exception as e:
            self._error = e

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> bool:
        return False


class Executor:
    """Runs work units: ``submit(fn, *args)`` returns a future-like (``result()``,
    ``cancel()``). ``workers`` is the number of units it runs at once; ``remote`` is true when
    units run on other machines (results travel over the network, files they write must be on
    a shared path). ``shares_memory`` is true when units run in this process (in the calling
    thread or a thread pool), so a unit may take arguments that cannot travel, such as a
    memory map. Use as a context manager: leaving it stops the pool it started."""

    workers = 1
    remote = False
    shares_memory = True

    def submit(self, fn: Callable[..., R], *args: Any) -> _Handle:
        return _Done(fn, args)

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PoolExecutor(Executor):
    def __init__(self, pool: _FuturesExecutor, workers: int) -> None:
        self._pool = pool
        self.workers = workers
        self.shares_memory = isinstance(pool, ThreadPoolExecutor)

    def submit(self, fn: Callable[..., R], *args: Any) -> Future[R]:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _DaskExecutor(Executor):
    remote = True
    shares_memory = False

    def __init__(self, client: Any) -> None:
        self._client = client
        try:
            self.workers = max(1, sum(client.nthreads().values()))
        except Exception:
            self.workers = 1

    def submit(self, fn: Callable[..., R], *args: Any) -> Any:
        # pure=False: units with equal arguments are still distinct tasks (never deduplicated).
        return self._client.submit(fn, *args, pure=False)


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_workers(workers: int | None) -> int:
    """``workers`` validated; ``None`` -> :func:`default_workers`."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ArgumentError(f"workers must be a positive int (1 = in this process) or None, got {workers!r}")
    return workers


def _check_client(client: Any) -> None:
    if not (hasattr(client, "submit") and hasattr(client, "nthreads")):
        raise ArgumentError(
            f"client must be a dask.distributed.Client, got {type(client).__name__}; "
            "e.g. Client('tcp://scheduler:8786')"
        )


def make_executor(workers: int | None, client: Any = None, kind: str = "thread") -> Executor:
    """The executor for ``workers`` local workers of ``kind`` (``"thread"`` or ``"process"``),
    or for a Dask ``client`` (which wins). ``workers=1``: units run in this process."""
    if client is not None:
        _check_client(client)
        return _DaskExecutor(client)
    n = check_workers(workers)
    if n == 1:
        return Executor()
    if kind == "process":
        with warnings.catch_warnings():
            # Python 3.12+ warns about forking a process that runs threads: see _mp_context.
            warnings.filterwarnings(
                "ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning
            )
            pool = ProcessPoolExecutor(n, mp_context=_mp_context())
            # Start the processes now, before the ingestion opens its store and lock files:
            # forked later, they would hold those files' locks until they exit.
            pool.submit(int).result()
        return _PoolExecutor(pool, n)
    return _PoolExecutor(ThreadPoolExecutor(n, thread_name_prefix="oocseq-ingest"), n)


def _mp_context() -> Any:
    # Linux: fork (quick, and the user's script needs no `if __name__ == "__main__"` guard,
    # which forkserver and spawn need, as they import the main module again). The children
    # only decode images; other threads of this process (zarr's I/O loop, a progress bar) hold
    # no lock they need, as with PyTorch's DataLoader workers. Elsewhere (macOS, Windows):
    # spawn, Python's default there.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def ordered(
    executor: Executor, fn: Callable[..., R], units: Iterable[tuple[Any, ...]], in_flight: int
) -> Generator[R, None, None]:
    """``fn(*unit)`` for every unit, in order, with at most ``in_flight`` units submitted and
    not yet taken. On an error, or when the caller stops early, units not yet run are cancelled."""
    pending: deque[_Handle] = deque()
    try:
        for unit in units:
            pending.append(executor.submit(fn, *unit))
            if len(pending) >= max(1, in_flight):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for handle in pending:
            handle.cancel()
