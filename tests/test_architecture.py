"""The package's shape: imports point one way, modules stay small, classes keep their privates.

Read from the source with :mod:`ast` (nothing is imported), so a violation is found whether or
not the code path runs in the other tests.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "emakit"
MAX_MODULE_LINES = 450
MAX_EMA_CLASS_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The package's modules that ``name`` imports (anywhere in the file, functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target not in known:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            names = [a.name for a in node.names if f"{target}.{a.name}" not in known]
            yield from subs
            if names:  # names from the module itself (for a package: its __init__)
                yield target


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        edges = set(imported(name, path, known)) - {name}
        # importing emakit.a.b runs emakit.a's __init__ first: not an edge of the importer's own
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["emakit.ema"], "the graph builder found no imports: it is broken"
    assert "emakit.io.checkpoint" not in graph["emakit.ema"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_engine_does_not_import_the_layers_above_it():
    graph = import_graph()
    below = {"emakit.ema", "emakit.engine", "emakit.tracked", "emakit.folding", "emakit.clock",
             "emakit.state", "emakit.swap", "emakit.hooks", "emakit.sources", "emakit.policy",
             "emakit.multi"}
    above = ("emakit.io", "emakit.cli", "emakit.bench", "emakit.integrations", "emakit.best")
    for name in below:
        bad = [m for m in graph[name] if m.startswith(above)]
        assert not bad, f"{name} imports {bad}"


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    big = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not big, big


def test_the_ema_class_stays_small():
    tree = ast.parse((PACKAGE / "ema.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EMA"]
    assert cls.end_lineno is not None
    length = cls.end_lineno - cls.lineno + 1
    assert length < MAX_EMA_CLASS_LINES, length


def private_members(tree: ast.AST) -> set[str]:
    """``_name`` attributes a module's classes define (methods, ``self._x = ...``)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in ast.walk(node):
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                        item.name.startswith("_") and not item.name.startswith("__"):
                    out.add(item.name)
                if isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store) and \
                        isinstance(item.value, ast.Name) and item.value.id == "self" and \
                        item.attr.startswith("_") and not item.attr.startswith("__"):
                    out.add(item.attr)
    return out


def test_no_module_reaches_into_another_modules_private_members():
    trees = {name: ast.parse(path.read_text()) for name, path in modules().items()}
    owners: dict[str, set[str]] = {}
    for name, tree in trees.items():
        for attr in private_members(tree):
            owners.setdefault(attr, set()).add(name)
    found = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in owners):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if name not in owners[node.attr]:  # defined only in other modules' classes
                found.append(f"{name}:{node.lineno} .{node.attr} (of {sorted(owners[node.attr])})")
    assert not found, "\n".join(found)


def test_the_checks_above_can_fail():
    """The cycle finder and the private-member scan catch what they are for."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("class A:\n    def __init__(self):\n        self._x = 1\n    def _y(self): pass")
    assert private_members(tree) == {"_x", "_y"}
