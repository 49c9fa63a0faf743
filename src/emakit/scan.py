"""Linear recurrences ``s_t = a_t * s_(t-1) + u_t`` along the last axis, without a loop per sample.

The time-series EMA (:mod:`emakit.smoothing`) reduces to these. Each function takes a 2-D float64
array whose rows are independent series and an incoming state ``init`` per row (``s_(-1)``, zero
by default), and returns a new array ``s`` of the same shape (its input may be overwritten).

- :func:`scan_const`, a constant coefficient ``a_t = beta``: blocks of ``block`` samples are one
  matrix product with the lower-triangular Toeplitz matrix ``T[k, i] = beta^(k-i)``; the block
  ends come first from one matrix-vector product and the same recurrence on ``block`` times fewer
  values (with ``beta^block``, recursively), and each block's incoming state times ``beta`` is
  added to its first input before the product. Every entry of ``T`` is in [0, 1]: no scaling.
- :func:`scan_general`, any ``a_t``: eight sequential steps per block, vectorised over blocks and
  rows, then the block ends recursively; no assumption on ``a``.

Example:
    >>> import numpy as np
    >>> scan_const(np.array([[1.0, 1.0, 1.0]]), 0.5, np.array([4.0]))
    array([[3.  , 2.5 , 2.25]])
    >>> scan_general(np.array([[1.0, 0.0, 2.0]]), np.array([[1.0, 1.0, 1.0]]))
    array([[1., 1., 3.]])
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

__all__ = ["scan_const", "scan_general", "toeplitz"]

F64 = npt.NDArray[np.float64]
FIRST_BLOCK = 8  # the bulk of the work: 8 x 8 products are the cheapest per sample (in cache)
UPPER_BLOCK = 16  # the block ends (measured: 8 to 16 is fastest, the cost is in the calls)


def toeplitz(beta: float, size: int) -> F64:
    """``T[k, i] = beta^(k-i)`` for ``i <= k``, else 0 (``0^0 = 1``).

    Example:
        >>> toeplitz(0.5, 3)
        array([[1.  , 0.  , 0.  ],
               [0.5 , 1.  , 0.  ],
               [0.25, 0.5 , 1.  ]])
    """
    k = np.arange(size)
    lag = k[:, None] - k[None, :]
    return np.where(lag >= 0, beta ** np.maximum(lag, 0).astype(np.float64), 0.0)


@lru_cache(maxsize=256)
def _right(beta: float, size: int, gain: float = 1.0) -> F64:
    """``gain * toeplitz(beta, size).T``, read-only and cached: ``u @ _right(...)`` scans rows."""
    t = np.ascontiguousarray(toeplitz(beta, size).T) * gain
    t.setflags(write=False)
    return t


@lru_cache(maxsize=256)
def _powers(beta: float, start: int, stop: int, step: int, gain: float = 1.0) -> F64:
    """``gain * beta ** arange(start, stop, step)``, read-only and cached."""
    p = beta ** np.arange(start, stop, step, dtype=np.float64) * gain
    p.setflags(write=False)
    return p


def _pad(u: F64, size: int, fill: float) -> F64:
    """``u`` with columns of ``fill`` appended up to ``size`` columns (``u`` itself if none)."""
    m, n = u.shape
    if n == size:
        return u
    out = np.full((m, size), fill)
    out[:, :n] = u
    return out


def _init(init: F64 | None, m: int) -> F64:
    return np.zeros(m) if init is None else np.asarray(init, dtype=np.float64).reshape(m)


def scan_const(u: F64, beta: float, init: F64 | None = None, *, gain: float = 1.0,
               block: int = FIRST_BLOCK, out: F64 | None = None, work: F64 | None = None) -> F64:
    """``s_t = beta * s_(t-1) + gain * u_t`` along axis 1 of ``u`` (rows independent).

    Args:
        u: 2-D float64 inputs, one series per row; it may be overwritten.
        beta: the coefficient, in [0, 1].
        init: the state ``s_(-1)`` before the first sample, one per row (zero if None).
        gain: a factor on the inputs, folded into the matrices (saves a pass over ``u``); > 0.
        block: samples per Toeplitz block at this level (the levels above use 16).
        out: where to write ``s`` (C-contiguous, the shape of ``u``, not overlapping it).
        work: scratch space for the block ends, 1-D float64 of at least ``2 * m * n / block``
            elements (``m`` rows); with ``out`` it saves allocating on a long series' every slab.

    Returns:
        ``s`` (``out`` if given).
    """
    m, n = u.shape
    if n <= block:
        res = np.matmul(u, _right(beta, n, gain), out=out)
        if init is not None:
            res += _init(init, m)[:, None] * _powers(beta, 1, n + 1, 1)
        return res
    nb = -(-n // block)
    blocks = np.ascontiguousarray(_pad(u, nb * block, 0.0)).reshape(m, nb, block)
    tail = _powers(beta, block - 1, -1, -1, gain)
    if work is not None and work.size >= 2 * m * nb:
        ends_in = np.matmul(blocks, tail, out=work[:m * nb].reshape(m, nb))
        ends = scan_const(ends_in, beta**block, init, block=UPPER_BLOCK,
                          out=work[m * nb:2 * m * nb].reshape(m, nb))
    else:
        ends = scan_const(blocks @ tail, beta**block, init, block=UPPER_BLOCK)
    # block b starts from beta * (the end of block b-1), entered as an input (times 1/gain)
    carry = beta / gain
    if init is not None:
        blocks[:, 0, 0] += carry * _init(init, m)
    blocks[:, 1:, 0] += carry * ends[:, :-1]
    flat = blocks.reshape(m * nb, block)
    if out is not None and nb * block == n:
        np.matmul(flat, _right(beta, block, gain), out=out.reshape(m * nb, block))
        return out
    res = (flat @ _right(beta, block, gain)).reshape(m, nb * block)[:, :n]
    if out is None:
        return np.asarray(res, dtype=np.float64)
    out[...] = res
    return out


def scan_general(a: F64, u: F64, init: F64 | None = None) -> F64:
    """``s_t = a_t * s_(t-1) + u_t`` along axis 1, for any finite ``a_t``.

    Args:
        a: 2-D float64 coefficients.
        u: 2-D float64 inputs, same shape.
        init: the state before the first sample, one per row (zero if None).

    Returns:
        ``s``, a new array of the shape of ``u``.
    """
    m, n = u.shape
    block = FIRST_BLOCK
    nb = -(-n // block)
    s = np.array(_pad(u, nb * block, 0.0), dtype=np.float64).reshape(m, nb, block)
    p = np.array(_pad(a, nb * block, 1.0), dtype=np.float64).reshape(m, nb, block)
    for k in range(1, block):  # within each block, from a zero state
        s[:, :, k] += p[:, :, k] * s[:, :, k - 1]
        p[:, :, k] *= p[:, :, k - 1]
    if nb == 1:
        carry = _init(init, m)[:, None]
    else:
        ends = scan_general(np.ascontiguousarray(p[:, :, -1]),
                            np.ascontiguousarray(s[:, :, -1]), init)
        carry = np.concatenate([_init(init, m)[:, None], ends[:, :-1]], axis=1)
    s += p * carry[:, :, None]
    return np.asarray(s.reshape(m, nb * block)[:, :n], dtype=np.float64)
