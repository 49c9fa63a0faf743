"""The numpy backend: shadows laid out in one flat buffer per dtype, updated in a few C calls.

The lerp reproduces ``torch.lerp``'s rounding (see ``docs/math.md``): for float32 and float16 the
fused multiply-add is emulated exactly in float64 (a float32 product is exact in float64), so the
numpy and torch backends agree bitwise on float32 shadows. float64 shadows use the unfused
formula (numpy has no FMA) and agree with torch to within an ulp per update.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from emakit.backends.base import Backend, GroupInfo, Plan, TensorInfo, bad_dtype

__all__ = ["BACKEND", "NumpyBackend", "lerp_into"]

Array = npt.NDArray[Any]
_CHUNK = 1 << 16  # elements per slice of the flat update: temporaries stay in cache
_HALF_LIKE = (np.dtype(np.float16), np.dtype(np.float32))


def lerp_into(out: Array, end: Array, weight: float) -> None:
    """In place ``out <- lerp(out, end, weight)`` with torch's rounding.

    ``out`` and ``end`` are 1-D arrays of the same dtype and length. The formula is
    ``out + w (end - out)`` for ``|w| < 0.5`` and ``end - (end - out)(1 - w)`` otherwise, each
    with one rounding of the multiply-add (as ``torch.lerp`` on CPU and CUDA).
    """
    dtype = out.dtype
    if dtype in _HALF_LIKE:
        w32 = np.float32(weight)
        small = abs(float(w32)) < 0.5
        factor = np.float64(w32) if small else np.float64(np.float32(1.0) - w32)
        for lo in range(0, out.shape[0], _CHUNK):
            s = out[lo:lo + _CHUNK].astype(np.float32)
            e = end[lo:lo + _CHUNK].astype(np.float32)
            diff = (e - s).astype(np.float64)
            base = s if small else e
            wide = base.astype(np.float64)
            out[lo:lo + _CHUNK] = (wide + factor * diff if small else wide - diff * factor
                                   ).astype(np.float32)
        return
    w = dtype.type(weight)
    small = abs(float(w)) < 0.5
    one_minus = dtype.type(1) - w
    for lo in range(0, out.shape[0], _CHUNK):
        s = out[lo:lo + _CHUNK]
        e = end[lo:lo + _CHUNK]
        gap = e - s
        out[lo:lo + _CHUNK] = s + w * gap if small else e - gap * one_minus


def _flat(x: Array) -> Array:
    """A 1-D view of a C-contiguous array (the shadows are allocated that way)."""
    return x.reshape(-1)


class _FlatGroup:
    """Shadows of one dtype that are consecutive views of one flat buffer."""

    def __init__(self, index: list[int], flat: Array) -> None:
        self.index = index
        self.flat = flat
        self.staging = np.empty_like(flat)

    def lerp_(self, sources: Sequence[Array], weight: float) -> None:
        parts = [np.asarray(sources[i]).reshape(-1) for i in self.index]
        np.concatenate(parts, out=self.staging, casting="unsafe")
        lerp_into(self.flat, self.staging, weight)


class _NumpyPlan(Plan):
    def __init__(self, avg_shadows: Sequence[Array], copy_shadows: Sequence[Array],
                 sources: Sequence[Any], fast: bool) -> None:
        self.shadows = list(avg_shadows)
        self.copy_shadows = list(copy_shadows)
        self.signature = _signature(sources)
        self.source_dtypes = [np.asarray(x).dtype.name for x in sources]
        self.groups: list[_FlatGroup] = []
        self.loose: list[int] = list(range(len(self.shadows)))
        if fast:
            self.groups, self.loose = _flat_groups(self.shadows)

    def fits(self, sources: Sequence[Any]) -> bool:
        try:
            return _signature(sources) == self.signature
        except AttributeError:  # an entry is no longer an array: validate
            return False

    def lerp_(self, sources: Sequence[Any], weight: float) -> None:
        for group in self.groups:
            group.lerp_(sources, weight)
        for i in self.loose:
            shadow = self.shadows[i]
            end = np.asarray(sources[i]).astype(shadow.dtype, copy=False)
            lerp_into(_flat(shadow), end.reshape(-1), weight)

    def copy_(self, sources: Sequence[Any]) -> None:
        for d, s in zip(self.copy_shadows, sources[len(self.shadows):]):
            np.copyto(d, s, casting="unsafe")

    def describe(self) -> tuple[GroupInfo, ...]:
        def where(dtypes: Sequence[str]) -> str:
            return ", ".join(f"{d}@cpu" for d in sorted(set(dtypes)))

        n = len(self.shadows)
        out = [GroupInfo("average", "direct", len(g.index), 1, 0, where([g.flat.dtype.name]),
                         where([self.source_dtypes[i] for i in g.index])) for g in self.groups]
        if self.loose:
            out.append(GroupInfo("average", "loop", len(self.loose), 0, len(self.loose),
                                 where([self.shadows[i].dtype.name for i in self.loose]),
                                 where([self.source_dtypes[i] for i in self.loose])))
        if self.copy_shadows:
            out.append(GroupInfo("copy", "loop", len(self.copy_shadows), 0,
                                 len(self.copy_shadows),
                                 where([s.dtype.name for s in self.copy_shadows]),
                                 where(self.source_dtypes[n:])))
        return tuple(out)


def _signature(xs: Sequence[Any]) -> list[tuple[Any, ...]]:
    return [(x.shape, x.dtype) for x in xs]


def _flat_groups(shadows: list[Array]) -> tuple[list[_FlatGroup], list[int]]:
    """Find runs of shadows that tile one flat base buffer in order; the rest stay loose."""
    by_base: dict[int, list[int]] = {}
    loose: list[int] = []
    for i, s in enumerate(shadows):
        base = s.base
        if isinstance(base, np.ndarray) and base.ndim == 1 and s.flags.c_contiguous:
            by_base.setdefault(id(base), []).append(i)
        else:
            loose.append(i)
    groups: list[_FlatGroup] = []
    for index in by_base.values():
        base = shadows[index[0]].base
        assert isinstance(base, np.ndarray)  # checked above; internal invariant
        start = (shadows[index[0]].ctypes.data - base.ctypes.data) // base.itemsize
        pos = start
        tiled = True
        for i in index:
            s = shadows[i]
            if (s.ctypes.data - base.ctypes.data) // base.itemsize != pos or s.dtype != base.dtype:
                tiled = False
                break
            pos += s.size
        if tiled:
            groups.append(_FlatGroup(index, base[start:pos]))
        else:
            loose.extend(index)
    return groups, sorted(loose)


class NumpyBackend(Backend):
    """numpy arrays on the CPU."""

    name = "numpy"

    def is_tensor(self, x: object) -> bool:
        return isinstance(x, np.ndarray)

    def info(self, x: Any) -> TensorInfo:
        a = np.asarray(x)
        return TensorInfo(tuple(a.shape), a.dtype.name, "cpu", a.dtype.kind in "fc")

    def resolve_dtype(self, spec: object) -> Any:
        text: Any = spec  # a numpy dtype, or its scalar type (np.float32)
        if not (isinstance(spec, np.dtype) or (isinstance(spec, type) and
                                               issubclass(spec, np.generic))):
            text = str(spec).removeprefix("torch.")
        try:
            dtype = np.dtype(text)
        except TypeError:
            raise bad_dtype(spec, "numpy", "dtype='float64'", known=False) from None
        if dtype.kind not in "fc":
            raise bad_dtype(repr(dtype.name), "numpy", "dtype='float64'", known=True)
        return dtype

    def shadow_dtype(self, x: Any, override: Any) -> Any:
        if override is not None:
            return override
        dtype = np.asarray(x).dtype
        return np.dtype(np.float32) if dtype == np.float16 else dtype

    def allocate(self, sources: Sequence[Any], dtypes: Sequence[Any], device: object,
                 zeros: bool) -> list[Any]:
        if device is not None and str(device) != "cpu":
            raise ValueError(
                f"device={device!r} is not available for numpy arrays; numpy shadows live on "
                "the CPU. Leave device unset."
            )
        sizes: dict[np.dtype[Any], int] = {}
        for src, dtype in zip(sources, dtypes):
            sizes[np.dtype(dtype)] = sizes.get(np.dtype(dtype), 0) + int(np.asarray(src).size)
        flats = {dt: np.zeros(n, dtype=dt) for dt, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        out: list[Array] = []
        for src, dtype in zip(sources, dtypes):
            a = np.asarray(src)
            dt = np.dtype(dtype)
            lo = offsets[dt]
            offsets[dt] = lo + a.size
            view = flats[dt][lo:lo + a.size].reshape(a.shape)
            if not zeros:
                np.copyto(view, a, casting="unsafe")
            out.append(view)
        return out

    def plan(self, avg_shadows: Sequence[Any], copy_shadows: Sequence[Any],
             sources: Sequence[Any], *, fast: bool, overlap: bool = False) -> Plan:
        return _NumpyPlan(avg_shadows, copy_shadows, sources, fast)  # reads before returning

    def copy_(self, dsts: Sequence[Any], srcs: Sequence[Any]) -> None:
        for d, s in zip(dsts, srcs):
            np.copyto(d, s, casting="unsafe")

    def guarded_update_(self, shadows: Sequence[Any], sources: Sequence[Any],
                        decay: float | None) -> list[bool]:
        done: list[bool] = []
        for shadow, src in zip(shadows, sources):
            a = np.asarray(src)
            if a.dtype.kind not in "fc":
                np.copyto(shadow, a, casting="unsafe")
                done.append(True)
                continue
            # convert first: a finite float64 source may overflow a float32 shadow, and the
            # lerp itself may overflow; either makes the result non-finite, which is skipped
            with np.errstate(over="ignore", invalid="ignore"):
                new = a.astype(shadow.dtype).reshape(-1)
                if decay is not None:
                    end, new = new, shadow.reshape(-1).copy()
                    lerp_into(new, end, 1.0 - decay)
            ok = bool(np.isfinite(new).all())
            if ok:
                shadow[...] = new.reshape(shadow.shape)
            done.append(ok)
        return done

    def largest(self, xs: Sequence[Any]) -> float:
        tops = [float(np.max(np.abs(x), initial=0.0)) for x in xs
                if np.asarray(x).dtype.kind in "fc"]
        return math.nan if any(math.isnan(t) for t in tops) else max(tops, default=0.0)

    def headroom(self, xs: Sequence[Any]) -> float:
        maxima = [float(np.finfo(np.asarray(x).dtype).max) for x in xs
                  if np.asarray(x).dtype.kind in "fc"]
        return min(maxima, default=math.inf) / 2

    def finite(self, xs: Sequence[Any]) -> list[bool]:
        return [bool(np.isfinite(x).all()) if np.asarray(x).dtype.kind in "fc" else True
                for x in xs]

    def scaled(self, xs: Sequence[Any], divisor: float | Sequence[float]) -> list[Any]:
        divisors = [divisor] * len(xs) if isinstance(divisor, float) else list(divisor)
        return [x / x.dtype.type(d) for x, d in zip(xs, divisors)]

    def shifted(self, base: Sequence[Any], current: Sequence[Any], origin: Sequence[Any],
                alpha: float) -> list[Any]:
        return [b + b.dtype.type(alpha) * (np.asarray(c).astype(b.dtype, copy=False) - o)
                for b, c, o in zip(base, current, origin)]

    def clone(self, x: Any, device: object = None) -> Any:
        return np.array(x, copy=True)

    def converted(self, x: Any, like: Any, device: object = None) -> Any:
        return np.array(x, dtype=like.dtype, copy=True)

    def as_native(self, x: object, name: str) -> Any:
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biufc":
                raise TypeError(f"{name} must hold numbers, got a numpy array of {x.dtype}.")
            return x
        torch_mod = sys.modules.get("torch")
        if torch_mod is not None and isinstance(x, torch_mod.Tensor):
            if x.layout != torch_mod.strided or x.device.type == "meta" or x.is_quantized:
                raise TypeError(f"{name} is not a dense tensor that holds its values.")
            t = x.detach().cpu()
            if t.dtype == torch_mod.bfloat16:
                raise TypeError(f"{name}: a bfloat16 tensor has no numpy dtype; cast it first.")
            return t.numpy()
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}.")


BACKEND = NumpyBackend()
