"""BEMA: the bias-corrected EMA of Block & Zhang (2025), on emakit's engine.

"EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes" corrects the lag of an EMA by
extrapolating along the path the weights took since a starting point ``theta_0``:

    EMA_t    = (1 - beta_t) EMA_(t-1) + beta_t theta_t,      beta_t  = (rho + gamma t)^(-kappa)
    BEMA_t   = EMA_t + alpha_t (theta_t - theta_0),            alpha_t = (rho + gamma t)^(-eta)

with ``rho`` the lag, ``gamma`` the multiplier, ``kappa`` the EMA power, ``eta`` the bias power;
``beta_t`` is clamped below at ``min_ema_multiplier``. For ``t <= tau`` (``update_after``) the EMA
follows the weights, and ``theta_0`` is the weights at step ``tau``. The EMA half is an ordinary
emakit EMA with the :class:`BEMASchedule` decay ``d_t = 1 - beta_t``; ``theta_0`` is kept in the
shadows' dtype (fp32) on their device; the correction is computed when the average is **read**
(``swapped()``, ``averaged()``, ``model_state_dict()``, ``KeepBest``, ``copy_to()``), from the
weights of that moment, never written every step. ``state_dict()`` carries ``theta_0``
(``extras["bema_origin"]``), so a run resumes exactly.

The numbers equal TRL's ``BEMACallback`` formula for the same hyperparameters at
``update_freq=1`` (its ``t`` is the optimizer step, as here). With ``every=k`` emakit applies the
product of the per-step decays over the ``k`` steps (the window in steps does not change), where
TRL's ``update_freq=k`` applies the single ``beta_t`` of the update step: those differ, by design.

Example:
    >>> import numpy as np
    >>> import emakit
    >>> w = {"w": np.zeros(2)}
    >>> bema = emakit.BEMA(w, ema_power=0.5, bias_power=0.2, lag=10.0)
    >>> for t in range(1, 4):
    ...     w["w"][:] = float(t)             # weights that drift: 1, 2, 3
    ...     _ = bema.update()
    >>> round(float(bema.state_dict()["shadows"]["w"][0]), 4)   # the EMA lags behind 3
    1.4043
    >>> round(float(bema.averaged()["w"][0]), 4)   # + 13^-0.2 (3 - 0): no lag
    3.2004
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from emakit.clock import DecayClock
from emakit.conversions import real_in_range
from emakit.ema import EMA
from emakit.errors import StateDictError
from emakit.folding import Folding, for_policy
from emakit.schedules import Schedule
from emakit.state import CheckedState
from emakit.tracked import Tracked

__all__ = ["BEMA", "BEMASchedule"]

ORIGIN = "bema_origin"
"""The state's ``extras`` group holding ``theta_0``."""


def _step_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (an optimizer step), got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class BEMASchedule(Schedule):
    """The EMA half of BEMA: ``d_t = 1 - max((lag + multiplier t)^-ema_power, min_ema_multiplier)``
    after ``update_after`` (``d_t = 0`` up to it: the average follows the weights).

    ``bias_power`` does not change ``d_t``; it is kept here so the whole BEMA definition is one
    value (saved, compared on load) and :meth:`alpha` gives the correction's weight.

    Example:
        >>> s = BEMASchedule(ema_power=0.5, lag=10.0)
        >>> round(s(6), 6), round(s.alpha(6), 6)   # beta_6 = 16^-0.5 = 0.25; alpha_6 = 16^-0.2
        (0.75, 0.574349)
    """

    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10.0
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0
    update_after: int = 0
    kind: ClassVar[str] = "BEMA"

    def __post_init__(self) -> None:
        inf = float("inf")
        for name in ("ema_power", "bias_power", "lag", "multiplier"):
            object.__setattr__(self, name, real_in_range(name, getattr(self, name), low=0.0,
                                                         high=inf, high_open=True))
        object.__setattr__(self, "min_ema_multiplier", real_in_range(
            "min_ema_multiplier", self.min_ema_multiplier, low=0.0, high=1.0))
        object.__setattr__(self, "update_after", _step_int("update_after", self.update_after))
        if self.lag + self.multiplier * (self.update_after + 1) <= 0.0:
            raise ValueError("lag + multiplier * t must be > 0 for the steps after "
                             f"update_after, got lag={self.lag}, multiplier={self.multiplier}.")

    def beta(self, step: int) -> float:
        """The EMA weight of step ``step``: ``max((lag + multiplier step)^-ema_power, min)``,
        at most 1."""
        base = self.lag + self.multiplier * step
        return float(min(1.0, max(base ** -self.ema_power, self.min_ema_multiplier)))

    def alpha(self, step: int) -> float:
        """The correction's weight at step ``step``: ``(lag + multiplier step)^-bias_power``."""
        return float((self.lag + self.multiplier * step) ** -self.bias_power)

    def __call__(self, step: int) -> float:
        if step <= self.update_after:
            return 0.0
        return 1.0 - self.beta(step)


