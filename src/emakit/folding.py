"""How an update folds the weights into the shadows, and how reads undo the zero start.

Two strategies, chosen by ``Policy(nonfinite=...)``:

- :class:`Plain` (``nonfinite="average"``): the backend plan's grouped kernels,
  ``shadow <- lerp(shadow, w, 1 - D)``; copied tensors are copied.
- :class:`Guarded` (``nonfinite="skip"``): a tensor whose update would not be all finite (NaN or
  Inf in the weights, or a finite weight that overflows the shadow's dtype or the lerp) keeps its
  shadow for that update, and the skip is counted. A plan with a checking kernel (the native CPU
  kernel) checks each tensor just before folding it in; otherwise the check reads one number per
  group back to the host, so updates without such values run the plain grouped kernels.

A zero-started average (``init="zeros"``) is divided on reading by ``1 - P``, where ``P`` is the
product of the decays of the updates that went into it (``docs/math.md`` (5)). Under the guard a
skipped tensor misses some updates, so :class:`Guarded` keeps a ``P`` per tensor.

Example:
    >>> import numpy as np
    >>> from emakit.clock import Tick
    >>> from emakit.policy import Policy
    >>> from emakit.tracked import Tracked
    >>> w = {"w": np.array([np.nan, 1.0])}
    >>> t = Tracked(w, Policy(), dtype=None, device=None, zeros=False, fast=True)
    >>> g = Guarded(t, init="copy")
    >>> sources, plan = t.prepare()
    >>> g.fold(plan, sources, Tick(1, 0.5))
    >>> g.skips()
    {'w': 1}
"""

from __future__ import annotations

from typing import Any

from emakit.backends import Plan
from emakit.clock import DecayClock, Tick
from emakit.errors import StateDictError, SwapError
from emakit.state import CheckedState, average_divisors
from emakit.tracked import Tracked

__all__ = ["Folding", "Guarded", "Plain", "for_policy"]


def _no_average(names: list[str], why: str) -> SwapError:
    shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
    return SwapError(f"an EMA started at zero (start='zeros') has no average yet for "
                     f"{len(names)} tensor(s): {shown}. {why}")


class Folding:
    """The plain strategy's interface; :class:`Plain` and :class:`Guarded` implement it."""

    guarded = False

    def __init__(self, tracked: Tracked, *, init: str) -> None:
        self.tracked = tracked
        self.reset(init)

    def reset(self, init: str) -> None:
        """Forget skip counts and per-tensor products (a new start, or before a load)."""
        self.init = init

    def fold(self, plan: Plan, sources: list[Any], tick: Tick) -> None:
        """Fold ``sources`` (the weights of step ``tick.step``) in with the interval decay
        ``tick.decay`` (copied tensors copied)."""
        plan.lerp_(sources, 1.0 - tick.decay)
        if self.tracked.copy_shadows:
            plan.copy_(sources)

    def divisors(self, num_updates: int, decay_product: float) -> float | list[float] | None:
        """What the averaged shadows are divided by on reading, or None (no correction)."""
        if self.init != "zeros":
            return None
        if num_updates == 0:
            raise SwapError("an EMA started at zero (start='zeros') has no average before its "
                            "first update (it would be all zeros). Call update() first.")
        divisors = average_divisors(self.init, decay_product, None, self.tracked.avg_names)
        if divisors is not None and any(d <= 0.0 for d in divisors.values()):
            raise _no_average(self.tracked.avg_names, "Every update so far applied decay 1, "
                              "which folds nothing in (the correction would divide by zero).")
        return None if divisors is None else 1.0 - decay_product

    def values(self, clock: DecayClock) -> list[Any]:
        """The averages (bias-corrected where needed), averaged tensors first, then copied."""
        t = self.tracked
        t.settle()
        divisors = self.divisors(clock.num_updates, clock.decay_product)
        avg = t.avg_shadows if divisors is None else t.backend.scaled(t.avg_shadows, divisors)
        return avg + t.copy_shadows

    def skips(self) -> dict[str, int]:
        """Name -> updates that left it out for non-finite values (always 0 without the guard)."""
        return dict.fromkeys(self.tracked.names, 0)

    def state(self) -> dict[str, Any]:
        """The strategy's entries of ``EMA.state_dict()``."""
        return {}

    def check(self, checked: CheckedState) -> None:
        """Raise if a checked state holds what this strategy cannot load (nothing changes)."""
        self.check_extras(checked, ())
        products = checked.products
        if products is not None and any(products.get(n, checked.decay_product) !=
                                        checked.decay_product for n in self.tracked.avg_names):
            raise StateDictError(
                "the state holds per-tensor bias corrections (decay_products) of an EMA whose "
                "guard skipped some tensors",
                fix="Create the EMA with policy=emakit.Policy(nonfinite='skip') to load it.")

    def check_extras(self, checked: CheckedState, known: tuple[str, ...]) -> None:
        """Refuse a state carrying tensors of a strategy this EMA does not run (e.g. BEMA's
        origin loaded into a plain EMA would silently drop the correction)."""
        unknown = sorted(set(checked.extras) - set(known))
        if unknown:
            raise StateDictError(
                f"the state holds tensors of another averaging method ({', '.join(unknown)})",
                fix="Load it into the kind of EMA that saved it (bema_origin: emakit.BEMA).")

    def load(self, checked: CheckedState) -> None:
        """Take the strategy's part of a checked state."""
        self.reset(checked.init)


