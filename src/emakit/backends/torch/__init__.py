"""The torch backend: grouped ``torch._foreach_*`` kernels, the only place that uses them.

Modules: :mod:`~emakit.backends.torch.layout` (where tensors lie: dense strides, runs, groups),
:mod:`~emakit.backends.torch.parts` (the kernels of one group: direct or staged),
:mod:`~emakit.backends.torch.offload` (host shadows of a CUDA model, folded in off-thread),
:mod:`~emakit.backends.torch.plan` (one EMA's prepared update and its per-update check),
:mod:`~emakit.backends.torch.shared` (several averages in one pass), and this adapter, which
implements the :class:`emakit.backends.Backend` protocol. Nothing here reads a tensor value on
the host or waits for the device on the calling thread during an update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from emakit.backends.base import Backend, Plan, TensorInfo, bad_dtype
from emakit.backends.torch.layout import PLAIN, is_dense, source_runs
from emakit.backends.torch.offload import Offloaded
from emakit.backends.torch.parts import Native, Staged
from emakit.backends.torch.plan import TorchPlan
from emakit.backends.torch.readback import peak, to_host
from emakit.backends.torch.shared import NativeShared, SharedRead

__all__ = ["BACKEND", "TorchBackend", "is_dense"]

_HALF = (torch.float16, torch.bfloat16)
_EXAMPLE = "dtype=torch.float32 or dtype='float32'"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TorchBackend(Backend):
    """torch tensors on any device."""

    name = "torch"

    def is_tensor(self, x: object) -> bool:
        return isinstance(x, torch.Tensor)

    def info(self, x: Any) -> TensorInfo:
        return TensorInfo(tuple(x.shape), _dtype_name(x.dtype), str(x.device),
                          x.is_floating_point() or x.is_complex())

    def resolve_dtype(self, spec: object) -> Any:
        if isinstance(spec, torch.dtype):
            dtype = spec
        else:
            if isinstance(spec, type) and issubclass(spec, np.generic):
                spec = np.dtype(spec)  # np.float32, the type object
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
            if device.type == "cuda" and not torch.cuda.is_available():  # type: ignore[attr-defined]
                raise ValueError(f"device={str(device)!r}: this torch ({torch.__version__}) sees "
                                 "no CUDA device. Leave device unset (the shadows go where the "
                                 "weights are) or give device='cpu'.")
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for run in source_runs(sources, dtypes):
                first = sources[run[0]]
                target: Any = first.device if device is None else device
                if len(run) == 1:
                    shadow = torch.empty_like(first, dtype=dtypes[run[0]], device=target,
                                              requires_grad=False)
                    out.append(shadow.zero_() if zeros else shadow.copy_(first))
                    continue
                buffer = torch.empty(sum(sources[i].numel() for i in run),
                                     dtype=dtypes[run[0]], device=target)
                offset = 0
                for i in run:
                    src = sources[i]
                    shadow = buffer.as_strided(src.shape, src.stride(), offset)
                    offset += src.numel()
                    out.append(shadow.zero_() if zeros else shadow.copy_(src))
        return out

    def plan(self, avg_shadows: Sequence[Any], copy_shadows: Sequence[Any],
             sources: Sequence[Any], *, fast: bool, overlap: bool = False) -> Plan:
        return TorchPlan(avg_shadows, copy_shadows, sources, fast, overlap)

    def shared_read(self, plans: Sequence[Any]) -> Any:
        # every plan must be one held run over the same source memory, into shadows of one kind
        if len(plans) < 2 or any(p.loop or len(p.lerps) != 1 for p in plans):
            return None
        parts = [p.lerps[0] for p in plans]
        first = parts[0]
        if isinstance(first, Native):
            return NativeShared.of(parts)
        if isinstance(first, Offloaded) or first.loose or len(first.held_sources) != 1:
            return None
        source, shadow = first.held_sources[0], first.held_shadows[0]
        for part in parts:
            if (type(part) is not type(first) or part.loose or len(part.held_sources) != 1
                    or part.held_sources[0].data_ptr() != source.data_ptr()
                    or part.held_sources[0].numel() != source.numel()
                    or part.held_shadows[0].dtype != shadow.dtype
                    or part.held_shadows[0].device != shadow.device):
                return None
        if isinstance(first, Staged) and \
                any(len(p.chunks) != len(first.chunks) for p in parts):
            return None
        return SharedRead(parts)

    def copy_(self, dsts: Sequence[Any], srcs: Sequence[Any]) -> None:
        if not dsts:
            return
        with torch.no_grad():
            torch._foreach_copy_(list(dsts), list(srcs))

    def guarded_update_(self, shadows: Sequence[Any], sources: Sequence[Any],
                        decay: float | None) -> list[bool]:
        done: list[bool] = []
        with torch.no_grad():
            for shadow, src in zip(shadows, sources):
                if not (src.is_floating_point() or src.is_complex()):
                    shadow.copy_(src)
                    done.append(True)
                    continue
                # NaN/Inf in the source, or a finite source that overflows the shadow's dtype
                # (or the lerp), makes the result non-finite: keep the shadow then
                value = src.to(device=shadow.device, dtype=shadow.dtype)
                new = value if decay is None else torch.lerp(shadow, value, 1.0 - decay)
                ok = bool(torch.isfinite(new).all())
                if ok:
                    shadow.copy_(new)
                done.append(ok)
        return done

    def largest(self, xs: Sequence[Any]) -> float:
        return peak([x for x in xs if x.is_floating_point() or x.is_complex()])

    def headroom(self, xs: Sequence[Any]) -> float:
        maxima = [torch.finfo(x.dtype).max for x in xs if x.is_floating_point()]
        return min(maxima, default=float("inf")) / 2

    def finite(self, xs: Sequence[Any]) -> list[bool]:
        flags = [torch.isfinite(x).all() if x.is_floating_point() or x.is_complex()
                 else torch.ones((), dtype=torch.bool, device=x.device) for x in xs]
        return [bool(f) for f in to_host(flags)]

    def scaled(self, xs: Sequence[Any], divisor: float | Sequence[float]) -> list[Any]:
        with torch.no_grad():
            scalars = divisor if isinstance(divisor, float) else list(divisor)
            return list(torch._foreach_div(list(xs), scalars))

    def shifted(self, base: Sequence[Any], current: Sequence[Any], origin: Sequence[Any],
                alpha: float) -> list[Any]:
        if not base:
            return []
        with torch.no_grad():
            now = [c.to(device=b.device, dtype=b.dtype) for b, c in zip(base, current)]
            return list(torch._foreach_add(list(base), torch._foreach_sub(now, list(origin)),
                                           alpha=alpha))

    def clone(self, x: Any, device: object = None) -> Any:
        with torch.no_grad():
            if device is None:
                return x.detach().clone()
            return x.detach().to(device=device, copy=True)

    def converted(self, x: Any, like: Any, device: object = None) -> Any:
        with torch.no_grad():
            return x.detach().to(dtype=like.dtype, device=device, copy=True)

    def can_alias(self, target: Any, value: Any) -> bool:
        plain = type(target) in PLAIN and type(value) is torch.Tensor
        return bool(plain and target.dtype == value.dtype and target.device == value.device
                    and target.shape == value.shape and target.stride() == value.stride())

    def repoint(self, target: Any, value: Any) -> Any:
        previous = target.data
        target.data = value
        return previous

    def writes(self, x: Any) -> int | None:
        try:
            return int(x._version)  # autograd's version counter: bumped by every in-place op
        except RuntimeError:  # an inference tensor keeps none
            return None

    def as_native(self, x: object, name: str) -> Any:
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biufc":
                raise TypeError(f"{name} must hold numbers, got a numpy array of {x.dtype}.")
            return torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}.")
        if x.layout != torch.strided or x.device.type == "meta" or x.is_quantized:
            what = "meta" if x.device.type == "meta" else \
                "quantized" if x.is_quantized else str(x.layout).removeprefix("torch.")
            raise TypeError(f"{name} is a {what} tensor; a shadow must be a dense tensor that "
                            "holds its values.")
        return x


BACKEND = TorchBackend()
