"""Power-function EMA profiles (EDM2): the weight each step gets, and their inner products.

A power-function EMA (:class:`emakit.schedules.PowerFunction`, ``d_t = (1 - 1/t)^(gamma+1)``)
read at step ``T`` weighs the weights of step ``s`` by exactly

    w_T(s) = (s^(gamma+1) - (s-1)^(gamma+1)) / T^(gamma+1) = integral_{s-1}^{s} p_T(t) dt,

the integral over one step of the *profile* ``p_T(t) = (gamma+1) t^gamma / T^(gamma+1)`` on
``[0, T]`` (zero after ``T``). An EMA updated only every ``k`` steps (``every=k``, or
``update(step=...)`` after a gap) folds in the weights of step ``u`` with the decay of the whole
interval since its last update ``v``, so they get ``integral_v^u p_T``: the same profile,
integrated over longer cells. Everything post-hoc EMA needs is therefore in ``p_T``, and the
inner product of two profiles has a closed form (Karras et al. 2024, Alg. 3):

    <p_a, p_b> = (g_a+1)(g_b+1) / (g_a+g_b+1) * (min(t_a, t_b) / max(t_a, t_b))^g / max(t_a, t_b)

where ``g`` is the exponent of the profile that ends later. ``docs/math.md`` section 11 derives it.

Example:
    >>> import numpy as np
    >>> w = step_weights(gamma=2.0, step=4)          # the exact weights of steps 1..4 at T = 4
    >>> w.round(4), float(w.sum())
    (array([0.0156, 0.1094, 0.2969, 0.5781]), 1.0)
    >>> float(inner_products(4.0, 2.0, 4.0, 2.0)) == float(9 / 5 / 4)
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["density", "gammas_of", "inner_products", "step_weights"]


def gammas_of(sigma_rels: Any) -> np.ndarray:
    """The exponents ``gamma`` of the relative widths ``sigma_rels`` (float64 array).

    Raises:
        ValueError, TypeError: a value outside ``(0, 1/sqrt(12))`` (as
            :func:`emakit.conversions.sigma_rel_to_gamma`).
    """
    from emakit.conversions import sigma_rel_to_gamma

    flat = np.asarray(sigma_rels, dtype=object).reshape(-1)
    return np.array([sigma_rel_to_gamma(s) for s in flat], dtype=np.float64)


def density(t: Any, *, step: float, gamma: float) -> np.ndarray:
    """The profile ``p_T(t) = (gamma+1) t^gamma / T^(gamma+1)`` on ``[0, T]``, zero elsewhere.

    Args:
        t: times (any shape).
        step: ``T``, the step at which the average is read (> 0).
        gamma: the exponent (>= 0).

    Returns:
        ``p_T(t)`` as float64, integrating to 1 over ``[0, T]``.
    """
    x = np.asarray(t, dtype=np.float64) / float(step)
    inside = (x >= 0.0) & (x <= 1.0)
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        values = (gamma + 1.0) * np.where(inside, x, 0.0) ** gamma / float(step)
    return np.where(inside, values, 0.0)


def step_weights(*, gamma: float, step: int, start: int = 0) -> np.ndarray:
    """The exact weights of steps ``start+1 .. step`` in a power EMA read at ``step``.

    ``w(s) = ((s/T)^(gamma+1) - ((s-1)/T)^(gamma+1))``; the weights of step ``start`` (the
    EMA's initial copy) get ``(start/T)^(gamma+1)`` more, on the first element when
    ``start > 0``. They sum to 1.

    Args:
        gamma: the exponent (>= 0).
        step: ``T`` (>= 1).
        start: the step of the weights the EMA started from (0: before the first step).

    Returns:
        float64 array of ``step - start`` weights (index ``i`` is step ``start + 1 + i``), or
        ``step - start + 1`` weights with the initial copy first when ``start > 0``.
    """
    s = np.arange(start, step + 1, dtype=np.float64) / float(step)
    with np.errstate(under="ignore"):
        cumulative = s ** (gamma + 1.0)
    weights = np.diff(cumulative)
    return np.concatenate([cumulative[:1], weights]) if start > 0 else weights


def inner_products(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
    """``<p_a, p_b>``, the integral of the product of two profiles (EDM2 Alg. 3), broadcast.

    Args:
        t_a, gamma_a: end step(s) and exponent(s) of the first profiles (> 0 and >= 0).
        t_b, gamma_b: the same for the second profiles.

    Returns:
        float64 array of the inner products, shaped as the arguments broadcast.
    """
    ta, ga = np.asarray(t_a, np.float64), np.asarray(gamma_a, np.float64)
    tb, gb = np.asarray(t_b, np.float64), np.asarray(gamma_b, np.float64)
    later = np.maximum(ta, tb)
    ratio = np.minimum(ta, tb) / later  # in (0, 1]: no overflow for huge gamma
    exponent = np.where(ta < tb, gb, ga)  # the exponent of the profile that ends later
    with np.errstate(under="ignore"):
        scale = ratio ** exponent
    result: np.ndarray = (ga + 1.0) * (gb + 1.0) / (ga + gb + 1.0) * scale / later
    return result
