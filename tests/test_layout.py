"""The package's structure, as DESIGN.md §3 states its rules: the import graph has no
cycle (one type-only pair aside); the worker side imports nothing of the supervisor;
loading the Dask caller side loads no local scheduler; `api`, `sync` and `executor` do
not import one another; no module reaches into `Pool`'s underscore names.

The graph is read from the source with `ast`: every ``import`` of an ashard module,
wherever it stands (top level, inside a function, under ``TYPE_CHECKING``), is an edge;
`loads` keeps only the imports that run when a module is loaded (not those inside
functions or under ``TYPE_CHECKING``). Run it by hand: ``python tests/test_layout.py``
prints each module's imports.
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


def _on_load(tree: ast.Module) -> list[ast.stmt]:
    """The import statements that run when the module is loaded: at top level, in class
    bodies and in plain ``if``/``try`` blocks, not in functions or ``if TYPE_CHECKING``."""
    found: list[ast.stmt] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if ast.unparse(node.test) != "TYPE_CHECKING":
                todo.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            todo.extend(node.body + node.orelse + node.finalbody)
            for handler in node.handlers:
                todo.extend(handler.body)
        elif isinstance(node, ast.ClassDef | ast.With):
            todo.extend(node.body)
    return found


def imports_of(path: Path, modules: set[str], on_load: bool = False) -> set[str]:
    """The ashard modules `path` imports (`from ashard import x` is an import of module
    ``ashard.x`` when that is a module); `on_load`: only those loading it imports."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in _on_load(tree) if on_load else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {name for name in found if name in modules}


def graph(on_load: bool = False) -> dict[str, set[str]]:
    modules = module_names()
    return {
        name: imports_of(path, set(modules), on_load) - {name} for name, path in modules.items()
    }


def reach(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` reaches through `edges` (itself included)."""
    reached: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(edges[name])
    return reached


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


SUPERVISOR = {"ashard._scheduler", "ashard._workers", "ashard._handle", "ashard._channel",
              "ashard.pool", "ashard.api", "ashard.sync", "ashard.executor", "ashard._calls",
              "ashard._backend", "ashard._stream", "ashard._job", "ashard._export",
              "ashard._consumers", "ashard._sizing", "ashard._outputs", "ashard._record",
              "ashard._positions", "ashard._reports", "ashard._lanes"}  # fmt: skip


def test_the_worker_side_imports_no_supervisor_module() -> None:
    reached = reach(graph(), "ashard._worker.__main__")
    assert not reached & SUPERVISOR
    assert not any(name.startswith("ashard._dask") for name in reached)


def test_the_dask_caller_side_loads_no_local_scheduler() -> None:
    """The caller's side of a cluster pool runs no worker processes of its own: loading
    it (the plugin it registers included) never loads the local backend."""
    reached = reach(graph(on_load=True), "ashard._dask.backend")
    assert "ashard._scheduler" not in reached, sorted(reached)
    assert "ashard._workers" not in reached, sorted(reached)
    assert "ashard._lanes" not in reached, sorted(reached)


def test_the_three_front_doors_do_not_import_one_another() -> None:
    """`api`, `sync` and `executor` each stand on the call layer, not on each other."""
    edges = graph()
    doors = {"ashard.api", "ashard.sync", "ashard.executor"}
    for door in doors:
        assert not edges[door] & (doors - {door}), (door, edges[door] & doors)


def _pool_private_names() -> set[str]:
    """The underscore names `Pool` defines: its methods and the attributes it assigns."""
    tree = ast.parse((PACKAGE / "pool.py").read_text())
    pool = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Pool")
    names = set()
    for node in ast.walk(pool):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")} - {"_repr_html_"}


def test_no_module_reaches_into_pools_underscore_names() -> None:
    """Other modules use `Pool` through its public face (an object's own ``self._x`` is
    its own business, whatever the name)."""
    private = _pool_private_names()
    assert {"_made", "_make"} <= private  # the scan sees what Pool keeps to itself
    used = []
    for name, path in module_names().items():
        if name == "ashard.pool":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            own = isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self"
            if isinstance(node, ast.Attribute) and node.attr in private and not own:
                used.append(f"{name}:{node.lineno} .{node.attr}")
    assert used == []


if __name__ == "__main__":
    for name, deps in sorted(graph().items()):
        print(f"{name}: {', '.join(sorted(deps)) or '-'}")
    print("cycles:", cycles(graph()) or "none", file=sys.stderr)
