"""Options of a :class:`~oocseq.ChunkedSequence`, as small validated value objects.

- :class:`ReadOptions`: how the window cache reads and decodes ahead (threads, windows).
- :class:`WorkerOptions`: who prepares whole batches ahead (Keras's ``PyDataset`` arguments).
- :class:`ShardOptions`: this process's data-parallel share (rank, world size, and how the
  ranks' shares are evened out).
- :class:`RemoteOptions`: how a store in object storage (``s3://``, ``gs://``, ``https://``)
  is fetched: concurrency, bytes in flight, retries, timeouts.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

from .errors import ArgumentError

__all__ = [
    "BALANCE_POLICIES",
    "KERAS_ORDERS",
    "ReadOptions",
    "RemoteOptions",
    "ShardOptions",
    "WorkerOptions",
]

#: Which plan batch answers Keras's requests during a pass (see :class:`ReadOptions`).
KERAS_ORDERS = ("plan", "index")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ReadOptions:
    """How a :class:`~oocseq.ChunkedSequence` reads: ahead of the batch served, and in which
    order it answers Keras's requests.

    Attributes:
        readahead: windows decoded in the background ahead of the one being served, when
            batches are served in order (0: none). Once an epoch's first batch has followed
            the epoch before's last, the read-ahead goes on past that epoch's end into the
            next epoch's first windows.
        threads: decoding threads (default: the cores less one, 1 to 4); 0 decodes in the calling
            thread only. numcodecs releases the GIL, so threads decode in parallel.
        keras_order: during a Keras pass, ``"plan"`` (default): the k-th distinct index Keras
            asks for gets the plan's k-th batch, so ``fit``'s shuffled requests read the store
            in plan order (chunk locality); ``"index"``: index ``i`` gets plan batch ``i``
            (each window is decoded again for every request that lands in it). Requests in
            order (``predict``, ``evaluate``, ``fit(shuffle=False)``) get the same batches
            either way; so does every epoch's set of batches.

    Raises:
        ArgumentError: a negative or non-integer value, an unknown ``keras_order``.
    """

    readahead: int = 1
    threads: int | None = None
    keras_order: str = "plan"

    def __post_init__(self) -> None:
        if self.keras_order not in KERAS_ORDERS:
            raise ArgumentError(f"keras_order must be one of {KERAS_ORDERS}, got {self.keras_order!r}")
        if not _is_int(self.readahead) or self.readahead < 0:
            raise ArgumentError(f"readahead must be an int >= 0, got {self.readahead!r}")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 0):
            raise ArgumentError(f"threads must be None or an int >= 0, got {self.threads!r}")


@dataclass(frozen=True)
class WorkerOptions:
    """Who prepares batches ahead of the training loop (Keras's ``PyDataset`` arguments).

    Attributes:
        workers: threads (or processes) that prepare batches (read, gather, ``transform``)
            ahead, in plan order. ``1`` (default) with ``use_multiprocessing=False``: batches
            are prepared when asked for (the window cache still decodes ahead in its own
            threads, see :class:`ReadOptions`).
        use_multiprocessing: workers are processes (of ``multiprocessing``'s start method:
            fork, spawn or forkserver), for a ``transform`` that holds the GIL. Each process
            reopens the store and keeps its own window cache; batches come back pickled.
        max_queue_size: batches prepared ahead at most (rounded up to whole tasks of about a
            window of batches, and at least one task per worker).
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"`` for the worker processes;
            None (default): ``multiprocessing``'s default. Forking a process that runs threads
            (JAX, TensorFlow, oocseq's decode threads) can deadlock the child if a thread held
            a lock at that moment; ``"forkserver"`` (Python 3.14's default) avoids it, and
            needs a picklable ``transform``.

    Raises:
        ArgumentError: a bad value.
    """

    workers: int = 1
    use_multiprocessing: bool = False
    max_queue_size: int = 10
    start_method: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.workers) or self.workers < 0:
            raise ArgumentError(f"workers must be an int >= 0, got {self.workers!r}")
        if not isinstance(self.use_multiprocessing, bool):
            raise ArgumentError(
                f"use_multiprocessing must be True or False, got {self.use_multiprocessing!r}"
            )
        if not _is_int(self.max_queue_size) or self.max_queue_size < 1:
            raise ArgumentError(f"max_queue_size must be an int >= 1, got {self.max_queue_size!r}")
        methods = multiprocessing.get_all_start_methods()
        if self.start_method is not None and self.start_method not in methods:
            raise ArgumentError(f"start_method must be None or one of {methods}, got {self.start_method!r}")

    @property
    def parallel(self) -> bool:
        """Whether batches are prepared ahead by workers (Keras's rule: ``workers > 1``, or
        ``use_multiprocessing`` with ``workers >= 1``)."""
        return self.workers > 1 or (self.use_multiprocessing and self.workers >= 1)


#: How ranks' shares are evened out (see :class:`ShardOptions`).
BALANCE_POLICIES = ("pad", "drop")


@dataclass(frozen=True)
class ShardOptions:
    """This process's share of every epoch in data-parallel training.

    The permuted chunks of an epoch are dealt round-robin to the ranks, so ranks serve
    disjoint, chunk-aligned shares, and every rank serves the same number of batches.

    Attributes:
        rank: this process's rank, in ``[0, world_size)``.
        world_size: processes training together (>= 1).
        balance: how the ranks' shares, which differ by up to a chunk, are evened out:
            ``"pad"`` (default) repeats a rank's own samples (at most one chunk's worth) so
            that every sample is served each epoch; ``"drop"`` leaves out up to a chunk per
            rank each epoch (others each epoch) so that no sample is served twice.

    Use :meth:`detect` for the rank of the framework in use.

    Raises:
        ArgumentError: rank outside ``[0, world_size)``, or an unknown ``balance``.
    """

    rank: int = 0
    world_size: int = 1
    balance: str = "pad"

    def __post_init__(self) -> None:
        if not _is_int(self.world_size) or self.world_size < 1:
            raise ArgumentError(f"world_size must be an int >= 1, got {self.world_size!r}")
        if not _is_int(self.rank) or not 0 <= self.rank < self.world_size:
            raise ArgumentError(
                f"rank must be an int in [0, world_size={self.world_size}), got {self.rank!r}"
            )
        if self.balance not in BALANCE_POLICIES:
            raise ArgumentError(f"balance must be one of {BALANCE_POLICIES}, got {self.balance!r}")

    @classmethod
    def detect(cls, balance: str = "pad") -> ShardOptions:
        """The rank and world size of this process, from ``torch.distributed``, JAX or the
        ``RANK`` / ``WORLD_SIZE`` environment variables, else one rank (see
        :func:`oocseq.distributed.detect_rank`).

        Raises:
            ArgumentError: inconsistent ``RANK`` / ``WORLD_SIZE``.
        """
        from .distributed import detect_rank

        rank, world_size = detect_rank()
        return cls(rank, world_size, balance)


@dataclass(frozen=True)
class RemoteOptions:
    """How chunks of a store in object storage are fetched (see :func:`oocseq.open_store`).

    The read-ahead of a :class:`~oocseq.ChunkedSequence` names every chunk of the next windows;
    they are fetched with up to ``max_requests`` concurrent requests, holding at most
    ``max_bytes_in_flight`` bytes of fetched-but-unread chunks (so memory stays bounded
    whatever the latency). Transient failures (5xx answers, dropped or refused connections,
    timeouts) are retried with exponential backoff and jitter, ``retries`` times and for at
    most ``retry_timeout`` seconds; then the read raises
    :class:`~oocseq.errors.StoreReadError` naming the chunk and the URL.

    Attributes:
        max_requests: concurrent requests at most (>= 1).
        max_bytes_in_flight: bytes of chunks fetched ahead and not yet read, at most
            (>= 1 MiB); a chunk read on demand is fetched whatever this bound.
        retries: retries of one request (>= 0).
        retry_timeout: seconds after a request's first try past which it is not retried (> 0).
        timeout: seconds one try may take, connecting included (> 0).
        cache_dir: a local folder that keeps chunk objects once they passed their checksum,
            so that later epochs read them from local disk (None: no cache). Each store gets
            a subfolder named after its URL and checksums: a store replaced in the bucket never
            meets the old store's chunks. Cached chunks are checked again at every read.
        cache_limit: bytes the cache may hold (per process using it); the chunks read least
            recently are deleted past it. Default: 10 GiB.

    Raises:
        ArgumentError: a value outside its range.
    """

    max_requests: int = 32
    max_bytes_in_flight: int = 256 << 20
    retries: int = 5
    retry_timeout: float = 30.0
    timeout: float = 30.0
    cache_dir: str | None = None
    cache_limit: int = 10 << 30

    def __post_init__(self) -> None:
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ArgumentError(f"cache_dir must be None or a folder path, got {self.cache_dir!r}")
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if not _is_int(self.cache_limit) or self.cache_limit < 0:
            raise ArgumentError(f"cache_limit must be an int >= 0 (bytes), got {self.cache_limit!r}")
        if not _is_int(self.max_requests) or self.max_requests < 1:
            raise ArgumentError(f"max_requests must be an int >= 1, got {self.max_requests!r}")
        if not _is_int(self.max_bytes_in_flight) or self.max_bytes_in_flight < (1 << 20):
            raise ArgumentError(
                f"max_bytes_in_flight must be an int >= 1 MiB (1048576), got {self.max_bytes_in_flight!r}"
            )
        if not _is_int(self.retries) or self.retries < 0:
            raise ArgumentError(f"retries must be an int >= 0, got {self.retries!r}")
        for name in ("retry_timeout", "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ArgumentError(f"{name} must be a number of seconds > 0, got {value!r}")
