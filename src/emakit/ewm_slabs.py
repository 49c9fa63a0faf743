"""The EMA of one long series (pandas' ``ewm().mean()``), a cache-sized slab at a time.

:func:`ewm_series` walks the series in slabs of ``slab`` samples (2^17 by default, 1 MiB of
float64), reusing one set of buffers, and carries the state of the recurrence from one slab to the
next: every pass inside a slab runs in cache and the series is read once and written once. Each
slab is a constant-coefficient scan (:func:`emakit.scan.scan_const`). The series is centred on its
first observed value ``ref`` (``z = x - ref``), so a constant series gives exactly zero and comes
back exactly constant. With ``beta = 1 - alpha``:

- ``ignore_na=False``, ``adjust=True`` (or ``debias=False``): the numerator ``S_t = beta S_(t-1) +
  z_t [t observed]`` and the weight ``W_t = beta W_(t-1) + [t observed]`` are two rows of one scan;
  the mean is ``S / W + ref`` (``alpha (S + ref W)`` for ``debias=False``). In a slab without
  missing values ``W`` is the closed form ``beta^(k+1) W_in + (1 - beta^(k+1)) / alpha``, which is
  ``1/alpha`` to the last bit once ``beta^(k+1) < 2^-60``.
- ``ignore_na=True``: missing positions do not count, so the slab's observations are packed (a
  compress), the dense recurrence runs on them, and a gather by the running count of observations
  unpacks them and fills the missing positions forward.
- ``adjust=False``, ``ignore_na=False``: pandas' ``y = (beta^g y_prev + alpha x) / (beta^g +
  alpha)`` after a gap of ``g`` positions (``beta^g`` as pandas makes it: ``g`` products). Carried
  over the missing positions as ``s_t = beta s_(t-1)``, it is ``s_t = beta s_(t-1) + alpha z_t``
  except at an observation after a gap, where the right side is divided by ``q = beta^g + alpha``.
  With ``R_t`` the product of the ``1/q`` so far (a cumulative product over the gaps only, spread
  to the samples by a gather), ``s = R * scan(u / R)`` with the constant ``beta``: exact algebra.
  ``R`` grows by at most ``1/alpha`` per gap; where a slab's product would pass ``2^400`` it
  restarts every 1024 samples instead (rows of one scan, chained by their ends), and a slab of
  values below ``2^-500`` is scaled by a power of two first, so ``u / R`` stays a normal number.

A missing value (NaN or +-inf) keeps the last average exactly (a forward fill in the slab).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from emakit.gaps import fill_forward, missing_runs
from emakit.scan import scan_const

__all__ = ["SLAB", "ewm_series"]

F64 = npt.NDArray[np.float64]
Index = npt.NDArray[np.intp]
SLAB = 1 << 17
_MAX_SCALE_LOG2 = 400  # R <= 2^400 in a slab (adjust=False with gaps)
_TABLE = 1 << 16  # beta^g for gaps up to this long from a table
_ROW = 1024  # R restarts this often when a slab's product is too large (adjust=False, gaps)


class _Head:
    """``beta^(k+1)`` and ``(1 - beta^(k+1)) / alpha`` for the ``k`` where the first is >= 2^-60
    (``limit`` of them; the first ``size`` kept, the rest made when asked for)."""

    def __init__(self, alpha: float, size: int) -> None:
        beta = 1.0 - alpha
        self.log_beta = math.log(beta) if beta > 0.0 else -math.inf
        self.limit = size if beta == 0.0 else math.ceil(-60 * math.log(2.0) / self.log_beta) + 1
        n = min(size, self.limit)
        self.size = n
        self.decay = np.cumprod(np.full(n, beta))  # beta^t as pandas' old_wt: t products
        self.weight = self.weight_at(0, n, kept=False)

    def weight_at(self, start: int, count: int, *, kept: bool = True) -> F64:
        """``sum_(j<t) beta^j`` for ``t = start + 1 .. start + count`` (accurate where
        ``1 - beta^t`` cancels: ``expm1``)."""
        if kept and start + count <= self.size:
            return self.weight[start:start + count]
        if self.log_beta == -math.inf:
            return np.ones(count)
        t = np.arange(start + 1, start + count + 1, dtype=np.float64)
        return np.expm1(t * self.log_beta) / math.expm1(self.log_beta)


class _Slab:
    """The buffers a slab works in, and the state carried from one slab to the next."""

    def __init__(self, size: int, alpha: float) -> None:
        self.fin = np.empty(size, dtype=bool)
        self.miss = np.empty(size + 1, dtype=bool)
        self.index = np.empty(size + 1, dtype=np.intp)
        self.u = np.empty(2 * size + 1)
        self.s = np.empty(2 * size)
        self.r = np.empty(size + 1)
        self.alpha = alpha
        self.decay = np.empty(0)  # beta^g for gaps g, filled when first needed
        self.rows = np.empty(0, dtype=np.intp)  # arange // 1024, filled when first needed
        self.work = np.empty(2 * (2 * size // 8 + 8))
        self.reset(0.0)

    def reset(self, ref: float) -> None:
        """The state before a series whose first observed value is ``ref``."""
        self.ref = ref
        self.s0 = 0.0  # the numerator (or the mean, adjust=False) in units of x - ref
        self.w0 = 0.0  # the weight sum W (ignore_na=False, adjust=True / debias=False)
        self.last = math.nan  # the previous output
        self.gap = 0  # missing positions since the last observation (adjust=False)
        self.count = 0  # observations so far

    def scan(self, u: F64, beta: float, init: list[float], gain: float = 1.0,
             out: F64 | None = None) -> F64:
        """``scan_const`` of the rows ``u`` (a view of ``self.u``) into ``out`` or ``self.s``."""
        m, w = u.shape
        return scan_const(u, beta, np.array(init), gain=gain,
                          out=self.s[:m * w].reshape(m, w) if out is None else out,
                          work=self.work)

    def row_of(self, size: int) -> Index:
        """``arange(size) // 1024``, kept."""
        if self.rows.size < size:
            self.rows = np.arange(size) // _ROW
        return self.rows[:size]

    def gap_weight(self, gaps: Index) -> F64:
        """``beta^g + alpha`` for the gap lengths ``g``, ``beta^g`` as pandas makes it (``g``
        products; a table up to 2^16, ``beta ** g`` above)."""
        beta = 1.0 - self.alpha
        longest = int(gaps.max(initial=0))
        if longest >= self.decay.size and self.decay.size <= _TABLE:
            size = min(max(longest + 1, 2 * self.decay.size, 64), _TABLE + 1)
            self.decay = np.cumprod(np.append(1.0, np.full(size - 1, beta)))
        top = self.decay.size - 1
        q = np.take(self.decay, np.minimum(gaps, top))
        if longest > top:
            long = gaps > top
            q[long] = beta ** gaps[long].astype(np.float64)
        q += self.alpha
        return q


