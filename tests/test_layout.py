"""The package layout's promises (README "Layout"): the method runs without Lightning, imports
point down the layers, and no module is too long to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: each package, and the layer it stands on: a module may import only from its own layer or
#: lower ones (the leaves are errors, paths, task)
LAYERS = {
    "macsc.cli": 6,
    "macsc.inference": 5.5,
    "macsc.analysis": 5,
    "tasks": 4,
    "macsc.training": 4,
    "macsc.method": 3,
    "macsc.prototypes": 2,
    "macsc.squad": 2,
    "macsc.commongen": 2,
    "macsc.errors": 0.5,
    "macsc.paths": 1,
    "macsc.task": 1,
    "macsc": 0,
}
#: the imports the layers allow besides "down": tasks and training stand side by side and never
#: import each other
FORBIDDEN = {("tasks", "macsc.training"), ("tasks", "macsc.cli"), ("macsc.training", "tasks")}
#: the one import up the layers: ``from macsc import MaCSC`` (PEP 562 ``__getattr__`` in
#: macsc/__init__.py), made on first use only, so ``import macsc`` stays cheap
#: (tests/inference/test_export.py checks that)
LAZY = {("macsc", "macsc.inference.model")}


def package_of(module: str) -> str:
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def imports_of(path: Path) -> set[str]:
    """Every ``macsc``/``tasks`` module ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("macsc", "tasks")}


def modules() -> dict[str, Path]:
    found = {}
    for top in ("macsc", "tasks"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_the_method_imports_no_lightning():
    code = "import sys, macsc.method; print('lightning' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert done.stdout.strip() == "False"


def test_imports_point_down_the_layers():
    upward = []
    for module, path in modules().items():
        here = package_of(module)
        for target in imports_of(path):
            there = package_of(target)
            if here == there or (module, target) in LAZY:
                continue
            if LAYERS[there] > LAYERS[here] or (here, there) in FORBIDDEN:
                upward.append(f"{module} -> {target}")
            elif LAYERS[there] == LAYERS[here]:
                upward.append(f"{module} -> {target} (side by side)")
    assert not upward, upward


def test_no_module_is_over_500_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in modules().values()
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, long
