"""The torch backend: grouped ``torch._foreach_*`` kernels, the only place that uses them.

Shadows are grouped by (shadow device, shadow dtype, source device, source dtype). Within a group,
pairs that lie back to back in memory on both sides (a module laid out by
:func:`emakit.flatten_parameters`, whose shadows are then allocated flat too) form a *run*, held by
the plan as two 1-D views, so one kernel covers the run; other tensors stay loose. A group whose
source already has the shadow's dtype and device is one ``lerp_`` (one run) or one
``_foreach_lerp_`` (runs and loose tensors together). A group that needs a conversion (fp32
shadow of a bf16 model, shadow on another device) goes through a preallocated staging
buffer in chunks: ``_foreach_copy_`` converts a chunk into views of the staging buffer,
``_foreach_lerp_`` folds it in; no per-tensor Python loop, no allocation per update. A CUDA
model's group with host shadows is copied without blocking into a pinned host mirror and folded
in by a background thread (:class:`_Offloaded`); ``Plan.settle`` waits for it. Each update
re-checks the plan: one pointer read per held tensor (sound, because the plan keeps that memory
alive), shape/dtype/device for loose ones. Nothing here reads a tensor value on the host or
waits for the device on the calling thread, so an update never synchronises with the device.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from emakit import flat
from emakit.backends import Plan, TensorInfo, bad_dtype

__all__ = ["BACKEND", "TorchBackend", "is_dense"]

_STAGING_ELEMENTS = 1 << 20  # 1M elements (4 MB in fp32): a staged chunk stays in the caches
_HALF = (torch.float16, torch.bfloat16)
# tensor types whose storage can be re-pointed with ``.data =`` (not subclasses such as DTensor)
_PLAIN = (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", torch.Tensor))
_EXAMPLE = "dtype=torch.float32 or dtype='float32'"


def _signature(xs: Sequence[torch.Tensor]) -> list[tuple[Any, ...]]:
    return [(x.shape, x.dtype, x.device) for x in xs]


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


def _pairable(shadow: torch.Tensor, src: torch.Tensor) -> bool:
    """Elementwise the same memory layout: the flat views of the two line up element by element."""
    return bool(type(src) in _PLAIN and shadow.shape == src.shape
                and shadow.stride() == src.stride() and is_dense(src) and is_dense(shadow))


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``b`` starts where dense ``a`` ends, in the same storage."""
    return bool(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size())


