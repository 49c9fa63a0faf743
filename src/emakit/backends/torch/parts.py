"""The update kernels of one group of (shadow, source) pairs: native, direct, or staged.

A :class:`Native` group (CPU, float32 shadows of float32/bfloat16/float16 sources, or float64)
is one call of emakit's compiled kernels (:mod:`~emakit.backends.torch.native`) for the whole
group, converting on the fly. Otherwise a :class:`Direct` group folds sources that already have
the shadows' dtype and device in with one ``lerp_`` (one run) or one ``_foreach_lerp_``, and a
:class:`Staged` group converts chunks of sources (a bf16 model's fp32 shadows, another device)
into a preallocated staging buffer and folds each chunk in while it is still in the caches. No
allocation and no host/device synchronisation per update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emakit.backends.base import GroupInfo
from emakit.backends.torch import layout
from emakit.backends.torch.layout import find_runs, pairable, region, where
from emakit.backends.torch.native import KINDS, PEAK_KINDS, Kernels, Table

__all__ = ["Direct", "Native", "Part", "Staged", "copy_all", "native_pair"]


class Part:
    """The pairs of one (shadow device, dtype, source device, dtype) group, as kernel operands.

    Runs become one pair of 1-D views each, held by the part (so their storage stays alive and
    a source at the recorded address is still that memory); loose tensors are read from the
    sources list at every update.
    """

    def __init__(self, index: list[int], shadows: list[torch.Tensor],
                 sources: list[torch.Tensor]) -> None:
        runs, loose = self.split(shadows, sources)
        self.held = [index[k] for run in runs for k in run]
        self.held_shadows = [region([shadows[k] for k in run]) for run in runs]
        self.held_sources = [region([sources[k] for k in run]) for run in runs]
        self.loose = [index[k] for k in loose]
        self.loose_shadows = [shadows[k] for k in loose]
        self.shadows = self.held_shadows + self.loose_shadows
        self.source_kind = where(sources[0])

    kind = "direct"

    def split(self, shadows: list[torch.Tensor], sources: list[torch.Tensor]
              ) -> tuple[list[list[int]], list[int]]:
        """Positions held (as runs, each one pair of 1-D views) and positions read afresh."""
        runs, loose = find_runs(shadows, sources)
        hold_above = self.hold_above()
        if hold_above is not None:
            big = {k for k in loose if shadows[k].numel() > hold_above
                   and pairable(shadows[k], sources[k])}
            runs += [[k] for k in sorted(big)]
            loose = [k for k in loose if k not in big]
        return runs, loose

    def hold_above(self) -> int | None:
        """Hold a lone tensor of more elements than this as a run of its own (None: never)."""
        return None

    def describe(self, role: str) -> GroupInfo:
        """What this part updates, and how (:class:`emakit.backends.GroupInfo`)."""
        tensors = len(self.held) + len(self.loose)
        return GroupInfo(role, self.kind, tensors, len(self.held_shadows), len(self.loose),
                         where(self.shadows[0]), self.source_kind)

    def sources(self, sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.loose:
            return self.held_sources
        return self.held_sources + [sources[i] for i in self.loose]

    def copy_(self, sources: Sequence[torch.Tensor]) -> None:
        copy_all(self.shadows, self.sources(sources))


def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor], *,
              non_blocking: bool = False) -> None:
    """``dsts[i].copy_(srcs[i])`` for all i, as one kernel call where there are several."""
    if len(dsts) == 1:
        dsts[0].copy_(srcs[0], non_blocking=non_blocking)
    elif dsts:
        torch._foreach_copy_(dsts, srcs, non_blocking=non_blocking)


class Direct(Part):
    """Sources already in the shadows' dtype and device: one ``lerp_`` (or copy) per group."""

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        srcs = self.sources(sources)
        if len(srcs) == 1:
            self.shadows[0].lerp_(srcs[0], weight)
        elif srcs:
            torch._foreach_lerp_(self.shadows, srcs, weight)



