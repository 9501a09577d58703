"""Read-path targets 1, 2, 3, 6 and 7, each a ratio measured in one run.

The same data (crops of real photos, in RAM and in four stores: Zarr and HDF5, uncompressed
and Blosc-lz4, default chunking) and one process; page cache warm (the stores were just
written). Measurements are interleaved, each after an untimed warm-up and after waiting for
the machine to be quiet: every round runs the reads of one store one after another (the stores,
and the reads of each, in a new random order every round; the in-RAM baseline of target 1 is
measured beside each uncompressed store), so the two sides of a ratio run seconds apart; a
ratio is the median over rounds of the ratio of the two runs of the same round. ``ChunkedSequence`` serves field ``x`` only
(``y=None``) for targets 1, 2, 3 and 6, so that it reads what the baselines read; batch 128,
default window and read options.

1. uncompressed store, shuffled epoch (requests ``0..len-1``) vs in-RAM numpy random batches
   ``x[np.sort(idx)]``: >= 0.5;
2. Blosc-lz4 store, the same epoch vs the read + decode limit: every chunk of the store read
   from its file (``os.preadv`` from the page cache into a reused buffer) and decoded once by
   ``numcodecs.blosc.decompress`` into a preallocated buffer, on ``os.cpu_count()`` threads:
   >= 0.6 (the decode limit alone, compressed bytes already in memory, is reported beside it,
   and so is the floor of this design: the same reads, decodes and gathers as the epoch with
   nothing else, :class:`GatherFloor`);
3. Keras's call order (``seq[i]`` for a random permutation of ``i``) vs requests in order:
   >= 0.8, and chunk decodes per epoch <= 1.05 x chunks;
6. the Keras-order epoch vs h5py ``ds[np.sort(idx)]`` / zarr ``arr.oindex[np.sort(idx)]``
   random batches of the same store (``--fancy-batches`` timed): >= 100;
7. ``model.fit`` for one epoch (Keras, JAX backend; Rescaling + GlobalAveragePooling2D + Dense)
   from a ChunkedSequence vs from the arrays in RAM (``shuffle=True``, timed beside each
   store's fit in every round): time ratio <= 1.15.

Every ChunkedSequence epoch is timed by :func:`oocseq.bench.time_epoch` (the one epoch timer
of ``oocseq bench`` and of the scripts here). As the limits keep their threads and buffers
across rounds, each store and order has one ChunkedSequence for the whole run, warmed up by
one untimed epoch: what is timed is an epoch of training, not a sequence's set-up.

Besides samples/s, every read reports the CPU time it cost per sample (all threads of the
process), which other load on the machine disturbs much less than wall time.

Run:  python benchmarks/read_path.py [--size-mb 1000] [--runs 5] [--fit-runs 5] [--no-fit]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from oocseq.storage._raw import aligned_empty

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _data
from _data import (
    SAMPLE_BYTES,
    SAMPLE_SHAPE,
    STORE_KINDS,
    Runs,
    Target,
    chunk_files,
    crops_in_ram,
    environment,
    fmt_rate,
    fmt_ratio,
    interleaved,
    load_summary,
    median,
    num_samples,
    paired_ratios,
    remove,
    spread,
    store_path,
    targets_table,
    write_store,
)


@dataclass
class Result:
    rate: float  # samples/s
    cpu_us: float  # CPU microseconds per sample, all threads of the process
    decodes: int | None = None  # chunk decodes of x per epoch (ChunkedSequence only)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- measurements ---------------------------------------------------------------------------


def random_batches(
    read: Callable[[np.ndarray], object], n: int, bs: int, count: int | None, seed: int
) -> Result:
    """``read(np.sort(idx))`` for ``count`` random batches of a globally shuffled epoch (all of
    them if ``count`` is None); the indices are made before the clock starts."""
    perm = np.random.default_rng(seed).permutation(n)
    batches = [np.sort(perm[s : s + bs]) for s in range(0, n, bs)][:count]
    samples = sum(len(b) for b in batches)
    c, t = _cpu(), time.perf_counter()
    for idx in batches:
        read(idx)
    seconds, cpu = time.perf_counter() - t, _cpu() - c
    return Result(samples / seconds, cpu / samples * 1e6)


class SequenceEpochs:
    """Epochs of one ChunkedSequence (x only) of ``store``, made once and reused by every
    round, as a :class:`DecodeLimit` keeps its threads and buffers: its decoding threads start
    and its window buffers are allocated in the untimed warm-up (a first epoch of a new
    sequence was ~5% slower). Requests ``"in order"`` or in a random order of ``i``
    (``"keras"``, a new one each epoch); each epoch timed by :func:`oocseq.bench.time_epoch`,
    which moves the sequence on to the next epoch."""

    def __init__(self, store: Any, bs: int, order: str, epochs: int) -> None:
        import oocseq

        self.seq = oocseq.ChunkedSequence(store, bs, y=None, seed=0)
        self.order = order
        self.epochs = epochs

    def warmup(self) -> None:
        """One untimed epoch (a whole one: a pass cut short would leave its read-ahead still
        decoding when the timed epoch starts)."""
        from oocseq.bench import time_epoch

        time_epoch(self.seq, self.order, seed=7)

    def __call__(self, run: int = 0) -> Result:
        from oocseq.bench import time_epoch

        timings = [time_epoch(self.seq, self.order, seed=7) for _ in range(self.epochs)]
        samples = sum(t.samples for t in timings)
        seconds = sum(t.seconds for t in timings)
        cpu = sum(t.cpu_seconds for t in timings)
        return Result(samples / seconds, cpu / samples * 1e6, max(t.chunk_decodes for t in timings))

    def close(self) -> None:
        self.seq.close()


class DecodeLimit:
    """Every chunk of field ``x`` of a Blosc store decoded once with numcodecs, on
    ``os.cpu_count()`` threads, each into its own preallocated buffer.

    ``with_read=False`` (the target's limit): the compressed bytes are read into memory
    beforehand, so this is decoding alone. ``with_read=True`` (a diagnostic): each thread also
    reads the chunk's bytes from the store file (page cache) into a reused buffer first."""

    def __init__(self, store: Any, with_read: bool = False) -> None:
        self.n = len(store)
        self.with_read = with_read
        chunk_bytes = store.chunk_len * SAMPLE_BYTES
        # (file, offset, size) of every chunk of x, in chunk order
        if store.format == "zarr":
            self.where = [(p, 0, p.stat().st_size) for p in chunk_files(store.path)]
        else:
            import h5py

            with h5py.File(store.path, "r") as f:
                ds = f["x"]
                infos = sorted(
                    (ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())),
                    key=lambda i: i.chunk_offset[0],
                )
            self.where = [(store.path, i.byte_offset, i.size) for i in infos]
        assert len(self.where) == store.num_chunks
        self.raws: list[bytes] = []
        if not with_read:
            for path, offset, size in self.where:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    self.raws.append(fh.read(size))
        self.threads = os.cpu_count() or 1
        # Page-aligned and touched, as oocseq's own buffers (see oocseq.storage._raw.ALIGNMENT:
        # in a bytearray the limit would be slow by chance).
        self.buffers = [aligned_empty((chunk_bytes,), np.uint8) for _ in range(self.threads)]
        self.inputs = [
            aligned_empty((max(s for _, _, s in self.where),), np.uint8) for _ in range(self.threads)
        ]
        for b in self.buffers + self.inputs:
            b.fill(1)
        self.pool = ThreadPoolExecutor(self.threads)

    def _work(self, k: int) -> None:
        import numcodecs.blosc

        out = self.buffers[k]
        if not self.with_read:
            for raw in self.raws[k :: self.threads]:
                numcodecs.blosc.decompress(raw, out)
            return
        buf = memoryview(self.inputs[k])  # type: ignore[arg-type]  # numpy arrays are buffers
        for path, offset, size in self.where[k :: self.threads]:
            fd = os.open(path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [buf[:size]], offset)
            finally:
                os.close(fd)
            assert got == size
            numcodecs.blosc.decompress(buf[:size], out)

    def __call__(self, run: int = 0) -> Result:
        c, t = _cpu(), time.perf_counter()
        list(self.pool.map(self._work, range(self.threads)))
        seconds, cpu = time.perf_counter() - t, _cpu() - c
        return Result(self.n / seconds, cpu / self.n * 1e6)

    def close(self) -> None:
        self.pool.shutdown()


