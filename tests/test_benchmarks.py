"""Every benchmark script runs once at a tiny size, so none can rot. Their figures are not
checked here (performance is measured by running them at full size, not asserted in tests);
only that each runs to the end and prints its report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "checksums.py": ["--size", "4", "--rounds", "1"],
    "ingest.py": ["--images", "40", "--csv-rows", "2000", "--npy-mb", "2", "--runs", "1"],
    "read_path.py": [
        "--size-mb",
        "4",
        "--runs",
        "1",
        "--epochs",
        "1",
        "--fit-runs",
        "1",
        "--fancy-batches",
        "2",
    ],
    "larger_than_ram.py": ["--size-mb", "4", "--runs", "1", "--skip-cgroup", "--skip-rss"],
    "throughput.py": ["--size-mb", "4", "--runs", "1", "--epochs", "1", "--fancy-batches", "2"],
    "workers.py": ["--size-mb", "4", "--runs", "1"],
    "shuffle.py": ["--samples", "3000", "--rounds", "1", "--train-seeds", "0"],
    "remote.py": ["--size-mb", "4", "--runs", "1", "--delays-ms", "10"],
}
QUIET = {"read_path.py", "larger_than_ram.py", "workers.py", "shuffle.py"}  # take --quiet-wait


def test_every_script_is_covered() -> None:
    scripts = {p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_benchmark_runs_at_a_tiny_size(script: str, tmp_path: Path) -> None:
    args = [*CASES[script], "--workdir", str(tmp_path)]
    if script in QUIET:
        args += ["--quiet-wait", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=900,
    )
    assert out.returncode == 0, f"{script}:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    assert out.stdout.strip(), f"{script} printed nothing"
