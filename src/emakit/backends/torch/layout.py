"""Where tensors lie in memory: dense strides, runs back to back, groups, plan signatures.

The torch backend pairs each shadow with its source. Within a group (same shadow and source
device and dtype), pairs that lie back to back in memory on both sides -- a module laid out by
:func:`emakit.flatten_parameters`, whose shadows are then allocated flat too -- form a *run*,
which one kernel covers through two 1-D views. :data:`generation` counts the flattening calls
that moved a tensor, so a plan made before one looks for runs again.

Example:
    >>> import torch
    >>> flat = torch.zeros(6)
    >>> a, b = flat[:2].view(2), flat[2:].view(2, 2)
    >>> find_runs([a, b], [a, b])
    ([[0, 1]], [])
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["PLAIN", "STAGING_ELEMENTS", "bump_generation", "find_runs", "follows", "generation",
           "group_positions", "is_dense", "pairable", "region", "shapes_and_strides", "signature",
           "source_runs", "where"]

generation = 0
"""Bumped by every :func:`emakit.flatten_parameters` call that moved a tensor: a plan made
before plans again at its next update, so it finds the new single-buffer layout."""


def where(t: torch.Tensor) -> str:
    """``"dtype@device"`` of a tensor, as plans describe their groups."""
    return f"{str(t.dtype).removeprefix('torch.')}@{t.device}"


def bump_generation() -> None:
    """Record that tensors were laid out anew (called by :func:`emakit.flatten_parameters`)."""
    global generation
    generation += 1


STAGING_ELEMENTS = 1 << 20  # 1M elements (4 MB in fp32): a staged chunk stays in the caches
# tensor types whose storage can be re-pointed with ``.data =`` (not subclasses such as DTensor)
PLAIN = (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", torch.Tensor))


def signature(xs: Sequence[torch.Tensor]) -> list[tuple[Any, ...]]:
    """Shape, dtype and device of each tensor: what a plan re-checks per update for tensors it
    reads afresh."""
    return [(x.shape, x.dtype, x.device) for x in xs]


_SHAPE = operator.attrgetter("shape")


def shapes_and_strides(xs: Sequence[torch.Tensor]) -> tuple[list[Any], list[Any]]:
    """Shapes and strides: what a plan re-checks per update for tensors it holds by address
    (a new view of the same memory keeps the address). Two C-level passes."""
    return list(map(_SHAPE, xs)), list(map(torch.Tensor.stride, xs))


def is_dense(t: torch.Tensor) -> bool:
    """True for a strided tensor whose elements fill ``numel`` consecutive slots (any order).

    Then ``data_ptr()`` is its lowest address and its memory is ``numel * element_size`` bytes,
    and two tensors with equal shape and strides line up element by element in that memory.
    """
    if t.layout != torch.strided:
        return False
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def pairable(shadow: torch.Tensor, src: torch.Tensor) -> bool:
    """Elementwise the same memory layout: the flat views of the two line up element by element."""
    return bool(type(src) in PLAIN and shadow.shape == src.shape
                and shadow.stride() == src.stride() and is_dense(src) and is_dense(shadow))


def follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` starts where dense ``a`` ends, in the same storage."""
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size())


def region(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 1-D view over the memory of dense tensors that lie back to back in one storage."""
    first = ts[0].detach()
    return first.as_strided((sum(t.numel() for t in ts),), (1,), first.storage_offset())


def find_runs(shadows: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
          ) -> tuple[list[list[int]], list[int]]:
    """Split positions into runs (>= 2 pairs back to back in memory on both sides) and loose ones.

    A run is what :func:`emakit.flatten_parameters` makes of a module: its sources are one
    stretch of one storage, and so are the shadows (allocated flat per group), so one kernel on
    the two 1-D views covers the whole run.
    """
    runs: list[list[int]] = []
    loose: list[int] = []
    current: list[int] = []
    for k, (shadow, src) in enumerate(zip(shadows, sources)):
        if not pairable(shadow, src):
            loose.append(k)
            continue
        if current and follows(shadows[current[-1]], shadow) and \
                follows(sources[current[-1]], src):
            current.append(k)
            continue
        if len(current) > 1:
            runs.append(current)
        else:
            loose.extend(current)
        current = [k]
    if len(current) > 1:
        runs.append(current)
    else:
        loose.extend(current)
    return runs, sorted(loose)


def source_runs(sources: Sequence[torch.Tensor], dtypes: Sequence[Any]) -> list[list[int]]:
    """Positions in order, cut into runs of sources back to back in memory (one flat shadow each).

    Only a flattened module (:func:`emakit.flatten_parameters`) has runs longer than one; every
    other tensor gets a shadow of its own, so a saved shadow never drags a larger buffer along.
    """
    runs: list[list[int]] = []
    for i, src in enumerate(sources):
        if runs and type(src) in PLAIN and is_dense(src):
            j = runs[-1][-1]
            prev = sources[j]
            if dtypes[j] == dtypes[i] and prev.device == src.device and is_dense(prev) and \
                    follows(prev, src):
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


def group_positions(shadows: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
                    ) -> list[list[int]]:
    """Positions grouped by (shadow device, shadow dtype, source device, source dtype)."""
    keys: dict[tuple[Any, ...], list[int]] = {}
    for i, (shadow, src) in enumerate(zip(shadows, sources)):
        keys.setdefault((shadow.device, shadow.dtype, src.device, src.dtype), []).append(i)
    return list(keys.values())

