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

__all__ = ["Entry", "Source", "as_source", "unwrapped"]


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

    def state(self) -> dict[str, Any]:
        """Everything the source holds, tracked or not, by name (a module's ``state_dict()``)."""

    def fetch(self, names: Sequence[str]) -> list[Any]:
        """The current tensors called ``names``, in that order."""

    def aliases(self) -> dict[str, str]:
        """Second names of shared tensors (tied weights): ``alias -> the entry's name``.

        A tensor reachable under several names (an embedding tied to the output head) is one
        entry, under the first name; its other names are aliases, filled from that entry
        wherever the source's full state is written (valid after :meth:`entries`).
        """


def _first_name(first: dict[int, str], aliases: dict[str, str], name: str, tensor: Any) -> bool:
    """True the first time ``tensor`` (the same object) is seen; else record ``name`` as alias."""
    seen = first.setdefault(id(tensor), name)
    if seen != name:
        aliases[name] = seen
        return False
    return True


def _missing(name: str, kind: str) -> ValueError:
    return ValueError(
        f"the source {kind} no longer has a tensor named {name!r}, which the EMA tracks. If the "
        "model changed, create a new EMA (or load a state saved from the new model)."
    )


class ModuleSource:
    """Parameters and persistent buffers of a ``torch.nn.Module``, by their dotted names.

    The owner submodule of each tensor is cached, and the chain of submodules leading to it is
    re-checked (identity of each ``_modules`` entry) on every fetch, so a replaced submodule
    (``model.head = nn.Linear(...)``) is found again instead of silently reading the old one.
    """

    kind = "module"

    def __init__(self, module: Any) -> None:
        self.module = module
        self._where: dict[str, tuple[Any, str, bool]] = {}
        self._edge_dicts: list[dict[str, Any]] = []
        self._edge_keys: list[str] = []
        self._edge_children: list[Any] = []
        self._slots: tuple[Sequence[str], list[dict[str, Any]], list[str]] | None = None
        self._aliases: dict[str, str] = {}

    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        buffers: set[str] = set()
        first: dict[int, str] = {}
        self._aliases = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if getattr(p, "ds_id", None) is not None:
                raise ValueError(
                    f"parameter {name!r} is partitioned by DeepSpeed ZeRO stage 3 (this rank "
                    "holds no full tensor to average), which emakit does not support. Use "
                    "ZeRO stage 1 or 2 (full parameters on every rank), or FSDP2 "
                    "(torch.distributed.fsdp.fully_shard), whose shards emakit averages.")
            if _first_name(first, self._aliases, name, p):
                out.append(Entry(name, p, False, bool(p.requires_grad)))
        for name, b in self.module.named_buffers(remove_duplicate=False):
            owner, key = self._split(name)
            if key in getattr(owner, "_non_persistent_buffers_set", ()):
                continue  # not model state (masks, caches): never part of the average
            if _first_name(first, self._aliases, name, b):
                buffers.add(name)
                out.append(Entry(name, b, True, False))
        self._where = {e.name: (None, "", e.name in buffers) for e in out}
        self._resolve()
        return out

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def state(self) -> dict[str, Any]:
        return dict(self.module.state_dict())

    def _split(self, name: str) -> tuple[Any, str]:
        path, _, key = name.rpartition(".")
        return (self.module.get_submodule(path) if path else self.module), key

    def _resolve(self) -> None:
        """Find every tracked tensor's owner again and record the submodule edges leading there."""
        edges: dict[tuple[int, str], tuple[Any, str, Any]] = {}
        for name, (_, _, buffer) in list(self._where.items()):
            path, _, key = name.rpartition(".")
            owner = self.module
            for part in path.split(".") if path else ():
                child = owner._modules.get(part)
                if child is None:
                    raise _missing(name, self.kind)
                edges[(id(owner), part)] = (owner, part, child)
                owner = child
            self._where[name] = (owner, key, buffer)
        self._edge_dicts = [parent._modules for parent, _, _ in edges.values()]
        self._edge_keys = [key for _, key, _ in edges.values()]
        self._edge_children = [child for _, _, child in edges.values()]
        self._slots = None

    def fetch(self, names: Sequence[str]) -> list[Any]:
        # one C-level pass over the submodule edges (a replaced submodule is found again) and
        # one over the owners' dicts: this runs on every update
        if list(map(dict.get, self._edge_dicts, self._edge_keys)) != self._edge_children:
            self._resolve()
        slots = self._slots
        if slots is None or slots[0] is not names:
            where = [self._where[n] for n in names]
            slots = self._slots = (
                names, [o._buffers if b else o._parameters for o, _, b in where],
                [k for _, k, _ in where])
        try:
            return list(map(dict.__getitem__, slots[1], slots[2]))
        except KeyError:
            for n in names:
                owner, key, buffer = self._where[n]
                if key not in (owner._buffers if buffer else owner._parameters):
                    raise _missing(n, self.kind) from None
            raise


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
        self._aliases: dict[str, str] = {}

    def entries(self) -> list[Entry]:
        first: dict[int, str] = {}
        self._aliases = {}
        return [
            Entry(name, t, False, bool(getattr(t, "requires_grad", True)))
            for name, t in self.mapping.items() if _first_name(first, self._aliases, name, t)
        ]

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def state(self) -> dict[str, Any]:
        return dict(self.mapping)

    def fetch(self, names: Sequence[str]) -> list[Any]:
        m = self.mapping
        try:
            return [m[n] for n in names]
        except KeyError as exc:
            raise _missing(str(exc.args[0]), self.kind) from None


