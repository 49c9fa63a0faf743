"""Float64 oracles: EMAs as explicit weighted sums, written independently of the engine."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np


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
