"""Counter-based randomness: the one hash every order and draw comes from, and per-sample
random numbers for augmentation, independent of workers, threads and ranks.

The hash is SplitMix64's finaliser (Steele, Lea & Flood, "Fast splittable pseudorandom number
generators", OOPSLA 2014) of ``(seed, epoch, stream, id)``. Each use has its own *stream*
(:data:`STREAMS`), so no two uses draw the same numbers. Nothing depends on numpy's generator
streams: orders are the same across numpy versions, platforms and processes.

Every sample gets its own stream, keyed by ``(seed, epoch, sample index)``: the draws for a
sample do not depend on which batch, worker, process or rank serves it, nor on the other
samples of its batch. Counter-based (SplitMix64 of the key and a draw counter), so a whole
batch's draws are one vectorised hash.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ArgumentError

__all__ = ["STREAMS", "SampleRandom", "hash_keys", "permutation"]

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)

#: Stream ids: one per use of the hash. Changing one changes every order pinned by the tests.
STREAMS = {
    "chunks": 1,  # the permutation of chunk ids in an epoch plan
    "samples": 2,  # the shuffle of samples inside a window
    "preshuffle": 3,  # the sample order written at ingestion
    "augment": 1000,  # SampleRandom: 1000 + draw counter
}


def _mix_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int (no overflow warnings)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix_array(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN  # (a new array: the rest works in place, without a temporary per step)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return x


def hash_keys(seed: int, epoch: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """One uint64 key per id of ``ids``, a pure function of ``(seed, epoch, stream, id)``."""
    base = _mix_int(_mix_int(_mix_int(seed & _MASK) ^ (epoch & _MASK)) ^ stream)
    with np.errstate(over="ignore"):
        return mix_array(ids.astype(np.uint64) ^ np.uint64(base))


def shuffled(seed: int, epoch: int, stream: int, ids: np.ndarray) -> np.ndarray:
    """``ids`` reordered by their hashed keys (a uniform-looking random permutation)."""
    return ids[np.argsort(hash_keys(seed, epoch, stream, ids), kind="stable")]


def permutation(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` (int64), independent of any epoch order; used for
    the pre-shuffle at ingestion.

    Raises:
        ArgumentError: ``n`` or ``seed`` is not an int >= 0.
    """
    for name, value in (("n", n), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ArgumentError(f"{name} must be an int >= 0, got {value!r}")
    return shuffled(int(seed), 0, STREAMS["preshuffle"], np.arange(int(n), dtype=np.int64))


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
        per_sample = hash_keys(self._seed, self._epoch, STREAMS["augment"] + self._draws, self.indices)
        self._draws += 1
        m = math.prod(shape)
        with np.errstate(over="ignore"):
            counters = (np.arange(1, m + 1, dtype=np.uint64) * _GOLDEN)[None, :]
            bits = mix_array(per_sample[:, None] ^ counters)
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
            raise ArgumentError(f"integers needs low < high, got {low}, {high}")
        out: np.ndarray = low + np.floor(self.random(shape) * (high - low)).astype(np.int64)
        return out

    def normal(self, loc: float = 0.0, scale: float = 1.0, shape: tuple[int, ...] | int = ()) -> np.ndarray:
        """Normal floats (Box-Muller), float64 ``(batch, *shape)``."""
        u1 = 1.0 - self.random(shape)  # (0, 1]: log is finite
        u2 = self.random(shape)
        return loc + scale * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)

    def generators(self) -> list[np.random.Generator]:
        """One numpy Generator per sample (for draws this class does not offer), seeded from
        the sample's stream; uses one draw of every stream."""
        return [np.random.default_rng(int(key)) for key in self._bits(())]
