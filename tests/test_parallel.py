"""The store is the same bytes whatever runs the ingestion: 1, 2 or 3 local workers, or a
Dask LocalCluster; and an interrupted run of each kind resumes to those same bytes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oocseq
from oocseq.manifest import AUX_GROUP

distributed = pytest.importorskip("distributed")
pd = pytest.importorskip("pandas")
Image = pytest.importorskip("PIL.Image")

KINDS = ("arrays", "npy", "csv", "images", "dataframe")
FORMATS = (".zarr", ".h5")


@pytest.fixture(scope="module")
def client() -> Any:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    rows = []
    for c in ("cat", "dog"):
        (root / "img" / c).mkdir(parents=True)
        for i in range(9):
            a = rng.integers(0, 256, (6 + i % 3, 7, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / "img" / c / f"{i}.png")
            rows.append({"filename": f"{c}/{i}.png", "class": c})
    pd.DataFrame(rows).to_pickle(root / "df.pkl")
    x = rng.standard_normal((47, 3)).astype(np.float32)
    np.save(root / "x0.npy", x[:20])
    np.save(root / "x1.npy", x[20:])
    np.save(root / "y.npy", rng.integers(0, 5, 47))
    with open(root / "t.csv", "w") as f:
        f.write("a,b,label\n")
        for i in range(41):
            f.write(f"{x[i, 0]},{x[i, 1]},{'pq'[i % 2]}{i % 3}\n")
    return root


def ingest(kind: str, src: Path, dest: Path, **kw: Any) -> oocseq.Store:
    kw = {"overwrite": True, "chunk_len": 2 if kind in ("images", "dataframe") else 4, **kw}
    if kind == "arrays":
        x = np.concatenate([np.load(src / "x0.npy"), np.load(src / "x1.npy")])
        return oocseq.ingest_arrays(dest, {"x": x, "y": np.arange(len(x))}, **kw)
    if kind == "npy":
        files = {"x": [src / "x0.npy", src / "x1.npy"], "y": src / "y.npy"}
        return oocseq.ingest_npy(files, dest, **kw)
    if kind == "csv":
        return oocseq.ingest_csv(src / "t.csv", dest, label_column="label", **kw)
    if kind == "images":
        return oocseq.ingest_image_folder(src / "img", dest, image_size=(4, 5), **kw)
    df = pd.read_pickle(src / "df.pkl")
    return oocseq.ingest_dataframe(df, dest, directory=src / "img", image_size=(4, 5), **kw)


def store_bytes(path: Path) -> dict[str, bytes]:
    """Every stored byte that matters: Zarr: every file; HDF5: every chunk as stored (with its
    filter mask), the auxiliary arrays and the manifest."""
    out: dict[str, bytes] = {}
    if path.suffix == ".zarr":
        for dirpath, _, files in os.walk(path):
            for name in files:
                p = Path(dirpath) / name
                out[str(p.relative_to(path))] = p.read_bytes()
        return out
    import h5py

    with h5py.File(path, "r") as f:
        out["attrs"] = repr(sorted(f.attrs.items())).encode()

        def visit(name: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            out[name + "/shape"] = repr((obj.shape, obj.dtype.str, obj.chunks)).encode()
            if obj.chunks is None or name.startswith(AUX_GROUP):  # not chunked as fields are
                out[name] = repr(obj[()].tolist()).encode()
                return
            for c in range(-(-obj.shape[0] // obj.chunks[0])):
                mask, data = obj.id.read_direct_chunk((c * obj.chunks[0],) + (0,) * (obj.ndim - 1))
                out[f"{name}/{c}"] = bytes([mask]) + data

        f.visititems(visit)
    return out


_reference: dict[tuple[str, str, bool], dict[str, bytes]] = {}


def reference(kind: str, fmt: str, preshuffle: bool, src: Path, tmp: Path) -> dict[str, bytes]:
    key = (kind, fmt, preshuffle)
    if key not in _reference:
        dest = tmp / f"ref-{kind}-{preshuffle}{fmt}"
        ingest(kind, src, dest, workers=1, preshuffle=preshuffle).close()
        _reference[key] = store_bytes(dest)
    return _reference[key]


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(KINDS),
    fmt=st.sampled_from(FORMATS),
    mode=st.sampled_from([2, 3, "cluster"]),
    preshuffle=st.booleans(),
)
def test_store_is_the_same_whatever_runs_it(
    client: Any,
    sources: Path,
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    fmt: str,
    mode: Any,
    preshuffle: bool,
) -> None:
    tmp = tmp_path_factory.mktemp("p")
    want = reference(kind, fmt, preshuffle, sources, tmp)
    dest = tmp / f"s{fmt}"
    kw = {"client": client} if mode == "cluster" else {"workers": mode}
    ingest(kind, sources, dest, preshuffle=preshuffle, **kw).close()
    got = store_bytes(dest)
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []


class _Interrupt:
    """Raises KeyboardInterrupt (which keeps the partial store) at the ``at``-th call."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", [1, 3, "cluster"])