Plain = Folding


class Guarded(Folding):
    """Skip, per tensor and update, what would make the shadow non-finite; count the skips.

    When every value is finite and, like every shadow, at most the shadows' ``headroom`` (half
    their dtype's largest value), no result can be non-finite, and the plain update is exact. A
    plan that :attr:`~emakit.backends.Plan.checks_while_folding` (the native CPU kernel) checks
    each tensor against that limit just before folding it in
    (:meth:`~emakit.backends.Plan.guarded_lerp_`); a tensor it left goes through the exact
    per-tensor check. Otherwise an update first reads back the largest magnitude among the
    averaged weights and among the copied ones (:meth:`~emakit.backends.Plan.peaks`: one
    reduction per run, one read), runs the plain grouped kernels when they are within the
    limit, and goes tensor by tensor (:meth:`~emakit.backends.Backend.guarded_update_`) when not.
    A bound on the shadows' magnitude is kept from the peaks folded in (a lerp's result lies
    between its inputs up to rounding), read from the shadows after a reset, a load or a
    tensor-by-tensor update. Counters and products live on the host (numpy).
    """

    guarded = True
    _SLACK = 1.0 + 2.0**-10  # rounding of the lerp: its result may pass its inputs by an ulp

    def reset(self, init: str) -> None:
        import numpy as np  # here: `import emakit` stays light

        t = self.tracked
        self.init = init
        self.counters = np.zeros(len(t.shadows), dtype=np.int64)
        self.products = (np.ones(len(t.avg_shadows), dtype=np.float64)
                         if init == "zeros" else None)
        self.bound: float | None = None  # >= every |shadow|; None: read it from the shadows
        self.headroom = (t.backend.headroom(t.avg_shadows), t.backend.headroom(t.copy_shadows))

    def fold(self, plan: Plan, sources: list[Any], tick: Tick) -> None:
        import numpy as np  # here: `import emakit` stays light

        t = self.tracked
        t.settle()
        n = len(t.avg_shadows)
        if self._fold_checking(plan, sources, tick):
            peaks = plan.peaks(sources, averaged=False) if t.copy_shadows else (0.0, 0.0)
        elif (peaks := plan.peaks(sources)) is not None and self._averages_safely(peaks[0]):
            plan.lerp_(sources, 1.0 - tick.decay)
            if self.products is not None:
                self.products *= tick.decay
            self.bound = max(self.bound or 0.0, peaks[0] * self._SLACK)  # no compounding
        else:
            done = np.array(t.backend.guarded_update_(t.avg_shadows, sources[:n], tick.decay),
                            dtype=bool)
            self.counters[:n] += ~done
            if self.products is not None:
                self.products[done] *= tick.decay
            self.bound = None
        if not t.copy_shadows:
            return
        if peaks is not None and peaks[1] <= self.headroom[1]:  # False for NaN
            plan.copy_(sources)
        else:
            done = np.array(t.backend.guarded_update_(t.copy_shadows, sources[n:], None),
                            dtype=bool)
            self.counters[n:] += ~done

    def _fold_checking(self, plan: Plan, sources: list[Any], tick: Tick) -> bool:
        """Fold in with the plan's checking kernel, if it has one: each tensor is checked just
        before it is folded in, and those the kernel left alone go tensor by tensor. False:
        nothing done (no such kernel, or the shadows themselves are too large)."""
        import numpy as np  # here: `import emakit` stays light

        if not plan.checks_while_folding:
            return False
        limit = self.headroom[0]
        if self.bound is None:
            self.bound = self.tracked.backend.largest(self.tracked.avg_shadows)
        if not self.bound <= limit:
            return False
        checked = plan.guarded_lerp_(sources, 1.0 - tick.decay, limit)
        assert checked is not None  # checks_while_folding says it has the kernel
        left, top = checked
        t = self.tracked
        done = np.ones(len(t.avg_shadows), dtype=bool)
        if left:  # an exact check of each: a finite result is still folded in
            done[left] = t.backend.guarded_update_([t.avg_shadows[i] for i in left],
                                                   [sources[i] for i in left], tick.decay)
            self.counters[:len(done)] += ~done
            self.bound = None
        else:
            self.bound = max(self.bound, top * self._SLACK)  # no compounding
        if self.products is not None:
            self.products[done] *= tick.decay
        return True

    def _averages_safely(self, peak: float) -> bool:
        """No lerp of weights at most ``peak`` in magnitude can give a non-finite shadow."""
        limit = self.headroom[0]
        if not peak <= limit:  # NaN, inf, or too large
            return False
        if self.bound is None:
            self.bound = self.tracked.backend.largest(self.tracked.avg_shadows)
        return self.bound <= limit

    def divisors(self, num_updates: int, decay_product: float) -> float | list[float] | None:
        if self.products is None:
            return super().divisors(num_updates, decay_product)
        super().divisors(num_updates, 0.0)  # refuses before the first update
        names = self.tracked.avg_names
        products = dict(zip(names, self.products.tolist()))
        divisors = average_divisors(self.init, decay_product, products, names)
        if divisors is None:
            return None
        empty = [n for n, d in divisors.items() if d <= 0.0]
        if empty:
            raise _no_average(empty, "Every update so far skipped them (non-finite values) or "
                              "applied decay 1. Update with finite weights first.")
        return [divisors[n] for n in names]

    def skips(self) -> dict[str, int]:
        return dict(zip(self.tracked.names, self.counters.tolist()))

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nonfinite_skips": self.skips()}
        if self.products is not None:
            out["decay_products"] = dict(zip(self.tracked.avg_names, self.products.tolist()))
        return out

    def check(self, checked: CheckedState) -> None:
        if checked.init != "zeros":
            super().check(checked)
        else:
            self.check_extras(checked, ())

    def load(self, checked: CheckedState) -> None:
        self.reset(checked.init)
        for i, name in enumerate(self.tracked.names):
            if checked.skips.get(name):
                self.counters[i] += checked.skips[name]
        if self.products is not None:
            saved = checked.products or {}
            for i, name in enumerate(self.tracked.avg_names):
                self.products[i] *= saved.get(name, checked.decay_product)


def for_policy(tracked: Tracked, init: str) -> Folding:
    """The strategy the tracked tensors' policy asks for (``Policy.nonfinite``)."""
    return (Guarded if tracked.policy.nonfinite == "skip" else Plain)(tracked, init=init)
