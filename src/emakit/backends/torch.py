"""The torch backend: grouped ``torch._foreach_*`` kernels, the only place that uses them.

Shadows are grouped by (shadow device, shadow dtype, source device, source dtype). A group whose
source already has the shadow's dtype and device is one ``_foreach_lerp_``. A group that needs a
conversion (fp32 shadow of a bf16 model, shadow offloaded to another device) goes through a
preallocated staging buffer in chunks: ``_foreach_copy_`` converts a chunk of sources into views of
the staging buffer, ``_foreach_lerp_`` folds them in; no per-tensor Python loop, no allocation per
update, and transient memory bounded by the chunk size. Nothing here reads a tensor value on the
host, so an update never synchronises with the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from emakit.backends import Plan, TensorInfo, bad_dtype

__all__ = ["BACKEND", "TorchBackend"]

_STAGING_ELEMENTS = 1 << 18  # 256K elements (1 MB in fp32): the staged chunk stays in cache
_HALF = (torch.float16, torch.bfloat16)
# tensor types whose storage can be re-pointed with ``.data =`` (not subclasses such as DTensor)
_PLAIN = (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", torch.Tensor))
_EXAMPLE = "dtype=torch.float32 or dtype='float32'"


class _Direct:
    """Sources already in the shadows' dtype and device: one ``_foreach_lerp_``."""

    def __init__(self, index: list[int], shadows: list[torch.Tensor], whole: bool) -> None:
        self.index = index
        self.shadows = shadows
        self.whole = whole  # the group is every shadow in order: pass the sources list as is

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        srcs = sources if self.whole and isinstance(sources, list) else [
            sources[i] for i in self.index]
        torch._foreach_lerp_(self.shadows, srcs, weight)


class _Staged:
    """Sources needing a dtype or device conversion: chunked through a staging buffer."""

    def __init__(self, index: list[int], shadows: list[torch.Tensor]) -> None:
        self.index = index
        self.shadows = shadows
        sizes = [s.numel() for s in shadows]
        budget = max(min(_STAGING_ELEMENTS, sum(sizes)), *sizes)
        self.staging = torch.empty(budget, dtype=shadows[0].dtype, device=shadows[0].device)
        self.chunks: list[tuple[int, int, list[torch.Tensor]]] = []
        lo, used = 0, 0
        views: list[torch.Tensor] = []
        for j, (shadow, n) in enumerate(zip(shadows, sizes)):
            if used + n > budget:
                self.chunks.append((lo, j, views))
                lo, used, views = j, 0, []
            views.append(self.staging[used:used + n].view(shadow.shape))
            used += n
        self.chunks.append((lo, len(shadows), views))

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        srcs = [sources[i] for i in self.index]
        for lo, hi, views in self.chunks:
            torch._foreach_copy_(views, srcs[lo:hi])
            torch._foreach_lerp_(self.shadows[lo:hi], views, weight)


class _Loop:
    """The plain per-tensor loop: the reference the fast path is tested against."""

    def __init__(self, shadows: Sequence[torch.Tensor]) -> None:
        self.shadows = list(shadows)

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        with torch.no_grad():
            for shadow, src in zip(self.shadows, sources):
                shadow.lerp_(src.to(device=shadow.device, dtype=shadow.dtype), weight)


