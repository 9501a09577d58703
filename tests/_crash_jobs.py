"""Ingestion jobs for the crash tests, and a small fork server that runs them in children.

The server (``python tests/_crash_jobs.py``) imports oocseq once, then for each JSON job read
from stdin forks a child that runs it, answers ``pid <pid>`` at once and ``exit <pid> <code>``
when the child ends: the test SIGKILLs children at random moments without paying an
interpreter start per kill. The test process runs the same jobs in-process (:func:`run`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import oocseq


def arrays_data(seed: int, n: int = 1200) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((n, 16)).astype(np.float32), "y": rng.integers(0, 10, n)}


def run(job: dict[str, Any]) -> oocseq.Store:
    """Run one ingestion described by ``job`` (kind, src, dest, extra keyword arguments, and
    optionally the ``scheduler`` address of a Dask cluster to run it on)."""
    kind, src, dest = job["kind"], job.get("src"), job["dest"]
    kw = {"overwrite": True, **job.get("kw", {})}
    if job.get("scheduler"):  # a Dask cluster's address: its workers encode (and write) the chunks
        import distributed

        kw["client"] = distributed.Client(job["scheduler"], timeout=30)  # never closed: killed
    if kind == "arrays":
        return oocseq.ingest_arrays(dest, arrays_data(job.get("seed", 1)), chunk_len=100, **kw)
    if kind == "npy":
        files = {"x": [f"{src}/x0.npy", f"{src}/x1.npy"], "y": f"{src}/y.npy"}
        return oocseq.ingest_npy(files, dest, chunk_len=100, **kw)
    if kind == "csv":
        return oocseq.ingest_csv(
            f"{src}/t.csv", dest, label_column="label", chunk_len=100, block_rows=250, **kw
        )
    if kind == "images":
        return oocseq.ingest_image_folder(src, dest, image_size=(8, 8), chunk_len=5, workers=2, **kw)
    if kind == "dataframe":
        import pandas as pd

        rows = json.loads(Path(src, "rows.json").read_text())
        df = pd.DataFrame(rows, columns=["filename", "class"])
        return oocseq.ingest_dataframe(
            df, dest, directory=src, image_size=(8, 8), chunk_len=5, workers=2, **kw
        )
    raise ValueError(kind)


def _aim(job: dict[str, Any]) -> None:
    """Kill this process at the ``k``-th call of ``os.rename`` (before it, or after it with
    ``after``), or just before the old store is deleted (``at="remove_old"``)."""
    aim = job.get("aim")
    if not aim:
        return
    from oocseq.storage import _commit

    calls = [0]
    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        calls[0] += 1
        if aim.get("at") == "rename" and calls[0] == aim["k"] and not aim.get("after"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)
        if aim.get("at") == "rename" and calls[0] == aim["k"] and aim.get("after"):
            os.kill(os.getpid(), signal.SIGKILL)

    def remove(path: Path) -> None:
        if aim.get("at") == "remove_old" and path.name.endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_remove(path)

    real_remove = _commit.remove
    _commit.os.rename = rename  # type: ignore[attr-defined]
    _commit.remove = remove


def serve() -> None:
    """Each stdin line is a JSON list of jobs, started at once in one child each."""
    out = sys.stdout
    for line in sys.stdin:
        pids = []
        for job in json.loads(line):
            pid = os.fork()
            if pid == 0:  # the child: run the job, exit without running the server's cleanup
                code = 0
                try:
                    _aim(job)
                    run(job)
                except BaseException as e:
                    print(f"{type(e).__module__}.{type(e).__name__}: {e}", file=sys.stderr)
                    code = 3 if isinstance(e, oocseq.StoreExistsError) else 1
                finally:
                    os._exit(code)
            pids.append(pid)
        out.write(" ".join(map(str, pids)) + "\n")
        out.flush()
        codes = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            codes.append(os.waitstatus_to_exitcode(status))
        out.write(" ".join(map(str, codes)) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
