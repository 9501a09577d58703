"""Stock batch transforms for :class:`~oocseq.ChunkedSequence`'s ``transform=``.

- :func:`one_hot`: an integer label field as float32 one-hot rows.
- :func:`class_weights`: per-sample weights from an integer label field, served as the batch's
  third element ``(x, y, sample_weight)``; :func:`balanced_class_weights` computes
  ``{class: weight}`` from a store's label counts.
- :func:`compose`: several transforms, one after the other.

Each is a small picklable object (worker processes of any start method can run it) called
with ``(batch, rng)``, like a user's transform; a bad label raises
:class:`~oocseq.InvalidSourceError` naming the sample and the field.

Keras's own ``model.fit(seq, class_weight={...})`` also works with a ``ChunkedSequence``
(Keras turns the ``y`` of each ``(x, y)`` batch into weights; a class missing from the dict
gets weight 1). :func:`class_weights` does the same inside oocseq, for any framework (PyTorch,
JAX, plain loops), and refuses a label missing from the dict instead of weighting it 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ArgumentError, ArgumentTypeError, InvalidSourceError
from .rng import SampleRandom

__all__ = [
    "ClassWeights",
    "Compose",
    "OneHot",
    "balanced_class_weights",
    "class_weights",
    "compose",
    "one_hot",
]

Batch = dict[str, np.ndarray]

#: The batch key :func:`class_weights` writes into by default.
SAMPLE_WEIGHT = "sample_weight"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _labels(batch: Mapping[str, Any], name: str, what: str) -> np.ndarray:
    if name not in batch:
        raise ArgumentError(
            f"{what}: the batch has no field {name!r} (it has {sorted(batch)}); name the label field "
            f"with field=..., and serve it (x=/y= of the sequence)"
        )
    labels = np.asarray(batch[name])
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ArgumentError(
            f"{what} needs a field of integer labels (shape (batch,) or (batch, 1)); "
            f"field {name!r} is {labels.dtype} of shape {labels.shape[1:]} per sample"
        )
    return labels


def _bad_label(
    labels: np.ndarray, bad: np.ndarray, rng: SampleRandom | None, name: str, expected: str
) -> None:
    k = int(np.flatnonzero(bad)[0])
    sample = f"sample {int(rng.indices[k])}" if rng is not None else f"row {k} of the batch"
    raise InvalidSourceError(f"{sample} has label {int(labels[k])} in field {name!r}; expected {expected}")


@dataclass(frozen=True)
class OneHot:
    """See :func:`one_hot`."""

    num_classes: int
    field: str = "y"

    def __post_init__(self) -> None:
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise ArgumentError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if not isinstance(self.field, str):
            raise ArgumentTypeError(f"field must be a field name (str), got {type(self.field).__name__}")

    @property
    def fields_read(self) -> tuple[str, ...]:
        """The fields it needs in the batch (checked when a sequence is built)."""
        return (self.field,)

    def __call__(self, batch: Batch, rng: SampleRandom | None = None) -> Batch:
        k = int(self.num_classes)
        labels = _labels(batch, self.field, f"one_hot({k}, field={self.field!r})")
        bad = (labels < 0) | (labels >= k)
        if bad.any():
            _bad_label(labels, bad, rng, self.field, f"an int in [0, {k}) (one_hot({k}))")
        out = np.zeros((len(labels), k), dtype=np.float32)
        out[np.arange(len(labels)), labels] = 1.0
        return {**batch, self.field: out}


def one_hot(num_classes: int, field: str = "y") -> OneHot:
    """A transform that replaces the integer labels of ``field`` (``(batch,)`` or
    ``(batch, 1)``, values in ``[0, num_classes)``) by float32 one-hot rows
    ``(batch, num_classes)``.

    Example: ``ChunkedSequence(store, 64, transform=oocseq.transforms.one_hot(10))``.

    Raises:
        ArgumentError: ``num_classes`` is not a positive int (here); the field is missing or
            not integer (at the first batch).
        InvalidSourceError: a label outside ``[0, num_classes)``, naming the sample.
    """
    return OneHot(num_classes, field)


@dataclass(frozen=True)
class ClassWeights:
    """See :func:`class_weights`."""

    weights: Mapping[int, float]
    field: str = "y"
    sample_weight_key: str = SAMPLE_WEIGHT
    _table: tuple[np.ndarray, np.ndarray] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise ArgumentTypeError(
                f"class weights must be a non-empty dict {{class: weight}}, got {self.weights!r}"
            )
        classes, values = [], []
        for c, w in self.weights.items():
            if not _is_int(c):
                raise ArgumentError(f"class weight keys must be int labels, got {c!r}")
            try:
                value = float(w)
            except (TypeError, ValueError):
                raise ArgumentError(f"the weight of class {c} must be a number, got {w!r}") from None
            if not np.isfinite(value) or value < 0:
                raise ArgumentError(f"the weight of class {c} must be finite and >= 0, got {w!r}")
            classes.append(int(c))
            values.append(value)
        order = np.argsort(classes)
        table = (np.asarray(classes, dtype=np.int64)[order], np.asarray(values, dtype=np.float32)[order])
        object.__setattr__(self, "weights", dict(zip(classes, values, strict=True)))
        object.__setattr__(self, "_table", table)

    @property
    def fields_read(self) -> tuple[str, ...]:
        """The fields it needs in the batch (checked when a sequence is built)."""
        return (self.field,)

    def __call__(self, batch: Batch, rng: SampleRandom | None = None) -> Batch:
        labels = _labels(batch, self.field, f"class_weights(field={self.field!r})")
        classes, values = self._table
        pos = np.clip(np.searchsorted(classes, labels), 0, len(classes) - 1)
        bad = classes[pos] != labels
        if bad.any():
            _bad_label(labels, bad, rng, self.field, f"one of the class weights' keys {classes.tolist()}")
        return {**batch, self.sample_weight_key: values[pos]}


def class_weights(weights: Mapping[int, float], field: str = "y") -> ClassWeights:
    """A transform that adds per-sample weights: ``weights[label]`` (float32 ``(batch,)``) for
    the integer labels of ``field``. The sequence serves them as the third element of each
    batch, ``(x, y, sample_weight)`` (so not together with ``sample_weight=``).

    Example: ``ChunkedSequence(store, 64, transform=class_weights({0: 1.0, 1: 5.0}))``;
    ``class_weights(balanced_class_weights(store))`` weights classes inversely to their counts.
    Put it before :func:`one_hot` in :func:`compose` (or give it the one-hot's label field
    before encoding): it reads integer labels.

    Raises:
        ArgumentError / ArgumentTypeError: bad weights (here); the field is missing or not
            integer (at the first batch).
        InvalidSourceError: a label that is not a key of ``weights``, naming the sample.
    """
    return ClassWeights(weights, field)


@dataclass(frozen=True)
class Compose:
    """See :func:`compose`."""

    transforms: tuple[Callable[..., Batch], ...]
    _two_args: tuple[bool, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from .batches import takes_two_args

        object.__setattr__(self, "_two_args", tuple(takes_two_args(t) for t in self.transforms))

    @property
    def sample_weight_key(self) -> str | None:
        """The key of the last transform that makes sample weights, if any."""
        keys = [getattr(t, "sample_weight_key", None) for t in self.transforms]
        keys = [k for k in keys if k is not None]
        return keys[-1] if keys else None

    @property
    def fields_read(self) -> tuple[str, ...]:
        """The stored fields its transforms need (not those an earlier one adds)."""
        made: set[str] = set()
        needed: list[str] = []
        for t in self.transforms:
            needed += [f for f in getattr(t, "fields_read", ()) if f not in made and f not in needed]
            key = getattr(t, "sample_weight_key", None)
            if key is not None:
                made.add(key)
        return tuple(needed)

    def __call__(self, batch: Batch, rng: SampleRandom | None = None) -> Batch:
        for t, two in zip(self.transforms, self._two_args, strict=True):
            batch = t(batch, rng) if two else t(batch)
        return batch


def compose(*transforms: Callable[..., Batch]) -> Compose:
    """Apply ``transforms`` in order; each is ``f(batch)`` or ``f(batch, rng)`` (the same
    per-sample random numbers object is passed to each in turn).

    Raises:
        ArgumentTypeError: one of them is not callable.
    """
    for t in transforms:
        if not callable(t):
            raise ArgumentTypeError(f"compose takes callables, got {type(t).__name__}")
    return Compose(tuple(transforms))


def balanced_class_weights(source: Any, field: str = "y") -> dict[int, float]:
    """``{class: n / (classes * count)}`` for the integer labels of ``field`` (the
    "balanced" weights: every class weighs as much in all), counted in one pass over the
    field's chunks, one chunk in memory at a time. Classes that never occur are left out.

    Args:
        source: an opened :class:`~oocseq.Store`, a store path or a dict of arrays.
        field: the label field (integers >= 0, shape ``(n,)`` or ``(n, 1)``).

    Raises:
        FieldNotFoundError: no such field.
        ArgumentError: the field is not of integer labels, or the source is empty.
        InvalidSourceError: a negative label, naming the sample.
    """
    from .batches import open_source

    src = open_source(source)
    try:
        return _balanced(src, field)
    finally:
        if src is not source and hasattr(src, "close"):
            src.close()  # a store opened here from its path


def _balanced(src: Any, field: str) -> dict[int, float]:
    from .errors import FieldNotFoundError

    if field not in src:
        raise FieldNotFoundError(f"{src.path} has no field {field!r}; its fields are {sorted(src.fields)}")
    spec = src.fields[field]
    if spec.dtype.kind not in "iu" or spec.sample_shape not in ((), (1,)):
        raise ArgumentError(
            f"balanced_class_weights needs a field of integer labels; {field!r} of {src.path} is "
            f"{spec.dtype} of shape {spec.sample_shape} per sample"
        )
    n, cl = len(src), src.chunk_len
    if n == 0:
        raise ArgumentError(f"{src.path} has no samples to count labels in")
    counts = np.zeros(0, dtype=np.int64)
    buf = np.empty((cl, *spec.sample_shape), dtype=spec.dtype)
    for c in range(-(-n // cl)):
        rows = min(cl, n - c * cl)
        out = buf[:rows]
        src.read_chunk_into(field, c, out)
        labels = out.reshape(rows).astype(np.int64)
        if (labels < 0).any():
            k = int(np.flatnonzero(labels < 0)[0])
            raise InvalidSourceError(
                f"{src.path}: sample {c * cl + k} has label {int(labels[k])} in field {field!r}; "
                "expected an int >= 0"
            )
        counts = np.pad(counts, (0, max(0, int(labels.max()) + 1 - len(counts))))
        counts += np.bincount(labels, minlength=len(counts))
    present = np.flatnonzero(counts)
    return {int(c): float(n / (len(present) * counts[c])) for c in present}
