"""Interleaved timing against the flat single-pass reference, discarding noisy chunks.

``x flat`` = median time of one update / median time of one ``lerp_`` over one flat fp32 buffer
of as many elements as the model has parameters. The two are timed in alternating chunks of
about ``chunk_s`` seconds in the same process, so slow drifts hit both alike; a chunk during which
other processes used the CPU (``/proc/stat`` busy time beyond this process's own CPU time) is
discarded and timed again.

Example:
    >>> import torch
    >>> a, b = torch.zeros(1000), torch.ones(1000)
    >>> r = interleaved(lambda: a.lerp_(b, 0.1), lambda: a.lerp_(b, 0.1), chunks=3, chunk_s=0.005)
    >>> 0.2 < r.x_flat < 5.0
    True
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Result", "interleaved", "transient_bytes"]


def _busy_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (Linux), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system


class Result(NamedTuple):
    """Per-call medians (seconds) of the update and of the flat reference, and chunk counts."""

    update_s: float
    flat_s: float
    kept: int
    discarded: int

    @property
    def x_flat(self) -> float:
        return self.update_s / self.flat_s


def _chunk(fn: Callable[[], Any], calls: int, sync: Callable[[], None]) -> tuple[float, bool]:
    busy0, own0 = _busy_s(), _own_s()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    wall = time.perf_counter() - t0
    busy1, own1 = _busy_s(), _own_s()
    if busy0 is None or busy1 is None:
        return wall / calls, True
    others = (busy1 - busy0) - (own1 - own0)
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    return wall / calls, others <= max(2 * tick, 0.1 * wall)


def _calls_for(fn: Callable[[], Any], chunk_s: float, sync: Callable[[], None]) -> int:
    """Calls per chunk, from batches of doubling size (a single call can mislead: with
    ``every=k`` most calls are no-ops and every k-th one does the work)."""
    fn()
    sync()
    calls, elapsed = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= chunk_s / 4 or calls >= 8192:
            break
        calls *= 2
    return max(1, min(10_000, round(chunk_s * calls / max(elapsed, 1e-9))))


def interleaved(update: Callable[[], Any], flat: Callable[[], Any], *, chunks: int = 15,
                chunk_s: float = 0.05, sync: Callable[[], None] = lambda: None,
                max_tries: int = 4, multiple: int = 1) -> Result:
    """Time ``update`` against ``flat`` in alternating chunks; keep ``chunks`` clean pairs.

    Args:
        update: one EMA update.
        flat: the flat reference pass.
        chunks: clean chunk pairs to keep.
        chunk_s: target duration of a chunk.
        sync: waits for queued device work (``torch.cuda.synchronize`` on a GPU).
        max_tries: give up on cleanliness after ``max_tries * chunks`` attempts (then the
            noisy chunks are kept too, and counted as discarded = -1).
        multiple: calls per chunk of ``update`` are a multiple of this (``every=k``: k, so
            each chunk holds whole cycles of skipped and working calls).

    Returns:
        A :class:`Result`.
    """
    n_update, n_flat = _calls_for(update, chunk_s, sync), _calls_for(flat, chunk_s, sync)
    n_update = -(-n_update // multiple) * multiple
    ups: list[float] = []
    flats: list[float] = []
    noisy_up: list[float] = []
    noisy_flat: list[float] = []
    discarded = 0
    for _ in range(chunks * max_tries):
        if len(ups) >= chunks:
            break
        u, ok_u = _chunk(update, n_update, sync)
        f, ok_f = _chunk(flat, n_flat, sync)
        if ok_u and ok_f:
            ups.append(u)
            flats.append(f)
        else:
            discarded += 1
            noisy_up.append(u)
            noisy_flat.append(f)
    if len(ups) < max(3, chunks // 3):  # the machine never went quiet: keep everything
        ups, flats, discarded = ups + noisy_up, flats + noisy_flat, -1
    return Result(statistics.median(ups), statistics.median(flats), len(ups), discarded)


def transient_bytes(fn: Callable[[], Any]) -> int | None:
    """Bytes allocated (and freed) by torch during one call of ``fn`` (CPU profiler), or None."""
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return int(sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages()))