def _region(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 1-D view over the memory of dense tensors that lie back to back in one storage."""
    first = ts[0].detach()
    return first.as_strided((sum(t.numel() for t in ts),), (1,), first.storage_offset())


def _runs(shadows: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]
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
        if not _pairable(shadow, src):
            loose.append(k)
            continue
        if current and _follows(shadows[current[-1]], shadow) and \
                _follows(sources[current[-1]], src):
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


class _Part:
    """The pairs of one (shadow device, dtype, source device, dtype) group, as kernel operands.

    Runs become one pair of 1-D views each, held by the part (so their storage stays alive and
    a source at the recorded address is still that memory); loose tensors are read from the
    sources list at every update.
    """

    def __init__(self, index: list[int], shadows: list[torch.Tensor],
                 sources: list[torch.Tensor]) -> None:
        runs, loose = _runs(shadows, sources)
        self.held = [index[k] for run in runs for k in run]
        self.held_shadows = [_region([shadows[k] for k in run]) for run in runs]
        self.held_sources = [_region([sources[k] for k in run]) for run in runs]
        self.loose = [index[k] for k in loose]
        self.loose_shadows = [shadows[k] for k in loose]
        self.shadows = self.held_shadows + self.loose_shadows

    def sources(self, sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.loose:
            return self.held_sources
        return self.held_sources + [sources[i] for i in self.loose]

    def copy_(self, sources: Sequence[torch.Tensor]) -> None:
        _copy_all(self.shadows, self.sources(sources))


def _copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor], *,
              non_blocking: bool = False) -> None:
    """``dsts[i].copy_(srcs[i])`` for all i, as one kernel call where there are several."""
    if len(dsts) == 1:
        dsts[0].copy_(srcs[0], non_blocking=non_blocking)
    elif dsts:
        torch._foreach_copy_(dsts, srcs, non_blocking=non_blocking)


class _Direct(_Part):
    """Sources already in the shadows' dtype and device: one ``lerp_`` (or copy) per group."""

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        srcs = self.sources(sources)
        if len(srcs) == 1:
            self.shadows[0].lerp_(srcs[0], weight)
        elif srcs:
            torch._foreach_lerp_(self.shadows, srcs, weight)



class _Staged(_Part):
    """Sources needing a dtype or device conversion: chunked through a staging buffer.

    Chunk by chunk, ``_foreach_copy_`` converts sources into views of a preallocated staging
    buffer and ``_foreach_lerp_`` folds them in: no allocation per update, and the converted
    chunk is still in the caches when the lerp reads it. Held runs are cut into pieces of at
    most the staging size; a loose tensor larger than that gets a staging buffer of its size.
    """

    def __init__(self, index: list[int], shadows: list[torch.Tensor],
                 sources: list[torch.Tensor]) -> None:
        super().__init__(index, shadows, sources)
        loose_sizes = [s.numel() for s in self.loose_shadows]
        total = sum(s.numel() for s in self.shadows)
        budget = max(min(_STAGING_ELEMENTS, total), *loose_sizes, 1)
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
        for piece, where in items:
            n = piece.numel()
            if used + n > budget:
                self.chunks.append(chunk)
                chunk, used = ([], [], []), 0
            chunk[0].append(piece)
            chunk[1].append(where)
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


def _offloads(source: torch.device, shadow: torch.device) -> bool:
    """Whether a group goes through :class:`_Offloaded`: a CUDA model with host shadows."""
    return source.type == "cuda" and shadow.type == "cpu"


def _mirror(sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Host tensors shaped like ``sources``, back to back in one buffer (pinned for CUDA).

    Dense sources keep their strides, so a mirror view and its source line up element by
    element and sources back to back in memory give mirror views back to back too (one run).
    """
    first = sources[0]
    buffer = torch.empty(sum(s.numel() for s in sources), dtype=first.dtype,
                         pin_memory=first.device.type == "cuda")
    views, offset = [], 0
    for src in sources:
        n = src.numel()
        if is_dense(src):
            views.append(buffer.as_strided(src.shape, src.stride(), offset))
        else:
            views.append(buffer[offset:offset + n].view(src.shape))
        offset += n
    return views


def _transfer_done(device: torch.device) -> Any:
    """An event on ``device``'s current stream after the copies enqueued so far (CUDA)."""
    if device.type != "cuda":
        return None  # host copies are complete when copy_ returns
    return torch.cuda.current_stream(device).record_event()


_WORKER: futures.ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> futures.ThreadPoolExecutor:
    """The one background thread that folds offloaded copies into host shadows (FIFO)."""
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = futures.ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="emakit-offload")
        return _WORKER


def _forget_worker() -> None:  # a forked child has no worker thread: start a new one when needed
    global _WORKER
    _WORKER = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker)