Step = Callable[[F64, F64, "npt.NDArray[np.bool_]", float, str, _Head, _Slab], None]


def _first_observed(x: F64, slab: int) -> int:
    """The index of the first finite value of ``x``, or ``x.size`` if none (read in slabs)."""
    for start in range(0, x.size, slab):
        fin = np.isfinite(x[start:start + slab])
        if fin.any():
            return start + int(np.argmax(fin))
    return x.size


def ewm_series(x: F64, out: F64, alpha: float, mode: str, ignore_na: bool, min_periods: int, *,
               slab: int = SLAB) -> None:
    """Write the EMA of the series ``x`` into ``out``, slab by slab.

    Args:
        x: the series (float64, 1-D), or several as the rows of a 2-D array (one set of buffers
            serves them all, one after the other); NaN and +-inf are missing values.
        out: where the result goes (float64, the shape of ``x``, not overlapping it).
        alpha: the smoothing factor in (0, 1].
        mode: ``"adjusted"`` (pandas' ``adjust=True``), ``"zeros"`` (``debias=False``) or
            ``"first"`` (``adjust=False``); ``alpha == 1`` needs ``"first"``.
        ignore_na: pandas' ``ignore_na``.
        min_periods: outputs with fewer observations so far are NaN.
        slab: samples per slab, a multiple of 8 (tests use small ones to cross many slabs).

    Raises:
        ValueError: a ``slab`` that is not a positive multiple of 8, or ``alpha == 1`` with a
            mode other than ``"first"``.

    Example:
        >>> y = np.empty(4)
        >>> ewm_series(np.array([1.0, 2.0, np.nan, 4.0]), y, 0.5, "adjusted", False, 0, slab=8)
        >>> y.round(4)
        array([1.    , 1.6667, 1.6667, 3.3636])
    """
    if slab <= 0 or slab % 8:
        raise ValueError(f"slab must be a positive multiple of 8, got {slab}.")
    if mode != "first" and alpha == 1.0:
        raise ValueError(f"alpha=1 needs mode 'first', got mode {mode!r}.")
    n = x.shape[-1]
    if n == 0:
        return
    rows, outs = (x, out) if x.ndim == 2 else (x[None, :], out[None, :])
    step: Step = _packed if ignore_na else (_gaps_first if mode == "first" else _weighted)
    head = _Head(alpha, min(n, slab))
    buf = _Slab(min(slab, n), alpha)
    for row, res in zip(rows, outs):
        _one_series(row, res, alpha, mode, min_periods, slab, step, head, buf)


