"""Read torch checkpoints that pickle whole objects, without running any of their code.

Some libraries save Python objects, not state dicts: Ultralytics stores the EMA as a pickled
``nn.Module`` (``ckpt["ema"]``), timm may store an ``argparse.Namespace``. ``torch.load(...,
weights_only=True)`` refuses such files, and ``weights_only=False`` would import and run whatever
classes the file names -- arbitrary code from an untrusted file.

This module's :class:`Unpickler` runs inside ``torch.load`` (as its ``pickle_module``, so torch
still reads the storages from the zip archive) and resolves only a short allow-list of globals:
torch's tensor and parameter rebuild functions, dtypes, ``OrderedDict``. Every other class or
function the pickle names becomes an :class:`Inert` record that keeps the arguments and state it
was given and does nothing else: nothing is imported, nothing is called. A pickled module comes
back as an ``Inert`` whose ``state`` holds ``_parameters``, ``_buffers`` and ``_modules``, which
:func:`module_tensors` walks.

Example:
    >>> import io, pickle
    >>> payload = pickle.dumps({"ok": 1})
    >>> Unpickler(io.BytesIO(payload)).load()
    {'ok': 1}
"""

from __future__ import annotations

import _compat_pickle
import collections
import pickle
from typing import IO, Any

__all__ = ["Inert", "Unpickler", "load", "module_tensors"]

_SAFE_BUILTINS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}
_TORCH_FUNCTIONS = ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                    "_rebuild_parameter_with_state")


class Inert:
    """A stand-in for an object of a class that was not imported.

    Attributes:
        qualname: ``module.Name`` of the class (or function) the pickle named.
        args: the positional arguments it was called or created with.
        state: what the pickle restored into it (usually the object's ``__dict__``).
        items: entries set by index (``obj[key] = value``), for pickled dict subclasses.
        list_items: entries appended, for pickled list subclasses.
    """

    qualname = "?"
    args: tuple[Any, ...]
    state: Any
    items: dict[Any, Any]
    list_items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:  # NEWOBJ and REDUCE both land here
        obj = super().__new__(cls)
        obj.args = args
        obj.state = kwargs or None
        obj.items = {}
        obj.list_items = []
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list_items.append(value)

    def extend(self, values: Any) -> None:
        self.list_items.extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return _inert_class(self.qualname)(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


_CLASSES: dict[str, type[Inert]] = {}


def _inert_class(qualname: str) -> type[Inert]:
    cls = _CLASSES.get(qualname)
    if cls is None:
        cls = type(qualname.rsplit(".", 1)[-1], (Inert,), {"qualname": qualname})
        _CLASSES[qualname] = cls
    return cls


def _allowed(module: str, name: str) -> Any:
    safe = _SAFE_BUILTINS.get((module, name))
    if safe is not None:
        return safe
    if module == "torch._utils" and name in _TORCH_FUNCTIONS:
        import torch._utils

        return getattr(torch._utils, name)
    if module == "torch":
        import torch

        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype) or value is torch.Size or value is torch.device:
            return value
    return None


class Unpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only allow-listed globals (see the module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (torch.save writes protocol 2, which spells builtins "__builtin__")
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _allowed(module, name)
        if allowed is not None:
            return allowed
        return _inert_class(f"{module}.{name}")


def load(file: IO[bytes], **kwargs: Any) -> Any:
    """``pickle.load`` with :class:`Unpickler` (the ``pickle_module`` protocol of torch.load)."""
    return Unpickler(file, **kwargs).load()


def module_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The state dict (parameters and persistent buffers, by dotted name) of a pickled module.

    Args:
        obj: an :class:`Inert` standing for an ``nn.Module`` (or a real module).
        prefix: prepended to every name.

    Returns:
        ``name -> tensor`` in the module's order, as ``module.state_dict()`` would give.
    """
    state = obj.state if isinstance(obj, Inert) else getattr(obj, "__dict__", None)
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]  # (dict_state, slot_state)
    if not isinstance(state, dict):
        return {}
    out: dict[str, Any] = {}
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is not None and not (kind == "_buffers" and name in skip):
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_tensors(child, f"{prefix}{name}."))
    return out


def looks_like_module(obj: Any) -> bool:
    """True if ``obj`` is a pickled ``nn.Module`` read by :class:`Unpickler`."""
    state = obj.state if isinstance(obj, Inert) else None
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]
    return isinstance(state, dict) and "_parameters" in state and "_modules" in state
