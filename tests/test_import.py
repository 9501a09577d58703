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


def _oocseq_imports() -> dict[str, set[str]]:
    """Module -> the oocseq modules it imports (at the top or inside functions)."""
    import ast

    graph: dict[str, set[str]] = {}
    root = REPO / "oocseq"
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t.startswith("oocseq")}
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_module_imports_another_in_a_circle():
    """The read path is a DAG (package __init__ files aside, which re-export)."""
    graph = {m: {d for d in deps if d != "oocseq"} for m, deps in _oocseq_imports().items() if m != "oocseq"}
    assert "oocseq.sequence" in graph and "oocseq.batches" in graph["oocseq.sequence"]
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def _run(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_oocseq_needs_neither_pillow_nor_pandas():
    """Pillow and pandas are the extras [images] and [csv]: a Zarr-only user needs neither."""
    out = _run(
        "import sys; sys.modules['PIL'] = None; sys.modules['pandas'] = None\n"
        "import numpy as np, oocseq, oocseq.cli, tempfile\n"
        "d = tempfile.mkdtemp()\n"
        "s = oocseq.ingest_arrays(d + '/s.zarr', {'x': np.arange(10)})\n"
        "seq = oocseq.ChunkedSequence(s, 4, y=None)\n"
        "print(len(seq), sorted(m for m in sys.modules if m.split('.')[0] in ('PIL', 'pandas') and sys.modules[m]))"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["3", "[]"]


@pytest.mark.parametrize(
    ("module", "call", "extra"),
    [
        ("PIL", "oocseq.ingest_image_folder(d, d + '/s.zarr', image_size=(8, 8))", "images"),
        ("pandas", "oocseq.ingest_csv(d + '/t.csv', d + '/s.zarr')", "csv"),
    ],
)
def test_a_missing_extra_is_named(module: str, call: str, extra: str):
    out = _run(
        f"import sys; sys.modules[{module!r}] = None\n"
        "import oocseq, tempfile\n"
        "d = tempfile.mkdtemp()\n"
        "try:\n"
        f"    {call}\n"
        "except oocseq.MissingDependencyError as e:\n"
        "    assert isinstance(e, ImportError)\n"
        "    print(e)\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"pip install 'oocseq[{extra}]'" in out.stdout