def _one_series(x: F64, out: F64, alpha: float, mode: str, min_periods: int, slab: int,
                step: Step, head: _Head, buf: _Slab) -> None:
    """:func:`ewm_series` of one 1-D series."""
    n = x.size
    start = _first_observed(x, slab)
    out[:start] = np.nan
    if start == n:
        return
    buf.reset(float(x[start]))
    need = max(min_periods, 1)
    reached = start if need == 1 else -1
    for lo in range(start, n, slab):
        xs = x[lo:lo + slab]
        fin = np.isfinite(xs, out=buf.fin[:xs.size])
        before = buf.count
        step(xs, out[lo:lo + xs.size], fin, alpha, mode, head, buf)
        buf.count += int(np.count_nonzero(fin))
        if reached < 0 and buf.count >= need:
            reached = lo + int(np.flatnonzero(fin)[need - before - 1])
    out[start:n if reached < 0 else reached] = np.nan


def _weighted(xs: F64, ys: F64, fin: npt.NDArray[np.bool_], alpha: float, mode: str,
              head: _Head, st: _Slab) -> None:
    """``ignore_na=False`` with ``adjust=True`` or ``debias=False``: ``S / W`` by position."""
    beta, ref, w = 1.0 - alpha, st.ref, xs.size
    missing = np.flatnonzero(np.logical_not(fin, out=st.miss[:w]))
    if missing.size == 0:
        u = st.u[:w].reshape(1, w)
        np.subtract(xs, ref, out=u[0])
        s = st.scan(u, beta, [st.s0])[0]
        h = min(head.size, w)
        wt = head.decay[:h] * st.w0 + head.weight[:h]
        if mode == "adjusted":
            np.divide(s[:h], wt, out=ys[:h])
            np.multiply(s[h:], alpha, out=ys[h:])
            ys += ref
        else:
            np.multiply(s[:h] + ref * wt, alpha, out=ys[:h])
            np.multiply(s[h:], alpha, out=ys[h:])
            ys[h:] += ref
        st.s0, st.w0 = float(s[-1]), float(wt[-1]) if h == w else 1.0 / alpha
    else:
        u = st.u[:2 * w].reshape(2, w)
        np.subtract(xs, ref, out=u[0])
        u[0, missing] = 0.0
        u[1] = fin
        s = st.scan(u, beta, [st.s0, st.w0])
        with np.errstate(invalid="ignore", divide="ignore"):  # W may underflow in a long gap
            if mode == "adjusted":
                np.divide(s[0], s[1], out=ys)
                ys += ref
            else:
                np.multiply(s[1], ref, out=ys)
                ys += s[0]
                ys *= alpha
        first, length = missing_runs(missing)
        fill_forward(ys, missing, first, length, before=st.last)
        st.s0, st.w0 = float(s[0, -1]), float(s[1, -1])
    st.last = float(ys[-1])


