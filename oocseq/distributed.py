"""Data-parallel rank and world size, from the framework in use or the environment.

Nothing here imports a framework: a framework that has not been imported is not in use.
"""

from __future__ import annotations

import os
import sys

from .errors import ArgumentError

__all__ = ["detect_rank"]


def detect_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of this process, from the first that applies:

    1. ``torch.distributed``, if imported and initialised (``get_rank()``, ``get_world_size()``);
    2. JAX, if imported and running more than one process (``process_index()``, ``process_count()``);
    3. the ``RANK`` and ``WORLD_SIZE`` environment variables (set by ``torchrun``, SLURM
       wrappers, ...);
    4. ``(0, 1)``.

    Raises ArgumentError for ``RANK`` / ``WORLD_SIZE`` that are not consistent integers."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    jax = sys.modules.get("jax")
    if jax is not None and hasattr(jax, "process_count"):
        try:
            count = int(jax.process_count())
        except Exception:  # no backend can start: not a multi-process JAX run
            count = 1
        if count > 1:
            return int(jax.process_index()), count
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None and world is None:
        return 0, 1
    try:
        r, w = int(rank or 0), int(world or 1)
    except ValueError:
        raise ArgumentError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers") from None
    if not (w >= 1 and 0 <= r < w):
        raise ArgumentError(f"RANK={r} must be in [0, WORLD_SIZE={w})")
    return r, w
