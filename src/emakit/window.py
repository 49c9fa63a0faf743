"""How an EMA weighs the past: the weight each optimizer step carries in the average at the end.

After the updates at steps ``t_1 < ... < t_U`` (every ``k``-th step), with the decay over each
interval ``D_j = prod_{s=t_(j-1)+1}^{t_j} d_s`` (``t_0 = 0``), the average is

    ema = prod_j D_j * w_0 + sum_j (1 - D_j) * prod_(i>j) D_i * w_(t_j),

so the initial weights ``w_0`` keep the share ``prod_j D_j`` and update ``j`` the share
``(1 - D_j) prod_(i>j) D_i``; the shares sum to 1. This is what ``emakit plan`` prints and plots.

Example:
    >>> from emakit import schedules
    >>> w = step_weights(schedules.Constant(0.5), 3)
    >>> w.initial, w.steps.tolist(), w.weights.tolist()
    (0.125, [1, 2, 3], [0.125, 0.25, 0.5])
    >>> round(w.share_of_last(1), 3), round(w.share_of_last(2), 3)
    (0.5, 0.75)
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from emakit.schedules import Constant, Schedule

__all__ = ["StepWeights", "step_weights"]

MAX_STEPS = 10**7  # a non-constant schedule is evaluated step by step in Python


@dataclass(frozen=True)
class StepWeights:
    """The shares of the average at the end of a run.

    Attributes:
        initial: the share still held by the weights the EMA started from.
        steps: the optimizer steps at which the EMA was updated (int64 array).
        weights: the share of each of those steps' weights (float64 array, same length).
    """

    initial: float
    steps: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float64]

    def share_of_last(self, n: int) -> float:
        """The share of the average that comes from the last ``n`` optimizer steps."""
        if not self.steps.size:
            return 0.0
        cutoff = int(self.steps[-1]) - n
        return float(self.weights[self.steps > cutoff].sum())

    def mean_age(self) -> float:
        """The average age in steps (end minus step) of what the average holds, initial included."""
        if not self.steps.size:
            return 0.0
        end = int(self.steps[-1])
        return float((self.weights * (end - self.steps)).sum() + self.initial * end)


def _decays(schedule: Schedule, ends: npt.NDArray[np.int64], every: int) -> npt.NDArray[Any]:
    if isinstance(schedule, Constant):
        return np.full(ends.shape, schedule.decay ** every, dtype=np.float64)
    per_step = np.array([schedule(t) for t in range(1, int(ends[-1]) + 1)], dtype=np.float64)
    # the ends are multiples of every, so the steps split evenly into intervals
    return np.asarray(np.prod(per_step.reshape(-1, every), axis=1))


def step_weights(schedule: Schedule, steps: int, *, every: int = 1) -> StepWeights:
    """The share of the average held by each update's weights after ``steps`` optimizer steps.

    Args:
        schedule: the decay schedule (``schedules.Constant(d)`` for a float decay).
        steps: the length of the run in optimizer steps, >= 1 (at most 10^7).
        every: the EMA updates on every ``every``-th step (with the exact ``d^k`` correction).

    Returns:
        A :class:`StepWeights`; steps after the last update (``steps % every``) are not in it.
    """
    checked: tuple[tuple[str, object], ...] = (("steps", steps), ("every", every))
    for name, value in checked:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    if steps > MAX_STEPS:
        raise ValueError(f"steps must be <= {MAX_STEPS:.0e}, got {steps}.")
    ends = np.arange(every, steps + 1, every, dtype=np.int64)
    if not ends.size:
        return StepWeights(1.0, ends, np.zeros(0))
    decays = _decays(schedule, ends, every)
    with np.errstate(divide="ignore"):
        logs = np.log(decays)
    # sum_{i>j} log D_i, from the end; exp of it is the survival of update j's share.
    after = np.concatenate([np.cumsum(logs[::-1])[::-1][1:], [0.0]])
    weights = (1.0 - decays) * np.exp(after)
    return StepWeights(float(np.exp(logs.sum())), ends, weights)  # exp(-inf) = 0 for a 0 decay
