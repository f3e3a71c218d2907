"""Import arrows point one way: no cycle among the app's modules, and each imports on its own.

The graph holds every ``import`` and ``from ... import`` of a module, at the top and inside
functions alike: an import deferred into a function still makes its module depend on the other.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app"
#: Packages left out of the cycle check (none: every module of the app is in it).
EXCLUDED: tuple[str, ...] = ()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def app_modules() -> dict[str, Path]:
    """Every module of the app by dotted name (a package by its ``__init__``)."""
    return {_module_name(path): path for path in sorted(APP.rglob("*.py"))
            if "node_modules" not in path.parts}


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool,
             modules: dict[str, Path]) -> set[str]:
    """The app modules one import statement loads (a name from a package: the submodule if
    there is one, else the package)."""
    def nearest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        return {target for alias in node.names if (target := nearest(alias.name))}
    base = node.module or ""
    if node.level:
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    found = set()
    for alias in node.names:
        target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else nearest(base)
        if target:
            found.add(target)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the app modules it imports anywhere in its body."""
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, name, path.name == "__init__.py", modules)
        graph[name] = edges - {name}
    return graph


def _excluded(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in EXCLUDED)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None (iterative DFS)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path = [start]
        children = [iter(sorted(graph[start]))]
        while children:
            child = next(children[-1], None)
            if child is None:
                children.pop()
                done.add(path.pop())
            elif child in path:
                return path[path.index(child):] + [child]
            elif child not in done:
                path.append(child)
                children.append(iter(sorted(graph.get(child, ()))))
    return None


def test_no_import_cycle_among_the_app_modules():
    graph = import_graph(app_modules())
    kept = {name: {t for t in targets if not _excluded(t)}
            for name, targets in graph.items() if not _excluded(name)}
    cycle = find_cycle(kept)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_top_level_and_deferred_imports_alike():
    graph = import_graph(app_modules())
    assert "app.extensions" in graph["app.errors"]  # top level
    assert "app.state.redis" in graph["app.state"]  # inside create_state
    assert "app.agents.net" in graph["app.agents.http"]  # "from app.agents import net"
    assert "app.state" not in graph["app.state.memory"]  # implementations import the protocol
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


_IMPORT_EACH_ALONE = """
import importlib, sys
names = sys.argv[1:]
# Third-party libraries stay loaded (that is what makes this fast); the app is forgotten
# before each module, so each one is imported first, as if nothing had imported it before.
for name in names:
    for loaded in [m for m in sys.modules if m == "app" or m.startswith("app.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        print(f"{name}: {type(exc).__name__}: {exc}")
"""


def test_every_app_module_imports_first_in_a_fresh_interpreter():
    names = [name for name in app_modules() if not _excluded(name)]
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH_ALONE, *names], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "", result.stdout
