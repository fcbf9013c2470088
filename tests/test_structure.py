"""The package's structure: no import cycles in `tcd_ds/`.

The graph has one node per module of `tcd_ds/` and an edge for every `import` / `from ... import`
statement anywhere in the file: at module level, inside functions and methods, under `if` or `try`
(function-level imports only defer a cycle, they do not remove it). `from pkg import name` is an edge
to `pkg.name` when that is a module of the package, else to `pkg`. Run this file as a script
(`python tests/test_structure.py`) to print the graph's cycles.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tcd_ds"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `importer`)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of tcd_ds: line of the first such import}."""
    mods = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                # `import tcd_ds.a.b` runs tcd_ds.a.b: the longest prefix that is one of our modules
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Cycles (each a path `a -> b -> ... -> a`) covering every module of every strongly connected
    component of more than one module (Tarjan's algorithm, iterative): the shortest cycle through
    each member that no earlier cycle of its component passes through."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    found = []
    for component in components:
        covered: set[str] = set()
        for member in component:
            if member not in covered:
                found.append(_cycle_in(graph, set(component), member))
                covered.update(found[-1])
    return found


def _cycle_in(graph: dict[str, dict[str, int]], component: set[str], start: str) -> list[str]:
    """The shortest path start -> ... -> start inside one strongly connected component (BFS)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in component:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is in a component without a cycle through it")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    hops = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "  " + "\n  ".join(hops)


def test_walker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The walker itself: a cycle through a function-level and a relative import is found."""
    pkg = tmp_path / "tcd_ds"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from tcd_ds.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import x\n")
    (pkg / "sub" / "c.py").write_text("import os\n\ndef g():\n    from tcd_ds import a\n")
    (pkg / "d.py").write_text("import tcd_ds.a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    graph = import_graph()
    assert graph["tcd_ds.sub.b"] == {"tcd_ds.sub.c": 2}
    assert graph["tcd_ds.d"] == {"tcd_ds.a": 1}
    assert cycles(graph) == [["tcd_ds.a", "tcd_ds.sub.b", "tcd_ds.sub.c", "tcd_ds.a"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 30 and "tcd_ds.train" in graph  # the walker found the package
    found = cycles(graph)
    assert not found, "import cycles in tcd_ds/ (module (line of the import) -> module it imports):\n" + \
        "\n".join(describe(graph, c) for c in found)


if __name__ == "__main__":
    g = import_graph()
    for c in cycles(g):
        print(describe(g, c), end="\n\n")


def test_every_package_directory_is_a_regular_package():
    """Every folder of modules under tcd_ds/ has an __init__.py (tcd_ds/model/ had none: a namespace
    package by accident, which a wheel's package discovery can leave out)."""
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    assert sorted(str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").is_file()) == []


def test_no_stray_binaries_at_the_repo_root():
    """Nothing the package does not use lies at the root (a pyflakes wheel did, committed by accident)."""
    root = PACKAGE.parent
    assert not [p.name for p in root.iterdir() if p.suffix in (".whl", ".egg", ".zip", ".tar", ".gz")]