class Staged(Part):
    """Sources needing a dtype or device conversion: chunked through a staging buffer.

    Chunk by chunk, ``_foreach_copy_`` converts sources into views of a preallocated staging
    buffer and ``_foreach_lerp_`` folds them in: no allocation per update, and the converted
    chunk is still in the caches when the lerp reads it. Held runs are cut into pieces of at
    most the staging size; so is a lone dense tensor larger than that (held as a run of its
    own: a 38M-element embedding would otherwise need a staging buffer of its size, and the
    converted values would come back from memory instead of the caches). A larger tensor that
    cannot be viewed flat gets a staging buffer of its size.
    """

    kind = "staged"

    def hold_above(self) -> int | None:
        return layout.STAGING_ELEMENTS

    def describe(self, role: str) -> GroupInfo:
        return super().describe(role)._replace(chunks=len(self.chunks))

    def __init__(self, index: list[int], shadows: list[torch.Tensor],
                 sources: list[torch.Tensor]) -> None:
        super().__init__(index, shadows, sources)
        loose_sizes = [s.numel() for s in self.loose_shadows]
        total = sum(s.numel() for s in self.shadows)
        budget = max(min(layout.STAGING_ELEMENTS, total), *loose_sizes, 1)
        # items: (shadow piece, held source piece or position of a loose source)
        items: list[tuple[torch.Tensor, torch.Tensor | int]] = []
        for shadow, src in zip(self.held_shadows, self.held_sources):
            for lo in range(0, shadow.numel(), budget):
                items.append((shadow[lo:lo + budget], src[lo:lo + budget]))
        items.extend(zip(self.loose_shadows, self.loose))
        self.staging = torch.empty(budget, dtype=shadows[0].dtype, device=shadows[0].device)
        self.chunks: list[tuple[list[torch.Tensor], list[torch.Tensor | int],
                                list[torch.Tensor]]] = []
        used = 0
        chunk: tuple[list[torch.Tensor], list[torch.Tensor | int], list[torch.Tensor]] = (
            [], [], [])
        for piece, at in items:
            n = piece.numel()
            if used + n > budget:
                self.chunks.append(chunk)
                chunk, used = ([], [], []), 0
            chunk[0].append(piece)
            chunk[1].append(at)
            chunk[2].append(self.staging[used:used + n].view(piece.shape))
            used += n
        if chunk[0]:
            self.chunks.append(chunk)

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        for shadows, srcs, views in self.chunks:
            got = [sources[s] if isinstance(s, int) else s for s in srcs]
            if len(got) == 1:
                views[0].copy_(got[0])
                shadows[0].lerp_(views[0], weight)
            else:
                torch._foreach_copy_(views, got)
                torch._foreach_lerp_(shadows, views, weight)



def native_pair(shadow: torch.Tensor, src: torch.Tensor, *, copied: bool) -> bool:
    """Can the native kernels update this pair? CPU tensors, elementwise the same layout, and
    a dtype pair they know (copies: the same dtype)."""
    if shadow.device.type != "cpu" or src.device.type != "cpu" or not pairable(shadow, src) \
            or src.is_neg() or src.is_conj():
        return False
    return shadow.dtype == src.dtype if copied else (shadow.dtype, src.dtype) in KINDS


class Native(Part):
    """A CPU group updated by one call of emakit's native kernels (lerp, copy, peak, guard).

    The call's tables of addresses are laid out once; every tensor has its entry (the guard
    skips tensor by tensor). Before each call the plan checks every source's address, and the
    shape and strides of those not in a run (:attr:`recheck`): a new view of the same memory is
    noticed as a moved tensor is. The memory of runs (a flattened module) is
    kept alive by the part, as for :class:`Direct`; that of other sources is not (a model
    converted with ``.to()`` frees its old weights at once).
    """

    kind = "native"

    def split(self, shadows: list[torch.Tensor], sources: list[torch.Tensor]
              ) -> tuple[list[list[int]], list[int]]:
        # each tensor on its own (one kernel call covers them all the same): the guard skips
        # tensor by tensor; empty ones are left loose (nothing to do)
        return ([[k] for k, s in enumerate(shadows) if s.numel()],
                [k for k, s in enumerate(shadows) if not s.numel()])

    def __init__(self, index: list[int], shadows: list[torch.Tensor],
                 sources: list[torch.Tensor], kernels: Kernels, *, copied: bool) -> None:
        super().__init__(index, shadows, sources)
        runs, loose = find_runs(shadows, sources)  # stretches in memory
        self.stretches = len(runs) + sum(1 for k in loose if shadows[k].numel())
        in_run = {index[k] for run in runs for k in run}
        self.recheck = [i for i in self.held if i not in in_run]
        self.kernels = kernels
        self.dtype = sources[0].dtype
        self.copied = copied
        views = self.held_sources
        self.held_sources = [v for i, v in zip(self.held, views) if i in in_run]  # kept alive
        self.source_table = Table(views, nbytes=copied, hold=False)
        self.shadow_table = Table(self.held_shadows, nbytes=copied)
        self.code = -1 if copied else KINDS[(shadows[0].dtype, self.dtype)]
        self.call = None if copied else kernels.lerp_call([self.shadow_table],
                                                           self.source_table, self.code)
        # the sources by element, for peak(); None: a dtype the peak kernel does not read
        self.peak_table = (self.source_table if not copied else
                           Table(views, hold=False) if self.dtype in PEAK_KINDS else None)

    def sources(self, sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [sources[i] for i in self.held + self.loose]

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        if self.call is not None:
            self.call((weight,))

    def copy_(self, sources: Sequence[torch.Tensor]) -> None:
        assert self.copied  # a plan copies through its copy parts only; internal invariant
        self.kernels.copy(self.shadow_table, self.source_table)

    def describe(self, role: str) -> GroupInfo:
        return super().describe(role)._replace(runs=self.stretches, loose=0)

    def guarded_lerp_(self, weight: float, limit: float) -> tuple[list[int], float]:
        """Fold in each tensor whose weights are all at most ``limit`` in magnitude; returns
        the positions (as in the plan) of the others, left as they were, and the largest
        magnitude folded in."""
        assert not self.copied  # callers check; internal invariant
        failed, top = self.kernels.guarded_lerp(self.shadow_table, self.source_table,
                                                self.code, weight, limit)
        return [self.held[j] for j in failed], top

    def peak(self) -> float:
        """``max |x|`` over the group's sources (NaN if one is NaN): one kernel call. Only for
        a part with a ``peak_table``."""
        assert self.peak_table is not None  # callers check; internal invariant
        return self.kernels.peak(self.peak_table, self.dtype)
