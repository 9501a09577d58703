"""Lint, format and types, run by the same test command as everything else (so CI runs them):
ruff (the rules in pyproject.toml), ruff's formatter, and mypy (strict on the leaf modules)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATHS = ["oocseq", "tests", "benchmarks", "scripts"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", *PATHS), ("ruff", "format", "--check", *PATHS), ("mypy",)],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_is_clean(command: tuple[str, ...]) -> None:
    out = _run(*command)
    assert out.returncode == 0, f"{' '.join(command)}:\n{out.stdout[-6000:]}\n{out.stderr[-2000:]}"
