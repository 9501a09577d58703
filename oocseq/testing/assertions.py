"""Assertions about what a :class:`~oocseq.ChunkedSequence` (or a subclass, or a transform on
it) serves, over the public API only: ``seq[i]``, ``len(seq)``, ``set_epoch``,
``state_dict`` / ``load_state_dict``, ``stats``, ``max_resident_chunks`` and the plan arguments.

They raise ``AssertionError`` (a test failure, with a message saying which batch or sample went
wrong), so they work in pytest, hypothesis and unittest alike. No hypothesis, no Keras.

Sample identity: the served batches must carry the sample ids, either a field served by name
(``ids="id"``: the key of a dict of inputs or targets, e.g.
``ChunkedSequence(store, 32, x={"x": "x", "id": "id"})``) or a function ``ids(batch) -> int
array`` (e.g. :func:`oocseq.testing.decode_x` of ``batch[0]`` for index-encoding stores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..plan import EpochPlan

__all__ = [
    "assert_bounded_work",
    "assert_deterministic",
    "assert_exactly_once",
    "assert_matches_source",
    "epoch_ids",
    "serve_epoch",
]

IdsOf = str | Callable[[tuple[Any, ...]], Any]


def epoch_ids(seq: Any, epoch: int) -> np.ndarray:
    """The sample indices (int64) the plan of ``seq`` serves in ``epoch``, in order, from its
    ``state_dict()`` plan arguments (without serving anything or moving its epoch)."""
    p = seq.state_dict()["plan"]
    plan = EpochPlan(
        p["n"],
        p["chunk_len"],
        p["window"],
        p["seed"],
        epoch,
        p["shuffle"],
        p["rank"],
        p["world_size"],
        p["remainder"],
    )
    return plan.indices(0, min(len(plan), len(seq) * p["batch_size"]))


def _ids(batch: tuple[Any, ...], ids: IdsOf, where: str) -> np.ndarray:
    if callable(ids):
        return np.asarray(ids(batch)).astype(np.int64).reshape(-1)
    for part in batch:
        if isinstance(part, Mapping) and ids in part:
            return np.asarray(part[ids]).astype(np.int64).reshape(-1)
    raise AssertionError(
        f"{where}: no field {ids!r} in the served batch (serve it in a dict, e.g. x={{'x': 'x', {ids!r}: {ids!r}}}, "
        "or pass ids=<function of the batch>)"
    )


def _order(n: int, order: str | Sequence[int], seed: int) -> list[int]:
    if isinstance(order, str):
        if order == "in order":
            return list(range(n))
        if order == "keras":  # model.fit(shuffle=True) asks for a random permutation of i
            return np.random.default_rng(seed).permutation(n).tolist()
        raise ValueError(f"order must be 'in order', 'keras' or a list of batch indices, got {order!r}")
    return [int(i) for i in order]


def serve_epoch(
    seq: Any, epoch: int | None = None, *, order: str | Sequence[int] = "in order", seed: int = 0
) -> list[tuple[Any, ...]]:
    """Every batch of one epoch of ``seq``: ``seq.set_epoch(epoch)`` (unless None), then
    ``seq[i]`` for ``i`` in ``order`` (``"in order"``, ``"keras"``: a seeded random permutation
    of the batch indices, as ``model.fit`` asks, inside ``on_epoch_begin`` / ``on_epoch_end``
    as Keras calls them; or a list)."""
    if epoch is not None:
        seq.set_epoch(epoch)
    requests = _order(len(seq), order, seed)
    if order == "keras" and callable(getattr(seq, "on_epoch_begin", None)):
        # As model.fit does: one pass between on_epoch_begin and on_epoch_end, in which a
        # ChunkedSequence hands out the plan's batches in the order requests arrive.
        seq.on_epoch_begin()
        try:
            return [seq[i] for i in requests]
        finally:
            seq.on_epoch_end()
    return [seq[i] for i in requests]


def assert_exactly_once(
    seq: Any,
    epoch: int = 0,
    *,
    ids: IdsOf = "id",
    order: str | Sequence[int] = "keras",
    seed: int = 0,
) -> None:
    """One epoch served in ``order`` holds every sample of the epoch's plan exactly as often as
    the plan says: with one rank and no ``drop_remainder``, every sample of the store exactly
    once. Also: ``len(seq)`` batches, each of ``batch_size`` samples but perhaps the last one,
    and the same samples in whatever order the batches are requested.

    Raises:
        AssertionError: naming the samples served twice, never, or not in the store.
    """
    batches = serve_epoch(seq, epoch, order=order, seed=seed)
    got = [_ids(b, ids, f"epoch {epoch}, request {k}") for k, b in enumerate(batches)]
    p = seq.state_dict()["plan"]
    sizes = sorted((len(g) for g in got), reverse=True)
    full = [s for s in sizes if s != p["batch_size"]]
    if len(full) > 1 or (full and p["drop_remainder"]):
        raise AssertionError(f"epoch {epoch}: batch sizes {sizes}: more than the last batch is short")
    served = np.sort(np.concatenate(got)) if got else np.zeros(0, np.int64)
    planned = np.sort(epoch_ids(seq, epoch))
    expected = planned
    if p["world_size"] == 1 and not p["drop_remainder"]:
        expected = np.arange(p["n"], dtype=np.int64)
        if not np.array_equal(planned, expected):
            raise AssertionError(f"epoch {epoch}: the plan itself does not hold every sample once")
    if not np.array_equal(served, expected):
        counts = np.bincount(served, minlength=p["n"]) if len(served) else np.zeros(p["n"], np.int64)
        want = np.bincount(expected, minlength=p["n"])
        if len(counts) > len(want):
            raise AssertionError(
                f"epoch {epoch}: served sample ids beyond the store's {p['n']}: {served[-5:]}"
            )
        extra = np.flatnonzero(counts > want)
        missing = np.flatnonzero(counts < want)
        raise AssertionError(
            f"epoch {epoch}, {len(batches)} batches requested in {order if isinstance(order, str) else 'the given'} "
            f"order: {len(extra)} sample(s) served too often (e.g. {extra[:10].tolist()}), "
            f"{len(missing)} too rarely or never (e.g. {missing[:10].tolist()})"
        )


def _flatten(part: Any, sel: Any) -> dict[str, np.ndarray]:
    if sel is None:
        return {}
    if isinstance(sel, str):
        return {sel: np.asarray(part)}
    if isinstance(sel, Mapping):
        return {field: np.asarray(part[key]) for key, field in sel.items()}
    return {field: np.asarray(a) for field, a in zip(sel, part, strict=True)}


def assert_matches_source(
    seq: Any,
    arrays: Mapping[str, Any],
    epoch: int = 0,
    *,
    ids: IdsOf = "id",
    order: str | Sequence[int] = "keras",
    transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> None:
    """Every field served in one epoch equals the source rows of the samples it claims to hold:
    ``served[field] == arrays[field][ids]`` (after ``transform`` of the source rows, for a
    sequence with a deterministic transform). Fields are told by the sequence's ``x`` / ``y``
    selections (a name, a list or a dict); sample weights are not compared.

    Raises:
        AssertionError: naming the field, the batch and the first differing sample.
    """
    for k, batch in enumerate(serve_epoch(seq, epoch, order=order)):
        sample_ids = _ids(batch, ids, f"epoch {epoch}, request {k}")
        served = {**_flatten(batch[0], seq.x)}
        if len(batch) > 1:
            served.update(_flatten(batch[1], seq.y))
        source = {f: np.asarray(arrays[f])[sample_ids] for f in served if f in arrays}
        if transform is not None:
            source = transform(source)
        for field, want in source.items():
            got = served[field]
            if got.shape != want.shape or not np.array_equal(got, want, equal_nan=got.dtype.kind in "fc"):
                bad = [
                    int(s)
                    for j, s in enumerate(sample_ids)
                    if j >= len(got) or not np.array_equal(got[j], want[j], equal_nan=got.dtype.kind in "fc")
                ]
                raise AssertionError(
                    f"epoch {epoch}, request {k}: field {field!r} differs from the source for sample(s) "
                    f"{bad[:10]} (served shape {got.shape} {got.dtype}, source {want.shape} {want.dtype})"
                )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same, a, b))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


def assert_deterministic(
    seq_factory: Callable[[], Any], epochs: Iterable[int] = (0, 1), *, resume_at: int | None = None
) -> None:
    """Two sequences from ``seq_factory`` serve the same batches, array for array, in every
    epoch of ``epochs`` (requested in order); and a third one, after ``load_state_dict`` of the
    first's ``state_dict()`` taken ``resume_at`` batches into the first epoch (default: half),
    serves the rest of that epoch the same. Different epochs must differ when shuffled.

    Raises:
        AssertionError: naming the epoch and batch that differ.
    """
    a, b = seq_factory(), seq_factory()
    epochs = list(epochs)
    served: dict[int, list[tuple[Any, ...]]] = {}
    for e in epochs:
        served[e] = serve_epoch(a, e)
        other = serve_epoch(b, e)
        for i, (p, q) in enumerate(zip(served[e], other, strict=True)):
            if not _same(p, q):
                raise AssertionError(
                    f"epoch {e}, batch {i}: two sequences from the same factory served different batches"
                )
    if not epochs:
        return
    first = epochs[0]
    n = len(a)
    at = n // 2 if resume_at is None else resume_at
    a.set_epoch(first)
    for i in range(at):
        a[i]
    state = a.state_dict()
    c = seq_factory()
    c.load_state_dict(state)
    for i in range(at, n):
        if not _same(c[i], served[first][i]):
            raise AssertionError(
                f"epoch {first}: resumed at batch {at} from state_dict(), batch {i} differs from the uninterrupted run"
            )


def assert_bounded_work(
    seq: Any,
    epoch: int = 0,
    *,
    order: str | Sequence[int] = "keras",
    decodes_per_chunk: float = 1.0,
    fields: int | None = None,
) -> None:
    """One epoch (requested in ``order``; default Keras's random order) costs bounded work:

    - locality: each batch of the plan touches at most ``2 * window + batch_size // chunk_len + 1``
      chunks;
    - chunk decodes (``seq.stats``) at most ``decodes_per_chunk`` per chunk of each served field;
    - decoded chunks held at once at most ``seq.max_resident_chunks`` per field.

    ``fields``: the number of fields served (default: counted from the ``x`` / ``y`` selections).
    Raises ``AssertionError`` naming the bound exceeded.
    """
    p = seq.state_dict()["plan"]
    bs, chunk_len, window = p["batch_size"], p["chunk_len"], p["window"]
    order_ids = epoch_ids(seq, epoch)
    limit = 2 * window + bs // chunk_len + 1
    for i in range(len(seq)):
        touched = len(np.unique(order_ids[i * bs : (i + 1) * bs] // chunk_len))
        if touched > limit:
            raise AssertionError(f"epoch {epoch}, batch {i}: touches {touched} chunks, more than {limit}")
    if fields is None:
        names: set[str] = set()
        for sel in (seq.x, seq.y, getattr(seq, "sample_weight", None)):
            if isinstance(sel, str):
                names.add(sel)
            elif isinstance(sel, Mapping):
                names.update(sel.values())
            elif sel is not None:
                names.update(sel)
        fields = len(names)
    before = seq.stats["chunk_decodes"]
    serve_epoch(seq, epoch, order=order)
    stats = seq.stats
    num_chunks = -(-p["n"] // chunk_len)
    decodes = stats["chunk_decodes"] - before + stats.get("worker_chunk_decodes", 0)
    allowed = decodes_per_chunk * num_chunks * fields
    if decodes > allowed:
        raise AssertionError(
            f"epoch {epoch}: {decodes} chunk decodes for {num_chunks} chunks x {fields} fields "
            f"(more than {decodes_per_chunk:g} per chunk and field: locality lost)"
        )
    if stats["peak_resident_chunks"] > seq.max_resident_chunks * fields:
        raise AssertionError(
            f"{stats['peak_resident_chunks']} decoded chunks held at once (all fields), more than "
            f"max_resident_chunks = {seq.max_resident_chunks} per field x {fields} fields"
        )