def test_interrupted_run_resumes_to_the_same_store(
    client: Any,
    sources: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    fmt: str,
    mode: Any,
) -> None:
    from oocseq.ingest import _writer

    want = reference(kind, fmt, True, sources, tmp_path)
    kw = {"client": client} if mode == "cluster" else {"workers": mode}
    interrupt = _Interrupt(9)  # of about 10 chunks: some are written whatever is in flight
    real = _writer.StoreWriter.checkpoint

    def checkpoint(self: Any, state: Any) -> None:
        interrupt()
        real(self, state)

    monkeypatch.setattr(_writer.StoreWriter, "checkpoint", checkpoint)
    dest = tmp_path / f"s{fmt}"
    with pytest.raises(KeyboardInterrupt):
        ingest(kind, sources, dest, **kw)
    assert not dest.exists() and any(p.name.endswith(".journal") for p in tmp_path.iterdir())
    monkeypatch.setattr(_writer.StoreWriter, "checkpoint", real)
    taken: list[int] = []
    real_take = _writer.StoreWriter._take_over
    monkeypatch.setattr(
        _writer.StoreWriter,
        "_take_over",
        lambda self, *a: real_take(self, *a) and not taken.append(a[2]["k"]),
    )
    ingest(kind, sources, dest, **kw).close()
    assert taken and taken[0] >= 2
    got = store_bytes(dest)
    assert [k for k in want if got.get(k) != want[k]] == [] and sorted(got) == sorted(want)


def test_cli_ingests_on_a_scheduler(client: Any, sources: Path, tmp_path: Path) -> None:
    from oocseq.cli import main

    address = client.scheduler.address
    dest = tmp_path / "s.zarr"
    argv = ["ingest", "npy", str(sources / "x0.npy"), str(sources / "x1.npy"), str(dest), "--chunk-len", "4"]
    assert main([*argv, "--scheduler", address, "-q"]) == 0
    assert main([*argv[:-3], str(tmp_path / "w.zarr"), "--chunk-len", "4", "--workers", "2", "-q"]) == 0
    assert store_bytes(dest) == store_bytes(tmp_path / "w.zarr")


TABLES = {
    "class": "a,b,label\n1,2.5,cat\n3,4,dog\n5,6e3,cat\n-7,8,bird\n9,10,dog\n",
    "int": "a,b,label\n1,2.5,3\n3,4,10\n5,6e3,-2\n-7,8,3\n9,10,0\n",
    "float": "a,b,label\n1,2.5,3.5\n3,4,1e3\n5,6e3,-2\n-7,8,0.25\n9,10,0\n",
    "unlabeled": "a,b,c\n1,2.5,3.5\n3,4,1e3\n5,6e3,-2\n-7,8,0.25\n9,10,0\n",
    "missing": "a,b,label\n1,,x\n3,NA,y\nnan,6e3,x\n-7,8,z\n9,10,y\n",
    "late text": "a,b,label\n1,2,3\n3,4,4\n5,6,5\n7,8,five\n9,10,6\n",
}


