"""Exponential moving averages of time series (loss curves, metrics), with pandas' semantics.

:func:`ewm` gives the numbers of ``pandas.Series.ewm(...).mean()`` for 1-D and N-D arrays (along an
axis), including the handling of missing values (NaN), without pandas and without a Python loop per
sample (NaN and +-inf are missing values, as in pandas). With ``beta = 1 - alpha``:

- ``adjust=True`` (pandas' default): ``y_t = sum_i beta^(t-i) x_i / sum_i beta^(t-i)`` over the
  observed ``i <= t`` -- the bias-corrected average (Adam's / TensorBoard's ``debias``).
- ``adjust=False``: ``y_0 = x_0``, ``y_t = beta * y_(t-1) + alpha * x_t`` (the textbook
  smoothing formula ``EMA(t) = (1 - alpha) * EMA(t-1) + alpha * x_t``, started from the first
  value).
- ``debias=False``: the same recurrence started from zero, ``y_(-1) = 0``, *not* corrected: what a
  hand-written loop with ``ema = np.zeros_like(x)`` gives (biased towards 0 early on).

How it runs: every case is a linear recurrence ``s_t = a_t * s_(t-1) + u_t``, solved by
``emakit.scan`` without a loop per sample (blocks of 8 samples are one BLAS product with the
Toeplitz matrix ``beta^(k-i)``, the block ends are chained by the same recurrence on 8x fewer
values). A series of at least 4096 samples goes through ``emakit.ewm_slabs``, a cache-sized
slab at a time with the state carried across (missing values included: numerator and weight as
two rows of one scan, observations packed for ``ignore_na=True``, a scaled scan for
``adjust=False``); shorter series go all together through ``emakit.ewm_batch``, vectorised
across series. Series are centred on their first observed value, so a constant series comes out
exactly constant.

Example:
    >>> import numpy as np
    >>> from emakit.smoothing import ewm
    >>> ewm([1.0, 2.0, np.nan, 4.0], alpha=0.5).round(4)
    array([1.    , 1.6667, 1.6667, 3.3636])
    >>> ewm([1.0, 2.0, 3.0], alpha=0.5, adjust=False)
    array([1.  , 1.5 , 2.25])
    >>> ewm([1.0, 2.0, 3.0], alpha=0.5, debias=False)
    array([0.5  , 1.25 , 2.125])
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import numpy.typing as npt

from emakit.conversions import real_in_range
from emakit.ewm_batch import ewm_rows
from emakit.ewm_slabs import ewm_series

__all__ = ["alpha_from", "ewm"]

_LONG = 1 << 12  # series at least this long go through emakit.ewm_slabs, one after the other
_MIN_ALPHA = 2.0**-53  # the smallest alpha with 1 - alpha != 1 in float64 (rounding to even)
F64 = npt.NDArray[np.float64]


def alpha_from(*, alpha: float | None = None, half_life: float | None = None,
               span: float | None = None, com: float | None = None) -> float:
    """The smoothing factor ``alpha`` from exactly one of pandas' four parameters.

    ``alpha = 2 / (span + 1) = 1 / (1 + com) = 1 - 0.5 ** (1 / half_life)``.

    Args:
        alpha: the weight of the newest value, in (0, 1].
        half_life: samples after which a value's weight halves, > 0.
        span: the "N-sample" average, >= 1.
        com: centre of mass, >= 0.

    Returns:
        ``alpha`` as a float in [2^-53, 1].

    Raises:
        ValueError: none or several given, a value out of range, or an ``alpha`` below 2^-53
            (``half_life`` above about 6.2e15 samples), where ``1 - alpha`` rounds to 1.

    Example:
        >>> alpha_from(span=3), alpha_from(com=1), alpha_from(half_life=1)
        (0.5, 0.5, 0.5)
    """
    given = {k: v for k, v in (("alpha", alpha), ("half_life", half_life), ("span", span),
                               ("com", com)) if v is not None}
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of alpha, half_life, span or com, got {given or 'none'}. "
            "Example: ewm(x, half_life=50)."
        )
    (name, value), = given.items()
    inf = math.inf
    if name == "alpha":
        a = real_in_range("alpha", value, low=0.0, high=1.0, low_open=True)
    elif name == "half_life":
        h = real_in_range("half_life", value, low=0.0, high=inf, low_open=True, high_open=True)
        a = -math.expm1(-math.log(2.0) / h)
    elif name == "span":
        a = 2.0 / (real_in_range("span", value, low=1.0, high=inf, high_open=True) + 1.0)
    else:
        a = 1.0 / (1.0 + real_in_range("com", value, low=0.0, high=inf, high_open=True))
    if 1.0 - a == 1.0:  # beta = 1 - alpha rounds to 1: the average could never move
        raise ValueError(
            f"{name}={value!r}" + ("" if name == "alpha" else f" gives alpha={a:.3g}, which")
            + " is too small for float64: 1 - alpha rounds to 1, so the average would never "
            f"leave its first value. The limits are about alpha >= "
            f"{_MIN_ALPHA:.3g}, half_life <= {math.log(2.0) / _MIN_ALPHA:.3g}, span <= "
            f"{2.0 / _MIN_ALPHA - 1.0:.3g}, com <= {1.0 / _MIN_ALPHA - 1.0:.3g} samples; for an "
            "average of everything so far use a plain cumulative mean."
        )
    return a


def ewm(
    x: Any,
    *,
    alpha: float | None = None,
    half_life: float | None = None,
    span: float | None = None,
    com: float | None = None,
    adjust: bool = True,
    ignore_na: bool = False,
    min_periods: int = 0,
    debias: bool | None = None,
    axis: int = 0,
) -> F64:
    """Exponentially weighted moving average, as ``pandas.Series.ewm(...).mean()``.

    With ``beta = 1 - alpha`` and the observed (non-NaN) samples ``x_i``:

    - ``adjust=True``: ``y_t = sum_(i<=t) beta^(t-i) x_i / sum_(i<=t) beta^(t-i)``;
    - ``adjust=False``: ``y_t = (w_old * y_prev + alpha * x_t) / (w_old + alpha)`` with
      ``w_old = beta^g`` after a gap of ``g`` positions (``g = 1`` with ``ignore_na=True``); without
      gaps this is ``y_t = beta * y_(t-1) + alpha * x_t``, ``y_0 = x_0``;
    - ``debias=False``: ``y_t = alpha * sum_(i<=t) beta^(t-i) x_i`` (started from 0, uncorrected);
      ``debias=True`` is the corrected average, identical to ``adjust=True``.

    A missing value (NaN, and +-inf as in pandas) keeps the last average; weights follow absolute
    positions unless ``ignore_na=True``, which drops the missing positions altogether. Computed in
    float64. One deliberate difference: at exactly ``alpha=0.5`` (``com=1``) with ``adjust=False``,
    ``ignore_na=False`` and gaps, pandas switches to its ``times=`` formula (new weight
    ``1 - beta^g``); emakit keeps the formula above for every alpha.

    Args:
        x: array-like of numbers (lists, numpy arrays, pandas Series).
        alpha, half_life, span, com: exactly one: the smoothing factor, a half-life in samples,
            a span (``alpha = 2/(span+1)``) or a centre of mass (``alpha = 1/(1+com)``).
        adjust: pandas' bias-corrected form (True) or the recurrence from the first value.
        ignore_na: weights by position among observations only.
        min_periods: outputs with fewer observations so far are NaN.
        debias: None for pandas' semantics; False for the zero-started uncorrected average;
            True for the corrected one (equals ``adjust=True``).
        axis: the time axis of an N-D array.

    Returns:
        A float64 array of the shape of ``x``.

    Raises:
        TypeError, ValueError: for bad arguments or non-numeric data.

    Example:
        >>> import numpy as np
        >>> ewm(np.array([[0.0, 10.0], [1.0, 20.0]]), alpha=0.5, adjust=False, axis=0)
        array([[ 0. , 10. ],
               [ 0.5, 15. ]])
    """
    a = alpha_from(alpha=alpha, half_life=half_life, span=span, com=com)
    minp: object = min_periods
    if isinstance(minp, bool) or not isinstance(minp, numbers.Integral) or int(minp) < 0:
        raise ValueError(f"min_periods must be an int >= 0, got {min_periods!r}.")
    if debias is not None and not adjust:
        raise ValueError(
            f"debias={debias!r} with adjust=False: debias selects the zero-started average, "
            "adjust=False the one started from the first value. Pass only one of them."
        )
    mode = "first" if not adjust else ("zeros" if debias is False else "adjusted")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"x must hold numbers, got {type(x).__name__} ({exc}).") from exc
    if arr.ndim == 0:
        raise ValueError("x must have at least one dimension (a series), got a scalar.")
    ax: object = axis
    if isinstance(ax, bool) or not isinstance(ax, numbers.Integral) \
            or not -arr.ndim <= int(ax) < arr.ndim:
        raise ValueError(f"axis={axis!r} is out of range for an array of {arr.ndim} dimensions.")
    moved = np.moveaxis(arr, axis, -1)
    rows = np.ascontiguousarray(moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1]))
    if a == 1.0:  # no memory: each output is its own input (carried over missing values)
        mode = "first"
    m, n = rows.shape
    if n >= _LONG:
        out = np.empty((m, n))
        ewm_series(rows, out, a, mode, bool(ignore_na), int(min_periods))
    else:
        out = ewm_rows(rows, a, mode, bool(ignore_na), int(min_periods))
    return np.moveaxis(out.reshape(moved.shape), -1, axis)
