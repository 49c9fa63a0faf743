"""Where the weights come from: an ``nn.Module``, a mapping of tensors, or ``(name, tensor)`` pairs.

A source is read by name at every update, so a parameter that was replaced (``model.to()``,
``load_state_dict(assign=True)``, a dict entry rebound to a new array) is still found. Tensors are
never matched by position.

Example:
    >>> import numpy as np
    >>> src = as_source({"w": np.zeros(3), "b": np.ones(1)})
    >>> [e.name for e in src.entries()]
    ['w', 'b']
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

__all__ = ["Entry", "Source", "as_source"]


class Entry(NamedTuple):
    """One named tensor of a source."""

    name: str
    tensor: Any
    buffer: bool
    requires_grad: bool


class Source(Protocol):
    """Named tensors, found again by name on every :meth:`fetch`."""

    kind: str

    def entries(self) -> list[Entry]:
        """Every tensor the source offers, in a stable order."""

    def fetch(self, names: Sequence[str]) -> list[Any]:
        """The current tensors called ``names``, in that order."""


def _missing(name: str, kind: str) -> ValueError:
    return ValueError(
        f"the source {kind} no longer has a tensor named {name!r}, which the EMA tracks. If the "
        "model changed, create a new EMA (or load a state saved from the new model)."
    )


class ModuleSource:
    """Parameters and persistent buffers of a ``torch.nn.Module``, by their dotted names."""

    kind = "module"

    def __init__(self, module: Any) -> None:
        self.module = module
        self._where: dict[str, tuple[Any, str, bool]] = {}

    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        self._where.clear()
        for name, p in self.module.named_parameters():
            self._remember(name, buffer=False)
            out.append(Entry(name, p, False, bool(p.requires_grad)))
        for name, b in self.module.named_buffers():
            owner, key = self._split(name)
            if key in getattr(owner, "_non_persistent_buffers_set", ()):
                continue  # not model state (masks, caches): never part of the average
            self._where[name] = (owner, key, True)
            out.append(Entry(name, b, True, False))
        return out

    def _split(self, name: str) -> tuple[Any, str]:
        path, _, key = name.rpartition(".")
        return (self.module.get_submodule(path) if path else self.module), key

    def _remember(self, name: str, *, buffer: bool) -> None:
        owner, key = self._split(name)
        self._where[name] = (owner, key, buffer)

    def fetch(self, names: Sequence[str]) -> list[Any]:
        where = self._where
        try:
            return [
                (owner._buffers if buffer else owner._parameters)[key]
                for owner, key, buffer in (where[n] for n in names)
            ]
        except KeyError:
            pass
        out = []
        for n in names:  # slow path: find which name went missing, or re-resolve owners
            try:
                owner, key = self._split(n)
                table = owner._buffers if where[n][2] else owner._parameters
                tensor = table[key]
            except (KeyError, AttributeError):
                raise _missing(n, self.kind) from None
            if tensor is None:
                raise _missing(n, self.kind)
            where[n] = (owner, key, where[n][2])
            out.append(tensor)
        return out


class MappingSource:
    """A mapping ``name -> tensor``, read again at every fetch (entries may be rebound)."""

    kind = "mapping"

    def __init__(self, mapping: Mapping[str, Any]) -> None:
        for key in mapping:
            if not isinstance(key, str):
                raise TypeError(
                    f"source keys must be tensor names (str), got {key!r} of type "
                    f"{type(key).__name__}. Example: EMA({{'w': w, 'b': b}})."
                )
        self.mapping = mapping

    def entries(self) -> list[Entry]:
        return [
            Entry(name, t, False, bool(getattr(t, "requires_grad", True)))
            for name, t in self.mapping.items()
        ]

    def fetch(self, names: Sequence[str]) -> list[Any]:
        m = self.mapping
        try:
            return [m[n] for n in names]
        except KeyError as exc:
            raise _missing(str(exc.args[0]), self.kind) from None


def _pairs(items: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"a source given as pairs must yield (name, tensor) tuples, got {item!r}. "
                "Example: EMA(model.named_parameters())."
            )
        if item[0] in out:
            raise ValueError(f"the name {item[0]!r} appears twice in the source pairs; names "
                             "must be unique.")
        out[item[0]] = item[1]
    return out


def as_source(obj: object) -> Source:
    """Wrap a module, mapping or iterable of ``(name, tensor)`` pairs as a :class:`Source`.

    Raises:
        TypeError: for anything else, naming what was received and what is accepted.
    """
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and isinstance(obj, torch_mod.nn.Module):
        return ModuleSource(obj)
    if isinstance(obj, Mapping):
        return MappingSource(obj)
    is_array = hasattr(obj, "shape") and hasattr(obj, "dtype")
    if not is_array and isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        source = MappingSource(_pairs(obj))
        source.kind = "pairs"
        return source
    hint = " Wrap a single array in a dict: EMA({'params': x})." if is_array else ""
    raise TypeError(
        f"source must be a torch.nn.Module, a mapping name -> tensor/array, or (name, tensor) "
        f"pairs; got {type(obj).__name__}.{hint}"
    )
