"""``import oocseq`` (and its CLI) imports no ML framework: the CLI starts fast, and users pick
their framework (and Keras backend) themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("keras", "tensorflow", "torch", "jax", "jaxlib", "flax")


def _imported_after(statement: str) -> list[str]:
    code = (
        f"import json, sys; {statement}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_oocseq_imports_no_framework():
    assert _imported_after("import oocseq; oocseq.ChunkedSequence; oocseq.open_store") == []


def test_import_cli_imports_no_framework():
    if not (REPO / "oocseq" / "cli.py").exists():
        pytest.skip("oocseq/cli.py does not exist yet")
    assert _imported_after("import oocseq.cli") == []


def test_framework_modules_are_detected():
    """The check above can fail: a module that imports a framework is reported."""
    assert "json" not in FRAMEWORKS
    got = _imported_after("import oocseq.adapters.keras")
    assert "keras" in got