@pytest.mark.parametrize("preshuffle", [True, False])
@pytest.mark.parametrize("table", sorted(TABLES))
def test_csv_fast_path_stores_what_the_reference_path_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, preshuffle: bool
) -> None:
    """pyarrow.csv (one pass, class names found on the way) and the pandas reference path
    (which decides the label kind in a first pass) give the same bytes."""
    from oocseq.ingest import csv as csv_module

    src = tmp_path / "t.csv"
    src.write_text(TABLES[table])
    kw: dict[str, Any] = {"chunk_len": 2, "block_rows": 2, "preshuffle": preshuffle, "workers": 2}
    kw["label_column"] = None if table == "unlabeled" else "label"
    kw["allow_missing"] = table == "missing"
    slow: list[int] = []
    real = csv_module._scan_labels
    monkeypatch.setattr(csv_module, "_scan_labels", lambda *a: slow.append(1) or real(*a))
    fast = oocseq.ingest_csv(src, tmp_path / "fast.zarr", **kw)
    # Only labels that turn from numbers to text in a later block need the reference path.
    assert not slow or table == "late text"
    fast.close()
    monkeypatch.setattr(csv_module, "_arrow_available", lambda: False)
    oocseq.ingest_csv(src, tmp_path / "ref.zarr", **kw).close()
    assert store_bytes(tmp_path / "fast.zarr") == store_bytes(tmp_path / "ref.zarr")


