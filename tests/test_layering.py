"""The import graph of the project, read from every module's source with `ast` (nothing is imported).

Layers (an arrow is "may import"):

    app, bench, cli (declab/cli.py, declab/runs_cli.py, declab/__main__.py), tools
        -> declab.run (plan, resolver, runner, service, store) -> declab.models (registry, LM, loading)
        -> declab.core (the contract) <- strategies
    viz imports nothing of the project; declab.run and the interfaces may draw with it.
    declab.sweep (sweeps) sits beside the interfaces: it uses the engine and strategies' own checkers (grammar),
    and the CLI, the app and bench use it.

The engine never imports `strategies` (the registry finds them through the `declab.strategies` entry points), no
project module imports `app`, and the test double lives in tests/. A function-local import of a project module is
not allowed outside the tests (it would hide an arrow from a reader), and the graph of every import,
function-local ones included, has no cycle: a local import that dodges a cycle fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("declab", "strategies", "viz", "app", "bench", "tools", "tests")
INTERFACE = ("declab.cli", "declab.runs_cli", "declab.__main__")

# group -> groups it may import (besides itself)
ALLOWED = {
    "declab.core": set(),
    "viz": set(),
    "strategies": {"declab.core"},
    "declab.models": {"declab.core"},
    "declab.run": {"declab.core", "declab.models", "viz"},
    "declab.sweep": {"declab.core", "declab.models", "declab.run", "strategies"},
    "interface": {"declab.core", "declab.models", "declab.run", "viz", "declab.sweep"},
    "app": {"declab.core", "declab.models", "declab.run", "viz", "declab.sweep"},
    "tools": {"declab.core", "declab.models", "declab.run"},
    "bench": {"declab.core", "declab.models", "declab.run", "viz", "strategies", "tools", "declab.sweep"},
    "tests": {"declab.core", "declab.models", "declab.run", "interface", "viz", "strategies", "app", "bench",
              "tools", "declab.sweep"},
}
NO_LOCAL_IMPORTS = ("declab.core", "declab.models", "declab.run", "declab.sweep",
                    "interface", "strategies", "viz", "app", "tools",
                    "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def group(module: str) -> str:
    for g in ("declab.core", "declab.models", "declab.run", "declab.sweep"):
        if module == g or module.startswith(g + "."):
            return g
    if module in INTERFACE:
        return "interface"
    if module == "declab":                                  # the package root holds only __version__
        return "declab.core"
    return module.split(".")[0]


def modules() -> dict[str, Path]:
    out = {}
    for top in PROJECT:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "data" in path.relative_to(ROOT).parts[1:-1]:
                continue                                    # scripts kept with test data
            out[module_name(path)] = path
    return out


MODULES = modules()


def resolve(name: str) -> str | None:
    """The project module an import name refers to (the longest known prefix), or None for outside modules."""
    if name.split(".")[0] not in PROJECT:
        return None
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported project module, imported inside a function, line) for every import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node, local: bool):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = resolve(alias.name)
                    if target:
                        found.append((target, local, child.lineno))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:                  # `from pkg import module` imports pkg.module
                    target = resolve(f"{child.module}.{alias.name}") or resolve(child.module)
                    if target:
                        found.append((target, local, child.lineno))
            visit(child, inner)
    visit(tree, False)
    return found


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_the_graph_was_read():
    assert {"declab.core.strategy", "declab.run.plan", "strategies.greedy", "viz.tree", "app.common"} <= set(MODULES)
    assert any(t == "declab.core" for t, _, _ in GRAPH["strategies.greedy"])


def test_every_arrow_follows_the_layers():
    bad = []
    for name, edges in GRAPH.items():
        g = group(name)
        for target, _local, line in edges:
            tg = group(target)
            if tg != g and tg not in ALLOWED[g]:
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {name} ({g}) imports {target} ({tg})")
    assert not bad, "imports across the layers:\n" + "\n".join(bad)


def test_no_function_local_imports_of_project_modules_in_the_engine():
    bad = [f"{MODULES[name].relative_to(ROOT)}:{line}: imports {target} inside a function"
           for name, edges in GRAPH.items() if group(name) in NO_LOCAL_IMPORTS
           for target, local, line in edges if local]
    assert not bad, "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    """Every import counts, function-local ones too, so a local import cannot hide a cycle."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for target, _local, _line in GRAPH.get(node, ()):
            if target == node:
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_a_cycle_and_a_local_import_would_be_caught(tmp_path):
    """The checks see what they are meant to: a function-local import is marked local, `from pkg import mod`
    resolves to the module."""
    src = tmp_path / "m.py"
    src.write_text("from declab.core import trace as tr\n\ndef f():\n    from declab.run import runner\n")
    found = imports(src)
    assert ("declab.core.trace", False, 1) in found and ("declab.run.runner", True, 4) in found
