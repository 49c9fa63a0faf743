"""A griffe extension for the API reference: Sphinx roles in docstrings become cross-references.

emakit's docstrings name objects with Sphinx roles (``:class:`~emakit.Policy```,
``:meth:`EMA.state_dict```, ``:mod:`emakit.clock```), which Markdown would print as they are.
This extension, loaded by mkdocstrings (``mkdocs.yml``), resolves each role's target with griffe,
relative to the object whose docstring holds it (its class, its module, then the package), and
writes an optional cross-reference: a link where the target is rendered in the site, plain code
where it is not (a package-internal module). A target that names nothing is logged as a warning,
so ``mkdocs build --strict`` fails on it. Two more reST habits are made Markdown: a paragraph
ending in ``::`` (the literal-block marker) ends in ``:``, and a doctest (``>>>`` lines and
their output, up to a blank line) outside an ``Example:`` section becomes a fenced ``pycon``
block (an ``Example:`` section becomes ``Examples:``, whose doctests mkdocstrings renders). An
argument entry naming several parameters (``every, dtype, device: as for EMA``) becomes one
entry per parameter, so each is matched with its annotation.

The rewrites are pure functions over the text (``tests/test_docs_api.py``).
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable

try:
    import griffe
except ImportError:  # the pure functions are tested with the test extra, which has no griffe
    griffe = None

__all__ = ["ROLE", "SphinxRoles", "fence_doctests", "rewrite", "split_arguments"]

ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`(?P<tilde>~?)(?P<text>[^`<]*?)\s*"
                  r"(?:<(?P<target>[^>]*)>)?`")
"""``:role:`target```, ``:role:`~a.b.target``` and ``:role:`title <target>```."""

_LITERAL = re.compile(r"(?<=\S)::$", re.MULTILINE)
_log = logging.getLogger("mkdocs.plugins.emakit.roles")


def rewrite(text: str, resolve: Callable[[str], str | None], where: str = "") -> str:
    """Replace every Sphinx role of ``text`` by an optional cross-reference.

    Args:
        text: a docstring.
        resolve: target as written (``"EMA.state_dict"``) -> the identifier it resolves to
            (``"emakit.ema.EMA.state_dict"``), or None when it names nothing.
        where: the docstring's owner, for the warning.

    Returns:
        The text with ``<autoref identifier="..." optional><code>...</code></autoref>`` for each
        role, and ``:`` for a line-final ``::``.
    """

    def one(match: re.Match[str]) -> str:
        title, target = match["text"], match["target"]
        if target is None:
            target = title.lstrip("~")
            title = target.rsplit(".", 1)[-1] if match["tilde"] else target
        if match["role"] == "ref":
            return f"<code>{html.escape(title)}</code>"
        identifier = resolve(target)
        if identifier is None:
            _log.warning("%s: %s names no object of emakit", where or "a docstring", match[0])
            return f"<code>{html.escape(title)}</code>"
        return (f'<autoref identifier="{html.escape(identifier)}" optional>'
                f"<code>{html.escape(title)}</code></autoref>")

    return _LITERAL.sub(":", ROLE.sub(one, text))


def fence_doctests(text: str) -> str:
    """Put every free-standing doctest of ``text`` (a ``>>>`` line to a blank line) in a fence.

    Args:
        text: a docstring.

    Returns:
        The text with each doctest between ```` ```pycon ```` and ```` ``` ```` lines, with a
        blank line before the fence: at the doctest's indentation under a section header,
        else dedented to the preceding paragraph's (an indented block there would be a
        Markdown code block of its own). An ``Example:`` header becomes ``Examples:`` and its
        doctests are left as they are: mkdocstrings renders that section's doctests itself.
    """
    lines = text.split("\n")
    out: list[str] = []
    examples: int | None = None  # the indentation of an open ``Example:`` section's header
    i = 0
    while i < len(lines):
        line = lines[i]
        depth = len(line) - len(line.lstrip())
        if line.strip() and examples is not None and depth <= examples:
            examples = None
        if _EXAMPLES.match(line):
            examples = depth
            line = line.replace("Example:", "Examples:") if "Examples:" not in line else line
        if not line.lstrip().startswith(">>>") or examples is not None:
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        before = next((o for o in reversed(out) if o.strip()), "")
        context = before[: len(before) - len(before.lstrip())]
        if not _HEADER.match(before) and len(context) < len(indent):
            cut = len(indent) - len(context)  # an indented block under a paragraph: dedent it
        else:
            context, cut = indent, 0
        if out and out[-1].strip():
            out.append("")
        out.append(f"{context}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i][cut:] if not lines[i][:cut].strip() else lines[i].lstrip())
            i += 1
        out.append(f"{context}```")
    return "\n".join(out)


_EXAMPLES = re.compile(r"^\s*Examples?:\s*$")
_HEADER = re.compile(r"^\s*[A-Z][A-Za-z ]*:\s*$")
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_SEVERAL = re.compile(r"^(\s+)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)+): (.*)$")


def split_arguments(text: str) -> str:
    """Give each parameter of an entry like ``every, dtype: as for EMA`` its own entry.

    Args:
        text: a Google-style docstring.

    Returns:
        The text with the entry repeated once per name (continuation lines included), inside
        argument sections only.
    """
    lines = text.split("\n")
    out: list[str] = []
    section: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if (head := _SECTION.match(line)) is not None:
            section = head[1]
        elif line.strip() and section is not None and not line.startswith(section + " "):
            section = None
        match = _SEVERAL.match(line) if section is not None else None
        if match is None:
            out.append(line)
            i += 1
            continue
        indent, names, first = match[1], match[2].split(", "), match[3]
        rest: list[str] = []
        i += 1
        while i < len(lines) and (lines[i].startswith(indent + " ") or not lines[i].strip()):
            if not lines[i].strip() and not (i + 1 < len(lines)
                                            and lines[i + 1].startswith(indent + " ")):
                break
            rest.append(lines[i])
            i += 1
        for name in names:
            out.extend([f"{indent}{name}: {first}", *rest])
    return "\n".join(out)


if griffe is not None:
    def _lookup(scope: griffe.Object | griffe.Alias, dotted: str) -> str | None:
        """The canonical path of ``dotted`` seen from ``scope``, or None."""
        try:
            found = scope[dotted]
        except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError,
                griffe.CyclicAliasError):
            return None
        try:
            return str(found.final_target.path if isinstance(found, griffe.Alias) else found.path)
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return str(found.target_path) if isinstance(found, griffe.Alias) else None


    class SphinxRoles(griffe.Extension):
        """Rewrite the roles of every docstring of a loaded package (see the module docstring)."""

        def on_package(self, *, pkg: griffe.Module, **kwargs: object) -> None:
            """Walk the package once it is loaded, when every alias can be resolved."""
            collection = pkg.modules_collection

            def visit(obj: griffe.Object) -> None:
                if obj.docstring is not None:
                    text = split_arguments(fence_doctests(obj.docstring.value))
                    obj.docstring.value = rewrite(text, self._resolver(obj, collection), obj.path)
                for member in obj.members.values():
                    if not isinstance(member, griffe.Alias):
                        visit(member)

            visit(pkg)

        @staticmethod
        def _resolver(obj: griffe.Object,
                      collection: griffe.ModulesCollection) -> Callable[[str], str | None]:
            scopes: list[griffe.Object] = []
            node: griffe.Object | None = obj
            while node is not None:
                scopes.append(node)
                node = node.parent

            def resolve(target: str) -> str | None:
                for scope in scopes:
                    if (path := _lookup(scope, target)) is not None:
                        return path
                head = target.split(".", 1)
                if head[0] in collection.members:
                    module = collection.members[head[0]]
                    return module.path if len(head) == 1 else _lookup(module, head[1])
                return None

            return resolve
