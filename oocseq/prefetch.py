"""Batches prepared ahead, in plan order, by worker threads or processes.

This is how a :class:`~oocseq.ChunkedSequence` honours Keras's ``workers``,
``use_multiprocessing`` and ``max_queue_size``: it runs the workers itself and shows Keras a
sequential dataset (the README's "Workers" section says why Keras's own enqueuer is not used).
The epoch's order is known in advance, so the workers compute exactly the batches that will be
asked for next, keyed by ``(epoch, batch)``; a batch computed ahead is served only when its turn
comes and is dropped, never re-served, when the epoch changes.

A *task* is a run of consecutive plan batches (about one window's worth). Worker threads share
the process's window cache, and a task's windows stay held (:meth:`WindowCache.hold`) from its
submission until it is served, so each chunk is decoded once per epoch. Worker processes have
caches of their own: each gets runs of consecutive tasks (``ahead / workers`` of them), so that
only a window where a run ends is decoded by two processes
(``seq.stats["worker_chunk_decodes"]`` counts them).
"""

from __future__ import annotations

import multiprocessing
import pickle
import threading
import traceback
import weakref
from concurrent.futures import (
    BrokenExecutor,
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import ArgumentError, OocseqError
from .options import WorkerOptions

__all__ = ["Failed", "Prefetcher", "TaskSource", "WorkerOptions"]


class Failed:
    """A batch whose preparation raised: re-raised when (and only if) that batch is served."""

    def __init__(self, error: BaseException) -> None:
        try:
            pickle.dumps(error)
        except Exception:  # an exception that cannot cross a process boundary: keep its text
            text = "".join(traceback.format_exception(error))
            error = OocseqError(f"a worker failed with an exception that cannot be pickled:\n{text}")
        self.error = error


class TaskSource(Protocol):
    """What the prefetcher needs: :class:`~oocseq.batches.ChunkedBatches` provides it."""

    def prepare(self, epoch: int, start: int, stop: int) -> list[Any]:
        """Plan batches ``range(start, stop)`` of ``epoch``: one entry each (a batch, or a
        :class:`Failed`)."""

    def hold(self, epoch: int, start: int, stop: int) -> Any:
        """Keep the windows of a queued task decoded until the returned hold's ``release()``."""

    def for_processes(self) -> Any:
        """The source as worker processes get it (inherited by fork, pickled otherwise)."""


# -- worker processes -------------------------------------------------------------------------
_worker_source: Any = None


def _init_process(source: Any) -> None:
    global _worker_source
    _worker_source = source


def _process_block(epoch: int, start: int, stop: int) -> tuple[list[Any], int]:
    """A task prepared in a worker process, and the chunk decodes that took there."""
    before = _worker_source.stats["chunk_decodes"]
    entries = _worker_source.prepare(epoch, start, stop)
    return entries, _worker_source.stats["chunk_decodes"] - before


@dataclass
class _Block:
    """A block queued on a pool: its future, the pool, the windows reserved for it (threads)
    and how many of its batches are still to be served."""

    future: Future[Any]
    pool: Executor
    left: int
    hold: Any = None


class Prefetcher:
    """Blocks of plan batches computed ahead by a pool; see the module docstring.

    Args:
        options: the workers.
        block: plan batches per task.
        ahead: blocks queued ahead of the one served.
        source: the batch core (threads call its ``prepare``; processes get
            ``for_processes()`` and call its).
    """

    def __init__(self, options: WorkerOptions, block: int, ahead: int, source: TaskSource) -> None:
        self.options = options
        self.block = max(1, block)
        self.ahead = max(1, ahead)
        self._source = source
        self._lock = threading.Lock()
        # Threads: one pool. Processes: one single-process pool per worker, each given runs of
        # consecutive blocks, so that the window two blocks share is decoded once, by one process.
        self._pools: dict[int, Executor] = {}
        self.run = max(1, self.ahead // max(1, options.workers)) if options.use_multiprocessing else 1
        self._blocks: dict[tuple[int, int], _Block] = {}  # (epoch, block) -> queued block
        self._closed = False
        #: Chunk decodes done by worker processes for the blocks they prepared.
        self.worker_decodes = 0
        self._count_lock = threading.Lock()

    def _executor(self, b: int) -> Executor:
        """The pool that computes block ``b``. Call with the lock held."""
        slot = (b // self.run) % max(1, self.options.workers) if self.options.use_multiprocessing else 0
        pool = self._pools.get(slot)
        if pool is None:
            n = max(1, self.options.workers)
            if self.options.use_multiprocessing:
                context = multiprocessing.get_context(self.options.start_method)
                copy = self._source.for_processes()
                if context.get_start_method() != "fork":  # the copy travels pickled: say so now
                    try:
                        pickle.dumps(copy)
                    except Exception as e:
                        raise ArgumentError(
                            f"use_multiprocessing=True with the {context.get_start_method()!r} start method "
                            f"sends the sequence to its worker processes pickled, and it cannot be pickled "
                            f"({type(e).__name__}: {e}). Make transform a module-level function or class "
                            "(not a lambda or a local function), or use threads (use_multiprocessing=False)."
                        ) from e
                pool = ProcessPoolExecutor(1, mp_context=context, initializer=_init_process, initargs=(copy,))
            else:
                pool = ThreadPoolExecutor(n, thread_name_prefix="oocseq-worker")
            self._pools[slot] = pool
            # Shut the pool down with this object (the sequence's per-process state).
            weakref.finalize(self, _shutdown, weakref.ref(pool))
        return pool

    def _submit(self, epoch: int, b: int, num_batches: int) -> None:
        """Queue block ``b`` of ``epoch``. Call with the lock held."""
        start, stop = b * self.block, min((b + 1) * self.block, num_batches)
        pool = self._executor(b)
        hold = None
        future: Future[Any]  # processes: (entries, decodes); threads: entries
        if self.options.use_multiprocessing:
            try:
                future = pool.submit(_process_block, epoch, start, stop)
            except BrokenExecutor:  # its process died since the last request: start a new one
                self._forget_pool(pool)
                pool.shutdown(wait=False, cancel_futures=True)
                pool = self._executor(b)
                future = pool.submit(_process_block, epoch, start, stop)
            future.add_done_callback(self._count_decodes)
        else:
            # Threads share this process's window cache: hold the block's windows from now until
            # it is served (or dropped). Released when computed instead, a block done early would
            # let other threads drop the window it shares with the next block, not yet
            # submitted, which would then decode it a second time.
            hold = self._source.hold(epoch, start, stop)
            try:
                future = pool.submit(self._source.prepare, epoch, start, stop)
            except BaseException:
                hold.release()
                raise
        self._blocks[(epoch, b)] = _Block(future, pool, stop - start, hold)

    def _count_decodes(self, future: Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            with self._count_lock:  # not _lock: cancel() under _lock runs this callback at once
                self.worker_decodes += future.result()[1]

    def _drop(self, key: tuple[int, int]) -> None:
        """Forget a block (served, passed or of another epoch). Call with the lock held."""
        block = self._blocks.pop(key, None)
        if block is None:
            return
        block.future.cancel()
        if block.hold is not None:
            block.hold.release()

    def get(self, epoch: int, i: int, num_batches: int) -> Any:
        """Plan batch ``i`` of ``epoch`` (computing it and the next blocks ahead). Safe to call
        from several threads at once."""
        b = i // self.block
        last = (num_batches - 1) // self.block
        block = None
        with self._lock:
            if not self._closed:  # (closed while this request was on its way: computed below)
                # Another epoch's blocks will never be served; nor will blocks far behind
                # (requests skipped them). Blocks just behind may be being served by another thread.
                for key in [k for k in self._blocks if k[0] != epoch or k[1] < b - self.ahead]:
                    self._drop(key)
                for _ in range(2):  # twice: a broken pool found at submit drops its blocks
                    for ahead in range(b, min(b + self.ahead, last + 1)):
                        if (epoch, ahead) not in self._blocks:
                            self._submit(epoch, ahead, num_batches)
                block = self._blocks.get((epoch, b))  # None: computed here below
        entries: list[Any] | None = None
        if block is not None:
            try:
                result = block.future.result()
                entries = result[0] if self.options.use_multiprocessing else result
            except CancelledError:  # the epoch changed meanwhile (set_epoch from another thread)
                entries = None
            except BrokenExecutor:  # a worker process died (killed, out of memory): no hang
                self._discard_pool(block.pool)  # the next request starts a new pool
                raise
        k = i - b * self.block
        out = None
        if block is not None and entries is not None:
            with self._lock:
                out, entries[k] = entries[k], None  # served once: drop the reference
                if out is not None:
                    block.left -= 1
                    if block.left <= 0 and self._blocks.get((epoch, b)) is block:
                        self._drop((epoch, b))
        if out is None:  # cancelled, or served before (a request repeated): compute it again
            out = self._again(epoch, b, i)
        if isinstance(out, Failed):
            raise out.error
        return out

    def _again(self, epoch: int, b: int, i: int) -> Any:
        """Plan batch ``i`` once more, by the workers when they run (a ``transform`` made for
        worker processes stays out of this one), else here."""
        pool = None
        with self._lock:
            if not self._closed:
                pool = self._executor(b)
        if pool is not None:
            try:
                if self.options.use_multiprocessing:
                    future = pool.submit(_process_block, epoch, i, i + 1)
                    future.add_done_callback(self._count_decodes)
                    return future.result()[0][0]
                return pool.submit(self._source.prepare, epoch, i, i + 1).result()[0]
            except (BrokenExecutor, CancelledError, RuntimeError):  # (RuntimeError: shut down meanwhile)
                pass
        return self._source.prepare(epoch, i, i + 1)[0]

    def reset(self) -> None:
        """Drop everything computed ahead (the epoch changed)."""
        with self._lock:
            self._drop_all()

    def _drop_all(self) -> None:
        """Call with the lock held."""
        for key in list(self._blocks):
            self._drop(key)

    def _discard_pool(self, pool: Executor) -> None:
        """Forget a broken pool and the blocks queued on it (once, whichever thread saw it)."""
        with self._lock:
            self._forget_pool(pool)
        pool.shutdown(wait=False, cancel_futures=True)

    def _forget_pool(self, pool: Executor) -> None:
        """Call with the lock held."""
        for key in [k for k, block in self._blocks.items() if block.pool is pool]:
            self._drop(key)
        for slot in [k for k, p in self._pools.items() if p is pool]:
            del self._pools[slot]

    def close(self) -> None:
        """Drop everything and stop the pool; later requests are computed by the caller."""
        with self._lock:
            self._closed = True
            self._drop_all()
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)


def _shutdown(pool_ref: weakref.ref[Executor]) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
