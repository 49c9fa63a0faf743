"""The decay clock: which optimizer steps update the average, and the decay over each interval.

Pure Python, no arrays. The clock counts optimizer steps, never calls: when the EMA last updated
at step ``s`` and updates again at step ``t`` (``every=k``, gradient accumulation, a step given
explicitly), the weights of step ``t`` are folded in with the decay of the whole interval,

    D = prod_{u=s+1}^{t} d_u        (d^(t-s) for a constant decay),

so the averaging window in optimizer steps never stretches. The product of all the ``D`` so far
is kept for the bias correction of a zero-started average (``docs/math.md`` (5)).

Example:
    >>> from emakit.schedules import Constant
    >>> clock = DecayClock(Constant(0.5), every=2, step=0)
    >>> clock.advance(None) is None            # step 1: not an update step
    True
    >>> tick = clock.advance(None)             # step 2: the decay of steps 1 and 2
    >>> tick
    Tick(step=2, decay=0.25)
    >>> clock.commit(tick)
    >>> clock.step, clock.num_updates, clock.decay_product
    (2, 1, 0.25)
"""

from __future__ import annotations

import numbers
import warnings
from typing import NamedTuple

from emakit.errors import EMAWarning, user_stacklevel
from emakit.schedules import Constant, Schedule

__all__ = ["DecayClock", "Start", "Tick", "resolve_schedule"]


def resolve_schedule(decay: object, half_life: object) -> Schedule:
    """The schedule that ``EMA(decay=..., half_life=...)`` asks for (default ``Constant(0.999)``).

    Raises:
        TypeError, ValueError: both given, or a decay that is neither a number nor a schedule.
    """
    if half_life is not None:
        if decay is not None:
            raise ValueError(f"give either decay or half_life, not both (got decay={decay!r}, "
                             f"half_life={half_life!r}). Example: EMA(model, half_life=2000).")
        return Constant.from_half_life(half_life)  # type: ignore[arg-type]
    if decay is None:
        return Constant(0.999)
    if isinstance(decay, Schedule):
        _check_saveable(decay)
        return decay
    if isinstance(decay, numbers.Real):  # Constant rejects bool with a clear message
        return Constant(decay)  # type: ignore[arg-type]
    raise TypeError(
        f"decay must be a float in [0, 1] or a schedule from emakit.schedules, got {decay!r} of "
        f"type {type(decay).__name__}. Examples: decay=0.999, half_life=2000, "
        "decay=emakit.schedules.InverseGamma(max_decay=0.9999).")


def _check_saveable(schedule: Schedule) -> None:
    """Refuse now a schedule that ``state_dict()`` / files could not record later."""
    import json

    try:
        json.dumps(schedule.to_dict())  # what the state and the files hold
    except (TypeError, AttributeError, ValueError) as exc:
        raise TypeError(
            f"decay={schedule!r}: the EMA's state records its schedule with to_dict(), which "
            f"fails for {type(schedule).__name__} ({exc}). Make the class a frozen dataclass "
            "with a kind (class MySchedule(Schedule): kind = 'mine', fields as dataclass "
            "fields), or give it to_dict() and from_fields().") from None


def _start_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or int(step) < 0:
        raise ValueError(f"start step must be an int >= 0, got {step!r}.")
    return int(step)


class Start(NamedTuple):
    """Where an average starts: the optimizer step of the current weights, and its value.

    Attributes:
        step: the optimizer step the current weights belong to (for an EMA started mid-run;
            the first update then applies only the decay of the steps after it).
        zeros: start the average at zero instead of the current weights; every read is then
            divided by ``1 - prod(decays)`` (bias correction, as Adam does for its moments).

    ``EMA(..., start=S)`` also takes an int (``Start(step=S)``) or ``"zeros"``
    (``Start(zeros=True)``).
    """

    step: int = 0
    zeros: bool = False

    @classmethod
    def of(cls, value: object, schedule: Schedule) -> Start:
        """The :class:`Start` that ``EMA(start=value)`` means, checked against the schedule.

        Raises:
            TypeError, ValueError: for anything else, naming the accepted forms; a zero start
                with ``decay=1``, which never averages anything.
        """
        start = cls._of(value)
        if start.zeros and isinstance(schedule, Constant) and schedule.decay == 1.0:
            raise ValueError("start='zeros' with decay=1 never averages anything: the shadow "
                             "stays zero and its bias correction divides by 1 - 1**t = 0. "
                             "Start from the weights (the default) to freeze them, or use a "
                             "decay below 1.")
        return start

    @classmethod
    def _of(cls, value: object) -> Start:
        if value is None or (isinstance(value, str) and value == "copy"):
            return cls()
        if isinstance(value, str) and value == "zeros":
            return cls(zeros=True)
        if isinstance(value, Start):
            return cls(_start_step(value.step), bool(value.zeros))
        if isinstance(value, numbers.Integral):
            return cls(_start_step(value))  # refuses True / False
        raise TypeError(
            f"start must be an optimizer step (int), 'zeros', or emakit.Start(step=, zeros=), "
            f"got {value!r}. Example: EMA(model, start=5000) for an EMA begun mid-run.")


