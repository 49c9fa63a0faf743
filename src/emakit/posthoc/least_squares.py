"""The post-hoc EMA solve, by least squares: which mix of snapshots makes another width.

Given snapshots of power EMAs (end steps ``t_i``, widths ``sigma_rel_i``), the profile of a
target average (``out_step``, ``sigma_rel``) is approximated in least squares by
``sum_i c_i p_i``: the normal equations ``A c = b`` with ``A_ij = <p_i, p_j>`` and
``b_i = <p_i, p_target>`` (:func:`emakit.posthoc.profiles.inner_products`), solved in float64
(Karras et al. 2024, Alg. 3). Each column is then divided by its sum, so the synthesised
average is an affine mix of the snapshots: a constant weight stays exactly that constant, and
the error a slightly-off solve leaves does not scale the weights.

How well the snapshots can represent the target is known before any weight is read: the
relative L2 distance between the synthesised profile and the target profile,
``||sum_i c_i p_i - p|| / ||p||`` (computed from the same inner products). It is 0.8-0.9
times the relative change of ``sigma_rel`` that moves a profile as far (a profile error of
0.02 is the distance between ``sigma_rel`` 0.100 and 0.1022), and :func:`coefficients`
refuses a target whose profile error is above ``max_profile_error`` (default
:data:`MAX_PROFILE_ERROR`): that is a request the snapshots do not support (too narrow for
their spacing, too wide for their widths, or a step they do not cover).

Example:
    >>> import numpy as np
    >>> steps = [t for t in range(1000, 20001, 1000) for _ in range(2)]  # every 1000 steps
    >>> sigmas = [0.05, 0.10] * 20                                        # two EMAs each time
    >>> c = coefficients(steps, sigmas, 20000, [0.10, 0.07])
    >>> c.shape, np.allclose(c.sum(axis=0), 1.0)
    ((40, 2), True)
    >>> c[-2:, 0].round(6)                   # a target equal to a snapshot is that snapshot
    array([0., 1.])
    >>> float(abs(c[:-1, 0]).max()) < 1e-6
    True
    >>> solve(steps, sigmas, 20000, [0.07]).profile_errors.round(4)
    array([0.0025])
    >>> supported_ranges(steps, [16.97, 6.94] * 20, 20000)   # by gamma; error <= 0.02
    [(0.0323, 0.211)]
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from emakit.conversions import SIGMA_REL_MAX, gamma_to_sigma_rel
from emakit.posthoc.profiles import gammas_of, inner_products

__all__ = ["MAX_INPUTS", "MAX_PROFILE_ERROR", "Solution", "checked", "coefficients",
           "describe_ranges", "solve", "solve_gammas", "supported_ranges"]

MAX_PROFILE_ERROR = 0.02
"""The default limit on the relative L2 error of a synthesised profile (see the module doc)."""
MAX_INPUTS = 2048
"""The most snapshots one solve takes (its matrix: 32 MiB, about a second on one core)."""


class Solution(NamedTuple):
    """The solve for some targets.

    Attributes:
        coefficients: ``[n_in, n_out]`` float64; each column sums to 1.
        profile_errors: ``[n_out]``: the relative L2 distance of each synthesised profile from
            its target profile (0 for a target equal to an input, up to float64 rounding).
    """

    coefficients: np.ndarray
    profile_errors: np.ndarray


def _steps(name: str, values: Any) -> np.ndarray:
    flat = list(np.asarray(values, dtype=object).reshape(-1))
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or \
                not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"{name} must hold optimizer steps (finite numbers > 0), got "
                             f"{v!r}. A snapshot's step is the step of the EMA's last update.")
    return np.array([float(v) for v in flat], dtype=np.float64)


def _gammas(name: str, values: Any) -> np.ndarray:
    flat = list(np.asarray(values, dtype=object).reshape(-1))
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or \
                not (math.isfinite(float(v)) and float(v) >= 0):
            raise ValueError(f"{name} must hold power-EMA exponents (finite numbers >= 0), got "
                             f"{v!r}.")
    return np.array([float(v) for v in flat], dtype=np.float64)


def _check_inputs(in_steps: np.ndarray, in_gammas: np.ndarray) -> None:
    if len(in_steps) == 0 or len(in_steps) != len(in_gammas):
        raise ValueError(f"the inputs need one step per sigma_rel (gamma), at least one; got "
                         f"{len(in_steps)} steps and {len(in_gammas)} widths.")
    if len(in_steps) > MAX_INPUTS:
        raise ValueError(
            f"{len(in_steps)} snapshots are more than one solve takes ({MAX_INPUTS}: its cost "
            "grows with the cube of their number, and snapshots that close add nothing). Record "
            "with a larger snapshot_every, or synthesise at an earlier step.")
    seen: dict[tuple[float, float], int] = {}
    for i, key in enumerate(zip(in_steps.tolist(), in_gammas.tolist())):
        if key in seen:
            raise ValueError(
                f"inputs {seen[key]} and {i} are the same snapshot (step {key[0]:g}, gamma "
                f"{key[1]:.6g}): their profiles are equal and the solve is singular. Give each "
                "(step, sigma_rel) once.")
        seen[key] = i


def solve_gammas(in_steps: npt.ArrayLike, in_gammas: npt.ArrayLike, out_step: float,
                 out_gammas: npt.ArrayLike) -> Solution:
    """The least-squares mix of input profiles for each target, with its profile error.

    No support check (see :func:`coefficients`); the inputs are used as given.

    Args:
        in_steps: the step of each input snapshot (its EMA's last update), > 0.
        in_gammas: the exponent of each input, >= 0.
        out_step: the step the targets end at, > 0 and at most the last input step.
        out_gammas: the exponent of each target.

    Returns:
        A :class:`Solution`.

    Raises:
        ValueError: malformed inputs, a repeated input, ``out_step`` after the last input, or
            a singular system.
    """
    ts, gs = _steps("in_steps", in_steps), _gammas("in_gammas", in_gammas)
    _check_inputs(ts, gs)
    (t_out,) = _steps("out_step", [out_step])
    go = _gammas("out_gammas", out_gammas)
    if len(go) == 0:
        raise ValueError("give at least one target width (out_sigma_rels / out_gammas).")
    if t_out > ts.max():
        raise ValueError(
            f"out_step={out_step!r} is after the last snapshot (step {ts.max():g}): the weights "
            f"after it were never recorded. Choose out_step <= {ts.max():g}.")
    a = inner_products(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    b = inner_products(ts[:, None], gs[:, None], t_out, go[None, :])
    try:
        x = np.linalg.solve(a, b)
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"the snapshots' profiles are linearly dependent ({exc}); remove "
                         "duplicate snapshots.") from None
    sums = x.sum(axis=0)
    if not np.all(np.isfinite(x)) or np.any(np.abs(sums) < 1e-12):
        raise ValueError("the solve for these snapshots is numerically singular (coefficients "
                         "not finite or summing to 0); use fewer, more distinct snapshots.")
    x = x / sums
    own = inner_products(t_out, go, t_out, go)
    squared = own - 2.0 * np.einsum("ij,ij->j", x, b) + np.einsum("ij,ik,kj->j", x, a, x)
    errors = np.sqrt(np.maximum(squared, 0.0) / own)
    return Solution(x, errors)


def solve(in_steps: npt.ArrayLike, in_sigma_rels: npt.ArrayLike, out_step: float,
          out_sigma_rels: npt.ArrayLike) -> Solution:
    """:func:`solve_gammas` with widths given as ``sigma_rel`` (converted to ``gamma``).

    Raises:
        ValueError: as :func:`solve_gammas`, or a ``sigma_rel`` outside ``(0, 1/sqrt(12))``.
    """
    return solve_gammas(in_steps, gammas_of(in_sigma_rels), out_step, gammas_of(out_sigma_rels))


def supported_ranges(in_steps: npt.ArrayLike, in_gammas: npt.ArrayLike, out_step: float, *,
                     max_profile_error: float = MAX_PROFILE_ERROR,
                     low: float = 1e-3, points: int = 400) -> list[tuple[float, float]]:
    """The ``sigma_rel`` intervals whose profile error at ``out_step`` is within the limit.

    Scanned on a log grid from ``low`` to ``1/sqrt(12)``, each end refined on a finer grid;
    the ends are rounded inwards to 3 significant digits.

    Returns:
        ``[(lo, hi), ...]`` in increasing order (empty if no width is supported).
    """
    grid = np.geomspace(low, SIGMA_REL_MAX * (1 - 1e-9), points)
    errors = solve_gammas(in_steps, in_gammas, out_step, gammas_of(grid)).profile_errors
    ok = errors <= max_profile_error
    ranges = []
    i = 0
    while i < points:
        if not ok[i]:
            i += 1
            continue
        j = i
        while j + 1 < points and ok[j + 1]:
            j += 1
        lo = grid[i] if i == 0 else _edge(in_steps, in_gammas, out_step, grid[i - 1], grid[i],
                                          max_profile_error)
        hi = grid[j] if j == points - 1 else _edge(in_steps, in_gammas, out_step, grid[j + 1],
                                                   grid[j], max_profile_error)
        ranges.append((_round(lo, up=True), _round(hi, up=False)))
        i = j + 1
    return ranges


def _edge(in_steps: npt.ArrayLike, in_gammas: npt.ArrayLike, out_step: float, bad: float,
          good: float, limit: float) -> float:
    """The supported end of ``[bad, good]`` (a finer grid between them)."""
    fine = np.linspace(good, bad, 64)
    errors = solve_gammas(in_steps, in_gammas, out_step, gammas_of(fine)).profile_errors
    k = 0
    while k + 1 < len(fine) and errors[k + 1] <= limit:
        k += 1
    return float(fine[k])


def _round(x: float, *, up: bool) -> float:
    scale = 10.0 ** (math.floor(math.log10(x)) - 2)
    return float(f"{(math.ceil(x / scale) if up else math.floor(x / scale)) * scale:.3g}")


def describe_ranges(ranges: list[tuple[float, float]]) -> str:
    """``"0.0281-0.211"`` (or several, comma-separated; ``"none"``)."""
    return ", ".join(f"{lo:.3g}-{hi:.3g}" for lo, hi in ranges) or "none"


def coefficients(in_steps: npt.ArrayLike, in_sigma_rels: npt.ArrayLike, out_step: float,
                 out_sigma_rels: npt.ArrayLike, *,
                 max_profile_error: float = MAX_PROFILE_ERROR) -> np.ndarray:
    """The mix of snapshots that synthesises each target average (EDM2 Alg. 3, normalised).

    Args:
        in_steps: the step of each snapshot (the EMA's last update), > 0.
        in_sigma_rels: the ``sigma_rel`` of each snapshot, in ``(0, 1/sqrt(12))``.
        out_step: the step the targets end at: at most the last snapshot's step.
        out_sigma_rels: the targets' ``sigma_rel``.
        max_profile_error: refuse a target whose synthesised profile is further than this
            (relative L2) from its profile; ``math.inf`` turns the check off.

    Returns:
        ``[n_in, n_out]`` float64; the average for target ``j`` is
        ``sum_i c[i, j] * snapshot_i``. Each column sums to 1.

    Raises:
        ValueError: malformed inputs (naming the argument and value), a repeated snapshot,
            ``out_step`` after the last snapshot, or a target the snapshots do not support
            (naming it, its profile error and the supported ``sigma_rel`` range).
    """
    return checked(in_steps, gammas_of(in_sigma_rels), out_step, gammas_of(out_sigma_rels),
                   max_profile_error=max_profile_error).coefficients


def checked(in_steps: npt.ArrayLike, in_gammas: npt.ArrayLike, out_step: float,
            out_gammas: npt.ArrayLike, *, max_profile_error: float = MAX_PROFILE_ERROR
            ) -> Solution:
    """:func:`solve_gammas`, refusing targets the inputs do not support (see
    :func:`coefficients`)."""
    given: object = max_profile_error
    if isinstance(given, bool) or not isinstance(given, numbers.Real) or not float(given) > 0:
        raise ValueError(f"max_profile_error must be a number > 0 (math.inf: no check), got "
                         f"{max_profile_error!r}.")
    limit = float(given)
    found = solve_gammas(in_steps, in_gammas, out_step, out_gammas)
    bad = [j for j, e in enumerate(found.profile_errors) if not e <= limit]
    if bad:
        ranges = supported_ranges(in_steps, in_gammas, out_step, max_profile_error=limit)
        targets = np.asarray(out_gammas, dtype=np.float64).reshape(-1)
        shown = ", ".join(f"{gamma_to_sigma_rel(float(targets[j])):.4g} (profile error "
                          f"{found.profile_errors[j]:.3g})" for j in bad[:5])
        raise ValueError(
            f"the snapshots do not support sigma_rel {shown} at step {out_step!r}: the "
            f"synthesised profile would be further than max_profile_error={limit:g} from "
            f"the target. Supported at this step: sigma_rel {describe_ranges(ranges)}. Choose "
            "targets in that range, snapshot more often (narrower targets) or record a wider "
            "sigma_rel (wider targets), or raise max_profile_error.")
    return found
