"""PyTorch: real ``torch.utils.data.DataLoader`` (and torchdata's ``StatefulDataLoader``) over
``oocseq.adapters.torch.TorchBatches``, with worker processes under fork, spawn and forkserver.

Stores encode the sample index in their values (see conftest.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import ids_of, x_of, y_of

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

import oocseq  # noqa: E402
from oocseq import ChunkedSequence  # noqa: E402
from oocseq.adapters.torch import TorchBatches  # noqa: E402
from oocseq.rng import SampleRandom  # noqa: E402

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),  # 3 workers, 2 cores
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning"),  # torchdata
    # JAX (imported by the Keras tests of the same session) warns at every fork; workers never use it
    pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning"),
]

N, CHUNK, BATCH = 150, 8, 10  # 19 chunks (the last one short), 15 batches


def img_of(idx: np.ndarray) -> np.ndarray:
    """A uint8 field: ``img[i] = [[i % 251, (i + 1) % 251], [(i + 2) % 251, (i + 3) % 251]]``."""
    idx = np.asarray(idx, dtype=np.int64)
    return ((idx[:, None] + np.arange(4)) % 251).astype(np.uint8).reshape(-1, 2, 2)


def make_mixed_store(path) -> oocseq.Store:
    idx = np.arange(N)
    fields = {"x": x_of(idx), "y": y_of(idx), "img": img_of(idx), "h": (idx % 7 - 3).astype(np.int16)}
    return oocseq.ingest_arrays(path, fields, chunk_len=CHUNK, preshuffle=False)


@pytest.fixture
def mixed(tmp_path, fmt):
    return make_mixed_store(tmp_path / f"mixed{fmt}")


def make_seq(store, **kw) -> ChunkedSequence:
    kw = {"seed": 3, "window": 2, **kw}
    return ChunkedSequence(store, BATCH, x={"x": "x", "img": "img"}, y=["y", "h"], **kw)


def plan_batches(store, epoch: int, **kw) -> set[tuple[int, ...]]:
    ref = make_seq(store, **kw)
    ref.set_epoch(epoch)
    return {tuple(sorted(ref.batch_indices(i).tolist())) for i in range(len(ref))}


def check_batch(batch) -> list[int]:
    """Checks a (x dict, (y, h)) batch of tensors against the sample ids it holds."""
    x, (y, h) = batch
    assert isinstance(x["x"], torch.Tensor)
    assert x["x"].dtype == torch.float32 and x["img"].dtype == torch.uint8
    assert y.dtype == torch.int64 and h.dtype == torch.int16
    ids = ids_of(x["x"].numpy())
    np.testing.assert_array_equal(x["img"].numpy(), img_of(ids))
    np.testing.assert_array_equal(y.numpy(), y_of(ids))
    np.testing.assert_array_equal(h.numpy(), ids % 7 - 3)
    return ids.tolist()


def run_epoch(loader) -> list[list[int]]:
    return [check_batch(b) for b in loader]


def assert_exactly_once(batches: list[list[int]]) -> None:
    served = sorted(i for b in batches for i in b)
    assert served == list(range(N)), "not every sample exactly once"


CONFIGS = [  # (store format, num_workers, multiprocessing context)
    (".zarr", 0, None),
    (".h5", 0, None),
    (".zarr", 1, "fork"),
    (".h5", 3, "fork"),
    (".zarr", 3, "spawn"),
    (".h5", 1, "spawn"),
    (".zarr", 2, "forkserver"),
    (".h5", 3, "forkserver"),
]


@pytest.mark.parametrize(
    ("suffix", "num_workers", "context"), CONFIGS, ids=[f"{s[1:]}-{n}-{c}" for s, n, c in CONFIGS]
)
def test_dataloader_serves_the_plan_batches_once(tmp_path, suffix, num_workers, context):
    mixed = make_mixed_store(tmp_path / f"mixed{suffix}")
    seq = make_seq(mixed)
    ds = TorchBatches(seq)
    assert len(ds) == len(seq) == -(-N // BATCH)
    ds.set_epoch(2)
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers, multiprocessing_context=context)
    batches = run_epoch(loader)
    assert len(batches) == len(seq)
    assert_exactly_once(batches)
    assert {tuple(sorted(b)) for b in batches} == plan_batches(mixed, 2)


def test_batches_equal_for_any_num_workers(mixed):
    """The same sample sets per batch (only their interleaving differs) for 0, 1 and 3 workers;
    and a batch's samples come in the plan's order within the batch."""
    ref = make_seq(mixed)
    planned = {tuple(ref.batch_indices(i).tolist()) for i in range(len(ref))}
    for num_workers in (0, 1, 3):
        loader = DataLoader(TorchBatches(make_seq(mixed)), batch_size=None, num_workers=num_workers)
        got = {tuple(b) for b in run_epoch(loader)}
        assert got == planned, f"num_workers={num_workers}"


def test_set_epoch_changes_the_batches(mixed):
    ds = TorchBatches(make_seq(mixed))
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    seen = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        assert ds.epoch == epoch
        batches = run_epoch(loader)
        assert_exactly_once(batches)
        got = {tuple(sorted(b)) for b in batches}
        assert got == plan_batches(mixed, epoch)
        seen.append(got)
    assert seen[0] != seen[1] and seen[0] == seen[2]


@pytest.mark.parametrize(
    ("suffix", "context"), [(".h5", "fork"), (".zarr", "spawn")], ids=["h5-fork", "zarr-spawn"]
)
def test_persistent_workers_see_set_epoch(tmp_path, suffix, context):
    mixed = make_mixed_store(tmp_path / f"mixed{suffix}")
    ds = TorchBatches(make_seq(mixed))
    loader = DataLoader(
        ds, batch_size=None, num_workers=2, persistent_workers=True, multiprocessing_context=context
    )
    seen = []
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        batches = run_epoch(loader)
        assert_exactly_once(batches)
        got = {tuple(sorted(b)) for b in batches}
        assert got == plan_batches(mixed, epoch), f"epoch {epoch}"
        seen.append(got)
    assert len({frozenset(s) for s in seen}) == 3


def test_pin_memory(mixed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CPU-only torch warns that there is nothing to pin to
        loader = DataLoader(TorchBatches(make_seq(mixed)), batch_size=None, num_workers=2, pin_memory=True)
        batches = run_epoch(loader)
    assert_exactly_once(batches)


def test_numpy_batches_without_conversion(mixed):
    ds = TorchBatches(make_seq(mixed), as_tensors=False)
    batches = list(ds)
    assert len(batches) == len(ds)
    x, (y, h) = batches[0]
    assert isinstance(x["x"], np.ndarray) and isinstance(y, np.ndarray) and x["img"].dtype == np.uint8
    assert h.dtype == np.int16
    np.testing.assert_array_equal(ids_of(x["x"]), make_seq(mixed).batch_indices(0))


def test_torch_batches_in_a_plain_loop_follow_the_sequence(mixed):
    """TorchBatches iterated in the main process (num_workers=0 without a DataLoader)."""
    seq = make_seq(mixed)
    ds = TorchBatches(seq)
    ds.set_epoch(4)
    got = [check_batch(b) for b in ds]
    ref = make_seq(mixed)
    ref.set_epoch(4)
    assert got == [ref.batch_indices(i).tolist() for i in range(len(ref))]


# -- StatefulDataLoader: mid-epoch resume --------------------------------------------------------
@pytest.mark.parametrize(("num_workers", "k"), [(0, 0), (0, 4), (0, 14), (2, 1), (2, 6), (2, 13)])
def test_stateful_dataloader_resumes_mid_epoch(mixed, num_workers, k):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = TorchBatches(make_seq(mixed))
    ds.set_epoch(3)
    loader = sdl.StatefulDataLoader(ds, batch_size=None, num_workers=num_workers)
    it = iter(loader)
    before = [check_batch(next(it)) for _ in range(k)]
    state = loader.state_dict()
    del it, loader

    # a restart: new sequence, new dataset, new loader
    ds2 = TorchBatches(make_seq(mixed))
    loader2 = sdl.StatefulDataLoader(ds2, batch_size=None, num_workers=num_workers)
    loader2.load_state_dict(state)
    after = [check_batch(b) for b in loader2]
    assert len(before) + len(after) == -(-N // BATCH)
    assert_exactly_once(before + after)
    assert {tuple(sorted(b)) for b in before + after} == plan_batches(mixed, 3)


def test_stateful_dataloader_refuses_another_plan(mixed):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    loader = sdl.StatefulDataLoader(TorchBatches(make_seq(mixed)), batch_size=None, num_workers=0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    other = sdl.StatefulDataLoader(TorchBatches(make_seq(mixed, seed=4)), batch_size=None, num_workers=0)
    with pytest.raises(oocseq.StateError, match="seed"):
        other.load_state_dict(state)
        list(other)


# -- per-sample random numbers in workers --------------------------------------------------------
def augment(batch, rng):
    """Module level: picklable for spawn workers. Puts two draws into x[:, 1:]."""
    x = batch["x"].astype(np.float64)
    x[:, 1] = rng.random()
    x[:, 2] = rng.normal()
    return {**batch, "x": x}


def draws_by_sample(loader) -> dict[int, tuple[float, float]]:
    out: dict[int, tuple[float, float]] = {}
    for x, _ in loader:
        x = x.numpy()
        assert x.dtype == np.float64
        for row in x:
            assert int(row[0]) not in out
            out[int(row[0])] = (float(row[1]), float(row[2]))
    return out


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_augmentation_draws_do_not_depend_on_workers(tmp_path, context):
    from conftest import make_store

    store = make_store(tmp_path / "s.zarr", N, CHUNK)

    def loader(num_workers, batch_size):
        seq = ChunkedSequence(store, batch_size, seed=8, window=2, transform=augment)
        ds = TorchBatches(seq)
        ds.set_epoch(1)
        ctx = context if num_workers else None
        return DataLoader(ds, batch_size=None, num_workers=num_workers, multiprocessing_context=ctx)

    a = draws_by_sample(loader(0, BATCH))
    b = draws_by_sample(loader(2, BATCH))
    assert sorted(a) == list(range(N))
    assert a == b
    if context == "fork":  # another batch size too (spawn is slow to start: once is enough)
        assert draws_by_sample(loader(3, 7)) == a
    ids = np.arange(N)
    rng = SampleRandom(8, 1, ids)
    u, z = rng.random(), rng.normal()
    assert a == {int(i): (float(u[i]), float(z[i])) for i in ids}
