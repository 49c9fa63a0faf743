"""The update and the load of EMAs over their parts: one average, or several in lockstep.

An :class:`~emakit.EMA` is made of :class:`Parts`: the tracked tensors and their plan
(:class:`~emakit.tracked.Tracked`), the decay clock (:class:`~emakit.clock.DecayClock`) and the
folding strategy (:class:`~emakit.folding.Folding`). :func:`update` folds the current weights
into the shadows of one or more EMAs of the same source, fetching the weights once (and, on a
flattened module, reading each chunk of them once for all averages); :func:`load` checks one
state per EMA and applies them all or none. ``EMA.update`` / ``EMA.load_state_dict`` and
``MultiEMA`` both run through here, so one average and several cannot drift apart.

Data flow of one update: ``clock.advance(step)`` gives the interval decay ``D`` (or None: not an
update step); ``tracked.prepare()`` fetches the weights by name and checks (one pointer read per
tensor) that the plan still fits them; ``folding.fold(plan, weights, tick)`` runs the kernels;
``clock.commit`` records the update.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from emakit.backends import Backend, Plan, SharedRead
from emakit.clock import DecayClock
from emakit.errors import EMAWarning, StateDictError, SwapError, user_stacklevel
from emakit.folding import Folding
from emakit.names import match_names, renamed_state
from emakit.state import CheckedState, LoadResult, check_state
from emakit.tracked import Tracked

__all__ = ["HasParts", "Parts", "SharedCache", "load", "update"]


class Parts(NamedTuple):
    """The components of one EMA (package-internal: ``EMA.parts``)."""

    tracked: Tracked
    clock: DecayClock
    folding: Folding


class SharedCache:
    """The shared read of several averages, kept while their plans stay the same."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []
        self.shared: SharedRead | None = None

    def get(self, backend: Backend, plans: list[Plan]) -> SharedRead | None:
        """The backend's shared read for ``plans`` (made again only when a plan changed)."""
        if len(plans) != len(self.plans) or any(a is not b for a, b in zip(plans, self.plans)):
            self.plans, self.shared = plans, backend.shared_read(plans)
        return self.shared


class HasParts(Protocol):
    """What :func:`update` and :func:`load` need of an EMA."""

    @property
    def parts(self) -> Parts:
        """The EMA's components."""

    @property
    def lock(self) -> Any:
        """Held while the EMA is used."""

    @property
    def is_swapped(self) -> bool:
        """True while the EMA weights are in the model."""

    @property
    def overlap(self) -> bool:
        """True while the copy of the weights overlaps the next step."""


def update(emas: Sequence[HasParts], step: int | None, *,
           shared: SharedCache | None = None) -> bool:
    """Fold the current weights into every EMA (all of one source, same ``every``).

    The caller holds every EMA's lock. With several EMAs and a ``shared`` cache, a flattened
    module is updated in one chunked pass for all of them (the backend's shared read).

    Returns:
        True if the shadows changed; False if this step is not an update step or was seen.

    Raises:
        SwapError: while an EMA's weights are swapped into the model.
    """
    for ema in emas:
        if ema.is_swapped:
            raise SwapError("update() called while the EMA weights are swapped into the model: "
                            "it would average the EMA with itself. Leave the swapped() block "
                            "(or call restore()) before the next training step.")
    if len(emas) == 1:  # the common case, on every step: no lists
        one = emas[0].parts
        tick = one.clock.advance(step)
        if tick is None:
            return False
        sources, plan = one.tracked.prepare(overlap=emas[0].overlap)
        one.folding.fold(plan, sources, tick)
        one.clock.commit(tick)
        return True
    parts = [ema.parts for ema in emas]
    ticks = [tick for tick in (p.clock.advance(step) for p in parts) if tick is not None]
    if not ticks:
        return False
    first = parts[0].tracked
    sources, plan = first.prepare(overlap=emas[0].overlap)
    plans = [plan] + [p.tracked.prepare(sources, overlap=e.overlap)[1]
                      for p, e in zip(parts[1:], emas[1:])]
    one_pass = None
    if shared is not None and not any(p.folding.guarded for p in parts):
        one_pass = shared.get(first.backend, plans)
    if one_pass is not None:
        one_pass.lerp_([1.0 - tick.decay for tick in ticks])
        if first.copy_shadows:
            for each in plans:
                each.copy_(sources)
    else:
        for p, each, tick in zip(parts, plans, ticks):
            p.folding.fold(each, sources, tick)
    for p, tick in zip(parts, ticks):
        p.clock.commit(tick)
    return True