def _packed(xs: F64, ys: F64, fin: npt.NDArray[np.bool_], alpha: float, mode: str,
            head: _Head, st: _Slab) -> None:
    """``ignore_na=True``: the dense recurrence on the slab's observations, unpacked after."""
    beta, ref, w = 1.0 - alpha, st.ref, xs.size
    k = int(np.count_nonzero(fin))
    if k == 0:
        ys[:] = st.last
        return
    packed = st.u[:k + 1]  # packed[0]: the output before a leading gap
    obs = ys if k == w else packed[1:]
    if k < w:
        np.compress(fin, xs, out=obs)
        obs -= ref
    else:
        np.subtract(xs, ref, out=obs)
    s = st.scan(obs.reshape(1, k), beta, [st.s0], gain=alpha if mode == "first" else 1.0)[0]
    st.s0 = float(s[-1])
    if mode == "first":
        np.add(s, ref, out=obs)
    else:
        h = min(max(head.limit - st.count, 0), k)
        wt = head.weight_at(st.count, h)
        if mode == "adjusted":
            np.divide(s[:h], wt, out=obs[:h])
        else:
            np.multiply(s[:h] + ref * wt, alpha, out=obs[:h])
            s[h:] += ref / alpha
        np.multiply(s[h:], alpha, out=obs[h:])
        if mode == "adjusted":
            obs += ref
    if k < w:
        packed[0] = st.last
        np.take(packed, np.cumsum(fin, out=st.index[:w]), out=ys, mode="wrap")
    st.last = float(ys[-1])


def _gaps_first(xs: F64, ys: F64, fin: npt.NDArray[np.bool_], alpha: float, mode: str,
                head: _Head, st: _Slab) -> None:
    """``adjust=False``, ``ignore_na=False``: the mean carried as ``beta^j y`` over gaps."""
    w = xs.size
    missing = np.flatnonzero(np.logical_not(fin, out=st.miss[:w]))
    first = length = resume = gaps = np.empty(0, dtype=np.intp)
    if missing.size:
        first, length = missing_runs(missing)
        resume, gaps = first + length, length + 1
        if first[0] == 0:
            gaps[0] += st.gap
    if st.gap and fin[0]:  # the slab opens on the end of a gap
        resume, gaps = np.append(0, resume), np.append(st.gap + 1, gaps)
    ends_open = resume.size > 0 and resume[-1] == w  # the slab ends in a gap
    if ends_open:
        resume, gaps = resume[:-1], gaps[:-1]
    u = st.u[:w]
    np.subtract(xs, st.ref, out=u)
    u[missing] = 0.0
    s = _scaled_scan(u, resume, st.gap_weight(gaps), alpha, st, ys)
    st.s0 = float(s[-1])
    s += st.ref
    if missing.size:
        fill_forward(ys, missing, first, length, before=st.last)
        st.gap = int(length[-1] + (st.gap if first[-1] == 0 else 0)) if ends_open else 0
    else:
        st.gap = 0
    st.last = float(ys[-1])