class _Offloaded(_Part):
    """A CUDA model's group with shadows in host memory: copied over, then folded in off-thread.

    ``lerp_`` (or ``copy_``) only enqueues work and returns: the sources are copied with
    ``non_blocking=True`` into a pinned host mirror on the current CUDA stream, an event is
    recorded after them, and the background worker waits for that event and runs the host
    update (:class:`_Direct` or :class:`_Staged` over the mirror) while the host thread goes on
    launching the next step. The host never waits for the GPU here (no synchronisation).
    Later kernels on the stream (the next optimizer step) run after the copies, so the mirror
    holds the weights of this update. :meth:`settle` waits for the worker; the next update
    settles the previous one first, since it reuses the mirror.

    With ``overlap`` the copies run on a side stream instead, alongside the next forward and
    backward pass; :meth:`fence` (called before the next optimizer step) makes the current
    stream wait for them on the GPU. That is only right when nothing but that step writes the
    sources in between, which ``EMA.attach(optimizer, overlap=True)`` checks for what it can.

    As a :class:`_Part` this is the pairs (mirror, source): runs of sources back to back (a
    flattened model) are copied with one ``copy_`` each.
    """

    def __init__(self, index: list[int], shadows: list[torch.Tensor],
                 sources: list[torch.Tensor], overlap: bool = False) -> None:
        mirror = _mirror(sources)
        super().__init__(index, mirror, sources)
        local = list(range(len(shadows)))
        same = shadows[0].dtype == sources[0].dtype
        self.host: _Direct | _Staged = (_Direct if same else _Staged)(local, shadows, mirror)
        self.mirror = mirror
        self.device = sources[0].device
        self.pending: futures.Future[None] | None = None
        overlap = overlap and self.device.type == "cuda"
        self.stream: Any = torch.cuda.Stream(self.device) if overlap else None  # type: ignore[no-untyped-call]
        self.unfenced: Any = None  # the side stream's event that the device has not waited for
        # the tensors the side stream reads, kept alive until the current stream waits for it:
        # memory freed earlier could be handed to the next step's kernels while still being read
        self.in_flight: list[torch.Tensor] = []

    def _send(self, sources: Sequence[torch.Tensor]) -> Any:
        self.settle()  # the worker must be done with the mirror before it is overwritten
        dsts, srcs = self.shadows, self.sources(sources)
        if self.stream is None:
            _copy_all(dsts, srcs, non_blocking=True)
            return _transfer_done(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            _copy_all(dsts, srcs, non_blocking=True)
        self.unfenced = done = self.stream.record_event()
        self.in_flight = srcs
        return done

    def fence(self) -> None:
        done, self.unfenced = self.unfenced, None
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
        self.in_flight = []

    def lerp_(self, sources: Sequence[torch.Tensor], weight: float) -> None:
        done = self._send(sources)
        self.pending = _worker().submit(self._fold, done, weight)

    def copy_(self, sources: Sequence[torch.Tensor]) -> None:
        done = self._send(sources)
        self.pending = _worker().submit(self._fold, done, None)

    def _fold(self, done: Any, weight: float | None) -> None:
        if done is not None:
            done.synchronize()  # releases the GIL while the copies finish
        with torch.no_grad():
            if weight is None:
                self.host.copy_(self.mirror)
            else:
                self.host.lerp_(self.mirror, weight)

    def settle(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()


class _TorchPlan:
    """The prepared update of one EMA: averaged groups, copied groups, and how to re-check them.

    :meth:`fits` is what every update pays to know the plan still describes the sources: one
    pointer read per tensor held in a run (sound because the plan keeps that memory alive),
    and shape/dtype/device for loose tensors (they are read afresh anyway).
    """

    def __init__(self, avg_shadows: Sequence[torch.Tensor], copy_shadows: Sequence[torch.Tensor],
                 sources: Sequence[torch.Tensor], fast: bool, overlap: bool) -> None:
        n = len(avg_shadows)
        self.loop = not fast
        self.avg_shadows = list(avg_shadows)
        self.copy_shadows = list(copy_shadows)
        self.lerps: list[_Direct | _Staged | _Offloaded] = []
        self.copies: list[_Direct | _Staged | _Offloaded] = []  # never _Staged (see _part)
        if fast:
            for index in _groups(avg_shadows, sources[:n]):
                shadows, srcs = [avg_shadows[i] for i in index], [sources[i] for i in index]
                self.lerps.append(_part(shadows, srcs, index, overlap, copied=False))
            for index in _groups(copy_shadows, sources[n:]):
                at = [n + i for i in index]
                shadows, srcs = [copy_shadows[i] for i in index], [sources[i] for i in at]
                self.copies.append(_part(shadows, srcs, at, overlap, copied=True))
        parts = [*self.lerps, *self.copies]
        self.offloaded = [p for p in parts if isinstance(p, _Offloaded)]
        held = sorted(i for p in parts for i in p.held)
        self.held = held if len(held) < len(sources) else None  # None: every source is held
        self.held_ptrs = [sources[i].data_ptr() for i in held]
        self.loose = sorted(set(range(len(sources))) - set(held))
        self.loose_signature = _signature([sources[i] for i in self.loose])
        self.generation = flat.generation
        # held runs are detached views: autograd needs switching off only for loose sources
        detached = fast and not any(p.loose for p in self.lerps)
        self.grad_off: Any = contextlib.nullcontext() if detached else torch.no_grad()

    def fits(self, sources: Sequence[torch.Tensor]) -> bool:
        if flat.generation != self.generation:  # a module was flattened: look for runs again
            return False
        try:
            if self.held is None:
                return list(map(torch.Tensor.data_ptr, sources)) == self.held_ptrs
            if self.held_ptrs and [sources[i].data_ptr() for i in self.held] != self.held_ptrs:
                return False
            return _signature([sources[i] for i in self.loose]) == self.loose_signature
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

    def settle(self) -> None:
        for part in self.offloaded:
            part.settle()

    def fence(self) -> None:
        for part in self.offloaded:
            part.fence()


def _part(shadows: list[torch.Tensor], sources: list[torch.Tensor], index: list[int],
          overlap: bool, *, copied: bool) -> _Direct | _Staged | _Offloaded:
    """The part for one group, by the kind of its shadows and sources.

    Copied tensors keep their dtype, and a plain ``copy_`` moves them to another device, so
    they need no staging; only a CUDA model's copies to host shadows go through the mirror.
    """
    shadow, source = shadows[0], sources[0]
    if _offloads(source.device, shadow.device):
        return _Offloaded(index, shadows, sources, overlap)
    if copied or (shadow.dtype == source.dtype and shadow.device == source.device):
        return _Direct(index, shadows, sources)
    return _Staged(index, shadows, sources)


def _source_runs(sources: Sequence[torch.Tensor], dtypes: Sequence[Any]) -> list[list[int]]:
    """Positions in order, cut into runs of sources back to back in memory (one flat shadow each).

    Only a flattened module (:func:`emakit.flatten_parameters`) has runs longer than one; every
    other tensor gets a shadow of its own, so a saved shadow never drags a larger buffer along.
    """
    runs: list[list[int]] = []
    for i, src in enumerate(sources):
        if runs and type(src) in _PLAIN and is_dense(src):
            j = runs[-1][-1]
            prev = sources[j]
            if dtypes[j] == dtypes[i] and prev.device == src.device and is_dense(prev) and \
                    _follows(prev, src):
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


_SHARED_CHUNK = 1 << 21  # 2M elements (8 MB in fp32): read from memory once, then from the cache


class _SharedRead:
    """Several averages of one flat source region: chunk by chunk, every shadow folds in the chunk.

    The source chunk comes from memory for the first average and from the cache for the others,
    so an update of N averages moves ``4 + 8 N`` bytes per fp32 parameter instead of ``12 N``. For
    a source that needs a conversion (bf16 model, fp32 shadows) each chunk is converted once into
    the first plan's staging buffer and folded into every average from there.
    """

    def __init__(self, parts: Sequence[_Direct | _Staged]) -> None:
        self.staged = isinstance(parts[0], _Staged)
        self.chunks: list[tuple[Any, Any, list[list[torch.Tensor]]]] = []
        if self.staged:
            first = parts[0]
            assert isinstance(first, _Staged)  # checked by shared_read(); internal invariant
            for c, (_, srcs, views) in enumerate(first.chunks):
                self.chunks.append((srcs, views, [p.chunks[c][0] for p in parts]))  # type: ignore[union-attr]
        else:
            source = parts[0].held_sources[0]
            for lo in range(0, source.numel(), _SHARED_CHUNK):
                hi = lo + _SHARED_CHUNK
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


def _groups(shadows: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> list[list[int]]:
    """Positions grouped by (shadow device, shadow dtype, source device, source dtype)."""
    keys: dict[tuple[Any, ...], list[int]] = {}
    for i, (shadow, src) in enumerate(zip(shadows, sources)):
        keys.setdefault((shadow.device, shadow.dtype, src.device, src.dtype), []).append(i)
    return list(keys.values())


def _to_host(scalars: list[torch.Tensor]) -> list[Any]:
    """Python numbers from 0-dim tensors: one transfer per device, not one per tensor."""
    out: list[Any] = [None] * len(scalars)
    by_device: dict[torch.device, list[int]] = {}
    for i, x in enumerate(scalars):
        by_device.setdefault(x.device, []).append(i)
    for index in by_device.values():
        for i, value in zip(index, torch.stack([scalars[i] for i in index]).tolist()):
            out[i] = value
    return out


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
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for run in _source_runs(sources, dtypes):
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
        return _TorchPlan(avg_shadows, copy_shadows, sources, fast, overlap)

    def shared_read(self, plans: Sequence[Any]) -> Any:
        # every plan must be one held run over the same source memory, into shadows of one kind
        if len(plans) < 2 or any(p.loop or len(p.lerps) != 1 for p in plans):
            return None
        parts = [p.lerps[0] for p in plans]
        first = parts[0]
        if isinstance(first, _Offloaded) or first.loose or len(first.held_sources) != 1:
            return None
        source, shadow = first.held_sources[0], first.held_shadows[0]
        for part in parts:
            if (type(part) is not type(first) or part.loose or len(part.held_sources) != 1
                    or part.held_sources[0].data_ptr() != source.data_ptr()
                    or part.held_sources[0].numel() != source.numel()
                    or part.held_shadows[0].dtype != shadow.dtype
                    or part.held_shadows[0].device != shadow.device):
                return None
        if isinstance(first, _Staged) and \
                any(len(p.chunks) != len(first.chunks) for p in parts):
            return None
        return _SharedRead(parts)

    def copy_(self, dsts: Sequence[Any], srcs: Sequence[Any]) -> None:
        if not dsts:
            return
        with torch.no_grad():
            torch._foreach_copy_(list(dsts), list(srcs))

    def new_counters(self, shadows: Sequence[Any], *, product: bool = False) -> Any:
        if product:
            return [torch.ones((), dtype=torch.float64, device=s.device) for s in shadows]
        return [torch.zeros((), dtype=torch.int64, device=s.device) for s in shadows]

    def guarded_update_(self, shadows: Sequence[Any], sources: Sequence[Any],
                        decay: float | None, counters: Any, products: Any = None) -> None:
        with torch.no_grad():
            for i, (shadow, src) in enumerate(zip(shadows, sources)):
                value = src.to(device=shadow.device, dtype=shadow.dtype)
                if not (src.is_floating_point() or src.is_complex()):
                    shadow.copy_(value)
                    continue
                # NaN/Inf in the source, or a finite source that overflows the shadow's dtype
                # (or the lerp), makes the result non-finite: keep the shadow then
                new = value if decay is None else torch.lerp(shadow, value, 1.0 - decay)
                ok = torch.isfinite(new).all()
                shadow.copy_(torch.where(ok, new, shadow))
                counters[i].add_(ok.logical_not().to(counters[i].device))
                if products is not None and decay is not None:
                    product = products[i]  # float64: multiply in float64, not in a float32 temp
                    product.copy_(torch.where(ok.to(product.device), product * decay, product))

    def counts(self, counters: Any) -> list[Any]:
        return _to_host(list(counters))

    def finite(self, xs: Sequence[Any]) -> list[bool]:
        flags = [torch.isfinite(x).all() if x.is_floating_point() or x.is_complex()
                 else torch.ones((), dtype=torch.bool, device=x.device) for x in xs]
        return [bool(f) for f in _to_host(flags)]

    def scaled(self, xs: Sequence[Any], divisor: float | Sequence[float]) -> list[Any]:
        with torch.no_grad():
            scalars = divisor if isinstance(divisor, float) else list(divisor)
            return list(torch._foreach_div(list(xs), scalars))

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
