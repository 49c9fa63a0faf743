"""The EMA of many short series at once (pandas' ``ewm().mean()``), vectorised across the series.

:func:`ewm_rows` takes a 2-D array whose rows are series and works on all of them together, so a
million series of ten samples cost a few array operations, not a million calls. Long series go
through :mod:`emakit.ewm_slabs` instead, one at a time in cache-sized slabs. The recurrences are
solved by :mod:`emakit.scan`; rows are centred on their first observed value, so a constant series
comes out exactly constant.

- No missing values: one constant-coefficient scan; for ``adjust=True`` the denominator is the
  closed form ``(1 - beta^(t+1)) / alpha``, equal to ``1/alpha`` to the last bit once
  ``beta^(t+1) < 2^-60`` (only that head is divided).
- ``ignore_na=True`` or ``adjust=False``: each row's observations are packed to the left (a
  scatter), the dense recurrence runs on them (with the coefficient ``beta^g / (beta^g + alpha)``
  after a gap of ``g`` positions for ``adjust=False``, a :func:`emakit.scan.scan_general`), and
  a gather unpacks them, which also fills missing positions forward.
- ``adjust=True`` (or ``debias=False``) with weights by position: numerator and weight sums by a
  masked constant-coefficient scan, filled forward over missing positions.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from emakit.scan import scan_const, scan_general

__all__ = ["ewm_rows"]

F64 = npt.NDArray[np.float64]
_BLOCK = 64  # short rows: one 64 x 64 product per row block (measured faster than 8 here)


def _dense(x: F64, alpha: float, mode: str, gaps: F64 | None) -> F64:
    """The average of rows with no missing values (``gaps``: positions between samples)."""
    if alpha == 1.0:  # no memory: every output is its input, exactly
        return np.array(x, dtype=np.float64)
    beta = 1.0 - alpha
    ref = x[:, :1].copy()
    z = x - ref  # centred: a constant row gives exactly zero below
    n = x.shape[1]
    if mode == "first":  # adjust=False: z_0 = 0, z_t = c_t z_(t-1) + (1 - c_t) x_t
        if gaps is None:
            z *= alpha
            return np.asarray(scan_const(z, beta, block=_BLOCK) + ref, dtype=np.float64)
        old = beta**gaps
        c = old / (old + alpha)
        c[:, 0] = 0.0
        return np.asarray(scan_general(c, (1.0 - c) * z) + ref, dtype=np.float64)
    s = scan_const(z, beta, block=_BLOCK)
    # sum_(i<=t) beta^(t-i) = (1 - beta^(t+1)) / alpha; it is 1/alpha to the last bit once
    # beta^(t+1) < 2^-60, so only that head is divided, the rest multiplied.
    head = n if beta == 0.0 else min(n, math.ceil(-60 * math.log(2.0) / math.log(beta)) + 1)
    t = np.arange(1, head + 1, dtype=np.float64)
    w = np.ones(head) if beta == 0.0 else np.expm1(t * math.log(beta)) / math.expm1(math.log(beta))
    if mode == "zeros":  # alpha * sum_i beta^(t-i) x_i, started from 0, not corrected
        s[:, :head] += ref * w
        s[:, head:] += ref / alpha
        s *= alpha
        return s
    s[:, :head] /= w
    s[:, head:] *= alpha
    s += ref
    return s


def ewm_rows(x: F64, alpha: float, mode: str, ignore_na: bool, minp: int) -> F64:
    """The average along axis 1 of a 2-D float64 array (rows are independent series).

    Args:
        x: the series, one per row (float64, 2-D); NaN and +-inf are missing values.
        alpha: the smoothing factor in (0, 1].
        mode: ``"adjusted"`` (pandas' ``adjust=True``), ``"zeros"`` (``debias=False``) or
            ``"first"`` (``adjust=False``; needed for ``alpha == 1``).
        ignore_na: pandas' ``ignore_na``.
        minp: outputs with fewer observations so far are NaN.

    Returns:
        A new float64 array of the shape of ``x``.

    Example:
        >>> ewm_rows(np.array([[1.0, np.nan, 3.0]]), 0.5, "first", False, 0)
        array([[1.        , 1.        , 2.33333333]])
    """
    m, n = x.shape
    if n == 0:
        return np.array(x, dtype=np.float64)
    finite = np.isfinite(x)
    if finite.all():
        y = _dense(x, alpha, mode, None)
        if minp > 1:
            y[:, : minp - 1] = np.nan
        return y
    observed = finite  # pandas treats +-inf as missing, like NaN
    x = np.where(finite, x, 0.0)
    index = np.int32 if n < 2**31 else np.int64
    count = np.cumsum(observed, axis=1, dtype=index)
    seen = count > 0
    first = np.where(seen[:, -1], x[np.arange(m), np.argmax(observed, axis=1)], 0.0)
    if ignore_na or mode == "first":
        # Pack each row's observations to the left; positions go along for the gaps.
        rows, cols = np.nonzero(observed)
        slot = count[rows, cols] - 1
        width = max(int(count[:, -1].max()), 1)
        packed = np.repeat(first[:, None], width, axis=1)
        packed[rows, slot] = x[rows, cols]
        gaps = None
        if mode == "first" and not ignore_na:
            where = np.zeros((m, width))
            where[rows, slot] = cols
            gaps = np.diff(where, axis=1, prepend=0.0)
            filler = np.arange(width)[None, :] >= count[:, -1:]
            gaps[filler] = 1.0
        out = _dense(packed, alpha, mode, gaps)
        y = np.take_along_axis(out, np.maximum(count - 1, 0), axis=1)
    else:
        # adjust=True (or debias) with weights by absolute position: masked sums, filled forward.
        beta = 1.0 - alpha
        ref = first[:, None]
        s = scan_const(np.where(observed, x - ref, 0.0), beta, block=_BLOCK)
        w = scan_const(observed.astype(np.float64), beta, block=_BLOCK)
        with np.errstate(invalid="ignore", divide="ignore"):
            full = alpha * (s + ref * w) if mode == "zeros" else s / w + ref
        last = np.maximum.accumulate(np.where(observed, np.arange(n, dtype=index), 0), axis=1)
        y = np.take_along_axis(full, last, axis=1)
    y[count < max(minp, 1)] = np.nan
    return y