def _brief(item: object) -> str:
    """What ``item`` is, without printing a whole tensor."""
    shape = getattr(item, "shape", None)
    if shape is not None:
        return f"a {type(item).__name__} of shape {tuple(shape)}"
    text = repr(item)
    return text if len(text) <= 80 else f"a {type(item).__name__}"


def _pairs(items: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                f"a source given as pairs must yield (name, tensor) tuples, got {_brief(item)}. "
                "Tensors are matched by name, never by position: pass the model itself "
                "(EMA(model)), a dict, or EMA(model.named_parameters())."
            )
        if item[0] in out:
            raise ValueError(f"the name {item[0]!r} appears twice in the source pairs; names "
                             "must be unique.")
        out[item[0]] = item[1]
    return out


def unwrapped(module: Any) -> Any:
    """The model inside the wrappers that only prefix its names: DDP / DataParallel / a
    DeepSpeed engine (``.module``) and ``torch.compile`` (``._orig_mod``). They share the
    model's parameters, so an EMA of the inner model averages the same tensors under the model's
    own names (files and ``model_state_dict()`` then load into the plain model).

    Raises:
        ValueError: for FSDP1 (``FullyShardedDataParallel``), whose flattened parameters are
            resharded behind the model's back.
    """
    import torch

    for _ in range(8):
        kind = type(module).__name__
        if kind == "FullyShardedDataParallel":
            raise ValueError(
                "source is a FullyShardedDataParallel (FSDP1) module, whose parameters are "
                "flattened and resharded behind the model's back; emakit averages FSDP2 models. "
                "Shard with torch.distributed.fsdp.fully_shard (FSDP2) and pass that model, or "
                "average the model before wrapping it in FSDP1 (single-process).")
        inner = getattr(module, "module", None) if kind in (
            "DistributedDataParallel", "DataParallel", "DeepSpeedEngine") else \
            getattr(module, "_orig_mod", None) if kind == "OptimizedModule" else None
        if not isinstance(inner, torch.nn.Module):
            break
        module = inner
    return module


def as_source(obj: object) -> Source:
    """Wrap a module, mapping or iterable of ``(name, tensor)`` pairs as a :class:`Source`.

    Raises:
        TypeError: for anything else, naming what was received and what is accepted.
    """
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and isinstance(obj, torch_mod.nn.Module):
        return ModuleSource(unwrapped(obj))
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
