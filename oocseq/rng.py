"""Per-sample random numbers for augmentation, independent of workers, threads and ranks.

Every sample gets its own stream, keyed by ``(seed, epoch, sample index)``: the draws for a
sample do not depend on which batch, worker, process or rank serves it, nor on the other
samples of its batch. Counter-based (SplitMix64 of the key and a draw counter), so a whole
batch's draws are one vectorised hash.
"""

from __future__ import annotations

import math

import numpy as np

from .plan import _keys, _mix_array

__all__ = ["SampleRandom"]

_STREAM_AUGMENT = 1000
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class SampleRandom:
    """Random numbers for the samples of one batch: row ``k`` of every draw comes from the
    stream of sample ``indices[k]``.

    Each call draws from the next counter of every sample's stream, so a transform that makes
    the same calls in the same order gets the same numbers for a sample wherever it is served.

    Args:
        seed, epoch: as the sequence's.
        indices: the batch's sample indices (int64, shape ``(batch,)``).
    """

    def __init__(self, seed: int, epoch: int, indices: np.ndarray) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self._seed = seed
        self._epoch = epoch
        self._draws = 0

    def __len__(self) -> int:
        return len(self.indices)

    def _bits(self, shape: tuple[int, ...]) -> np.ndarray:
        """uint64 array ``(batch, *shape)`` of fresh hashed bits."""
        per_sample = _keys(self._seed, self._epoch, _STREAM_AUGMENT + self._draws, self.indices)
        self._draws += 1
        m = math.prod(shape)
        with np.errstate(over="ignore"):
            counters = (np.arange(1, m + 1, dtype=np.uint64) * _GOLDEN)[None, :]
            bits = _mix_array(per_sample[:, None] ^ counters)
        return bits.reshape((len(self.indices), *shape))

    def random(self, shape: tuple[int, ...] | int = ()) -> np.ndarray:
        """Uniform floats in ``[0, 1)``, float64 ``(batch, *shape)`` (53 random bits each)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return (self._bits(shape) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def uniform(self, low: float = 0.0, high: float = 1.0, shape: tuple[int, ...] | int = ()) -> np.ndarray:
        """Uniform floats in ``[low, high)``, float64 ``(batch, *shape)``."""
        return low + (high - low) * self.random(shape)

    def integers(self, low: int, high: int, shape: tuple[int, ...] | int = ()) -> np.ndarray:
        """Integers in ``[low, high)``, int64 ``(batch, *shape)``."""
        if high <= low:
            raise ValueError(f"integers needs low < high, got {low}, {high}")
        return low + np.floor(self.random(shape) * (high - low)).astype(np.int64)

    def normal(self, loc: float = 0.0, scale: float = 1.0, shape: tuple[int, ...] | int = ()) -> np.ndarray:
        """Normal floats (Box-Muller), float64 ``(batch, *shape)``."""
        u1 = 1.0 - self.random(shape)  # (0, 1]: log is finite
        u2 = self.random(shape)
        return loc + scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)

    def generators(self) -> list[np.random.Generator]:
        """One numpy Generator per sample (for draws this class does not offer), seeded from
        the sample's stream; uses one draw of every stream."""
        return [np.random.default_rng(int(key)) for key in self._bits(())]
