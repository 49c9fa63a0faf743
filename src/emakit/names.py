"""Tensor names across wrappers: ``module.`` (DDP), ``_orig_mod.`` (torch.compile), an attribute.

A file written from a wrapped model names its tensors with the wrapper's prefix; the same model
unwrapped does not. :func:`match_names` finds the one renaming (as is, a prefix stripped, or a
prefix added) under which a file's names are the model's, and :func:`renamed_state` renames
every name-keyed entry of an EMA state with it. Pure Python: used by ``EMA.load_state_dict``
and by :mod:`emakit.io.adopt` alike.

Example:
    >>> match_names(["module.fc.weight", "module.fc.bias"], ["fc.weight", "fc.bias"])
    ({'module.fc.weight': 'fc.weight', 'module.fc.bias': 'fc.bias'}, "strip 'module.'")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["match_names", "renamed_state"]


def _prefixes(name: str, limit: int = 3) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) + "." for k in range(1, min(limit, len(parts) - 1) + 1)]


def match_names(found: Sequence[str], wanted: Sequence[str]) -> tuple[dict[str, str], str]:
    """Rename ``found`` names into ``wanted``'s namespace, allowing one wrapper prefix.

    Tries the names as they are, with a prefix stripped from the found names (``module.`` of
    DDP, ``_orig_mod.`` of torch.compile, a LightningModule's attribute) and with a prefix
    added, and keeps the renaming under which the most names are wanted (as-is wins ties).

    Args:
        found: the names in the file.
        wanted: the names the EMA tracks.

    Returns:
        ``(found name -> its name in the model's namespace, for every found name; a
        description of the renaming)``.
    """
    wanted_set = set(wanted)
    renamings: list[tuple[str, Callable[[str], str]]] = [("as is", lambda n: n)]
    strip: set[str] = {"module.", "_orig_mod.", "module._orig_mod."}
    if found:
        strip.update(_prefixes(found[0]))
    for p in sorted(strip):
        renamings.append((f"strip {p!r}", lambda n, p=p: n.removeprefix(p)))  # type: ignore[misc]
    for p in sorted(_prefixes(wanted[0]) if wanted else ()):
        renamings.append((f"add {p!r}", lambda n, p=p: p + n))  # type: ignore[misc]
    best_label, best, best_hits = "as is", {n: n for n in found}, -1
    for label, rename in renamings:
        table = {n: rename(n) for n in found}
        hits = sum(1 for n in table.values() if n in wanted_set)
        if hits > best_hits:
            best_label, best, best_hits = label, table, hits
    return best, best_label


_NAMED = ("shadows", "actions", "nonfinite_skips", "decay_products", "source_dtypes")
"""The state entries keyed by tracked name (renamed with the shadows)."""


def renamed_state(state: dict[str, Any], rename: Mapping[str, str]) -> dict[str, Any]:
    """``state`` with every tracked name (and tied alias) renamed by ``rename``."""
    out = dict(state)
    for key in _NAMED:
        if isinstance(state.get(key), Mapping):
            out[key] = {rename.get(n, n): v for n, v in state[key].items()}
    if isinstance(state.get("aliases"), Mapping):
        out["aliases"] = {rename.get(a, a): rename.get(n, n) for a, n in state["aliases"].items()}
    return out
