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

The work is bounded by the file's size: the pickle's opcodes are scanned first
(:func:`check_opcodes`: no memo index beyond the opcodes read, no length beyond the data), torch's
lazily imported submodules are never touched by name lookups, and :func:`module_tensors` visits
each module once, without recursion.

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
import pickletools
from typing import IO, Any

__all__ = ["Inert", "Unpickler", "check_opcodes", "load", "looks_like_module", "module_tensors"]

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

        # vars(), not getattr(): torch imports submodules lazily on attribute access
        # (``torch._dynamo`` alone pulls in hundreds of modules); a dtype is a plain attribute
        value = vars(torch).get(name)
        if isinstance(value, torch.dtype) or value is torch.Size or value is torch.device:
            return value
    return None


_MEMO_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def check_opcodes(file: IO[bytes]) -> None:
    """Read one pickle's opcodes from ``file`` (without building anything) and bound its work.

    A memo index may not exceed the number of opcodes before it (a pickler numbers its memo
    entries in order; the C unpickler allocates up to the index), and every length-prefixed
    argument must be present in the data (the C unpickler allocates the claimed length first).

    Raises:
        pickle.UnpicklingError: naming the opcode, its position and why.
    """
    count = 0
    try:
        for opcode, arg, pos in pickletools.genops(file):
            count += 1
            if opcode.name in _MEMO_OPS and isinstance(arg, int) and arg > count:
                raise pickle.UnpicklingError(
                    f"{opcode.name} at byte {pos} stores memo index {arg:,} after only "
                    f"{count:,} opcodes (a hostile or corrupt pickle)")
    except (ValueError, EOFError) as exc:  # truncated argument, unknown opcode, no STOP
        raise pickle.UnpicklingError(f"malformed pickle after {count:,} opcodes: {exc}"
                                     ) from None


class Unpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only allow-listed globals (see the module doc).

    Before unpickling, :func:`check_opcodes` scans the pickle (the stream must be seekable, as
    ``torch.load`` gives it), so a few hostile bytes cannot make it allocate gigabytes.
    """

    def __init__(self, file: IO[bytes], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._file = file

    def load(self) -> Any:
        start = self._file.tell()
        check_opcodes(self._file)
        self._file.seek(start)
        return super().load()

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


def _module_state(obj: Any) -> dict[str, Any] | None:
    state = obj.state if isinstance(obj, Inert) else getattr(obj, "__dict__", None)
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]  # (dict_state, slot_state)
    return state if isinstance(state, dict) else None


def _entries(value: Any) -> list[tuple[Any, Any]]:
    """The ``(name, item)`` pairs of a pickled ``_parameters`` / ``_modules`` dict."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, Inert):  # an OrderedDict subclass pickled by reference
        return list(value.items.items())
    return []


def module_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The state dict (parameters and persistent buffers, by dotted name) of a pickled module.

    Each submodule is visited once, under the first name it is reached by (as
    ``named_modules()`` does), so the work is linear in the pickle's size even when modules are
    shared along many paths or contain themselves.

    Args:
        obj: an :class:`Inert` standing for an ``nn.Module`` (or a real module).
        prefix: prepended to every name.

    Returns:
        ``name -> tensor`` in the module's order, as ``module.state_dict()`` would give.
    """
    out: dict[str, Any] = {}
    seen: set[int] = set()
    stack = [(obj, prefix)]
    while stack:
        module, where = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        state = _module_state(module)
        if state is None:
            continue
        skip = state.get("_non_persistent_buffers_set")
        skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
        for kind in ("_parameters", "_buffers"):
            for name, value in _entries(state.get(kind)):
                if isinstance(name, str) and value is not None and not (
                        kind == "_buffers" and name in skip):
                    out[where + name] = value
        children = [(c, f"{where}{n}.") for n, c in _entries(state.get("_modules"))
                    if isinstance(n, str) and c is not None]
        stack.extend(reversed(children))  # depth first, in the module's order
    return out


def looks_like_module(obj: Any) -> bool:
    """True if ``obj`` is a pickled ``nn.Module`` read by :class:`Unpickler`."""
    state = obj.state if isinstance(obj, Inert) else None
    if isinstance(state, tuple) and len(state) == 2:
        state = state[0]
    return isinstance(state, dict) and "_parameters" in state and "_modules" in state
