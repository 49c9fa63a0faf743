"""The EMA state schema: the keys of ``EMA.state_dict()``, their types, and the checks on loading.

One place for the layout that :meth:`emakit.EMA.state_dict` writes and that
:mod:`emakit.io.checkpoint` stores in a file header (``docs/state-format.md``):

==================  ===========================================================================
key                 value
==================  ===========================================================================
format_version      1 (an ``int``; bumped on any incompatible change)
backend             ``"torch"`` or ``"numpy"``
step                the last optimizer step seen
last_update_step    the step of the last update
num_updates         how many updates made the average
decay_product       product of all interval decays so far (bias correction of ``init="zeros"``)
init                ``"copy"`` or ``"zeros"``
every               update every k-th step (a setting: reported if it differs, never applied)
decay               the schedule as a dict (a setting)
policy              the policy as a dict (a setting)
actions             name -> ``"average"`` / ``"copy"``
shadows             name -> tensor, in the shadow dtype
nonfinite_skips     (guard) name -> how many updates skipped it
decay_products      (guard with ``init="zeros"``) name -> its own decay product
source_dtypes       (informational) name -> the model's dtype
aliases             (informational) second name of a tied weight -> its tracked name
extras              (a strategy's tensors, e.g. BEMA's origin) group -> name -> tensor
==================  ===========================================================================

:func:`check_state` checks every entry and converts the tensors before anything is loaded, so a
malformed state raises :class:`~emakit.StateDictError` and changes nothing.

Example:
    >>> try:
    ...     check_state({"format_version": True}, lambda x, where: x)
    ... except ValueError as exc:
    ...     print(exc)
    unknown format_version True; this emakit reads format_version 1. Nothing was loaded. Is this
    an emakit EMA state_dict()?
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from emakit.errors import StateDictError

__all__ = ["FORMAT_VERSION", "INFO_KEYS", "READABLE_VERSIONS", "REQUIRED_KEYS", "SETTINGS",
           "CheckedState", "LoadResult", "average_divisors", "check_state"]

FORMAT_VERSION = 1
"""Version of the layout of :meth:`emakit.EMA.state_dict`; bumped on any incompatible change."""
READABLE_VERSIONS = (1,)
"""The ``format_version`` values this emakit reads (every version it ever wrote)."""
SETTINGS = ("backend", "step", "last_update_step", "num_updates", "decay_product", "init",
            "every", "decay", "policy", "actions")
"""The non-tensor keys every state has (besides ``format_version`` and ``shadows``)."""
REQUIRED_KEYS = ("format_version", *SETTINGS, "shadows")
"""The keys every state has: the version, the settings, and the shadows."""
INFO_KEYS = ("source_dtypes", "aliases")
"""Optional keys that describe the model; reported, never applied."""
MAX_COUNT = 2 ** 63 - 1  # skip counters are int64


class LoadResult(NamedTuple):
    """What :meth:`emakit.EMA.load_state_dict` found.

    Attributes:
        missing: names this EMA tracks that the state did not hold (kept as they were).
        unexpected: names in the state that this EMA does not track (ignored).
        changed: setting -> ``(saved, current)`` for settings that differ; the current ones stay
            in force (saved hyperparameters are reported, never silently applied).
    """

    missing: list[str]
    unexpected: list[str]
    changed: dict[str, tuple[Any, Any]]


class CheckedState(NamedTuple):
    """A state that passed every check of :func:`check_state`, with native tensors."""

    step: int
    last_update_step: int
    num_updates: int
    decay_product: float
    init: str
    every: int
    shadows: dict[str, Any]
    actions: Mapping[str, str]
    decay: Mapping[str, Any]
    skips: dict[str, int]
    products: dict[str, float] | None
    extras: Mapping[str, dict[str, Any]] = MappingProxyType({})
    raw: Mapping[str, Any] = MappingProxyType({})
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    changed: Mapping[str, tuple[Any, Any]] = MappingProxyType({})


def short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters; arrays by type (a state may hold anything)."""
    text = repr(value) if not hasattr(value, "shape") else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _int(value: object, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            not minimum <= int(value) <= MAX_COUNT:
        raise StateDictError(f"{where} must be an int in [{minimum}, 2**63), got {short(value)}")
    return int(value)


def _fraction(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not 0.0 <= float(value) <= 1.0:
        raise StateDictError(f"{where} must be a number in [0, 1], got {short(value)}")
    return float(value)


def _mapping(state: Mapping[str, Any], key: str, *, optional: bool = False
             ) -> Mapping[str, Any]:
    value = state.get(key)
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise StateDictError(f"state[{key!r}] must map names (str) to values, got "
                             f"{type(value).__name__}")
    return value


def check_state(state: object, as_native: Callable[[object, str], Any]) -> CheckedState:
    """Check every entry of a state dict and convert its tensors; change nothing.

    Args:
        state: what :meth:`emakit.EMA.state_dict` returned (possibly through a file).
        as_native: converts one tensor to the loading backend's type, raising ``TypeError``
            for anything that is not a dense array of numbers (``Backend.as_native``).

    Returns:
        The :class:`CheckedState`.

    Raises:
        StateDictError: naming the first malformed key and what was found.
    """
    if not isinstance(state, Mapping):
        raise StateDictError(f"state must be a dict from EMA.state_dict(), got "
                             f"{type(state).__name__}")
    version = state.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        newer = type(version) is int and version > max(READABLE_VERSIONS)
        raise StateDictError(
            f"unknown format_version {short(version)}; this emakit reads format_version "
            f"{', '.join(map(str, READABLE_VERSIONS))}",
            fix="Upgrade emakit to read it." if newer else "Is this an emakit EMA state_dict()?")
    absent = [k for k in REQUIRED_KEYS if k not in state]
    if absent:
        raise StateDictError(f"the state lacks the keys {absent}",
                             fix="Is this an emakit EMA state_dict()?")
    step, last, updates = (_int(state[k], f"state[{k!r}]") for k in
                           ("step", "last_update_step", "num_updates"))
    every = _int(state["every"], "state['every']", minimum=1)
    if last > step:
        raise StateDictError(f"state['last_update_step']={last} is after state['step']={step}")
    product = _fraction(state["decay_product"], "state['decay_product']")
    init = state["init"]
    if init not in ("copy", "zeros"):
        raise StateDictError(f"state['init'] must be 'copy' or 'zeros', got {short(init)}")
    for key in ("decay", "policy"):
        _mapping(state, key)
    actions = _mapping(state, "actions")
    bad = [n for n, a in actions.items() if a not in ("average", "copy")]
    if bad:
        raise StateDictError(f"state['actions'] must map names to 'average' or 'copy'; "
                             f"{short(bad[0])} -> {short(actions[bad[0]])}")
    shadows = {}
    for name, tensor in _mapping(state, "shadows").items():
        try:
            shadows[name] = as_native(tensor, f"state['shadows'][{name!r}]")
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            raise StateDictError(str(exc)) from None
    raw_skips = _mapping(state, "nonfinite_skips", optional=True)
    skips = {n: _int(v, f"state['nonfinite_skips'][{n!r}]") for n, v in raw_skips.items()}
    products = None
    if state.get("decay_products") is not None:
        products = {n: _fraction(v, f"state['decay_products'][{n!r}]")
                    for n, v in _mapping(state, "decay_products").items()}
    for key in INFO_KEYS:
        for name, value in _mapping(state, key, optional=True).items():
            if not isinstance(value, str):
                raise StateDictError(f"state[{key!r}][{name!r}] must be a str, got "
                                     f"{short(value)}")
    extras: dict[str, dict[str, Any]] = {}
    for group, tensors in _mapping(state, "extras", optional=True).items():
        if not isinstance(tensors, Mapping) or not all(isinstance(k, str) for k in tensors):
            raise StateDictError(f"state['extras'][{group!r}] must map names to tensors, got "
                                 f"{type(tensors).__name__}")
        try:
            extras[group] = {n: as_native(t, f"state['extras'][{group!r}][{n!r}]")
                             for n, t in tensors.items()}
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            raise StateDictError(str(exc)) from None
    return CheckedState(step, last, updates, product, str(init), every, shadows, actions,
                        state["decay"], skips, products, extras, state)


def average_divisors(init: str, decay_product: float, products: Mapping[str, float] | None,
                     names: list[str]) -> dict[str, float] | None:
    """What each averaged shadow is divided by on reading: ``1 - P`` (``docs/math.md`` (5)).

    A zero-started average (``init="zeros"``) holds ``(1 - P) x`` of a constant input ``x``,
    where ``P`` is the product of the decays of the updates that went into it: per tensor
    (``products``) where the non-finite guard skipped some, else ``decay_product``. A divisor
    of 0 means no average yet (no update, or decay 1 throughout).

    Returns:
        name -> divisor for every name in ``names``, or None when nothing needs dividing
        (``init="copy"``, or every ``P`` is 0).

    Example:
        >>> average_divisors("zeros", 0.25, None, ["w"])
        {'w': 0.75}
        >>> average_divisors("zeros", 0.25, {"w": 1.0}, ["w"])
        {'w': 0.0}
    """
    if init != "zeros":
        return None
    divisors = {n: 1.0 - float((products or {}).get(n, decay_product)) for n in names}
    return None if all(d == 1.0 for d in divisors.values()) else divisors
