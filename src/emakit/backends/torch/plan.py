"""The prepared update of one EMA over torch tensors, and its per-update check.

A :class:`TorchPlan` groups the shadows by (shadow device, dtype, source device, dtype), builds
the kernel part of each group (:mod:`~emakit.backends.torch.parts`, or
:mod:`~emakit.backends.torch.offload` for host shadows of a CUDA model), and re-checks on every
update, with one pointer read per held tensor, that the sources still lie where it expects.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from emakit.backends.base import GroupInfo, Plan
from emakit.backends.torch import layout, native, offload
from emakit.backends.torch.layout import group_positions, shapes_and_strides, signature, where
from emakit.backends.torch.offload import Offloaded
from emakit.backends.torch.parts import Direct, Native, Staged, native_pair
from emakit.backends.torch.readback import peaks

__all__ = ["TorchPlan", "parts_for"]


class TorchPlan(Plan):
    """The prepared update of one EMA: averaged groups, copied groups, and how to re-check them.

    :meth:`fits` is what every update pays to know the plan still describes the sources: one
    pointer read per tensor held in a run (sound because the plan keeps that memory alive) or
    by a native part (with its shape and strides, outside runs), and shape/dtype/device for
    loose tensors (they are read afresh anyway).
    """

    def __init__(self, avg_shadows: Sequence[torch.Tensor], copy_shadows: Sequence[torch.Tensor],
                 sources: Sequence[torch.Tensor], fast: bool, overlap: bool) -> None:
        n = len(avg_shadows)
        self.loop = not fast
        self.sources_at_plan = [where(x) for x in sources]  # for describe()
        self.avg_shadows = list(avg_shadows)
        self.copy_shadows = list(copy_shadows)
        self.lerps: list[Direct | Staged | Native | Offloaded] = []
        self.copies: list[Direct | Staged | Native | Offloaded] = []  # never Staged (see parts_for)
        if fast:
            for index in group_positions(avg_shadows, sources[:n]):
                shadows, srcs = [avg_shadows[i] for i in index], [sources[i] for i in index]
                self.lerps += parts_for(shadows, srcs, index, overlap, copied=False)
            for index in group_positions(copy_shadows, sources[n:]):
                at = [n + i for i in index]
                shadows, srcs = [copy_shadows[i] for i in index], [sources[i] for i in at]
                self.copies += parts_for(shadows, srcs, at, overlap, copied=True)
        parts = [*self.lerps, *self.copies]
        self.offloaded = [p for p in parts if isinstance(p, Offloaded)]
        held = sorted(i for p in parts for i in p.held)
        self.held = held if len(held) < len(sources) else None  # None: every source is held
        self.held_ptrs = [sources[i].data_ptr() for i in held]
        self.loose = sorted(set(range(len(sources))) - set(held))
        self.loose_signature = signature([sources[i] for i in self.loose])
        # held by address alone (a native part's tensors outside runs): a new view of the same
        # memory keeps the address, so their shapes and strides are checked at every update
        recheck = sorted(i for p in parts if isinstance(p, Native) for i in p.recheck)
        self.recheck: list[int] | None = recheck if len(recheck) < len(sources) else None
        self.recheck_layout = shapes_and_strides([sources[i] for i in recheck])
        self.rechecks = bool(recheck)
        self.generation = layout.generation
        self.checks_while_folding = fast and all(isinstance(p, Native) for p in self.lerps)
        # held runs are detached views: autograd needs switching off only for loose sources
        detached = fast and not any(p.loose for p in self.lerps)
        self.grad_off: Any = contextlib.nullcontext() if detached else torch.no_grad()

    def fits(self, sources: Sequence[torch.Tensor]) -> bool:
        if layout.generation != self.generation:  # a module was flattened: look for runs again
            return False
        try:
            if self.held is None:
                if list(map(torch.Tensor.data_ptr, sources)) != self.held_ptrs:
                    return False
            elif self.held_ptrs and [sources[i].data_ptr() for i in self.held] != self.held_ptrs:
                return False
            if self.rechecks:
                held = sources if self.recheck is None else [sources[i] for i in self.recheck]
                if shapes_and_strides(held) != self.recheck_layout:
                    return False
            return not self.loose or \
                signature([sources[i] for i in self.loose]) == self.loose_signature
        except (AttributeError, TypeError):  # an entry is no longer a tensor: validate
            return False

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        with self.grad_off:
            if self.loop:
                for shadow, src in zip(self.avg_shadows, sources):
                    shadow.lerp_(src.to(device=shadow.device, dtype=shadow.dtype), weight)
                return
            for part in self.lerps:
                part.lerp_(sources, weight)

    def copy_(self, sources: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            if self.loop:
                n = len(self.avg_shadows)
                for shadow, src in zip(self.copy_shadows, sources[n:]):
                    shadow.copy_(src)
                return
            for part in self.copies:
                part.copy_(sources)

    def describe(self) -> tuple[GroupInfo, ...]:
        if self.loop:
            return tuple(_loop_info(role, shadows, sources) for role, shadows, sources in (
                ("average", self.avg_shadows, self.sources_at_plan[:len(self.avg_shadows)]),
                ("copy", self.copy_shadows, self.sources_at_plan[len(self.avg_shadows):]))
                if shadows)
        return tuple(part.describe(role) for role, parts in (("average", self.lerps),
                                                             ("copy", self.copies))
                     for part in parts)

    def peaks(self, sources: Sequence[torch.Tensor], *, averaged: bool = True
              ) -> tuple[float, float] | None:
        if self.offloaded:  # the sources are read on another device by a worker thread
            return None
        n = len(self.avg_shadows)
        if self.loop:
            groups = [list(sources[:n]) if averaged else [], list(sources[n:])]
            native_tops: list[list[float]] = [[], []]
        else:  # a held run is one tensor here: one reduction covers a flattened module
            lerps = self.lerps if averaged else []
            by_kernel = [[p for p in parts if isinstance(p, Native) and p.peak_table is not None]
                         for parts in (lerps, self.copies)]
            native_tops = [[p.peak() for p in ps] for ps in by_kernel]
            groups = [[x for p in parts if p not in ps for x in p.sources(sources)]
                      for parts, ps in zip((lerps, self.copies), by_kernel)]
        floating = [[x for x in g if x.is_floating_point() or x.is_complex()] for g in groups]
        tops = peaks(floating[0] + floating[1])
        k = len(floating[0])
        return _largest(tops[:k] + native_tops[0]), _largest(tops[k:] + native_tops[1])

    def guarded_lerp_(self, sources: Sequence[torch.Tensor], weight: float, limit: float
                      ) -> tuple[list[int], float] | None:
        if not self.checks_while_folding:
            return None
        failed: list[int] = []
        top = 0.0
        for part in self.lerps:
            assert isinstance(part, Native)  # checked above
            left, folded = part.guarded_lerp_(weight, limit)
            failed += left
            top = max(top, folded)
        return sorted(failed), top

    def settle(self) -> None:
        for part in self.offloaded:
            part.settle()

    def fence(self) -> None:
        for part in self.offloaded:
            part.fence()


def _loop_info(role: str, shadows: Sequence[torch.Tensor], sources: Sequence[str]
               ) -> GroupInfo:
    kinds = sorted(set(sources))
    return GroupInfo(role, "loop", len(shadows), 0, len(shadows),
                     ", ".join(sorted({where(s) for s in shadows})), ", ".join(kinds))


def parts_for(shadows: list[torch.Tensor], sources: list[torch.Tensor], index: list[int],
              overlap: bool, *, copied: bool) -> list[Direct | Staged | Native | Offloaded]:
    """The parts of one group, by the kind of its shadows and sources.

    CPU pairs the native kernels know form a :class:`Native` part (when they are available:
    see :func:`emakit.backends.torch.native.status`); the others of the group (a strided view,
    say) get torch's kernels. Copied tensors keep their dtype, and a plain ``copy_`` moves them
    to another device, so they need no staging; only a CUDA model's copies to host shadows go
    through the mirror.
    """
    shadow, source = shadows[0], sources[0]
    if offload.offloads(source.device, shadow.device):  # looked up here: tests may patch it
        return [Offloaded(index, shadows, sources, overlap)]
    fit = [k for k, (a, b) in enumerate(zip(shadows, sources))
           if native_pair(a, b, copied=copied)]
    kernels = native.kernels() if fit else None
    out: list[Direct | Staged | Native | Offloaded] = []
    if fit and kernels is not None:
        out.append(Native([index[k] for k in fit], [shadows[k] for k in fit],
                          [sources[k] for k in fit], kernels, copied=copied))
    else:
        fit = []
    taken = set(fit)
    rest = [k for k in range(len(shadows)) if k not in taken]
    if rest:
        ix = [index[k] for k in rest]
        sh, sr = [shadows[k] for k in rest], [sources[k] for k in rest]
        same = copied or (shadow.dtype == source.dtype and shadow.device == source.device)
        out.append(Direct(ix, sh, sr) if same else Staged(ix, sh, sr))
    return out


def _largest(tops: list[float]) -> float:
    return math.nan if any(math.isnan(t) for t in tops) else max(tops, default=0.0)
