"""Conversions between the ways of giving a decay, and the range check they share.

``half_life`` (optimizer steps) <-> per-step ``decay``, and EDM2's relative width ``sigma_rel``
<-> the exponent ``gamma`` of a power-function EMA (Karras et al. 2024, eq. 3). Pure Python;
:mod:`emakit.schedules` re-exports the four functions.

Example:
    >>> round(half_life_to_decay(693.1), 6), round(sigma_rel_to_gamma(0.05), 2)
    (0.999, 16.97)
"""

from __future__ import annotations

import math
import numbers

__all__ = [
    "SIGMA_REL_MAX",
    "decay_to_half_life",
    "gamma_to_sigma_rel",
    "half_life_to_decay",
    "real_in_range",
    "sigma_rel_to_gamma",
]


def real_in_range(name: str, value: object, *, low: float, high: float,
                  low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """Check that ``value`` is a finite real number in a range; return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a real number, got {value!r} of type {type(value).__name__}. {hint}"
        )
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if math.isnan(v) or too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}. {hint}".rstrip())
    return v


def half_life_to_decay(half_life: float) -> float:
    """The per-step decay whose weights halve every ``half_life`` steps: ``0.5 ** (1/half_life)``.

    Args:
        half_life: steps, > 0 (may be fractional).

    Returns:
        The decay ``d`` with ``d ** half_life == 0.5``.

    Example:
        >>> half_life_to_decay(1)
        0.5
    """
    h = real_in_range("half_life", half_life, low=0.0, high=math.inf, low_open=True, high_open=True,
              hint="half_life is counted in optimizer steps, e.g. half_life=2000.")
    return float(0.5 ** (1.0 / h))


def decay_to_half_life(decay: float) -> float:
    """The half-life in steps of a constant decay: ``ln(1/2) / ln(decay)``.

    Args:
        decay: in (0, 1).

    Returns:
        Steps after which a past weight's share of the average has halved.

    Example:
        >>> round(decay_to_half_life(0.999), 2)
        692.8
    """
    d = real_in_range("decay", decay, low=0.0, high=1.0, low_open=True, high_open=True,
              hint="decay 0 has half-life 0 and decay 1 never halves.")
    return math.log(0.5) / math.log(d)


SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)  # sigma_rel of gamma = 0 (the running mean), ~0.2887
_GAMMA_HINT = ("gamma 0 is the running mean; EDM2 uses gamma 6.94 (sigma_rel 0.10) and 16.97 "
               "(sigma_rel 0.05).")


def gamma_to_sigma_rel(gamma: float) -> float:
    """Karras et al. (2024) eq. 3: ``sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3)))``.

    Args:
        gamma: the power-function exponent, ``>= 0`` (the weights grow like ``s^gamma``).

    Returns:
        ``sigma_rel`` in ``(0, 1/sqrt(12)]``, decreasing in ``gamma``.

    Raises:
        ValueError: ``gamma < 0``: the profile would weigh early steps more than late ones, and
            ``sigma_rel`` would no longer determine ``gamma`` (it peaks at 0.3003 near
            ``gamma = -0.38``); EDM2's mapping is the branch ``gamma >= 0``.

    Example:
        >>> round(gamma_to_sigma_rel(6.94), 4), round(gamma_to_sigma_rel(0), 4)
        (0.1, 0.2887)
    """
    g = real_in_range("gamma", gamma, low=0.0, high=math.inf, high_open=True, hint=_GAMMA_HINT)
    return math.sqrt((g + 1.0) / (g + 3.0)) / (g + 2.0)  # no overflow for huge gamma


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Invert :func:`gamma_to_sigma_rel`: the ``gamma > 0`` with this ``sigma_rel``.

    Solves ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0`` for its largest real root by
    bisection in float64.

    Args:
        sigma_rel: in ``(0, 1/sqrt(12))``, i.e. below about 0.2887 (EDM2's range, ``gamma > 0``).

    Raises:
        ValueError: ``sigma_rel`` outside that range (for the running mean give ``gamma=0``),
            or so small that ``gamma`` (about ``1/sigma_rel``) overflows a float.

    Example:
        >>> round(sigma_rel_to_gamma(0.1), 2)
        6.94
    """
    s = real_in_range("sigma_rel", sigma_rel, low=0.0, high=SIGMA_REL_MAX, low_open=True,
              high_open=True, hint="EDM2 uses sigma_rel between 0.01 and 0.2; sigma_rel 0.2887 "
                                   "and above would need gamma <= 0 (give gamma= for the "
                                   "running mean, gamma=0).")
    lo, hi = 0.0, 1.0
    while gamma_to_sigma_rel(hi) > s:
        lo, hi = hi, hi * 2.0
        if math.isinf(hi):
            raise ValueError(f"sigma_rel={sigma_rel!r} is too small: gamma (about 1/sigma_rel) "
                             "would overflow a float. Use sigma_rel >= 1e-300.")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gamma_to_sigma_rel(mid) > s:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(hi)):
            break
    return 0.5 * (lo + hi)
