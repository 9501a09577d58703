"""Data-parallel ranks: disjoint chunk-aligned shares, equal lengths, remainder policies, rank
and world size from the environment, and a real two-process ``torch.distributed`` (gloo) run.

Stores encode the sample index in their values (see conftest.py).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import ids_of, make_store, y_of
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import oocseq
from oocseq import ArgumentError, ChunkedSequence, EpochPlan, ShardOptions
from oocseq.distributed import detect_rank
from oocseq.plan import epoch_order, num_batches, rank_length, rank_orders


def _plans(n, chunk_len, window, seed, epoch, world_size, remainder):
    return [
        EpochPlan(n, chunk_len, window, seed, epoch, True, r, world_size, remainder)
        for r in range(world_size)
    ]


def _full_chunks(n, chunk_len):
    return n // chunk_len


def _expected_error(n, chunk_len, world_size, remainder):
    """Whether a plan of these numbers must be refused (too few chunks for the ranks)."""
    num_chunks = -(-n // chunk_len)
    if 0 < num_chunks < world_size:
        return True
    return world_size > 1 and remainder == "drop" and _full_chunks(n, chunk_len) < world_size


plan_args = st.fixed_dictionaries(
    {
        "n": st.integers(1, 400),
        "chunk_len": st.integers(1, 40),
        "window": st.integers(1, 6),
        "world_size": st.integers(1, 8),
        "seed": st.integers(0, 2**63),
        "epoch": st.integers(0, 1000),
        "remainder": st.sampled_from(["pad", "drop"]),
    }
)


# -- the plan, for arbitrary numbers -------------------------------------------------------------
@settings(max_examples=300)
@given(args=plan_args, batch_size=st.integers(1, 64))
def test_ranks_partition_every_epoch(args, batch_size):
    n, cl, window, ws, seed, epoch, remainder = (
        args["n"],
        args["chunk_len"],
        args["window"],
        args["world_size"],
        args["seed"],
        args["epoch"],
        args["remainder"],
    )
    if _expected_error(n, cl, ws, remainder):
        with pytest.raises(ArgumentError):
            EpochPlan(n, cl, window, seed, epoch, True, 0, ws, remainder)
        return
    length = rank_length(n, cl, ws, remainder)
    for e in (epoch, epoch + 1):  # equal lengths in every epoch, whatever the chunk permutation
        plans = _plans(n, cl, window, seed, e, ws, remainder)
        orders = [p.indices(0, len(p)) for p in plans]
        assert all(len(p) == length for p in plans)
        assert all(len(o) == length and o.dtype == np.int64 for o in orders)
        # the same number of batches on every rank, with and without drop_remainder
        for drop in (False, True):
            assert len({num_batches(len(p), batch_size, drop) for p in plans}) == 1
        # rank_orders is the same thing
        for a, b in zip(rank_orders(n, cl, window, seed, e, ws, remainder), orders, strict=True):
            np.testing.assert_array_equal(a, b)

        sets = [set(o.tolist()) for o in orders]
        for r, (plan, order) in enumerate(zip(plans, orders, strict=True)):
            # each rank touches only its own chunks, and all of its own samples
            own_chunks = set(plan.chunk_order.tolist())
            assert set((order // cl).tolist()) <= own_chunks
            own_samples = {i for c in own_chunks for i in range(c * cl, min((c + 1) * cl, n))}
            assert sets[r] == own_samples
            assert plan.own == len(own_samples)
            # every batch of the rank touches only the rank's chunks
            for start in range(0, length, batch_size):
                assert set((plan.indices(start, start + batch_size) // cl).tolist()) <= own_chunks
        # ranks are disjoint, also in their chunks
        for r in range(ws):
            for s in range(r + 1, ws):
                assert not sets[r] & sets[s]
                assert not set(plans[r].chunk_order.tolist()) & set(plans[s].chunk_order.tolist())
        union = set().union(*sets)
        if remainder == "pad" or ws == 1:
            assert union == set(range(n))  # every sample, every epoch
            for plan, order in zip(plans, orders, strict=True):
                # padding repeats the rank's own order from its start
                own = plan.own
                np.testing.assert_array_equal(order, order[np.arange(length) % own])
        else:
            for order in orders:
                assert len(np.unique(order)) == len(order)  # no sample twice
            assert len(union) == ws * length
            # only the short last chunk and the full chunks that do not go round are left out
            assert n - len(union) <= (n % cl) + (_full_chunks(n, cl) % ws) * cl
        if ws == 1:
            np.testing.assert_array_equal(orders[0], epoch_order(n, cl, window, seed, e))


@settings(max_examples=300)
@given(args=plan_args)
def test_pad_repeats_at_most_one_chunk(args):
    """README ("Several GPUs: ranks"): with remainder="pad", at most one chunk's worth of
    positions per rank are repeats (a rank may hold one chunk fewer than another; the short last
    chunk goes to a rank holding one more)."""
    n, cl, ws = args["n"], args["chunk_len"], args["world_size"]
    assume(not _expected_error(n, cl, ws, "pad"))
    for plan in _plans(n, cl, args["window"], args["seed"], args["epoch"], ws, "pad"):
        order = plan.indices(0, len(plan))
        padded = len(order) - plan.own
        assert padded <= cl, (
            f"rank {plan.rank} serves {padded} positions of padding > chunk_len={cl}; its chunks: "
            f"{plan.chunk_order.tolist()}, it serves a sample up to {np.bincount(order).max()} times"
        )


def test_fewer_chunks_than_ranks_is_refused():
    with pytest.raises(ArgumentError, match="chunk"):
        EpochPlan(20, 8, 2, 0, 0, True, 0, 4, "pad")  # 3 chunks, 4 ranks
    # "drop" needs a full chunk per rank: 3 full chunks (and a short one) for 4 ranks
    with pytest.raises(ArgumentError, match="drop"):
        EpochPlan(25, 8, 2, 0, 0, True, 0, 4, "drop")
    EpochPlan(25, 8, 2, 0, 0, True, 3, 4, "pad")  # 4 chunks: fine


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (5, 3), (-1, 2), (0, 0), (1.0, 2), (True, 2)])
def test_bad_rank_is_refused_by_the_plan(rank, world_size):
    with pytest.raises(ArgumentError):
        EpochPlan(100, 4, 2, 0, 0, True, rank, world_size, "pad")


def test_unknown_remainder_is_refused(store):
    with pytest.raises(ArgumentError, match="remainder"):
        EpochPlan(100, 4, 2, 0, 0, True, 0, 2, "wrap")
    with pytest.raises(ArgumentError, match="balance"):
        ShardOptions(0, 2, "wrap")


# -- ChunkedSequence with ranks ------------------------------------------------------------------
@pytest.fixture(scope="module")
def rank_stores(tmp_path_factory):
    """Stores of several shapes (both formats): (n, chunk_len) -> store."""
    root = tmp_path_factory.mktemp("rank_stores")
    shapes = [(103, 8, ".zarr"), (64, 4, ".h5"), (30, 3, ".zarr"), (17, 8, ".h5"), (9, 1, ".zarr")]
    return [make_store(root / f"s{n}_{cl}{suffix}", n, cl) for n, cl, suffix in shapes]


@settings(max_examples=100)
@given(
    data=st.data(),
    batch_size=st.integers(1, 40),
    window=st.integers(1, 4),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 5),
    remainder=st.sampled_from(["pad", "drop"]),
    drop_remainder=st.booleans(),
    keras_order=st.sampled_from(["plan", "index"]),
)
def test_sequence_serves_its_rank_plan(
    rank_stores, data, batch_size, window, seed, epoch, remainder, drop_remainder, keras_order
):
    store = data.draw(st.sampled_from(rank_stores), label="store")
    n, cl = len(store), store.chunk_len
    ws = data.draw(st.integers(1, 8), label="world_size")
    kw = dict(
        window=window,
        seed=seed,
        drop_remainder=drop_remainder,
        read=oocseq.ReadOptions(keras_order=keras_order),
    )
    if _expected_error(n, cl, ws, remainder):
        with pytest.raises(ArgumentError):
            ChunkedSequence(store, batch_size, shard=ShardOptions(0, ws, remainder), **kw)
        return
    served_sets, lengths = [], set()
    for r in range(ws):
        seq = ChunkedSequence(store, batch_size, shard=ShardOptions(r, ws, remainder), **kw)
        assert (seq.rank, seq.world_size) == (r, ws)
        seq.set_epoch(epoch)
        plan = EpochPlan(n, cl, window, seed, epoch, True, r, ws, remainder)
        expected_len = num_batches(rank_length(n, cl, ws, remainder), batch_size, drop_remainder)
        assert len(seq) == expected_len
        lengths.add(len(seq))
        ids = []
        # Keras-like shuffled requests in a pass: seq[i] is plan batch i with
        # keras_order="index"; with "plan" the k-th request gets plan batch k
        requests = data.draw(st.permutations(range(len(seq))), label="requests")
        seq.on_epoch_begin()
        for k, i in enumerate(requests):
            b = i if keras_order == "index" else k
            want = plan.indices(b * batch_size, (b + 1) * batch_size)
            np.testing.assert_array_equal(seq.batch_indices(b), want)
            x, y = seq[i]
            got = ids_of(x)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(y, y_of(got))
            if drop_remainder:
                assert len(got) == batch_size
            ids.append(got)
        served = np.concatenate(ids) if ids else np.empty(0, np.int64)
        assert set((served // cl).tolist()) <= set(plan.chunk_order.tolist())
        served_sets.append(set(served.tolist()))
    assert len(lengths) == 1
    for r in range(ws):
        for s in range(r + 1, ws):
            assert not served_sets[r] & served_sets[s]
    if remainder == "pad" and not drop_remainder:
        assert set().union(*served_sets) == set(range(n))


def test_sequence_refuses_bad_ranks(store):
    with pytest.raises(ArgumentError):
        ShardOptions(2, 2)
    with pytest.raises(ArgumentError):
        ShardOptions(-1, 2)
    with pytest.raises(ArgumentError):
        ShardOptions(0, 0)
    with pytest.raises(ArgumentError, match="chunk"):
        ChunkedSequence(store, 8, shard=ShardOptions(0, 14))  # 13 chunks
    ChunkedSequence(store, 8, shard=ShardOptions(12, 13))
    with pytest.warns(DeprecationWarning, match="ShardOptions"):  # the earlier spelling
        assert ChunkedSequence(store, 8, rank=1, world_size=2).shard == ShardOptions(1, 2)


def test_sequence_refuses_half_given_ranks(store):
    """A rank without a world size (or the reverse) is a mistake, not rank 0 of 1."""
    with pytest.warns(DeprecationWarning), pytest.raises(ArgumentError, match="both rank and world_size"):
        ChunkedSequence(store, 8, world_size=2)
    with pytest.warns(DeprecationWarning), pytest.raises(ArgumentError, match="both rank and world_size"):
        ChunkedSequence(store, 8, rank=1)


def test_sequence_ranks_each_epoch_equal_batches(store):
    """Every rank serves len(seq) batches in every epoch, and epochs deal other chunks."""
    ws = 3
    seqs = [ChunkedSequence(store, 7, shard=ShardOptions(r, ws), seed=1, window=2) for r in range(ws)]
    chunk_sets = []
    for epoch in range(4):
        counts, seen = [], []
        for seq in seqs:
            seq.set_epoch(epoch)
            batches = [ids_of(b[0]) for b in iter(seq)]
            counts.append(len(batches))
            seen.append(set(np.concatenate(batches).tolist()))
        assert len(set(counts)) == 1 and counts[0] == len(seqs[0])
        assert set().union(*seen) == set(range(len(store)))
        chunk_sets.append(tuple(frozenset(s.plan.chunk_order.tolist()) for s in seqs))
    assert len(set(chunk_sets)) > 1


# -- rank and world size from the environment ----------------------------------------------------
@pytest.fixture
def no_rank_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_defaults_to_one_rank(store, no_rank_env):
    assert detect_rank() == (0, 1)
    seq = ChunkedSequence(store, 8)
    assert (seq.rank, seq.world_size) == (0, 1)


@pytest.mark.parametrize(("rank", "world_size"), [(0, 2), (1, 2), (2, 3), (3, 4)])
def test_rank_from_environment(store, no_rank_env, rank, world_size):
    no_rank_env.setenv("RANK", str(rank))
    no_rank_env.setenv("WORLD_SIZE", str(world_size))
    assert detect_rank() == (rank, world_size)
    seq = ChunkedSequence(store, 8, seed=3)
    assert (seq.rank, seq.world_size) == (rank, world_size)
    explicit = ChunkedSequence(store, 8, seed=3, shard=ShardOptions(rank, world_size))
    assert len(seq) == len(explicit)
    for i in range(len(seq)):
        np.testing.assert_array_equal(seq.batch_indices(i), explicit.batch_indices(i))
    # explicit arguments win over the environment
    mine = ChunkedSequence(store, 8, seed=3, shard=ShardOptions(0, 1))
    assert (mine.rank, mine.world_size) == (0, 1)


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "x", "WORLD_SIZE": "2"},
        {"RANK": "0", "WORLD_SIZE": "two"},
        {"RANK": "2", "WORLD_SIZE": "2"},
        {"RANK": "-1", "WORLD_SIZE": "2"},
        {"RANK": "0", "WORLD_SIZE": "0"},
        {"RANK": "1"},
        {"RANK": "1.5", "WORLD_SIZE": "2"},
    ],
)
def test_bad_environment_is_refused(store, no_rank_env, env):
    for k, v in env.items():
        no_rank_env.setenv(k, v)
    with pytest.raises(ArgumentError):
        detect_rank()
    with pytest.raises(ArgumentError):
        ChunkedSequence(store, 8)


# -- a real two-process torch.distributed run (gloo, CPU) ----------------------------------------
def _distributed_worker(rank: int, world_size: int, init_method: str, store_path: str, out_dir: str) -> None:
    """One rank: build sequences with no rank arguments (detect_rank reads torch.distributed),
    serve an epoch, all_gather the served ids, write what it saw to out_dir/rank<r>.json."""
    result: dict = {"rank": rank}
    try:
        for var in ("RANK", "WORLD_SIZE"):  # make sure the ranks come from torch.distributed
            os.environ.pop(var, None)
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
        try:
            for remainder in ("pad", "drop"):
                seq = ChunkedSequence(store_path, 7, seed=11, window=2, shard=ShardOptions.detect(remainder))
                seq.set_epoch(1)
                batches = [ids_of(b[0]).tolist() for b in iter(seq)]
                gathered: list = [None] * world_size
                dist.all_gather_object(
                    gathered, {"rank": seq.rank, "world_size": seq.world_size, "batches": batches}
                )
                result[remainder] = gathered
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # reported to the test, which fails with it
        import traceback

        result["error"] = "".join(traceback.format_exception(e))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.timeout(120)
def test_torch_distributed_two_ranks(tmp_path, fmt):
    pytest.importorskip("torch.distributed")
    store = make_store(tmp_path / f"s{fmt}", 101, 6)  # 17 chunks, the last one short
    world_size = 2
    init_method = (tmp_path / "rendezvous").as_uri()  # file:// rendezvous, no network
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_distributed_worker, args=(r, world_size, init_method, str(store.path), str(tmp_path))
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(100)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for r in range(world_size):
        out = tmp_path / f"rank{r}.json"
        assert out.exists(), f"rank {r} wrote nothing (exit code {procs[r].exitcode})"
        res = json.loads(out.read_text())
        assert "error" not in res, res["error"]
        results.append(res)
    n = len(store)
    for remainder in ("pad", "drop"):
        views = [res[remainder] for res in results]
        assert views[0] == views[1]  # all_gather_object: every rank sees the same
        gathered = views[0]
        assert [g["rank"] for g in gathered] == [0, 1]
        assert all(g["world_size"] == world_size for g in gathered)
        counts = [len(g["batches"]) for g in gathered]
        assert counts[0] == counts[1] > 0
        ids = [np.concatenate(g["batches"]) for g in gathered]
        assert len(ids[0]) == len(ids[1]) == rank_length(n, 6, world_size, remainder)
        assert not set(ids[0].tolist()) & set(ids[1].tolist())
        for r in range(world_size):  # the very plan of that rank
            plan = EpochPlan(n, 6, 2, 11, 1, True, r, world_size, remainder)
            np.testing.assert_array_equal(ids[r], plan.indices(0, len(plan)))
        if remainder == "pad":
            assert set(ids[0].tolist()) | set(ids[1].tolist()) == set(range(n))
        else:
            assert all(len(np.unique(i)) == len(i) for i in ids)