class GatherFloor:
    """The least work an epoch of this design does on a Blosc store, with nothing else: each
    window's chunks (the epoch plan's windows) read from their files and decoded into a window
    buffer by one decoding thread and the serving thread, as ChunkedSequence shares them on 2
    cores (the decoding thread takes chunks from the first up, one window ahead; the serving
    thread decodes its window's chunks no thread has started, from the last down, and the next
    window's while it would wait), then the window's samples gathered in the plan's serving
    order (``np.take`` into a new page-aligned batch array). What ChunkedSequence costs above
    this floor is its own work: plan, cache, checks and Python per batch and per chunk."""

    def __init__(self, store: Any, bs: int, where: list[tuple[Path, int, int]]) -> None:
        import oocseq

        self.n, self.bs, self.where = len(store), bs, where
        chunk_len = store.chunk_len
        probe = oocseq.ChunkedSequence(store, bs, y=None, seed=0)
        plan = probe.plan
        probe.close()
        # Per window: its chunks, and the gather index of its serving order (rows of its
        # chunks' samples back to back, as buffer positions: every chunk has a full slot).
        self.windows: list[tuple[list[int], np.ndarray]] = []
        for w in range(plan.num_windows):
            chunks = plan.window_chunks(w).tolist()
            sizes = [min(chunk_len, self.n - c * chunk_len) for c in chunks]
            slots = np.concatenate([j * chunk_len + np.arange(k) for j, k in enumerate(sizes)])
            self.windows.append((chunks, slots[plan.window_rows(w)]))
        rows = plan.window * chunk_len
        self.buffers = [aligned_empty((rows, *SAMPLE_SHAPE), np.uint8) for _ in range(3)]
        self.inputs = [aligned_empty((max(s for _, _, s in where),), np.uint8) for _ in range(2)]
        self.chunk_bytes = chunk_len * SAMPLE_BYTES
        for b in self.buffers + self.inputs:
            b.fill(1)

    def _decode(self, k: int, w: int, j: int) -> None:
        import numcodecs.blosc

        path, offset, size = self.where[self.windows[w][0][j]]
        buf = memoryview(self.inputs[k])  # type: ignore[arg-type]  # numpy arrays are buffers
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf[:size]], offset)
        finally:
            os.close(fd)
        if got != size:
            raise RuntimeError(f"{path}: read {got} of the {size} bytes at {offset}")
        out = self.buffers[w % 3].reshape(-1)[j * self.chunk_bytes : (j + 1) * self.chunk_bytes]
        numcodecs.blosc.decompress(buf[:size], out)

    def __call__(self, run: int = 0) -> Result:
        count = len(self.windows)
        lock = threading.Lock()
        claimed = [[False] * len(chunks) for chunks, _ in self.windows]
        done = [[threading.Event() for _ in chunks] for chunks, _ in self.windows]
        started = [threading.Event() for _ in range(count)]

        def claim(w: int, last: bool) -> int | None:
            with lock:
                order = range(len(claimed[w]) - 1, -1, -1) if last else range(len(claimed[w]))
                for j in order:
                    if not claimed[w][j]:
                        claimed[w][j] = True
                        return j
            return None

        errors: list[BaseException] = []

        def stop_all() -> None:
            """Wake every wait: the decoding thread finds nothing left to claim and ends."""
            with lock:
                for flags in claimed:
                    flags[:] = [True] * len(flags)
            for event in started + [e for events in done for e in events]:
                event.set()

        def decoding_thread() -> None:
            try:
                for w in range(count):
                    started[w].wait()
                    while (j := claim(w, False)) is not None:
                        self._decode(0, w, j)
                        done[w][j].set()
            except BaseException as e:  # (reported by the serving thread, which would wait)
                errors.append(e)
                stop_all()

        started[0].set()
        thread = threading.Thread(target=decoding_thread, daemon=True)
        samples = 0
        c, t = _cpu(), time.perf_counter()
        thread.start()
        try:
            for w, (_, gather) in enumerate(self.windows):
                if w + 1 < count:
                    started[w + 1].set()
                while (j := claim(w, True)) is not None:
                    self._decode(1, w, j)
                    done[w][j].set()
                for event in done[w]:
                    while not event.is_set():
                        if w + 1 < count and (j := claim(w + 1, True)) is not None:
                            self._decode(1, w + 1, j)
                            done[w + 1][j].set()
                        else:
                            event.wait()
                if errors:
                    raise errors[0]
                window = self.buffers[w % 3]
                for a in range(0, len(gather), self.bs):
                    idx = gather[a : a + self.bs]
                    # (mode="clip", as the sequence gathers: "raise" with out= takes into a
                    # temporary copy first, a second copy of every sample)
                    window.take(
                        idx, axis=0, out=aligned_empty((len(idx), *SAMPLE_SHAPE), np.uint8), mode="clip"
                    )
                    samples += len(idx)
        finally:
            stop_all()
            thread.join()
        seconds, cpu = time.perf_counter() - t, _cpu() - c
        return Result(samples / seconds, cpu / samples * 1e6)