class Tick(NamedTuple):
    """An update due: the optimizer step and the decay over the interval since the last one."""

    step: int
    decay: float


class DecayClock:
    """Step counters of an EMA and the decay each update applies.

    Args:
        schedule: the per-step decay.
        every: update on every ``every``-th optimizer step.
        step: the optimizer step the current weights belong to.

    Attributes:
        step: the last optimizer step seen.
        last_update_step: the step of the last update (``step`` at creation).
        num_updates: how many updates were committed.
        decay_product: the product of the interval decays of all committed updates.
        last_decay: the interval decay of the last committed update (None before any).
    """

    def __init__(self, schedule: Schedule, *, every: object, step: int,
                 zeros: bool = False) -> None:
        if isinstance(every, bool) or not isinstance(every, numbers.Integral):
            raise TypeError(f"every must be an int, got {every!r} of type "
                            f"{type(every).__name__}.")
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every!r}.")
        self.schedule = schedule
        self.every = int(every)
        self.zeros = zeros  # a zero start has no initial weights for a long first gap to drop
        self.restart(step)

    def restart(self, step: int) -> None:
        """Forget every update: the average starts again from the weights of ``step``."""
        self.step = step
        self.last_update_step = step
        self.num_updates = 0
        self.decay_product = 1.0
        self.last_decay: float | None = None

    def restore(self, step: int, last_update_step: int, num_updates: int,
                decay_product: float) -> None:
        """Set the counters from a saved state (checked by :mod:`emakit.state`)."""
        self.step, self.last_update_step = step, last_update_step
        self.num_updates, self.decay_product = num_updates, decay_product
        self.last_decay = None

    def advance(self, step: object) -> Tick | None:
        """Move to the next optimizer step; the update due there, or None.

        Args:
            step: the optimizer step count after this step, or None for "one more step".
                A step already seen returns None (gradient accumulation calls again).

        Returns:
            The :class:`Tick` to fold in and then :meth:`commit`, or None when this step does
            not update (``every``) or was seen already. A skipped step still moves ``step``.

        Raises:
            TypeError: ``step`` is not an int.
            ValueError: ``step`` goes backwards.
        """
        t = self._next(step)
        if t is None:
            return None
        if t % self.every:
            self.step = t
            return None
        decay = self.schedule.interval(self.last_update_step, t)
        gap = t - self.last_update_step
        if self.num_updates == 0 and gap > self.every and decay < 1e-3 and self.schedule(1) \
                and not self.zeros:
            warnings.warn(
                f"the first update at step {t} applies the decay of {gap} steps since the EMA "
                f"was created at step {self.last_update_step} (total decay {decay:.2g}), which "
                f"discards the initial weights. If the EMA starts mid-run, create it with "
                f"EMA(..., start={t - 1}).",
                EMAWarning,
                stacklevel=user_stacklevel(),
            )
        return Tick(t, decay)

    def commit(self, tick: Tick) -> None:
        """Record that the update of ``tick`` reached the shadows."""
        self.step = tick.step
        self.last_update_step = tick.step
        self.num_updates += 1
        self.decay_product *= tick.decay
        self.last_decay = tick.decay

    def _next(self, step: object) -> int | None:
        if step is None:
            return self.step + 1
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(
                f"step must be an int (the optimizer step count), got {step!r} of type "
                f"{type(step).__name__}."
            )
        t = int(step)
        if t == self.step:
            return None  # same optimizer step again (gradient accumulation): nothing to do
        if t < self.step:
            raise ValueError(
                f"step={t} is behind the EMA's step {self.step}: steps must increase. After "
                "restarting from a checkpoint, load the EMA's saved state with "
                "ema.load_state_dict(...) so its step matches."
            )
        return t
