"""Numbers read back from tensors to the host: one transfer per device, not one per tensor.

Example:
    >>> import torch
    >>> to_host([torch.tensor(1.5), torch.tensor(2)])
    [1.5, 2.0]
    >>> peaks([torch.tensor([1.0, -3.0]).bfloat16(), torch.tensor([3.0, 4.0])])
    [3.0, 10.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["peak", "peaks", "to_host"]


_BY_DOT = (torch.float32, torch.float64)


def peaks(xs: Sequence[torch.Tensor]) -> list[float]:
    """An upper bound of ``max |x|`` for each tensor (NaN if it holds a NaN, inf if an inf).

    One pass per tensor and one transfer per device. A contiguous float32/float64 tensor gives
    ``2 * sqrt(x . x)`` (a BLAS dot, the fastest full read: at least ``max |x|`` even with the
    dot's rounding, and non-finite when any element is -- or when the sum of squares
    overflows, past about ``1e19`` in float32, which only makes a caller more careful); other
    tensors (16-bit, complex, strided) give ``max(-min, max)`` from ``torch.aminmax`` (a dot is
    slow for 16-bit types on CPU, and ``vector_norm(x, inf)`` several times slower than either).
    """
    with torch.no_grad():
        dots = [x.dtype in _BY_DOT and x.is_contiguous() for x in xs]
        ends: list[torch.Tensor] = []
        for x, dot in zip(xs, dots):
            if not x.numel():
                continue
            if dot:
                flat = x.view(-1)
                ends.append(torch.dot(flat, flat))
            else:
                ends += torch.aminmax(torch.view_as_real(x) if x.is_complex() else x)
        read = iter(to_host(ends))
    out = []
    for x, dot in zip(xs, dots):
        if not x.numel():
            out.append(0.0)
        elif dot:
            square = next(read)
            out.append(2.0 * math.sqrt(square) if square >= 0.0 else math.nan)  # NaN: False
        else:
            low, high = next(read), next(read)
            out.append(math.nan if math.isnan(low) or math.isnan(high) else max(high, -low))
    return out


def peak(xs: Sequence[torch.Tensor]) -> float:
    """``max |x|`` over all elements of ``xs`` (0.0 for none; NaN if one is NaN)."""
    tops = peaks(xs)
    return math.nan if any(math.isnan(t) for t in tops) else max(tops, default=0.0)


def to_host(scalars: list[torch.Tensor]) -> list[Any]:
    """Python numbers from 0-dim tensors: one transfer per device, not one per tensor."""
    out: list[Any] = [None] * len(scalars)
    by_device: dict[torch.device, list[int]] = {}
    for i, x in enumerate(scalars):
        by_device.setdefault(x.device, []).append(i)
    for index in by_device.values():
        if len(index) == 1:
            out[index[0]] = scalars[index[0]].item()
            continue
        for i, value in zip(index, torch.stack([scalars[i] for i in index]).tolist()):
            out[i] = value
    return out
