"""oocseq.bench: the one epoch timer (time_epoch) and ``oocseq bench``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_store

import oocseq
from oocseq import ChunkedSequence
from oocseq.bench import bench_store, format_results, time_epoch


@pytest.mark.parametrize("order", ["in order", "keras", "keras order"])
def test_time_epoch_times_one_pass_and_moves_to_the_next_epoch(tmp_path, order):
    store = make_store(tmp_path / "s.zarr", 103, 8)
    seq = ChunkedSequence(store, 10, seed=3, window=2)
    t = time_epoch(seq, order, sample_rss=True)
    assert (t.epoch, t.samples, t.batches) == (0, 103, len(seq))
    assert t.chunk_decodes == 2 * store.num_chunks  # x and y, each chunk once
    assert t.seconds > 0 and t.cpu_seconds >= 0 and t.samples_per_s > 0 and t.rss_peak >= 0
    assert seq.epoch == 1
    cut = time_epoch(seq, order, max_batches=3)
    assert (cut.epoch, cut.batches, cut.samples) == (1, 3, 30)
    assert seq.epoch == 2  # a pass cut short moves on too
    with pytest.raises(oocseq.ArgumentError, match="unknown order"):
        time_epoch(seq, "backwards")


def test_time_epoch_counts_samples_of_any_batch_structure():
    arrays = {"a": np.zeros((25, 2)), "b": np.ones(25), "y": np.arange(25)}
    seq = ChunkedSequence(arrays, 4, x={"in_a": "a", "in_b": "b"}, y=None, shuffle=False)
    assert time_epoch(seq).samples == 25


def test_bench_store_and_its_table(tmp_path):
    store = make_store(tmp_path / "s.h5", 64, 8)
    results = bench_store(store, batch_size=16)
    assert [r.order for r in results] == ["in order", "keras order"]
    for r in results:
        assert r.samples == 64 and r.chunk_decodes == r.num_chunks == 2 * store.num_chunks  # x and y
    assert "keras order" in format_results(store, results)
