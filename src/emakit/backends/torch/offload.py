"""Host shadows of a CUDA model: a non-blocking copy into pinned memory, folded in off-thread.

The copy runs in stream order (the next optimizer step writes the weights only after it), and
one background thread (``emakit-offload``, FIFO, recreated after ``fork``) waits for it and
runs the host update. :meth:`Offloaded.settle` waits for that fold; :meth:`Offloaded.fence`
makes later GPU work wait for a copy made on a side stream (``attach(overlap=True)``).
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from emakit.backends.base import GroupInfo
from emakit.backends.torch.layout import is_dense, where
from emakit.backends.torch.parts import Direct, Part, Staged, copy_all

__all__ = ["Offloaded", "offloads", "worker"]


def offloads(source: torch.device, shadow: torch.device) -> bool:
    """Whether a group goes through :class:`Offloaded`: a CUDA model with host shadows."""
    return source.type == "cuda" and shadow.type == "cpu"


def host_mirror(sources: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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


def transfer_done(device: torch.device) -> Any:
    """An event on ``device``'s current stream after the copies enqueued so far (CUDA)."""
    if device.type != "cuda":
        return None  # host copies are complete when copy_ returns
    return torch.cuda.current_stream(device).record_event()


_WORKER: futures.ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()


def worker() -> futures.ThreadPoolExecutor:
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


class Offloaded(Part):
    """A CUDA model's group with shadows in host memory: copied over, then folded in off-thread.

    ``lerp_`` (or ``copy_``) only enqueues work and returns: the sources are copied with
    ``non_blocking=True`` into a pinned host mirror on the current CUDA stream, an event is
    recorded after them, and the background worker waits for that event and runs the host
    update (:class:`Direct` or :class:`Staged` over the mirror) while the host thread goes on
    launching the next step. The host never waits for the GPU here (no synchronisation).
    Later kernels on the stream (the next optimizer step) run after the copies, so the mirror
    holds the weights of this update. :meth:`settle` waits for the worker; the next update
    settles the previous one first, since it reuses the mirror.

    With ``overlap`` the copies run on a side stream instead, alongside the next forward and
    backward pass; :meth:`fence` (called before the next optimizer step) makes the current
    stream wait for them on the GPU. That is only right when nothing but that step writes the
    sources in between, which ``EMA.attach(optimizer, overlap=True)`` checks for what it can.

    As a :class:`Part` this is the pairs (mirror, source): runs of sources back to back (a
    flattened model) are copied with one ``copy_`` each.
    """

    kind = "offloaded"

    def describe(self, role: str) -> GroupInfo:
        info = super().describe(role)
        return info._replace(shadow=where(self.host.shadows[0]),
                             side_stream=self.stream is not None,
                             pinned=bool(self.mirror[0].is_pinned()))

    def __init__(self, index: list[int], shadows: list[torch.Tensor],
                 sources: list[torch.Tensor], overlap: bool = False) -> None:
        mirror = host_mirror(sources)
        super().__init__(index, mirror, sources)
        local = list(range(len(shadows)))
        same = shadows[0].dtype == sources[0].dtype
        self.host: Direct | Staged = (Direct if same else Staged)(local, shadows, mirror)
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
            copy_all(dsts, srcs, non_blocking=True)
            return transfer_done(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            copy_all(dsts, srcs, non_blocking=True)
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
        self.pending = worker().submit(self._fold, done, weight)

    def copy_(self, sources: Sequence[torch.Tensor]) -> None:
        done = self._send(sources)
        self.pending = worker().submit(self._fold, done, None)

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

