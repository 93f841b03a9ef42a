"""The rooms and their arrows, checked by parsing every import in the package (so they stay true).

core (clvr_agent/*.py) <- graphs/ <- app (clvr_agent/app/) <- cli (clvr_agent/cli/)
core <- tools/ <- training/;  eval (clvr_agent/eval/) reads everything but the cli.
GenEval's rules (clvr_agent/eval/rules.py) are a leaf: they import only the standard library and
numpy, and every room may read them (the detector, the oracle controller and the data all obey them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# room -> the rooms it may import (besides itself and the rules leaf)
ALLOWED = {
    "core": set(),
    "graphs": {"core"},
    "tools": {"core"},
    "training": {"core", "tools", "graphs"},
    "app": {"core", "graphs", "tools"},
    "eval": {"core", "graphs", "tools", "training", "app"},
    "cli": {"core", "graphs", "tools", "training", "app", "eval"},
    "rules": set(),
}
FACADE = ROOT / "clvr_agent" / "__init__.py"  # re-exports the app's public names lazily, on first access


def _room_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    if rel[0] in ("graphs", "tools", "training"):
        return rel[0]
    if rel[1] == "eval" and rel[-1] == "rules.py":
        return "rules"
    return rel[1] if rel[1] in ("app", "cli", "eval") else "core"


def _room_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "clvr_agent":
        return None
    if len(parts) == 1:
        return "core"
    if parts[1] in ("graphs", "tools", "training", "app", "cli"):
        return parts[1]
    if parts[1] == "eval":
        return "rules" if parts[2:3] == ["rules"] else "eval"
    return "core"


def _package_files() -> list[Path]:
    files = [p for p in (ROOT / "clvr_agent").rglob("*.py")]
    for room in ("graphs", "tools", "training"):
        files += list((ROOT / room).rglob("*.py"))
    return [f for f in files if "__pycache__" not in f.parts and f != FACADE]


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module imported anywhere in the file (inside functions too: a lazy import is still an arrow)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "clvr_agent"]
    return found


def violations() -> list[str]:
    bad = []
    for path in _package_files():
        room = _room_of_file(path)
        for line, module in _imports(path):
            target = _room_of_module(module)
            if target is None or target == room or target == "rules" and room != "rules":
                continue
            if target not in ALLOWED[room]:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({room}) imports {module} ({target})")
    return bad


def test_every_import_points_the_allowed_way():
    assert violations() == []


def test_the_checker_sees_a_lazy_outward_import(tmp_path, monkeypatch):
    """The check itself can fail: an import inside a function of a core module is reported."""
    core = ROOT / "clvr_agent" / "state.py"
    original = _imports

    def with_a_lazy_import(path):
        found = original(path)
        return found + [(999, "clvr_agent.tools.registry")] if path == core else found

    monkeypatch.setattr(sys.modules[__name__], "_imports", with_a_lazy_import)
    assert violations() == ["clvr_agent/state.py:999 (core) imports clvr_agent.tools.registry (tools)"]


def test_the_rules_leaf_imports_no_room():
    rules = ROOT / "clvr_agent" / "eval" / "rules.py"
    assert [m for _, m in _imports(rules) if m.startswith("clvr_agent")] == []


@pytest.mark.parametrize("module", ["clvr_agent.state", "clvr_agent.types", "clvr_agent.protocols",
                                    "clvr_agent.graphs.graph"])
def test_importing_the_core_or_the_graph_loads_no_outer_room(module):
    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('clvr_agent.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert not loaded & {"app", "cli", "eval", "tools", "training"}, loaded