def _scaled_scan(u: F64, resume: Index, q: F64, alpha: float, st: _Slab, out: F64) -> F64:
    """``s_t = beta s_(t-1) + alpha u_t``, divided by ``q[k]`` at ``resume[k]``; ``s_(-1) = s0``.

    ``R`` (the product of the ``1/q`` so far) restarts every 1024 samples when a slab's product
    would pass 2^400: the rows of 1024 are one scan, their incoming states chained first from
    each row's end (a 1024-sample row gathers at most 2^293: 0.234 bits a sample at worst, plus
    one gap begun before it). ``u`` is overwritten; ``s`` is written into ``out`` (1-D, the size
    of ``u``, used as scratch too).
    """
    beta, w = 1.0 - alpha, u.size
    if not resume.size:
        st.scan(u.reshape(1, w), beta, [st.s0], gain=alpha, out=out.reshape(1, w))
        return out
    with np.errstate(over="ignore"):  # an overflow means rows, below
        scale = np.cumprod(np.append(1.0, 1.0 / q))  # R before the gaps, after each one's end
    rows = 1 if scale[-1] <= 2.0**_MAX_SCALE_LOG2 else -(-w // _ROW)
    if rows > 1:
        scale, last = _row_products(1.0 / q, resume // _ROW, rows)
    init, unit = st.s0, 1.0
    top = abs(init)
    if top < 2.0**-500:
        top = max(alpha * max(float(u.max()), -float(u.min())), top)
    if 0.0 < top < 2.0**-500:  # u / R must stay normal: scale by a power of two (exact)
        unit = math.ldexp(1.0, -500 - math.frexp(top)[1])  # top * unit in [2^-501, 2^-500)
        u *= unit
        init *= unit
    # R_(t-1), the product of 1/q over the gaps ended before t (since its row began), for
    # t = 0 .. w: dividing by it also divides each gap's observation by its q.
    count = st.index[:w + 1]  # gaps ended before t (the output's memory is free: w go there)
    mark = st.miss[:w + 1]
    mark[:] = False
    mark[resume + 1] = True
    np.cumsum(mark, out=count)
    if rows > 1:  # row r's table starts with a 1: r more entries before it than gaps
        count += st.row_of(w + 1)
    prev = st.r[:w + 1]
    np.take(scale, count, out=prev, mode="wrap")
    u /= prev[:w]
    s = out
    if rows == 1:
        st.scan(u.reshape(1, w), beta, [init], gain=alpha, out=out.reshape(1, w))
    else:
        v = st.u[:rows * _ROW].reshape(rows, _ROW)  # u, padded with zeros to whole rows
        v.reshape(-1)[w:] = 0.0
        tails = (v @ _row_tail(alpha)) * last
        decay = beta**_ROW * last
        carry = [init]
        for r in range(rows - 1):
            carry.append(decay[r] * carry[-1] + tails[r])
        s[...] = st.scan(v, beta, carry, gain=alpha).reshape(-1)[:w]
        ends = s[_ROW - 1::_ROW]  # the rows' last samples: prev just after is a restart (a 1)
        ends *= last[:ends.size]
    s *= prev[1:]
    if unit != 1.0:
        s /= unit
    return s


def _row_products(f: F64, row: Index, rows: int) -> tuple[F64, F64]:
    """Per row (``row`` sorted): a 1, then the running product of its ``f``; and the totals.

    The table of row ``r`` starts at ``r`` plus the number of ``f`` in the rows before it.
    """
    k = np.arange(row.size)
    counts = np.bincount(row, minlength=rows)
    width = int(counts.max()) + 1
    at = row * width + k - (np.cumsum(counts) - counts)[row] + 1  # (row, rank + 1), flat
    grid = np.ones((rows, width))
    grid.reshape(-1)[at] = f
    np.cumprod(grid, axis=1, out=grid)
    table = np.ones(row.size + rows + 1)  # (+1: the restart after a slab of whole rows)
    table[k + row + 1] = grid.reshape(-1)[at]
    return table, grid[:, -1].copy()


@lru_cache(maxsize=64)
def _row_tail(alpha: float) -> F64:
    """``alpha * beta^(_ROW-1-i)``: a row's end, from zero, is ``v_row @ _row_tail(alpha)``."""
    tail = alpha * (1.0 - alpha) ** np.arange(_ROW - 1, -1, -1.0)
    tail.setflags(write=False)
    return tail