class _Grouped:
    def __init__(self, shadows: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
        keys: dict[tuple[Any, ...], list[int]] = {}
        for i, (shadow, src) in enumerate(zip(shadows, sources)):
            key = (shadow.device, shadow.dtype, src.device, src.dtype)
            keys.setdefault(key, []).append(i)
        self.parts: list[_Direct | _Staged] = []
        for (sh_dev, sh_dt, src_dev, src_dt), index in keys.items():
            group = [shadows[i] for i in index]
            if sh_dev == src_dev and sh_dt == src_dt:
                self.parts.append(_Direct(index, group, whole=len(keys) == 1))
            else:
                self.parts.append(_Staged(index, group))

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        with torch.no_grad():
            for part in self.parts:
                part.lerp_(sources, weight)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TorchBackend:
    """torch tensors on any device."""

    name = "torch"

    def is_tensor(self, x: object) -> bool:
        return isinstance(x, torch.Tensor)

    def info(self, x: Any) -> TensorInfo:
        return TensorInfo(tuple(x.shape), _dtype_name(x.dtype), str(x.device),
                          x.is_floating_point() or x.is_complex())

    def signature(self, xs: Sequence[Any]) -> list[tuple[Any, ...]]:
        return [(x.shape, x.dtype, x.device) for x in xs]

    def resolve_dtype(self, spec: object) -> Any:
        if isinstance(spec, torch.dtype):
            dtype = spec
        else:
            name = spec.name if isinstance(spec, np.dtype) else str(spec).removeprefix("torch.")
            found = getattr(torch, name, None)
            if not isinstance(found, torch.dtype):
                raise bad_dtype(spec, "torch", _EXAMPLE, known=False)
            dtype = found
        if not (dtype.is_floating_point or dtype.is_complex):
            raise bad_dtype(dtype, "torch", _EXAMPLE, known=True)
        return dtype

    def shadow_dtype(self, x: Any, override: Any) -> Any:
        if override is not None:
            return override
        if x.dtype in _HALF or (x.is_floating_point() and x.element_size() == 1):
            return torch.float32
        return x.dtype

    def allocate(self, sources: Sequence[Any], dtypes: Sequence[Any], device: object,
                 zeros: bool) -> list[Any]:
        if device is not None:
            try:
                device = torch.device(device)  # type: ignore[call-overload]
            except (RuntimeError, TypeError):
                raise ValueError(
                    f"device={device!r} is not a torch device. Example: device='cpu' to keep the "
                    "shadow in host memory."
                ) from None
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for src, dtype in zip(sources, dtypes):
                target: Any = src.device if device is None else device
                shadow = torch.empty_like(src, dtype=dtype, device=target, requires_grad=False)
                if zeros:
                    shadow.zero_()
                else:
                    shadow.copy_(src)
                out.append(shadow)
        return out

    def plan(self, shadows: Sequence[Any], sources: Sequence[Any], *, fast: bool) -> Plan:
        if fast:
            return _Grouped(shadows, sources)
        return _Loop(shadows)

    def copy_(self, dsts: Sequence[Any], srcs: Sequence[Any]) -> None:
        if not dsts:
            return
        with torch.no_grad():
            torch._foreach_copy_(list(dsts), list(srcs))

    def new_counters(self, shadows: Sequence[Any]) -> Any:
        return [torch.zeros((), dtype=torch.int64, device=s.device) for s in shadows]

    def guarded_update_(self, shadows: Sequence[Any], sources: Sequence[Any],
                        weight: float | None, counters: Any) -> None:
        with torch.no_grad():
            for shadow, src, count in zip(shadows, sources, counters):
                value = src.to(device=shadow.device, dtype=shadow.dtype)
                if not (src.is_floating_point() or src.is_complex()):
                    shadow.copy_(value)
                    continue
                ok = torch.isfinite(value).all()
                clean = torch.where(ok, value, shadow)
                if weight is None:
                    shadow.copy_(clean)
                else:
                    shadow.lerp_(clean, weight)
                count.add_(ok.logical_not().to(count.device))

    def counts(self, counters: Any) -> list[int]:
        return [int(c.item()) for c in counters]

    def scaled(self, xs: Sequence[Any], divisor: float) -> list[Any]:
        with torch.no_grad():
            return list(torch._foreach_div(list(xs), divisor))

    def clone(self, x: Any, device: object = None) -> Any:
        with torch.no_grad():
            if device is None:
                return x.detach().clone()
            return x.detach().to(device=device, copy=True)

    def converted(self, x: Any, like: Any, device: object = None) -> Any:
        with torch.no_grad():
            return x.detach().to(dtype=like.dtype, device=device, copy=True)

    def can_alias(self, target: Any, value: Any) -> bool:
        plain = type(target) in _PLAIN and type(value) is torch.Tensor
        return bool(plain and target.dtype == value.dtype and target.device == value.device
                    and target.shape == value.shape and target.stride() == value.stride())

    def repoint(self, target: Any, value: Any) -> Any:
        previous = target.data
        target.data = value
        return previous

    def as_native(self, x: object, name: str) -> Any:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, np.ndarray):
            return torch.from_numpy(x)
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}.")


BACKEND = TorchBackend()
