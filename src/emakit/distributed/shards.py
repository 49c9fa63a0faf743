"""DTensor shards: the local piece an EMA averages, and how to go back to the global tensor.

A parameter of a model sharded with FSDP2 (``fully_shard``) or any DTensor layout is a
``DTensor``: a global shape, a device mesh, placements (``Shard(d)``, ``Replicate()``) and on each
rank a local tensor. The EMA of such a parameter is kept as a local shadow shaped like the local
tensor, with the parameter's :class:`ShardSpec`; an update folds the local tensor into the local
shadow (no communication: the average of a shard is the shard of the average). The spec turns
a local shadow back into a DTensor without a copy (:func:`as_dtensor`, for ``state_dict()`` and
``torch.distributed.checkpoint``) and cuts the local piece out of a full tensor read from a file
(:func:`local_piece`, no communication either: every rank holds the full tensor then).

FSDP2 leaves a module's parameters unsharded (plain tensors) after a forward pass without a
backward (an eval forward of the root module); :func:`reshard` puts every FSDP module of a model
back into its sharded state first.

Example (no process group needed to ask what a tensor is):
    >>> import torch
    >>> is_dtensor(torch.zeros(2))
    False
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

__all__ = ["ShardSpec", "as_dtensor", "gather", "is_dtensor", "local", "local_piece",
           "reshard"]


def _dtensor_type() -> Any:
    """The DTensor class, if torch.distributed.tensor is loaded (never imported here)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(x: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (a sharded or replicated parameter)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(x, cls)


class ShardSpec(NamedTuple):
    """How a DTensor is laid out over ranks: enough to rebuild it around a local tensor."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, x: Any) -> ShardSpec:
        """The spec of DTensor ``x``."""
        return cls(x.device_mesh, tuple(x.placements), tuple(x.shape), tuple(x.stride()))

    def describe(self) -> str:
        """``Shard(dim=0) over 2 ranks, global (7, 5)``: for messages."""
        places = ", ".join(str(p) for p in self.placements)
        return f"{places} over mesh {tuple(self.mesh.shape)}, global shape {self.shape}"


def local(x: Any) -> Any:
    """The local tensor of DTensor ``x`` (a view of this rank's shard: no copy, no collective)."""
    import torch

    with torch.no_grad():
        return x.to_local()


def as_dtensor(local_tensor: Any, spec: ShardSpec) -> Any:
    """A DTensor with ``spec``'s layout around ``local_tensor`` (shares its memory; no check, no
    collective: the global shape and strides come from the spec, so uneven shards are right)."""
    import torch
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor, spec.mesh, spec.placements, run_check=False,
                              shape=torch.Size(spec.shape), stride=spec.stride)


def local_piece(value: Any, spec: ShardSpec) -> Any:
    """This rank's piece of ``value`` laid out as ``spec``.

    Args:
        value: a DTensor (same layout: its local tensor; another layout: redistributed, which
            communicates) or a full tensor of the global shape (sliced locally: every rank holds
            it, e.g. read from a full file).

    Returns:
        A local tensor shaped like this rank's shard.
    """
    from torch.distributed.tensor import distribute_tensor

    if is_dtensor(value):
        if tuple(value.placements) != spec.placements or value.device_mesh != spec.mesh:
            value = value.redistribute(spec.mesh, spec.placements)
        return local(value)
    return local(distribute_tensor(value, spec.mesh, list(spec.placements), src_data_rank=None))


def gather(x: Any) -> Any:
    """The full tensor of DTensor ``x`` on every rank (a collective: every rank must call it)."""
    import torch

    with torch.no_grad():
        return x.full_tensor()


def reshard(module: Any) -> int:
    """Put every FSDP2 module of ``module`` back into its sharded state; how many there are.

    FSDP2 keeps a module unsharded after a forward pass that no backward follows (an eval
    forward of the root); its parameters are then plain tensors of the full shape, which the
    EMA's local shadows do not match.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    modules = getattr(module, "modules", None)
    if kind is None or not callable(modules):
        return 0
    count = 0
    for m in modules():
        if isinstance(m, kind):
            m.reshard()
            count += 1
    return count
