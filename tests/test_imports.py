"""Every module of evomerge imports on its own, and no two modules import each other.

An import cycle works or breaks depending on which of its modules is imported first, so a test
suite that always imports the package the same way can miss it. Two checks:

* statically, the graph of imports between evomerge's modules (parsed with ``ast``) has no cycle:
  neither among module-level imports (a cycle there breaks at import time, depending on which
  module comes first), nor once the imports inside functions are added (a deferred import that
  closes a loop hides a cycle rather than removing it). Imports under ``if TYPE_CHECKING:`` never
  run and are left out;
* dynamically, in one fresh interpreter, each module is imported first: evomerge is dropped from
  ``sys.modules`` before every import (third-party libraries stay loaded, which keeps it fast).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import evomerge

PACKAGE_ROOT = Path(evomerge.__file__).parent


def module_files() -> dict[str, Path]:
    """``{"evomerge.search.pareto": path, ...}`` for every .py file of the package."""
    modules = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (not in functions or classes'
    methods, not under ``if TYPE_CHECKING:``)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            todo += node.orelse if _is_type_checking(node.test) else node.body + node.orelse
        elif isinstance(node, (ast.Try, ast.With, ast.ClassDef)):
            for block in ("body", "orelse", "finalbody", "handlers"):
                todo += getattr(node, block, [])
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body
    return found


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level, inside functions, not under TYPE_CHECKING."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """module -> the evomerge modules its module-level imports load (with ``deferred``, its
    imports inside functions too).

    ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``.
    The implicit import of a module's parent packages is not an edge: it is what every submodule
    does, and it breaks only through the edges this graph already holds.
    """
    graph = {}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in _all_imports(tree) if deferred else _module_level_imports(tree):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            for alias in node.names:
                child = f"{source}.{alias.name}"
                targets.add(child if child in MODULES else source)
        graph[name] = {t for t in targets if t in MODULES and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        path.pop()
        colour[node] = 2
        return None

    for start in sorted(graph):
        if colour[start] == 0 and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_relative_and_absolute_imports():
    graph = import_graph()
    assert "evomerge.search.optimizers._base" in graph["evomerge.search.optimizers._m2n2"]
    assert "evomerge.search.pareto" in graph["evomerge.search.optimizers._map"]
    assert "evomerge.zoo._build" in graph["evomerge.zoo._stages"]
    assert "evomerge.zoo._stages" not in graph["evomerge.zoo._build"]
    assert "evomerge.search.optimizers._base" not in graph["evomerge.search.optimizers._registry"]  # TYPE_CHECKING
    assert "evomerge.merge.materializer" in import_graph(deferred=True)["evomerge.zoo._stages"]  # inside a function


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "with-deferred"])
def test_no_import_cycles(deferred):
    cycle = find_cycle(import_graph(deferred))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


_IMPORT_EACH_FIRST = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "evomerge" or m.startswith("evomerge.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, *MODULES], capture_output=True, text=True,
                          timeout=300, cwd=PACKAGE_ROOT.parent)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


@pytest.mark.parametrize("name", ["evomerge.search.optimizers", "evomerge.cli"])
def test_light_entry_points_do_not_load_the_optimizer_back_ends(name):
    """Strategies load on first use (through the registry), so the protocol and the CLI's --help
    stay quick to import."""
    code = (f"import sys, {name}; heavy = [m for m in ('pymoo', 'nevergrad', 'scipy') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