def _own_names(state: Mapping[str, Any], names: list[str]) -> tuple[Mapping[str, Any], str]:
    """``state`` renamed into the model's names where it was saved from a wrapped model
    (``module.``, ``_orig_mod.``) or for one; as it is otherwise (the checks come after). Also
    the renaming, described (``"as is"``, ``"strip 'module.'"``, ...)."""
    saved = state.get("shadows") if isinstance(state, Mapping) else None
    if not (isinstance(saved, Mapping) and saved and all(isinstance(k, str) for k in saved)):
        return state, "as is"
    table, how = match_names(list(saved), names)
    return (state if how == "as is" else renamed_state(dict(state), table)), how


def _checked(parts: Parts, state: Mapping[str, Any], strict: bool) -> CheckedState:
    t, clock = parts.tracked, parts.clock
    own, how = _own_names(state, t.names)
    checked = check_state(own, t.backend.as_native)
    missing = [n for n in t.names if n not in checked.shadows]
    unexpected = [n for n in checked.shadows if n not in t.actions]
    mismatched = t.mismatches(checked.shadows)
    if mismatched or (strict and (missing or unexpected)):
        renamed = "" if how == "as is" else \
            f" (its names read with {how}, the renaming that matches this EMA's names best)"
        raise StateDictError(
            "the state does not fit this EMA" + renamed, missing=missing if strict else (),
            unexpected=unexpected if strict else (), mismatched=mismatched,
            fix="Build the EMA over the same model and dtype, or pass strict=False to load "
                "the common names (shape/dtype mismatches always fail).")
    parts.folding.check(checked)
    changed: dict[str, tuple[Any, Any]] = {}
    if dict(checked.decay) != clock.schedule.to_dict():
        changed["decay"] = (dict(checked.decay), clock.schedule.to_dict())
    if checked.every != clock.every:
        changed["every"] = (checked.every, clock.every)
    diff = {n: a for n, a in checked.actions.items() if t.actions.get(n, a) != a}
    if diff:
        changed["actions"] = (diff, {n: t.actions[n] for n in diff})
    return checked._replace(missing=tuple(missing), unexpected=tuple(unexpected),
                            changed=changed)


def _apply(parts: Parts, checked: CheckedState) -> LoadResult:
    parts.tracked.write(checked.shadows)
    parts.clock.restore(checked.step, checked.last_update_step, checked.num_updates,
                        checked.decay_product)
    parts.clock.zeros = checked.init == "zeros"
    parts.folding.load(checked)
    changed = dict(checked.changed)
    if changed:
        details = "; ".join(f"{k}: saved {v[0]!r}, current {v[1]!r}" for k, v in changed.items())
        warnings.warn(f"the loaded EMA state was saved with other settings ({details}); the "
                      "current settings stay in force. Pass the saved ones to EMA(...) to keep "
                      "them.", EMAWarning, stacklevel=user_stacklevel())
    return LoadResult(list(checked.missing), list(checked.unexpected), changed)


def load(emas: Sequence[HasParts], states: Sequence[Mapping[str, Any]], *,
         strict: bool) -> list[LoadResult]:
    """Load one state per EMA, all or nothing: every state is checked before any is applied.

    Raises:
        SwapError: while an EMA's weights are swapped in.
        StateDictError: the first state that does not fit (``average k:`` in front when
            several); nothing was loaded into any EMA.
    """
    with contextlib.ExitStack() as held:
        for ema in emas:
            held.enter_context(ema.lock)
        checked = []
        for k, (ema, state) in enumerate(zip(emas, states)):
            if ema.is_swapped:
                raise SwapError("load_state_dict() called while the EMA weights are swapped "
                                "in; leave the swapped() block (or call restore()) first.")
            try:
                checked.append(_checked(ema.parts, state, strict))
            except StateDictError as exc:
                raise (exc.located(f"average {k}") if len(emas) > 1 else exc) from None
        return [_apply(ema.parts, c) for ema, c in zip(emas, checked)]
