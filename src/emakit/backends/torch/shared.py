"""Several averages of one source, updated in one pass that reads each chunk of it once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from emakit.backends.torch.parts import Direct, Native, Part, Staged

__all__ = ["SHARED_CHUNK", "NativeShared", "SharedRead"]

SHARED_CHUNK = 1 << 21  # 2M elements (8 MB in fp32): read from memory once, then from the cache


class SharedRead:
    """Several averages of one flat source region: chunk by chunk, every shadow folds in the chunk.

    The source chunk comes from memory for the first average and from the cache for the others,
    so an update of N averages moves ``4 + 8 N`` bytes per fp32 parameter instead of ``12 N``. For
    a source that needs a conversion (bf16 model, fp32 shadows) each chunk is converted once into
    the first plan's staging buffer and folded into every average from there.
    """

    def __init__(self, parts: Sequence[Direct | Staged]) -> None:
        self.staged = isinstance(parts[0], Staged)
        self.chunks: list[tuple[Any, Any, list[list[torch.Tensor]]]] = []
        if self.staged:
            first = parts[0]
            assert isinstance(first, Staged)  # checked by shared_read(); internal invariant
            for c, (_, srcs, views) in enumerate(first.chunks):
                self.chunks.append((srcs, views, [p.chunks[c][0] for p in parts]))  # type: ignore[union-attr]
        else:
            source = parts[0].held_sources[0]
            for lo in range(0, source.numel(), SHARED_CHUNK):
                hi = lo + SHARED_CHUNK
                self.chunks.append((None, source[lo:hi],
                                    [[p.held_shadows[0][lo:hi]] for p in parts]))

    def lerp_(self, weights: Sequence[float]) -> None:
        # every operand is a held, detached view: no autograd to switch off
        for srcs, views, shadows in self.chunks:
            if self.staged:
                torch._foreach_copy_(views, srcs)
                for pieces, weight in zip(shadows, weights):
                    torch._foreach_lerp_(pieces, views, weight)
            else:
                for pieces, weight in zip(shadows, weights):
                    pieces[0].lerp_(views, weight)



class NativeShared:
    """Several averages of one source, as native parts: one kernel call folds each block of the
    source into every average while it is in the caches (``4 + 8 N`` bytes per fp32 parameter
    for N averages, converted once for a bf16 source)."""

    def __init__(self, parts: Sequence[Native]) -> None:
        first = parts[0]
        self.call = first.kernels.lerp_call([p.shadow_table for p in parts],
                                            first.source_table, first.code)

    @classmethod
    def of(cls, parts: Sequence[Part]) -> NativeShared | None:
        """The shared update of ``parts``, or None unless they are native lerp parts over the
        same source tensors (same addresses and sizes, same kind of conversion)."""
        first = parts[0]
        if not isinstance(first, Native) or first.copied or first.loose:
            return None
        table = first.source_table
        for part in parts:
            if not isinstance(part, Native) or part.copied or part.loose or \
                    part.code != first.code or part.source_table.count != table.count or \
                    part.source_table.pointers[:] != table.pointers[:] or \
                    part.source_table.prefix[:] != table.prefix[:] or \
                    part.shadow_table.prefix[:] != table.prefix[:]:
                return None
        return cls([p for p in parts if isinstance(p, Native)])

    def lerp_(self, weights: Sequence[float]) -> None:
        self.call(weights)
