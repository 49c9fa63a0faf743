"""Interleaved timing against the flat single-pass reference, discarding noisy chunks.

``x flat`` = median time of one update / median time of one ``lerp_`` over one flat fp32 buffer
of as many elements as the model has parameters. The two are timed in alternating chunks of
about ``chunk_s`` seconds in the same process, so slow drifts hit both alike; a chunk during which
other processes used the CPU (``/proc/stat`` busy time beyond this process's own CPU time) is
discarded and timed again; the result says how many were discarded and how many CPUs other
processes used on average, so a table can say when the machine was busy.

Example (a simulated clock: the update costs 3 time units, the flat pass 2):
    >>> now = [0.0]
    >>> def cost(units):
    ...     def call():
    ...         now[0] += units
    ...     return call
    >>> r = interleaved(cost(3.0), cost(2.0), chunks=3, chunk_s=20.0, clock=lambda: now[0],
    ...                 cpu=lambda: None)
    >>> r.x_flat, r.kept, r.discarded, r.quiet, r.others_cpus
    (1.5, 3, 0, True, None)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["Result", "cpu_seconds", "interleaved", "transient_bytes"]


def cpu_seconds() -> tuple[float, float] | None:
    """``(busy CPU seconds of the whole machine, CPU seconds of this process)`` so far, or None.

    Read from ``/proc/stat`` (Linux); None where it cannot be read, and then no chunk is ever
    discarded as noisy.
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return busy, t.user + t.system


class Result(NamedTuple):
    """Per-call medians (seconds) of the update and of the flat reference, and the load seen.

    Attributes:
        update_s: median seconds per update call over the kept chunks.
        flat_s: median seconds per flat reference pass over the kept chunks.
        kept: chunk pairs the medians come from.
        discarded: chunk pairs timed but discarded because other processes used the CPU.
        quiet: False when the machine never went quiet enough and the noisy pairs were kept
            (then ``kept`` includes them and the medians are those of a busy machine).
        others_cpus: CPUs used by other processes during all timed chunks, on average (CPU
            seconds of others / wall seconds); None where the machine's load cannot be read.
    """

    update_s: float
    flat_s: float
    kept: int
    discarded: int
    quiet: bool = True
    others_cpus: float | None = None

    @property
    def x_flat(self) -> float:
        """``update_s / flat_s``: 1.00 is the single-pass limit."""
        return self.update_s / self.flat_s


class _Meter:
    """Times chunks of calls and measures the CPU time other processes used meanwhile."""

    def __init__(self, clock: Callable[[], float],
                 cpu: Callable[[], tuple[float, float] | None]) -> None:
        self.clock, self.cpu = clock, cpu
        self.wall = 0.0
        self.others: float | None = 0.0

    def chunk(self, fn: Callable[[], Any], calls: int, sync: Callable[[], None]
              ) -> tuple[float, bool]:
        """Seconds per call of ``fn`` over ``calls`` calls, and whether the machine was quiet."""
        before = self.cpu()
        t0 = self.clock()
        for _ in range(calls):
            fn()
        sync()
        wall = self.clock() - t0
        after = self.cpu()
        self.wall += wall
        if before is None or after is None or self.others is None:
            self.others = None
            return wall / calls, True
        others = max(0.0, (after[0] - before[0]) - (after[1] - before[1]))
        self.others += others
        tick = 1.0 / os.sysconf("SC_CLK_TCK")
        return wall / calls, others <= max(2 * tick, 0.1 * wall)

    def calls_for(self, fn: Callable[[], Any], chunk_s: float, sync: Callable[[], None],
                  warmup: int = 1) -> int:
        """Calls per chunk, from batches of doubling size (a single call can mislead: with
        ``every=k`` most calls are no-ops and every k-th one does the work), after ``warmup``
        calls (``every=k``: k, so the first real update, which prepares the plan, is not
        timed)."""
        for _ in range(warmup):
            fn()
        sync()
        calls, elapsed = 1, 0.0
        while True:
            t0 = self.clock()
            for _ in range(calls):
                fn()
            sync()
            elapsed = self.clock() - t0
            if elapsed >= chunk_s / 4 or calls >= 8192:
                break
            calls *= 2
        return max(1, min(10_000, round(chunk_s * calls / max(elapsed, 1e-9))))


def interleaved(update: Callable[[], Any], flat: Callable[[], Any], *, chunks: int = 15,
                chunk_s: float = 0.05, sync: Callable[[], None] = lambda: None,
                max_tries: int = 4, multiple: int = 1,
                clock: Callable[[], float] = time.perf_counter,
                cpu: Callable[[], tuple[float, float] | None] = cpu_seconds) -> Result:
    """Time ``update`` against ``flat`` in alternating chunks; keep ``chunks`` clean pairs.

    A pair is noisy (discarded and timed again) when, during either chunk, other processes used
    more than a tenth of a CPU (at least two clock ticks) of CPU time.

    Args:
        update: one EMA update.
        flat: the flat reference pass.
        chunks: clean chunk pairs to keep.
        chunk_s: target duration of a chunk.
        sync: waits for queued device work (``torch.cuda.synchronize`` on a GPU).
        max_tries: give up on cleanliness after ``max_tries * chunks`` attempts; with fewer
            than ``max(3, chunks // 3)`` clean pairs the noisy pairs are kept too
            (``quiet=False``).
        multiple: calls per chunk of ``update`` are a multiple of this (``every=k``: k, so
            each chunk holds whole cycles of skipped and working calls).
        clock: the wall clock in seconds (``time.perf_counter``).
        cpu: the machine's busy and this process's CPU seconds (:func:`cpu_seconds`).

    Returns:
        A :class:`Result`, with how many pairs were discarded and the load seen.
    """
    meter = _Meter(clock, cpu)
    n_update = meter.calls_for(update, chunk_s, sync, warmup=multiple)
    n_flat = meter.calls_for(flat, chunk_s, sync)
    n_update = -(-n_update // multiple) * multiple
    ups: list[float] = []
    flats: list[float] = []
    noisy_up: list[float] = []
    noisy_flat: list[float] = []
    for _ in range(chunks * max_tries):
        if len(ups) >= chunks:
            break
        u, ok_u = meter.chunk(update, n_update, sync)
        f, ok_f = meter.chunk(flat, n_flat, sync)
        if ok_u and ok_f:
            ups.append(u)
            flats.append(f)
        else:
            noisy_up.append(u)
            noisy_flat.append(f)
    discarded, quiet = len(noisy_up), True
    if len(ups) < max(3, chunks // 3):  # the machine never went quiet: keep everything
        ups, flats, quiet = ups + noisy_up, flats + noisy_flat, False
    others = None if meter.others is None else meter.others / max(meter.wall, 1e-12)
    return Result(statistics.median(ups), statistics.median(flats), len(ups), discarded,
                  quiet, others)


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