# --- model.fit (target 7) -------------------------------------------------------------------


def fit_phase(x: np.ndarray, y: np.ndarray, stores: dict[str, Any], bs: int, runs: int) -> Runs:
    """Seconds of one ``model.fit`` epoch, keyed ``(source, store)``: each store through a
    ChunkedSequence (x and y) as ``(store, store)``, and the arrays in RAM beside it as
    ``("numpy", store)``. One untimed epoch per source first (jit compilation), then the timed
    epochs, interleaved, each store's two fits one after the other."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    import oocseq

    print(f"\nmodel.fit phase: Keras {keras.__version__}, backend {keras.backend.backend()}", flush=True)

    def new_model() -> Any:
        model = keras.Sequential(
            [
                keras.Input(x.shape[1:]),
                keras.layers.Rescaling(1 / 255),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(10),
            ]
        )
        model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    model = new_model()
    sources: dict[str, Callable[[], None]] = {
        "numpy": partial(model.fit, x, y, batch_size=bs, shuffle=True, epochs=1, verbose=0)
    }
    for name, store in stores.items():
        seq = oocseq.ChunkedSequence(store, bs, seed=0)  # a keras.utils.PyDataset: Keras is imported
        assert isinstance(seq, keras.utils.PyDataset)
        model = new_model()
        sources[name] = partial(model.fit, seq, epochs=1, verbose=0)
    for name, fit in sources.items():
        t = time.perf_counter()
        fit()
        print(f"  warm-up epoch {name}: {time.perf_counter() - t:.1f} s", flush=True)

    def timed(fit: Callable[[], None], run: int) -> float:
        t = time.perf_counter()
        fit()
        return time.perf_counter() - t

    # (source, store): each store's fit and a numpy fit beside it, one after the other in
    # every round, so that each ratio's two sides run seconds apart.
    fits: dict[tuple[str, str], Callable[[int], float]] = {}
    for name in stores:
        fits["numpy", name] = partial(timed, sources["numpy"])
        fits[name, name] = partial(timed, sources[name])
    return interleaved(fits, {}, runs, seed=3, label="fit ", group=lambda key: key[1])


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _data.common_arguments(parser, runs=5, runs_help="rounds of read measurements")
    parser.add_argument("--epochs", type=int, default=2, help="ChunkedSequence epochs per run (default 2)")
    parser.add_argument(
        "--fancy-batches", type=int, default=20, help="h5py / zarr fancy batches timed per run"
    )
    parser.add_argument(
        "--fit-runs", type=int, default=5, help="timed model.fit epochs per source (default 5)"
    )
    parser.add_argument(
        "--fit-stores",
        default="Zarr lz4,HDF5 lz4,Zarr raw,HDF5 raw",
        help="stores to fit from (comma-separated)",
    )
    parser.add_argument("--no-fit", action="store_true", help="skip target 7 (no Keras / JAX import)")
    args = parser.parse_args(argv)
    _data.apply_arguments(args)

    t_start = time.perf_counter()
    bs = args.batch_size
    n = num_samples(args.size_mb)
    print(environment())
    print(f"data: {n} crops 64x64x3 uint8 of real photos = {n * SAMPLE_BYTES / 1e6:.0f} MB; batch {bs}")
    x, y = crops_in_ram(n)
    args.workdir.mkdir(parents=True, exist_ok=True)
    stores = {}
    try:
        for kind, (_, compression) in STORE_KINDS.items():
            stores[kind] = write_store(store_path(args.workdir, kind), {"x": x, "y": y}, compression)
        targets, report = measure(args, x, y, stores)
    finally:
        for store in stores.values():
            store.close()
            if not args.keep:
                remove(store.path)
    print(report)
    print(f"\nTargets ({n * SAMPLE_BYTES / 1e6:.0f} MB, batch {bs}; medians over rounds):\n")
    print(targets_table(targets))
    print(f"\n{time.perf_counter() - t_start:.0f} s in all")
    return 0


def measure(
    args: argparse.Namespace, x: np.ndarray, y: np.ndarray, stores: dict[str, Any]
) -> tuple[list[Target], str]:
    import h5py
    import hdf5plugin  # noqa: F401  (Blosc filter for h5py's own reads)
    import zarr

    import oocseq

    n, bs = len(x), args.batch_size
    any_store = next(iter(stores.values()))
    probe = oocseq.ChunkedSequence(any_store, bs, y=None)
    chunk_len, num_chunks = any_store.chunk_len, any_store.num_chunks
    print(
        f"chunk_len {chunk_len} ({chunk_len * SAMPLE_BYTES / 2**20:.1f} MiB), {num_chunks} chunks, window "
        f"{probe.window} chunks, {len(probe)} batches per epoch, {probe.read}"
    )
    probe.close()

    # --- reads (targets 1, 2, 3, 6) ---
    measurements: dict[tuple[str, str], Callable[[int], Result]] = {}
    warmups: dict[tuple[str, str], Callable[[], object]] = {}
    limits: list[DecodeLimit] = []
    sequences: list[SequenceEpochs] = []
    h5_files = []
    for kind, store in stores.items():
        if STORE_KINDS[kind][1] is None:  # target 1's baseline, in the same group as its store
            measurements["numpy", kind] = lambda run: random_batches(x.__getitem__, n, bs, None, 100 + run)
            warmups["numpy", kind] = lambda: random_batches(x.__getitem__, n, bs, 20, 99)
        for order in ("in order", "keras"):
            sequences.append(SequenceEpochs(store, bs, order, args.epochs))
            measurements[order, kind] = sequences[-1]
            warmups[order, kind] = sequences[-1].warmup
        if store.format == "zarr":
            read = zarr.open_group(str(store.path), mode="r")["x"].oindex.__getitem__
        else:
            h5_files.append(h5py.File(store.path, "r"))
            read = h5_files[-1]["x"].__getitem__
        measurements["fancy", kind] = lambda run, read=read: random_batches(
            read, n, bs, args.fancy_batches, 200 + run
        )
        warmups["fancy", kind] = lambda read=read: random_batches(read, n, bs, 2, 199)
        if STORE_KINDS[kind][1] is not None:
            for name, with_read in (("decode limit", False), ("read + decode", True)):
                limits.append(DecodeLimit(store, with_read))
                measurements[name, kind] = limits[-1]
                warmups[name, kind] = limits[-1]
            floor = GatherFloor(store, bs, limits[-1].where)
            measurements["floor", kind] = floor
            warmups["floor", kind] = floor
    print(f"\nreads: {len(measurements)} measurements x {args.runs} rounds", flush=True)
    try:
        # The reads of one store (and target 1's baseline beside each uncompressed store) one
        # after another in each round: each target's two sides seconds apart.
        runs = interleaved(measurements, warmups, args.runs, group=lambda key: key[1])
    finally:
        for lim in limits:
            lim.close()
        for seq in sequences:
            seq.close()
        for f in h5_files:
            f.close()
    res = runs.results
    rate = {k: median(r.rate for r in v) for k, v in res.items()}
    rates = {k: [r.rate for r in v] for k, v in res.items()}
    cpu = {k: median(r.cpu_us for r in v) for k, v in res.items()}

    def ratio(a: tuple[str, str], b: tuple[str, str]) -> tuple[float, str]:
        """Median over rounds of rate[a] / rate[b], and the range of those ratios."""
        rs = paired_ratios(rates[a], rates[b])
        return median(rs), f"rounds {min(rs):.2f}-{max(rs):.2f}"

    base_keys = [k for k in rates if k[0] == "numpy"]
    base_rates = [r for k in base_keys for r in rates[k]]
    base_cpu = [r.cpu_us for k in base_keys for r in res[k]]
    lines = [
        f"\nin-RAM numpy random batches x[np.sort(idx)]: {fmt_rate(median(base_rates))} samples/s "
        f"({spread(base_rates)}), {median(base_cpu):.2f} us CPU per sample (measured beside each uncompressed store)",
        f"{load_summary(runs.all_others())}",
        "\nSamples/s, median of rounds (min-max), and CPU microseconds per sample (all threads):\n",
        "| read | " + " | ".join(stores) + " |",
        "|---|" + "---|" * len(stores),
    ]
    row_names = {
        "in order": "ChunkedSequence, requests 0..len-1",
        "keras": "ChunkedSequence, requests in random order (Keras)",
        "decode limit": f"decode limit (numcodecs, {os.cpu_count()} threads, bytes in RAM)",
        "read + decode": f"read + decode limit (pread from the page cache + numcodecs, {os.cpu_count()} threads)",
        "floor": "decode + gather floor (the same reads, decodes and gathers as the epoch, nothing else)",
        "fancy": f"fancy-index random batches ({args.fancy_batches} timed)",
    }
    for row, label in row_names.items():
        cells = [
            f"{fmt_rate(rate[row, k])} ({spread(rates[row, k])}); {cpu[row, k]:.2f} us"
            if (row, k) in rate
            else "-"
            for k in stores
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    decodes = {k: max(r.decodes or 0 for r in res["keras", k]) for k in stores}
    decodes_in_order = {k: max(r.decodes or 0 for r in res["in order", k]) for k in stores}

    targets: list[Target] = []
    for kind in stores:
        if STORE_KINDS[kind][1] is None:
            r, rounds = ratio(("in order", kind), ("numpy", kind))
            targets.append(
                Target(
                    f"1. uncompressed {kind.split()[0]}, warm cache: ChunkedSequence / in-RAM numpy random batches",
                    fmt_ratio(r),
                    ">= 0.5x",
                    r >= 0.5,
                    f"{fmt_rate(rate['in order', kind])} vs {fmt_rate(rate['numpy', kind])} samples/s; CPU "
                    f"{cpu['in order', kind]:.2f} vs {cpu['numpy', kind]:.2f} us/sample; {rounds}",
                )
            )
    for kind in stores:
        if STORE_KINDS[kind][1] is not None:
            r, rounds = ratio(("in order", kind), ("read + decode", kind))
            targets.append(
                Target(
                    f"2. Blosc-lz4 {kind.split()[0]}: ChunkedSequence / read + decode limit "
                    f"(preadv + numcodecs, {os.cpu_count()} threads)",
                    fmt_ratio(r),
                    ">= 0.6x",
                    r >= 0.6,
                    f"{fmt_rate(rate['in order', kind])} vs {fmt_rate(rate['read + decode', kind])} samples/s "
                    f"(decode alone {fmt_rate(rate['decode limit', kind])}); CPU {cpu['in order', kind]:.2f} vs "
                    f"{cpu['read + decode', kind]:.2f} us/sample; {rounds}; decode + gather floor "
                    f"{fmt_ratio(ratio(('floor', kind), ('read + decode', kind))[0])} of the limit "
                    f"(ChunkedSequence {fmt_ratio(ratio(('in order', kind), ('floor', kind))[0])} of the floor)",
                )
            )
    for kind in stores:
        r, rounds = ratio(("keras", kind), ("in order", kind))
        targets.append(
            Target(
                f"3. {kind}: Keras call order / in order",
                fmt_ratio(r),
                ">= 0.8x",
                r >= 0.8,
                f"{fmt_rate(rate['keras', kind])} vs {fmt_rate(rate['in order', kind])} samples/s; {rounds}",
            )
        )
    for kind in stores:
        d = max(decodes[kind], decodes_in_order[kind])
        targets.append(
            Target(
                f"3. {kind}: chunk decodes of x per epoch / chunks",
                f"{d / num_chunks:.3f}",
                "<= 1.05",
                d <= 1.05 * num_chunks,
                f"{decodes[kind]} (Keras order), {decodes_in_order[kind]} (in order), most of any run; {num_chunks} chunks",
            )
        )
    for kind in stores:
        lib = "zarr oindex" if kind.startswith("Zarr") else "h5py fancy index"
        r, rounds = ratio(("keras", kind), ("fancy", kind))
        targets.append(
            Target(
                f"6. {kind}: ChunkedSequence (Keras order) / {lib} batches",
                fmt_ratio(r),
                ">= 100x",
                r >= 100,
                f"{fmt_rate(rate['keras', kind])} vs {fmt_rate(rate['fancy', kind])} samples/s; {rounds}",
            )
        )

    # --- model.fit (target 7) ---
    if args.no_fit:
        targets.append(
            Target("7. model.fit epoch time, ChunkedSequence / numpy", "-", "<= 1.15x", None, "--no-fit")
        )
    else:
        fit_stores = {k.strip(): stores[k.strip()] for k in args.fit_stores.split(",") if k.strip()}
        fit = fit_phase(x, y, fit_stores, bs, args.fit_runs)
        seconds = fit.results
        by_source: dict[str, list[float]] = {}
        for (source, _), v in seconds.items():
            by_source.setdefault(source, []).extend(v)
        lines.append(
            "\nmodel.fit, seconds per epoch, median (min-max; numpy beside each store): "
            + "; ".join(f"{k} {median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in by_source.items())
            + f"; {load_summary(fit.all_others())}"
        )
        for kind in fit_stores:
            t, t_np = median(seconds[kind, kind]), median(seconds["numpy", kind])
            rs = paired_ratios(seconds[kind, kind], seconds["numpy", kind])
            r = median(rs)
            targets.append(
                Target(
                    f"7. {kind}: model.fit epoch time, ChunkedSequence / numpy arrays",
                    fmt_ratio(r),
                    "<= 1.15x",
                    r <= 1.15,
                    f"{t:.2f} s vs {t_np:.2f} s ({n / t / 1e3:.0f} k vs {n / t_np / 1e3:.0f} k samples/s); "
                    f"rounds {min(rs):.2f}-{max(rs):.2f}",
                )
            )
    lines.append(
        f"\nchunk decodes of x per epoch ({num_chunks} chunks), the most of any run: in order "
        + ", ".join(f"{k} {v}" for k, v in decodes_in_order.items())
        + "; Keras order "
        + ", ".join(f"{k} {v}" for k, v in decodes.items())
    )
    return targets, "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
