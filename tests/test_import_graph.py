"""The modules of f2d_bench import each other without cycles.

Every `import` / `from ... import` counts, at any depth (an import inside a function is an edge too),
except those under `if TYPE_CHECKING:`. An import of `a.b.c` is an edge to the module `a.b.c` when it
exists, else to the nearest package above it; `from a.b import c` is an edge to `a.b.c` when that is a
module, else to `a.b`. A package's `__init__` importing a submodule that imports the package back is a
cycle like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "f2d_bench"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        if is_package or name not in found:  # a package shadows a module of its name, as in Python
            found[name] = (path, is_package)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST):
    """The Import/ImportFrom nodes in `node`, at any depth, skipping `if TYPE_CHECKING:` bodies (not their
    else branches)."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    elif isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.orelse:
            yield from _imports(child)
    else:
        for child in ast.iter_child_nodes(node):
            yield from _imports(child)


def imported_modules(tree: ast.AST, name: str, is_package: bool, modules) -> set[str]:
    """The modules of `modules` that module `name` (parsed as `tree`) imports, itself left out."""

    def nearest(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            targets.update(nearest(alias.name) for alias in node.names)
            continue
        if node.level:  # relative: in a.b.c, `from . import x` is a.b.x and `from .. import x` is a.x
            parts = package.split(".")
            source = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            full = f"{source}.{alias.name}"
            targets.add(full if full in modules else nearest(source))
    return {t for t in targets if t is not None and t != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the f2d_bench modules it imports."""
    modules = _modules()
    return {
        name: imported_modules(ast.parse(path.read_text(encoding="utf-8"), str(path)), name, is_package, modules)
        for name, (path, is_package) in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) for each strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, as a path that returns to its start."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def test_the_graph_sees_every_kind_of_import():
    code = (
        "import p.a.x\n"  # a module's attribute path: the module p.a
        "from p import b\n"  # a submodule through its package
        "from p.a import helper\n"  # a name: the module it is in
        "from .. import a\n"  # relative, one package up
        "from . import d\n"  # relative: p.sub has no module d, so the package p.sub
        "import torch\n"  # not ours
        "if TYPE_CHECKING:\n    import p.e\nelse:\n    import p.f\n"
        "def later():\n    import p.g\n"  # inside a function
    )
    modules = {m: None for m in ("p", "p.a", "p.b", "p.e", "p.f", "p.g", "p.sub", "p.sub.c")}
    got = imported_modules(ast.parse(code), "p.sub.c", False, modules)
    assert got == {"p.a", "p.b", "p.sub", "p.f", "p.g"}
    assert imported_modules(ast.parse("from . import c"), "p.sub", True, modules) == {"p.sub.c"}
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"p": {"p.m"}, "p.m": {"p"}, "q": set()}) == [["p", "p.m", "p"]]  # package <-> submodule
    graph = import_graph()
    assert "f2d_bench.errors" in graph["f2d_bench.devices"] and "f2d_bench" in graph
    assert "f2d_bench.pipelines.tiny" in graph["f2d_bench.pipelines.loading"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(cycle) for cycle in cycles)
