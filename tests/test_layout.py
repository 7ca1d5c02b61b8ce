"""The package's structure: the import graph has no cycle (one type-only pair aside), and
the worker side imports nothing of the supervisor.

The graph is read from the source with `ast`: every ``import`` of an ashard module,
wherever it stands (top level, inside a function, under ``TYPE_CHECKING``), is an edge.
Run it by hand: ``python tests/test_layout.py`` prints each module's imports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import ashard

PACKAGE = Path(ashard.__file__).resolve().parent
ALLOWED_CYCLES = [{"ashard.errors", "ashard.results"}]
"""`errors` names `ShardResult` (ShardMapError.result) and `results` names the errors,
both for types only."""


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The ashard modules `path` imports (`from ashard import x` is an import of module
    ``ashard.x`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {name for name in found if name in modules}


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle_but_the_type_only_one() -> None:
    found = cycles(graph())
    assert [c for c in found if c not in ALLOWED_CYCLES] == []


def test_the_cycle_finder_finds_cycles() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"} - {"e"}}
    assert cycles(edges) == [{"a", "b", "c"}]


def test_the_worker_side_imports_no_supervisor_module() -> None:
    edges = graph()
    reached: set[str] = set()
    todo = ["ashard._worker.__main__"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(edges[name])
    supervisor = {"ashard._scheduler", "ashard._workers", "ashard._handle", "ashard._channel",
                  "ashard.pool", "ashard.api", "ashard._job", "ashard._export"}  # fmt: skip
    assert not reached & supervisor


if __name__ == "__main__":
    for name, deps in sorted(graph().items()):
        print(f"{name}: {', '.join(sorted(deps)) or '-'}")
    print("cycles:", cycles(graph()) or "none", file=sys.stderr)
