"""Decay schedules and conversions, in pure Python.

A schedule is a small frozen value: ``schedule(step)`` gives the decay ``d_t`` applied when the
weights after optimizer step ``t`` (``t = 1`` for the first step) are folded into the average,

    ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t.

Schedules count optimizer steps, never calls to ``update()``: when the engine updates only every
``k`` steps it applies :meth:`Schedule.interval`, the product of the per-step decays over the
skipped steps, so the averaging window in steps does not change. Gaps of up to
:data:`EXACT_STEPS` steps multiply the per-step decays in order; longer ones use each built-in
schedule's closed form (bounded work for any gap, e.g. a state resumed at step 10^12). Every
equation is collected in ``docs/math.md`` with its source.

Example:
    >>> from emakit import schedules
    >>> s = schedules.InverseGamma(inv_gamma=1.0, power=2 / 3, max_decay=0.9999)
    >>> [round(s(t), 4) for t in (1, 2, 10, 1000)]
    [0.0, 0.37, 0.7846, 0.99]
    >>> round(schedules.half_life_to_decay(693.1), 6)
    0.999
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, ClassVar, cast

from emakit.conversions import (
    decay_to_half_life,
    gamma_to_sigma_rel,
    half_life_to_decay,
    sigma_rel_to_gamma,
)
from emakit.conversions import real_in_range as _real
from emakit.integer_sums import first_true, in_order, log1m_exp, power, sampled_sum, smooth_sum

__all__ = ["EXACT_STEPS", "FALLBACK_STEPS", "REGISTRY", "Constant", "ExponentialRamp",
           "InverseGamma", "PowerFunction", "Schedule", "TFWarmup", "decay_to_half_life",
           "from_dict", "gamma_to_sigma_rel", "half_life_to_decay", "sigma_rel_to_gamma"]


def _interval_args(start: object, stop: object) -> tuple[int, int]:
    if type(start) is int and type(stop) is int and 0 <= start <= stop:
        return start, stop  # the clock's own steps, on every update: no abc checks
    a = _step(start, "start", 0)
    b = _step(stop, "stop", 0)
    if b < a:
        raise ValueError(f"stop must be >= start, got start={a}, stop={b}.")
    return a, b


EXACT_STEPS = 10_000
"""Gaps of up to this many steps multiply the per-step decays in order (bitwise resumable)."""
FALLBACK_STEPS = 2**20
"""A schedule without a closed form: the first steps of a longer gap multiplied in order, the
rest sampled (:meth:`Schedule.long_interval`)."""


def _step(value: object, name: str = "step", minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}.")
    return v


REGISTRY: dict[str, type[Schedule]] = {}
"""Every schedule class by its ``kind`` (filled as the classes are defined)."""


class Schedule(ABC):
    """Base class of decay schedules: ``schedule(step) -> decay`` for optimizer step ``step >= 1``.

    Subclasses are frozen dataclasses; :meth:`to_dict` / :func:`from_dict` round-trip them, and
    :meth:`interval` gives the decay over several steps.
    """

    kind: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register every schedule class that names its ``kind``: :func:`from_dict`, files and
        ``emakit plan --schedule`` then know it (a new schedule is one class)."""
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            REGISTRY[cls.kind] = cls

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Schedule:
        """The schedule from :meth:`to_dict`'s fields (without ``kind``)."""
        return cls(**fields)

    @abstractmethod
    def __call__(self, step: int) -> float:
        """Return the decay ``d_step`` in [0, 1] for optimizer step ``step`` (1-based)."""

    def interval(self, start: int, stop: int) -> float:
        """Decay over the steps ``start+1 .. stop``: ``prod_{t=start+1}^{stop} d_t``.

        This is what the engine applies when it folds in the weights of step ``stop`` after
        last updating at step ``start`` (update every k steps, gradient accumulation). An empty
        interval (``stop == start``) gives 1.0.

        Up to :data:`EXACT_STEPS` (10,000) steps the per-step decays are multiplied in order,
        so short gaps give the same bits as ever (bitwise resume). Longer gaps call
        :meth:`long_interval`: a closed form for every built-in schedule (relative error about
        ``1e-13`` plus the rounding of the per-step decays themselves, ``2^-53`` per step, which
        the in-order product carries too), in bounded work whatever the gap.

        Args:
            start: the step of the previous update (0 when the average was created).
            stop: the current step, ``>= start``.

        Returns:
            The product of the per-step decays, a float in [0, 1].
        """
        start, stop = _interval_args(start, stop)
        if stop - start <= EXACT_STEPS:
            return in_order(self, start + 1, stop)
        return self.long_interval(start, stop)

    def long_interval(self, start: int, stop: int) -> float:
        """:meth:`interval` over more than :data:`EXACT_STEPS` steps; subclasses with a closed
        form override it.

        This default serves schedules without one (your own subclasses): it multiplies the
        first :data:`FALLBACK_STEPS` (2^20) per-step decays in order, stopping at 0, and
        estimates the rest in log space from 64 steps per doubling of the range
        (:func:`emakit.integer_sums.sampled_sum`): exact where the decay is constant over
        stretches, about ``1e-4`` relative error per doubling for one that still changes like
        ``1/t``. Override this method (or :meth:`interval`) with an exact form if that matters.

        Args:
            start: the step of the previous update, ``>= 0``.
            stop: the current step, ``> start + EXACT_STEPS``.

        Returns:
            The product of the per-step decays, a float in [0, 1].
        """
        head = min(stop, start + FALLBACK_STEPS)
        product = in_order(self, start + 1, head)
        if product == 0.0 or head == stop:
            return product

        def log_decay(t: int) -> float:
            d = self(t)
            return math.log(d) if d > 0.0 else -math.inf

        return product * math.exp(sampled_sum(log_decay, head + 1, stop))

    def to_dict(self) -> dict[str, Any]:
        """Return ``{"kind": name, **fields}``, JSON-serialisable; :func:`from_dict` inverts it."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"kind": self.kind, **fields}


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    """A constant decay: ``d_t = decay``; over k steps ``decay ** k``.

    Args:
        decay: the per-step decay in [0, 1]. 0 copies the weights, 1 freezes the average.

    Example:
        >>> Constant(0.9)(5), round(Constant(0.9).interval(0, 3), 6)
        (0.9, 0.729)
        >>> round(Constant.from_half_life(10).decay ** 10, 12)
        0.5
    """

    decay: float
    kind: ClassVar[str] = "Constant"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _real("decay", self.decay, low=0.0, high=1.0,
                                                hint="Typical values are 0.99 to 0.9999."))

    @classmethod
    def from_half_life(cls, half_life: float) -> Constant:
        """The constant decay whose weights halve every ``half_life`` optimizer steps."""
        return cls(half_life_to_decay(half_life))

    def __call__(self, step: int) -> float:
        _step(step)
        return self.decay

    def interval(self, start: int, stop: int) -> float:
        """``decay ** (stop - start)`` (closed form of :meth:`Schedule.interval`, any gap)."""
        start, stop = _interval_args(start, stop)
        return self.decay ** (stop - start)

    def long_interval(self, start: int, stop: int) -> float:
        """``decay ** (stop - start)``."""
        return self.interval(start, stop)


@dataclasses.dataclass(frozen=True)
class InverseGamma(Schedule):
    """Warmup of timm / diffusers / ema-pytorch: ``1 - (1 + e / inv_gamma) ** -power``.

    With ``e = max(0, step - update_after_step - 1)``: the decay is 0 (the average copies the
    weights) while ``e == 0``, then ``clamp(1 - (1 + e / inv_gamma) ** -power, min_decay,
    max_decay)``. ``power=2/3`` suits short runs, ``power=3/4`` long ones (diffusers' advice).

    Args:
        inv_gamma: step scale of the warmup, > 0.
        power: exponent of the warmup, > 0.
        min_decay: lower clamp once warmed up, in [0, max_decay].
        max_decay: upper clamp, in [0, 1].
        update_after_step: steps during which the average just copies the weights.

    Example:
        >>> s = InverseGamma(power=0.75, max_decay=0.999, update_after_step=2)
        >>> [round(s(t), 4) for t in (1, 3, 4, 100, 10**6)]
        [0.0, 0.0, 0.4054, 0.9679, 0.999]
    """

    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    max_decay: float = 0.9999
    update_after_step: int = 0
    kind: ClassVar[str] = "InverseGamma"

    def __post_init__(self) -> None:
        inf = math.inf
        object.__setattr__(self, "inv_gamma", _real("inv_gamma", self.inv_gamma, low=0.0,
                                                    high=inf, low_open=True, high_open=True))
        object.__setattr__(self, "power", _real("power", self.power, low=0.0, high=inf,
                                                low_open=True, high_open=True))
        object.__setattr__(self, "max_decay", _real("max_decay", self.max_decay, low=0.0,
                                                    high=1.0))
        object.__setattr__(self, "min_decay", _real(
            "min_decay", self.min_decay, low=0.0, high=self.max_decay,
            hint="min_decay must not exceed max_decay."))
        object.__setattr__(self, "update_after_step",
                           _step(self.update_after_step, "update_after_step", 0))

    def __call__(self, step: int) -> float:
        e = _step(step) - self.update_after_step - 1
        if e <= 0:
            return 0.0
        value = 1.0 - (1.0 + e / self.inv_gamma) ** -self.power
        return float(min(self.max_decay, max(self.min_decay, value)))

    def long_interval(self, start: int, stop: int) -> float:
        """The product in three parts, split where the clamps start and stop acting.

        ``d_t`` never decreases, so the steps clamped at ``min_decay`` and at ``max_decay``
        are found by bisection and contribute ``min_decay ** k`` and ``max_decay ** k``; the
        steps in between contribute ``exp(sum log(1 - (1 + e/inv_gamma) ** -power))``, summed
        by :func:`emakit.integer_sums.smooth_sum` (singularity at ``e = 0``).
        """
        a, b = start + 1, stop
        if self(a) == 0.0:  # the smallest decay of the interval: the product is 0
            return 0.0
        low = first_true(lambda t: self(t) > self.min_decay, a, b)  # first step above min_decay
        high = first_true(lambda t: self(t) >= self.max_decay, low, b)  # first one at max_decay
        g, p, origin = self.inv_gamma, self.power, self.update_after_step + 1

        def f(t: float) -> float:
            return log1m_exp(p * math.log1p((t - origin) / g))

        def df(t: float) -> float:
            e = t - origin
            return p / ((g + e) * math.expm1(p * math.log1p(e / g)))

        ramp = smooth_sum(f, df, low, high - 1, origin=float(origin))
        return (power(self.min_decay, low - a) * math.exp(ramp)
                * power(self.max_decay, b - high + 1))


@dataclasses.dataclass(frozen=True)
class TFWarmup(Schedule):
    """TensorFlow's ``ExponentialMovingAverage(num_updates=...)``: ``min(decay, (1+t)/(10+t))``.

    Args:
        decay: the decay reached after the warmup, in [0, 1].

    Example:
        >>> s = TFWarmup(0.999)
        >>> [round(s(t), 4) for t in (1, 10, 100, 10**5)]
        [0.1818, 0.55, 0.9182, 0.999]
    """

    decay: float = 0.9999
    kind: ClassVar[str] = "TFWarmup"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _real("decay", self.decay, low=0.0, high=1.0))

    def __call__(self, step: int) -> float:
        t = _step(step)
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def long_interval(self, start: int, stop: int) -> float:
        """Ramp, then cap: ``prod_{t=x}^{y} (1+t)/(10+t) = prod_{i=1}^{9} (x+i)/(y+1+i)``
        (the products telescope), times ``decay ** k`` over the ``k`` capped steps."""
        a, b = start + 1, stop
        cap = first_true(lambda t: (1.0 + t) / (10.0 + t) >= self.decay, a, b)
        last = cap - 1  # the ramp is a .. last
        if last - a + 1 <= 9:
            ramp = in_order(self, a, last)
        else:
            ramp = math.prod((a + i) / (last + 1 + i) for i in range(1, 10))
        return ramp * power(self.decay, b - cap + 1)


@dataclasses.dataclass(frozen=True)
class ExponentialRamp(Schedule):
    """The Ultralytics (YOLO) ramp: ``d_t = decay * (1 - exp(-t / tau))``.

    Args:
        decay: the decay approached for ``t >> tau``, in [0, 1].
        tau: the ramp's time constant in optimizer steps, > 0.

    Example:
        >>> s = ExponentialRamp(decay=0.9999, tau=2000)
        >>> [round(s(t), 4) for t in (1, 2000, 20000)]
        [0.0005, 0.6321, 0.9999]
    """

    decay: float = 0.9999
    tau: float = 2000.0
    kind: ClassVar[str] = "ExponentialRamp"

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay", _real("decay", self.decay, low=0.0, high=1.0))
        object.__setattr__(self, "tau", _real("tau", self.tau, low=0.0, high=math.inf,
                                              low_open=True, high_open=True))

    def __call__(self, step: int) -> float:
        t = _step(step)
        return self.decay * (1.0 - math.exp(-t / self.tau))

    def long_interval(self, start: int, stop: int) -> float:
        """``decay ** k`` times ``exp(sum log(1 - exp(-t/tau)))`` over the steps where the ramp
        still differs from 1 in float64 (bisection), summed by
        :func:`emakit.integer_sums.smooth_sum`; beyond them each step's decay is ``decay``."""
        if self.decay == 0.0:
            return 0.0
        a, b, tau = start + 1, stop, self.tau
        flat = first_true(lambda t: 1.0 - math.exp(-t / tau) == 1.0, a, b)

        def f(t: float) -> float:
            return log1m_exp(t / tau)

        def df(t: float) -> float:
            return 1.0 / (tau * math.expm1(t / tau))

        ramp = smooth_sum(f, df, a, flat - 1, origin=0.0)
        return math.exp(ramp + (flat - a) * math.log(self.decay)) * power(self.decay,
                                                                           b - flat + 1)


@dataclasses.dataclass(frozen=True)
class PowerFunction(Schedule):
    """Power-function EMA of Karras et al. (2024, EDM2): ``d_t = (1 - 1/t) ** (gamma + 1)``.

    After ``T`` steps the average weighs step ``s`` by exactly
    ``(s ** (gamma+1) - (s-1) ** (gamma+1)) / T ** (gamma+1)`` (the products telescope), which
    for large ``s`` is ``(gamma+1) s ** gamma / T ** (gamma+1)``: in proportion to ``s ** gamma``.
    Its width relative to the run length is ``sigma_rel``; give either ``gamma`` or
    ``sigma_rel``.

    Args:
        gamma: exponent, ``>= 0`` (0: the running mean; EDM2: gamma 16.97 for sigma_rel 0.05,
            6.94 for 0.10; see :func:`sigma_rel_to_gamma`).
        sigma_rel: relative standard deviation of the averaging profile, in
            ``(0, 1/sqrt(12))`` (about 0.2887), EDM2's range (``gamma > 0``).

    Raises:
        ValueError: neither or both given, ``gamma < 0``, or ``sigma_rel`` outside its range.

    Example:
        >>> s = PowerFunction(gamma=7.0)
        >>> [round(s(t), 4) for t in (1, 2, 100)]
        [0.0, 0.0039, 0.9227]
        >>> round(PowerFunction(sigma_rel=0.05).gamma, 4)
        16.9722
    """

    gamma: float | None = None
    sigma_rel: float | None = None
    kind: ClassVar[str] = "PowerFunction"
    aliases: ClassVar[tuple[str, ...]] = ("power",)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Schedule:
        """``gamma`` is authoritative: a saved ``sigma_rel`` is derived from it."""
        return cls(**{k: v for k, v in fields.items() if k != "sigma_rel"})

    def __post_init__(self) -> None:
        if (self.gamma is None) == (self.sigma_rel is None):
            raise ValueError(
                f"PowerFunction takes exactly one of gamma or sigma_rel, got gamma={self.gamma!r},"
                f" sigma_rel={self.sigma_rel!r}. Example: PowerFunction(sigma_rel=0.05)."
            )
        if self.sigma_rel is not None:
            gamma = sigma_rel_to_gamma(self.sigma_rel)
        else:
            gamma = _real("gamma", self.gamma, low=0.0, high=math.inf, high_open=True,
                          hint="gamma 0 is the running mean; negative gamma would weigh early "
                               "steps more than late ones.")
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "sigma_rel", gamma_to_sigma_rel(gamma))

    def __call__(self, step: int) -> float:
        t = _step(step)
        return float((1.0 - 1.0 / t) ** (cast(float, self.gamma) + 1.0))

    def long_interval(self, start: int, stop: int) -> float:
        """``(start / stop) ** (gamma + 1)``: ``prod_{t=a+1}^{b} ((t-1)/t)^(gamma+1)``
        telescopes (0 from step 0, whose first decay is 0)."""
        if start == 0:
            return 0.0
        g = cast(float, self.gamma)
        return math.exp((g + 1.0) * math.log1p(-(stop - start) / stop))

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": "PowerFunction", "gamma": g, "sigma_rel": s}``; gamma is authoritative."""
        return {"kind": self.kind, "gamma": self.gamma, "sigma_rel": self.sigma_rel}


def from_dict(data: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict` output.

    Example:
        >>> from_dict(TFWarmup(0.99).to_dict())
        TFWarmup(decay=0.99)
    """
    if not isinstance(data, dict) or "kind" not in data:
        raise ValueError(f"schedule data must be a dict with a 'kind' key, got {data!r}.")
    fields = dict(data)
    kind = fields.pop("kind")
    if kind not in REGISTRY:
        raise ValueError(f"unknown schedule kind {kind!r}; known kinds: {sorted(REGISTRY)}.")
    try:
        return REGISTRY[kind].from_fields(fields)
    except TypeError as exc:
        raise ValueError(f"bad fields for schedule {kind!r}: {fields!r} ({exc}).") from exc
