"""Lay a torch model's parameters and buffers out in one flat buffer per (device, dtype).

An EMA update is one streaming pass over memory; what makes it slower than one flat ``lerp_`` on
a model with many small tensors is the cost per tensor (one kernel per tensor on the CPU). After
:func:`flatten_parameters`, every parameter and persistent buffer of a module is a view into one
contiguous buffer per (device, dtype), in the order the EMA tracks them (parameters, then
buffers), so :meth:`emakit.EMA.update` folds a whole group in with a single ``lerp_`` (or a single
``copy_`` for integer buffers) and checks per update, with one pointer read per tensor, that the
layout still holds. Flattening changes no number: values, shapes and strides are kept, and the
``Parameter`` objects stay the same (optimizers built before or after keep working).

Re-allocating a tensor afterwards (``model.to(...)``, ``load_state_dict(..., assign=True)``,
``module.weight = nn.Parameter(...)``, ``p.data = ...``) is safe: the EMA sees that the tensor
no longer sits where the plan expects it and falls back to the per-tensor path; call
:func:`flatten_parameters` again to get the single pass back. Until that next update the EMA
still holds the old flat buffer (that is what makes the pointer check sound), so after
``model.to("cuda")`` the host copy is freed at the first update on the device.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

__all__ = ["FlatGroup", "FlatLayout", "flatten_parameters"]

_MADE: weakref.WeakSet[Any] = weakref.WeakSet()  # storages this module allocated (while alive)

class FlatGroup(NamedTuple):
    """One flat buffer: the tensors of one (device, dtype), in order."""

    device: str
    dtype: str
    names: tuple[str, ...]
    numel: int


class FlatLayout(NamedTuple):
    """What :func:`flatten_parameters` did.

    Attributes:
        groups: one :class:`FlatGroup` per flat buffer.
        skipped: name -> why the tensor was left where it was (it still works; the EMA just
            handles it on its own).
        moved: how many tensors were copied into a new flat buffer (0 when the module was
            already flat).
    """

    groups: tuple[FlatGroup, ...]
    skipped: dict[str, str]
    moved: int


def _tiled(tensors: list[Any], *, in_order: bool = False) -> bool:
    """True if the dense tensors cover one storage exactly, without overlapping.

    With ``in_order``, also back to back in the order given (the layout flattening makes).
    """
    from emakit.backends.torch.layout import is_dense

    storage = tensors[0].untyped_storage()
    base = storage.data_ptr()
    if any(t.untyped_storage().data_ptr() != base or not is_dense(t) for t in tensors):
        return False
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]
    pos = base
    for lo, hi in spans if in_order else sorted(spans):
        if lo != pos:
            return False
        pos = hi
    return bool(pos - base == storage.nbytes())


def flatten_parameters(module: Any, *, buffers: bool = True) -> FlatLayout:
    """Re-point a module's parameters (and persistent buffers) into one flat buffer per group.

    For each (device, dtype) group ``G`` with tensors ``t_1..t_m`` (parameters first, then
    buffers, in ``named_parameters()`` / ``named_buffers()`` order) one buffer ``F`` of
    ``sum(numel(t_i))`` elements is allocated and ``t_i.data`` becomes the view
    ``F[o_i : o_i + numel(t_i)]`` with ``t_i``'s own shape and strides, holding ``t_i``'s values
    bitwise. An EMA of the module then updates each group with one kernel.

    Left alone (and listed in ``skipped``): tensor subclasses (e.g. DTensor under FSDP2), meta
    or sparse tensors, tensors that share their storage with memory outside the module (views
    of something else, which would lose their aliasing; a buffer made by an earlier call is
    not "something else") and non-dense strides. Calling it again on a flat module
    changes nothing (``moved == 0``).

    Call it before creating the EMA (the EMA lays its shadows out flat only for a module that
    is flat when it is created; one made earlier keeps its per-tensor update) and before
    ``torch.compile`` / CUDA-graph capture (they may record the old addresses).
    ``copy.deepcopy`` of a flattened module is not flat (parameters are cloned one by one, and
    buffers become views into a copy of the whole buffer, which a later call leaves in place):
    flatten the original after copying, or build the copy fresh. Peak memory during the call:
    one extra copy of the largest group.

    Args:
        module: a ``torch.nn.Module``.
        buffers: also flatten persistent buffers (BatchNorm statistics and counters).

    Returns:
        A :class:`FlatLayout`.

    Raises:
        TypeError: if ``module`` is not a ``torch.nn.Module``.

    Example:
        >>> import torch
        >>> import emakit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        >>> layout = emakit.flatten_parameters(model)
        >>> [(g.dtype, len(g.names), g.numel) for g in layout.groups]
        [('float32', 4, 23)]
        >>> ema = emakit.EMA(model, decay=0.9)      # one lerp_ per update
    """
    import torch

    from emakit.backends.torch import layout

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"flatten_parameters needs a torch.nn.Module, got "
                        f"{type(module).__name__}. Example: emakit.flatten_parameters(model).")
    plain = (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", torch.Tensor))
    named: list[tuple[str, Any]] = list(module.named_parameters())
    if buffers:
        for name, b in module.named_buffers():
            path, _, key = name.rpartition(".")
            owner = module.get_submodule(path) if path else module
            if key not in getattr(owner, "_non_persistent_buffers_set", ()):
                named.append((name, b))
    skipped: dict[str, str] = {}
    groups: dict[tuple[Any, Any], list[tuple[str, Any]]] = {}
    for name, t in named:
        if type(t) not in plain:
            skipped[name] = f"a {type(t).__name__}, not a plain tensor"
        elif t.device.type == "meta" or t.layout != torch.strided:
            skipped[name] = f"a {t.layout} tensor on {t.device}"
        elif not layout.is_dense(t):
            skipped[name] = f"non-dense strides {tuple(t.stride())}"
        else:
            groups.setdefault((t.device, t.dtype), []).append((name, t))
    # a storage may be re-laid out only if this group's tensors tile it exactly: anything else
    # (a view into a tensor outside the module, two names on overlapping memory) keeps its place
    by_storage: dict[int, list[Any]] = {}
    for members in groups.values():
        for _, t in members:
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    # ... or if flatten_parameters made it: then a gap is a tensor re-allocated since
    owned = {ptr for ptr, ts in by_storage.items()
             if _tiled(ts) or ts[0].untyped_storage() in _MADE}
    out: list[FlatGroup] = []
    moved = 0
    with torch.no_grad():
        for (device, dtype), members in groups.items():
            tensors = [t for _, t in members]
            if not _tiled(tensors, in_order=True):
                keep = []
                for name, t in members:
                    if t.untyped_storage().data_ptr() in owned:
                        keep.append((name, t))
                    else:
                        skipped[name] = ("shares its storage with a tensor outside the module, or "
                                         "overlaps another tensor")
                members, tensors = keep, [t for _, t in keep]
                if not members:
                    continue
                total = sum(t.numel() for t in tensors)
                flat = torch.empty(total, dtype=dtype, device=device)
                _MADE.add(flat.untyped_storage())
                offset = 0
                for t in tensors:
                    view = flat.as_strided(t.shape, t.stride(), offset)
                    view.copy_(t)
                    t.data = view
                    offset += t.numel()
                moved += len(tensors)
            out.append(FlatGroup(str(device), str(dtype).removeprefix("torch."),
                                 tuple(n for n, _ in members), sum(t.numel() for t in tensors)))
    if moved:
        layout.bump_generation()  # EMAs planned before look for the new runs
    return FlatLayout(tuple(out), skipped, moved)