class _Corrected(Folding):
    """A folding strategy (plain or guarded) with BEMA's ``theta_0`` and read-time correction."""

    def __init__(self, inner: Folding, clock: DecayClock, schedule: BEMASchedule) -> None:
        self.inner = inner
        self.tracked = inner.tracked
        self.clock = clock
        self.schedule = schedule
        self.guarded = inner.guarded
        self.origin: list[Any] | None = None
        if clock.step >= schedule.update_after:  # begun at or after tau: theta_0 is now
            self.origin = self._copy(self.tracked.fetch(self.tracked.avg_names))

    @property
    def init(self) -> str:  # type: ignore[override]
        return self.inner.init

    def _copy(self, weights: list[Any]) -> list[Any]:
        t = self.tracked
        return t.backend.allocate(weights, t.avg_dtypes, t.device, False)

    def reset(self, init: str) -> None:
        self.inner.reset(init)
        self.origin = None

    def fold(self, plan: Any, sources: list[Any], tick: Any) -> None:
        self.inner.fold(plan, sources, tick)
        if self.origin is None and tick.step >= self.schedule.update_after:
            self.origin = self._copy(sources[:len(self.tracked.avg_names)])

    def divisors(self, num_updates: int, decay_product: float) -> float | list[float] | None:
        return self.inner.divisors(num_updates, decay_product)

    def values(self, clock: DecayClock) -> list[Any]:
        base = self.inner.values(clock)
        if self.origin is None or clock.step <= self.schedule.update_after:
            return base
        t = self.tracked
        n = len(t.avg_names)
        current = t.training(t.avg_names)  # swapped in or not: the training weights
        shifted = t.backend.shifted(base[:n], current, self.origin,
                                    self.schedule.alpha(clock.step))
        return shifted + base[n:]

    def skips(self) -> dict[str, int]:
        return self.inner.skips()

    def state(self) -> dict[str, Any]:
        out = dict(self.inner.state())
        if self.origin is not None:
            out["extras"] = {ORIGIN: self.tracked.state_tensors_of(self.tracked.avg_names,
                                                                    self.origin)}
        return out

    def check(self, checked: CheckedState) -> None:
        self.check_extras(checked, (ORIGIN,))
        self.inner.check(checked._replace(extras={}))
        origin = checked.extras.get(ORIGIN)
        if origin is None:
            if checked.step > self.schedule.update_after:
                raise StateDictError(
                    f"the state (step {checked.step}) has no BEMA origin (theta_0, taken at step "
                    f"{self.schedule.update_after}): it was saved by a plain EMA",
                    fix="Load it into emakit.EMA, or start the BEMA from the weights.")
            return
        t = self.tracked
        wrong = sorted(set(origin) ^ set(t.avg_names))
        bad = t.mismatches(origin)
        if wrong or bad:
            raise StateDictError("the state's BEMA origin (theta_0) does not fit this EMA",
                                 mismatched=bad + [f"{n}: not an averaged tensor of both"
                                                   for n in wrong],
                                 fix="Load a state saved from the same model.")

    def load(self, checked: CheckedState) -> None:
        self.inner.load(checked._replace(extras={}))
        origin = checked.extras.get(ORIGIN)
        self.origin = None
        if origin is not None:
            values = [origin[n] for n in self.tracked.avg_names]
            self.origin = self._copy(self.tracked.fetch(self.tracked.avg_names))
            self.tracked.write_into(self.origin, self.tracked.avg_names, values)


class BEMA(EMA):
    """An EMA with BEMA's bias correction (Block & Zhang, 2025); see the module docstring.

    Args:
        source: as for :class:`~emakit.EMA`.
        ema_power: ``kappa``, the EMA weight's power (0.5 in the paper).
        bias_power: ``eta``, the correction's power (0.2 TRL's default; 0 disables decay of
            the correction).
        lag: ``rho``, the offset of the step count (10).
        multiplier: ``gamma``, the step count's scale (1).
        min_ema_multiplier: the floor of ``beta_t`` (0).
        update_after: ``tau``: steps during which the average follows the weights; ``theta_0``
            is the weights at step ``tau`` (0: the weights the BEMA starts from).
        every, dtype, device, policy, start, foreach: as for :class:`~emakit.EMA` (``start``
            takes the step only: a zero start has no meaning here).

    Raises:
        TypeError, ValueError: for a bad argument, naming it.
    """

    def __init__(self, source: Any, *, ema_power: float = 0.5, bias_power: float = 0.2,
                 lag: float = 10.0, multiplier: float = 1.0, min_ema_multiplier: float = 0.0,
                 update_after: int = 0, every: int = 1, dtype: Any = None, device: Any = None,
                 policy: Any = None, start: Any = None, foreach: bool = True) -> None:
        if (isinstance(start, str) and start == "zeros") or getattr(start, "zeros", False):
            raise ValueError("BEMA starts from the weights (theta_0): start='zeros' has no "
                             "meaning here. Give start=STEP for a BEMA begun mid-run.")
        self.bema = BEMASchedule(ema_power, bias_power, lag, multiplier, min_ema_multiplier,
                                 update_after)
        super().__init__(source, self.bema, every=every, dtype=dtype, device=device,
                         policy=policy, start=start, foreach=foreach)

    def _folding(self, tracked: Tracked, clock: DecayClock, init: str) -> Folding:
        return _Corrected(for_policy(tracked, init), clock, self.bema)
