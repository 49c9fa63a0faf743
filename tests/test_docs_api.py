"""The API reference: every public module has a page, every public symbol a docstring, and the
site's docstring rewriting (``docs/_ext/roles.py``) does what it says.

The site itself is built by ``mkdocs build --strict`` (CI, the README's third command), which
fails on a cross-reference that does not resolve. These tests need only the test extra: they
read the source with ``ast`` (nothing is imported, so the frameworks need not be installed).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
API = ROOT / "docs" / "api"
PUBLIC = [
    "emakit", "emakit.schedules", "emakit.smoothing", "emakit.window", "emakit.io",
    "emakit.io.layouts", "emakit.posthoc", "emakit.bema", "emakit.distributed",
    "emakit.distributed.shards", "emakit.distributed.gather", "emakit.integrations",
    "emakit.integrations.transformers", "emakit.integrations.lightning",
    "emakit.integrations.keras", "emakit.compat", "emakit.compat.torch_ema",
    "emakit.compat.timm", "emakit.backends", "emakit.state",
]


def source(module: str) -> Path:
    base = SRC / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def tree(module: str) -> ast.Module:
    return ast.parse(source(module).read_text(encoding="utf-8"))


def exported(module: str) -> list[str]:
    for node in tree(module).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                return list(ast.literal_eval(node.value))
    return []


def definition(module: str, name: str, depth: int = 0) -> tuple[str, ast.AST, ast.AST | None]:
    """(module, node, the node after it) where ``name`` is defined, following imports."""
    body = tree(module).body
    for i, node in enumerate(body):
        after = body[i + 1] if i + 1 < len(body) else None
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            return module, node, after
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return module, node, after
        if isinstance(node, ast.ImportFrom) and node.module and depth < 5:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    target = node.module
                    if source(f"{target}.{alias.name}").exists():   # a submodule
                        return f"{target}.{alias.name}", tree(f"{target}.{alias.name}"), None
                    return definition(target, alias.name, depth + 1)
    raise LookupError(f"{module}.{name} is exported but not defined")


def documented(node: ast.AST, after: ast.AST | None) -> bool:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
        return bool(ast.get_docstring(node))
    return (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str))


def undocumented(module: str) -> list[str]:
    missing = [] if ast.get_docstring(tree(module)) else [f"{module} (module)"]
    for name in exported(module):
        if name.startswith("__"):
            continue
        where, node, after = definition(module, name)
        if not documented(node, after):
            missing.append(f"{module}.{name} (defined in {where})")
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                setter = any(isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter")
                             for d in getattr(member, "decorator_list", []))
                if (isinstance(member, ast.FunctionDef) and not member.name.startswith("_")
                        and not setter and not ast.get_docstring(member)):
                    missing.append(f"{module}.{name}.{member.name}")
    return missing


def test_every_public_module_has_a_page():
    directives = set()
    for page in API.glob("*.md"):
        directives |= set(re.findall(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.M))
    missing = [m for m in PUBLIC if m not in directives and m != "emakit"]
    top = [n for n in exported("emakit") if n not in ("__version__", "schedules", "BEMA")]
    missing += [f"emakit.{n}" for n in top if f"emakit.{n}" not in directives]
    assert not missing, f"no API page shows: {missing}"


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_symbol_has_a_docstring(module):
    assert not undocumented(module)


def load_roles():
    spec = importlib.util.spec_from_file_location("docs_roles", ROOT / "docs" / "_ext" / "roles.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_roles"] = module
    spec.loader.exec_module(module)
    return module


def test_roles_become_optional_cross_references():
    roles = load_roles()
    known = {"EMA.state_dict": "emakit.ema.EMA.state_dict", "emakit.clock": "emakit.clock"}
    text = "See :meth:`EMA.state_dict` and :mod:`~emakit.clock`, or :ref:`the table <t>`."
    out = roles.rewrite(text, known.get)
    assert out == ('See <autoref identifier="emakit.ema.EMA.state_dict" optional>'
                   "<code>EMA.state_dict</code></autoref> and "
                   '<autoref identifier="emakit.clock" optional><code>clock</code></autoref>, '
                   "or <code>the table</code>.")


def test_a_role_naming_nothing_is_a_warning(caplog):
    roles = load_roles()
    with caplog.at_level("WARNING"):
        out = roles.rewrite("Uses :func:`nowhere`.", lambda target: None, "emakit.x")
    assert out == "Uses <code>nowhere</code>."
    assert "emakit.x: :func:`nowhere` names no object of emakit" in caplog.text


def test_doctests_are_fenced():
    roles = load_roles()
    section = "Example:\n    >>> 1 + 1\n    2\n\nAfter."     # mkdocstrings renders these
    assert roles.fence_doctests(section) == section.replace("Example:", "Examples:")
    text = "Notes:\n    >>> 1 + 1\n    2\n\nAfter."
    assert roles.fence_doctests(text) == (
        "Notes:\n\n    ```pycon\n    >>> 1 + 1\n    2\n    ```\n\nAfter.")
    free = "Some text.\n\n    >>> x = 1\n\nMore."   # under a paragraph: dedented, else the
    assert roles.fence_doctests(free) == (              # indentation makes a code block of it
        "Some text.\n\n```pycon\n>>> x = 1\n```\n\nMore.")
    assert roles.rewrite("A literal block::\n\n    x\n", {}.get) == "A literal block:\n\n    x\n"


def test_several_names_become_one_entry_each():
    roles = load_roles()
    text = "Args:\n    a: first.\n    b, c: as for X,\n        shared.\n\nReturns:\n    d, e: kept."
    assert roles.split_arguments(text) == (
        "Args:\n    a: first.\n    b: as for X,\n        shared.\n    c: as for X,\n        shared."
        "\n\nReturns:\n    d, e: kept.")
