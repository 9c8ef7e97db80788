"""The package's shape, read from the source (ast): no import circle, no upward import, small modules.

The picture this keeps true (docs/layout.md): the root's shared leaves, then the core packages
(``store``, ``model``, ``camera``), then the edges (``panel``, ``mqtt``, ``web``), then ``device``
(which wires them), then the tools on top (``cli``, ``bench``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgeknn"
CORE = {"store", "model", "camera"}
EDGES = {"panel", "mqtt", "web", "device", "cli", "bench", "fleet"}
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 280


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The edgeknn modules ``path`` imports, at any depth (a function-level import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("edgeknn")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgeknn"):
            assert node.level == 0, f"{path}: relative import"
            for a in node.names:  # `from edgeknn.store import file`: the submodule is what is imported
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, known) - {name} for name, path in mods.items()}


def part(module: str) -> str:
    """The package a module belongs to (``store``, ``mqtt``, ...), or the root module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "edgeknn"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_between_modules():
    assert cycles(graph()) == []


def test_no_import_circle_between_packages():
    """Package level: ``store`` and ``model`` may not lean on each other, even through different modules."""
    packages: dict[str, set[str]] = {}
    for module, targets in graph().items():
        # the package's own __init__ and its modules are one node; the root's modules are one node each
        node = part(module) if module.count(".") >= 1 else module
        for target in targets:
            other = part(target) if target.count(".") >= 1 else target
            if other != node and target != "edgeknn":
                packages.setdefault(node, set()).add(other)
    assert cycles(packages) == []


def test_the_core_imports_no_edge():
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        if part(module) in CORE
        for target in targets
        if part(target) in EDGES
    ]
    assert upward == []


def test_the_root_keeps_only_shared_leaves():
    """The root's modules import no package but the core's (``config`` checks names and model names)."""
    upward = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        if module.count(".") == 1 and part(module) not in CORE | EDGES | {"__main__"}
        for target in targets
        if part(target) in EDGES
    ]
    assert upward == []


def test_modules_and_classes_stay_small():
    too_big = []
    for name, path in modules().items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_big.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_big.append(f"{name}.{node.name}: {size} lines")
    assert too_big == []


def test_the_checks_see_a_circle_and_an_upward_import():
    """The checks above are not vacuous: a made-up circle and a made-up upward import are caught."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert part("edgeknn.store.knn") == "store" and part("edgeknn.mqtt.link") in EDGES
    assert "edgeknn.store.names" in graph()["edgeknn.store.matcher"]
