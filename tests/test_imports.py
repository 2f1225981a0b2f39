"""The import graph runs one way, down the data flow: no cycle, no import of a higher layer.

LAYERS is the order documented in ``src/kunlun/__init__.py``. Every import counts, also those inside
functions: an import deferred to run time still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kunlun

PACKAGE = Path(kunlun.__file__).parent

# lowest first; a module may import from its own layer and the layers below
LAYERS = [
    ["kunlun", "kunlun.errors", "kunlun.files", "kunlun.processes", "kunlun.console", "kunlun.config",
     "kunlun.model_configs", "kunlun._version"],
    ["kunlun.data"],
    ["kunlun.formats"],
    ["kunlun.ops"],
    ["kunlun.blocks"],
    ["kunlun.models"],
    ["kunlun.metrics"],
    ["kunlun.runs", "kunlun.training"],
    ["kunlun.serving"],
    ["kunlun.scaling", "kunlun.bench", "kunlun.tuning"],
    ["kunlun.cli", "kunlun.__main__"],
]


def module_name(path: Path) -> str:
    parts = ("kunlun", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    """The module's layer index (its longest matching prefix), or None when no layer names it."""
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len and (p != "kunlun" or module == "kunlun"):
                best, best_len = i, len(p)
    return best


def imports() -> dict[str, set[str]]:
    """module → the kunlun modules it imports. ``from kunlun.x import y`` is kunlun.x.y when that is a module,
    else kunlun.x; a module that is not in the source tree (the build-time ``_version``) is left out."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for a in node.names:
                    target = f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    if target in modules:
                        found.add(target)
        graph[name] = found - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [m, …, m], or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_every_module_is_in_a_layer():
    unplaced = [m for m in imports() if layer(m) is None]
    assert not unplaced, f"modules in no layer (add them to LAYERS and to src/kunlun/__init__.py's docstring): {unplaced}"
    assert layer("kunlun.nowhere") is None and layer("kunlun.models.kunlun") == layer("kunlun.models")


def test_no_import_goes_up_a_layer():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, deps in imports().items() for b in deps if layer(b) > layer(a)]
    assert not upward, "imports against the data flow:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]  # the search finds one
    cycle = find_cycle(imports())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_importing_kunlun_asks_openmp_for_a_passive_wait_before_torch_starts():
    """``import kunlun`` sets OMP_WAIT_POLICY=PASSIVE (unless the user set it) and does not import torch, so the policy
    is in place when torch's OpenMP pool starts: spinning pool threads collapse throughput on a busy machine."""
    import os
    import subprocess
    import sys

    code = "import os, sys, kunlun; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["PASSIVE", "False"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["ACTIVE", "False"]  # the user's choice stands
