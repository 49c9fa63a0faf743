"""Float64 oracles: EMAs as explicit weighted sums, written independently of the engine."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from emakit.schedules import Schedule


def weighted_sum(x0: np.ndarray, updates: Sequence[tuple[int, np.ndarray]],
                 decay: Callable[[int], float], *, zeros: bool = False) -> np.ndarray:
    """The EMA after folding in ``updates`` = [(step, weights), ...] as one weighted sum.

    Between consecutive updates at steps s < t the decay is prod_{u=s+1}^{t} decay(u). The
    result is sum_j c_j x_j with c_j = (1 - D_j) prod_{i>j} D_i and the initial value weighted by
    prod_i D_i (zero when ``zeros``, then divided by 1 - prod_i D_i).
    """
    steps = [0] + [s for s, _ in updates]
    big_d = [math.prod(decay(u) for u in range(a + 1, b + 1)) for a, b in itertools.pairwise(steps)]
    total = math.prod(big_d)
    acc = np.zeros_like(np.asarray(x0, dtype=np.float64)) if zeros else total * np.asarray(
        x0, dtype=np.float64)
    for j, (_, x) in enumerate(updates):
        coef = (1.0 - big_d[j]) * math.prod(big_d[j + 1:])
        acc = acc + coef * np.asarray(x, dtype=np.float64)
    if zeros and total < 1.0:
        acc = acc / (1.0 - total)
    return acc


def ewm_loop(x: Sequence[float], alpha: float, *, adjust: bool = True, ignore_na: bool = False,
             min_periods: int = 0) -> np.ndarray:
    """pandas' ewm mean as a plain float64 loop over samples (one series; NaN/inf are missing)."""
    beta = 1.0 - alpha
    out = np.full(len(x), np.nan)
    mean = math.nan
    old = 1.0
    nobs = 0
    for t, v in enumerate(x):
        seen = math.isfinite(v)
        nobs += seen
        if not math.isnan(mean):
            if seen or not ignore_na:
                old *= beta
            if seen:
                new = 1.0 if adjust else alpha
                mean = (old * mean + new * v) / (old + new)
                old = old + new if adjust else 1.0
        elif seen:
            mean = v
        out[t] = mean if nobs >= max(min_periods, 1) else math.nan
    return out


def ewm_sum(x: Sequence[float], alpha: float, *, zeros: bool = False) -> np.ndarray:
    """The weighted-sum form over absolute positions: sum beta^(t-i) x_i / sum beta^(t-i) over the
    finite x_i (or alpha * the numerator with ``zeros``), filled forward over missing samples."""
    beta = 1.0 - alpha
    xs = np.asarray(x, dtype=np.float64)
    out = np.full(len(xs), np.nan)
    for t in range(len(xs)):
        idx = [i for i in range(t + 1) if math.isfinite(xs[i])]
        if not idx:
            continue
        if not math.isfinite(xs[t]):
            out[t] = out[t - 1]
            continue
        num = math.fsum(beta ** (t - i) * xs[i] for i in idx)
        den = math.fsum(beta ** (t - i) for i in idx)
        out[t] = alpha * num if zeros else num / den
    return out


@dataclasses.dataclass(frozen=True)
class Cycle(Schedule):
    """A test schedule: ``d_t = decays[t % len(decays)]`` (decays that change every step)."""

    decays: tuple[float, ...]
    kind: ClassVar[str] = "Cycle"

    def __call__(self, step: int) -> float:
        return self.decays[step % len(self.decays)]
