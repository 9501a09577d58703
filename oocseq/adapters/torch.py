"""PyTorch: :class:`TorchBatches`, an ``IterableDataset`` of whole batches of a
:class:`~oocseq.ChunkedSequence`, for ``torch.utils.data.DataLoader(..., batch_size=None)``.

Each DataLoader worker serves one contiguous range of the epoch plan's batches (so it reads a
contiguous run of windows, each decoded once), the ranges of the workers partition the epoch,
and a batch's content depends on the plan only: every sample is served exactly once per epoch
and the set of batches is the same for any ``num_workers``. (DataLoader interleaves the
workers' batches, so their *order* depends on ``num_workers``.)

Supports ``persistent_workers`` (the epoch is shared memory, set with :meth:`set_epoch`),
``pin_memory``, and torchdata's ``StatefulDataLoader`` (``state_dict`` / ``load_state_dict``
of each worker's progress). Importing this module imports torch.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import StateError
from ..sequence import ChunkedSequence, check_state

__all__ = ["TorchBatches"]


def _to_torch(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_torch(v) for v in obj)
    return obj


def worker_range(num_batches: int, worker: int, num_workers: int) -> range:
    """Batches served by DataLoader worker ``worker`` of ``num_workers``: a contiguous range;
    the ranges of all workers partition ``range(num_batches)``."""
    return range(worker * num_batches // num_workers, (worker + 1) * num_batches // num_workers)


class TorchBatches(IterableDataset):  # type: ignore[type-arg]
    """Batches of ``seq`` as torch tensors (``(x, y)``, ``(x, y, w)`` or ``(x,)``; dicts and
    tuples as ``seq`` makes them). Use with ``DataLoader(TorchBatches(seq), batch_size=None,
    num_workers=N)``, and call :meth:`set_epoch` before each epoch (as with
    ``DistributedSampler``).

    Args:
        seq: the sequence (its store, plan and transform travel to the workers as paths and
            arguments; file handles reopen in each worker).
        as_tensors: convert numpy arrays to tensors (zero-copy ``torch.from_numpy``).
    """

    def __init__(self, seq: ChunkedSequence, as_tensors: bool = True) -> None:
        super().__init__()
        self.seq = seq
        self.as_tensors = as_tensors
        # Shared memory: persistent workers see set_epoch() made in the main process.
        self._epoch = multiprocessing.get_context().Value("q", seq.epoch, lock=False)
        self._resume: dict[str, Any] | None = None
        self._progress: dict[str, Any] = {"epoch": seq.epoch, "next": None}

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch``'s plan on the next iteration (all workers)."""
        self._epoch.value = int(epoch)
        self._progress = {"epoch": int(epoch), "next": None}

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def __len__(self) -> int:
        return len(self.seq)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.epoch
        core = self.seq.core  # stateless: nothing of the sequence's cursor changes here
        batches = worker_range(len(core), worker, num_workers)
        start = batches.start
        self._progress = {"epoch": epoch, "next": start}
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == epoch and resume["next"] is not None:
            start = max(start, min(int(resume["next"]), batches.stop))
        for i in range(start, batches.stop):
            batch = core.get(epoch, i, readahead=True, until=batches.stop)  # read ahead in its range only
            self._progress = {"epoch": epoch, "next": i + 1}
            yield _to_torch(batch) if self.as_tensors else batch

    # torchdata's Stateful protocol: called in each worker by StatefulDataLoader.
    def state_dict(self) -> dict[str, Any]:
        """This worker's progress: ``{"epoch", "next"}`` (next batch of its range) and the
        sequence's plan (checked on load)."""
        return {**self._progress, "sequence": self.seq.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume this worker's range at ``state["next"]`` of epoch ``state["epoch"]``.
        Raises StateError for a state of another store or plan."""
        try:
            check_state(self.seq.core, state.get("sequence"))
        except StateError as e:
            raise StateError(f"cannot resume TorchBatches: {e}") from None
        self._epoch.value = int(state["epoch"])
        self._resume = {"epoch": int(state["epoch"]), "next": state.get("next")}
        self._progress = dict(self._resume)