def test_csv_labels_that_turn_to_text_late_are_class_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Numbers for many blocks, then text: the one-pass reader hands over to the reference
    path, which stores class names (as a table of text labels throughout would be)."""
    from oocseq.ingest import csv as csv_module

    rows = [f"{i},{i * 0.5},{i % 3}" for i in range(12000)] + ["1,2,other"]
    (tmp_path / "t.csv").write_text("a,b,label\n" + "\n".join(rows) + "\n")
    slow: list[int] = []
    real = csv_module._scan_labels
    monkeypatch.setattr(csv_module, "_scan_labels", lambda *a: slow.append(1) or real(*a))
    store = oocseq.ingest_csv(tmp_path / "t.csv", tmp_path / "s.h5", label_column="label", block_rows=1000)
    assert slow and store.metadata["class_names"] == ["0", "1", "2", "other"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5", "t.csv"]  # no spool left
    store.close()


_CELLS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.text(alphabet='ab,"\n\r x', max_size=6),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.lists(_CELLS, min_size=3, max_size=3), min_size=1, max_size=25),
    size=st.integers(1, 120),
    line_end=st.sampled_from(["\n", "\r\n"]),
)
def test_csv_pieces_are_whole_rows_that_parse_alone(rows: list[list[str]], size: int, line_end: str) -> None:
    """The file cut into pieces for parallel parsing: each starts with the header, the pieces
    without it are the file's bytes in order, and parsed one by one they give the rows the
    whole file gives, even with quoted cells that hold delimiters, quotes and line ends."""
    import csv as pycsv
    import io
    import tempfile

    from oocseq.ingest.csv import _text_pieces

    buf = io.StringIO()
    writer = pycsv.writer(buf, lineterminator=line_end)
    writer.writerow(["a", "b", "c"])
    writer.writerows(rows)
    data = buf.getvalue().encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.csv"
        path.write_bytes(data)
        pieces = list(_text_pieces(path, size))
    header = data[: data.index(b"\n") + 1]
    assert all(p.startswith(header) for p in pieces)
    assert header + b"".join(p[len(header) :] for p in pieces) == data

    def parse(text: bytes) -> list[list[str]]:
        return list(pycsv.reader(io.StringIO(text.decode(), newline="")))[1:]

    assert [row for p in pieces for row in parse(p)] == parse(data)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=st.lists(
        st.lists(st.floats(allow_nan=False, width=32), min_size=2, max_size=2), min_size=1, max_size=30
    ),
    labels=st.lists(st.text(alphabet='ab,"\n ', min_size=1, max_size=4), min_size=1, max_size=4),
    size=st.integers(1, 200),
    preshuffle=st.booleans(),
)
def test_csv_fast_path_in_small_pieces_does_what_the_reference_path_does(
    x: list[list[float]], labels: list[str], size: int, preshuffle: bool
) -> None:
    """Pieces of any size, labels with delimiters, quotes and line ends: the pieces parsed
    apart store the bytes that the pandas reference path stores, or raise its error."""
    import csv as pycsv
    import tempfile

    from oocseq.ingest import csv as csv_module

    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        src = Path(tmp) / "t.csv"
        with open(src, "w", newline="") as f:
            writer = pycsv.writer(f)
            writer.writerow(["a", "b", "label"])
            writer.writerows([*map(repr, row), labels[i % len(labels)]] for i, row in enumerate(x))
        kw: dict[str, Any] = {"label_column": "label", "chunk_len": 4, "preshuffle": preshuffle, "workers": 1}

        def outcome(dest: Path) -> object:
            try:
                oocseq.ingest_csv(src, dest, **kw).close()
            except oocseq.OocseqError as e:  # e.g. a label of spaces only: the same error both ways
                return (type(e), str(e))
            return store_bytes(dest)

        mp.setattr(csv_module, "_block_bytes", lambda reader: size)
        fast = outcome(Path(tmp) / "fast.zarr")
        mp.setattr(csv_module, "_arrow_available", lambda: False)
        assert fast == outcome(Path(tmp) / "ref.zarr")


def test_csv_in_many_pieces_takes_the_fast_path_with_quoted_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table cut into dozens of pieces, labels quoted because they hold the delimiter or a
    quote: parsed piece by piece (never handed to the reference path), the same bytes as the
    reference path stores."""
    from oocseq.ingest import csv as csv_module

    names = ["a,b", 'say "hi"', "plain"]
    lines = [f"{i},{i / 7!r},{names[i % 3]!r}".replace("'", '"') for i in range(300)]
    lines = [line.replace('"say "hi""', '"say ""hi"""') for line in lines]
    (tmp_path / "t.csv").write_text("a,b,label\n" + "\n".join(lines) + "\n")
    kw: dict[str, Any] = {"label_column": "label", "chunk_len": 16, "workers": 1}
    slow: list[int] = []
    real = csv_module._scan_labels
    monkeypatch.setattr(csv_module, "_scan_labels", lambda *a: slow.append(1) or real(*a))
    pieces: list[int] = []
    real_pieces = csv_module._text_pieces
    monkeypatch.setattr(
        csv_module, "_text_pieces", lambda path, size: (pieces.append(1) or p for p in real_pieces(path, 200))
    )
    fast = oocseq.ingest_csv(tmp_path / "t.csv", tmp_path / "fast.zarr", **kw)
    assert not slow and len(pieces) > 20
    assert fast.metadata["class_names"] == sorted(names)
    fast.close()
    monkeypatch.setattr(csv_module, "_arrow_available", lambda: False)
    oocseq.ingest_csv(tmp_path / "t.csv", tmp_path / "ref.zarr", **kw).close()
    assert store_bytes(tmp_path / "fast.zarr") == store_bytes(tmp_path / "ref.zarr")


def test_hdf5_ingestion_is_safe_while_another_thread_uses_h5py(tmp_path: Path) -> None:
    """HDF5 is not thread-safe, and h5py writes a raw chunk without its global lock: another
    thread opening and freeing h5py objects meanwhile (the user's, or the garbage collector in
    an encoding thread) failed the write ("Unspecified error in H5Dwrite_chunk") within the
    first few chunks. The store must come out whole, every time."""
    import threading

    import h5py

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("a", data=np.arange(10))
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            f = h5py.File(other, "r")
            d = f["a"]
            del d, f  # each free runs HDF5 on this thread

    x = np.arange(400 * 256, dtype=np.float32).reshape(400, 256)
    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for k in range(3):
            store = oocseq.ingest_arrays(
                tmp_path / f"s{k}.h5", {"x": x}, chunk_len=2, compression=None, preshuffle=False, workers=2
            )
            np.testing.assert_array_equal(store["x"][:], x)
            store.close()
    finally:
        stop.set()
        thread.join()
