"""The slab-by-slab EMA of long series (emakit.ewm_slabs) and the scans under it (emakit.scan).

Every path is checked against a float64 loop over samples with pandas' formula (written here,
independently of the code under test), and against pandas itself: random gaps, runs of missing
values, leading and trailing gaps, all-missing series, +-inf, min_periods, slab boundaries inside
gaps and at the first observation after one, N-D along each axis.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emakit.ewm_batch import ewm_rows
from emakit.ewm_slabs import ewm_series
from emakit.gaps import fill_forward, missing_runs
from emakit.scan import scan_const, scan_general, toeplitz
from emakit.smoothing import ewm

pd = pytest.importorskip("pandas")

RNG = np.random.default_rng(20260417)
MODES = ["adjusted", "zeros", "first"]


# ------------------------------------------------------------------------------------ oracles
def loop_ewm(x: np.ndarray, alpha: float, mode: str, ignore_na: bool,
             min_periods: int = 0) -> np.ndarray:
    """pandas' ewm mean as a loop over samples (NaN and +-inf missing), plus debias=False.

    ``adjusted``: y = (old_wt * y + x) / (old_wt + 1), old_wt += 1; ``first``: the same with
    new weight alpha and old_wt reset to 1; old_wt is multiplied by beta at every position after
    the first observation (observed positions only with ignore_na). ``zeros``: alpha * sum of
    beta^(distance) x over the observations so far, distance in positions (or observations with
    ignore_na); a missing position keeps the last value.
    """
    beta = 1.0 - alpha
    out = np.full(len(x), np.nan)
    mean, old, acc, nobs, started = math.nan, 1.0, 0.0, 0, False
    for t, v in enumerate(x):
        seen = math.isfinite(v)
        nobs += seen
        if mode == "zeros":
            if started and (seen or not ignore_na):
                acc *= beta
            if seen:
                acc += v
                started = True
                mean = alpha * acc
        elif started:
            if seen or not ignore_na:
                old *= beta
            if seen:
                new = 1.0 if mode == "adjusted" else alpha
                if mean != v:
                    mean = (old * mean + new * v) / (old + new)
                old = old + new if mode == "adjusted" else 1.0
        elif seen:
            mean, started = v, True
        out[t] = mean if nobs >= max(min_periods, 1) else math.nan
    return out


def loop_scan(a: np.ndarray, u: np.ndarray, init: np.ndarray) -> np.ndarray:
    """``s_t = a_t s_(t-1) + u_t`` row by row, sample by sample."""
    s = np.empty_like(u)
    for i in range(u.shape[0]):
        cur = float(init[i])
        for t in range(u.shape[1]):
            cur = a[i, t] * cur + u[i, t]
            s[i, t] = cur
    return s


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-12,
                 data: np.ndarray | None = None) -> None:
    """Same NaN positions; elsewhere within ``rtol`` of the largest magnitude (of the result,
    and of the finite ``data`` averaged when given: an average's rounding is relative to its
    inputs, and a result can be far smaller than they are, e.g. 2^-53 of a 1 after a gap).

    Subnormal values carry an absolute, not a relative, precision (one step is 5e-324), so the
    bound never falls below a few of those steps.
    """
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    scale = np.max(np.abs(want[~nan]), initial=0.0)
    if data is not None:
        scale = max(scale, np.max(np.abs(data[np.isfinite(data)]), initial=0.0))
    floor = 64 * np.finfo(np.float64).smallest_subnormal
    np.testing.assert_allclose(got[~nan], want[~nan], rtol=0, atol=max(rtol * scale, floor))


def series(n: int, pattern: str, rng: np.random.Generator = RNG) -> np.ndarray:
    """A random walk with noise and a pattern of missing values."""
    x = np.cumsum(rng.standard_normal(n)) + 3.0 * rng.standard_normal(n) + 40.0
    if pattern == "sparse":
        x[rng.random(n) < 0.1] = np.nan
    elif pattern == "dense-gaps":
        x[rng.random(n) < 0.7] = np.nan
    elif pattern == "runs":
        for _ in range(max(n // 50, 1)):
            at = int(rng.integers(0, n))
            x[at:at + int(rng.integers(1, 60))] = np.nan
    elif pattern == "edges":
        x[: n // 5] = np.nan
        x[-n // 7:] = np.nan
        x[n // 2] = np.inf
        x[n // 2 + 3] = -np.inf
    elif pattern == "alternate":
        x[1::2] = np.nan
    elif pattern == "all":
        x[:] = np.nan
    return x


def run_series(x: np.ndarray, alpha: float, mode: str, ignore_na: bool, min_periods: int = 0,
               slab: int = 1 << 17) -> np.ndarray:
    out = np.full(x.size, 123.0)
    ewm_series(x, out, alpha, mode, ignore_na, min_periods, slab=slab)
    return out


# -------------------------------------------------------------------------------------- scans
@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 129, 1000, 5003])
@pytest.mark.parametrize("block", [8, 16, 64])
def test_scan_const_matches_the_loop(n, block):
    u = RNG.standard_normal((3, n))
    init = RNG.standard_normal(3)
    for beta, gain in [(0.97, 1.0), (0.3, 0.25), (0.0, 1.0), (1.0 - 1e-6, 2.0)]:
        want = loop_scan(np.full((3, n), beta), gain * u, init)
        got = scan_const(u.copy(), beta, init, gain=gain, block=block)
        assert_close(got, want)
        zero = scan_const(u.copy(), beta, gain=gain, block=block)
        assert_close(zero, loop_scan(np.full((3, n), beta), gain * u, np.zeros(3)))


def test_scan_const_writes_into_out_with_scratch():
    u = RNG.standard_normal((2, 4096))
    out, work = np.empty((2, 4096)), np.empty(2048)
    got = scan_const(u.copy(), 0.9, np.array([1.0, -2.0]), out=out, work=work)
    assert got is out
    assert_close(out, loop_scan(np.full((2, 4096), 0.9), u, np.array([1.0, -2.0])))


@pytest.mark.parametrize("n", [1, 8, 9, 100, 4100])
def test_scan_general_matches_the_loop(n):
    a = RNG.random((2, n)) * 1.1
    a[:, ::7] = 0.0
    u = RNG.standard_normal((2, n))
    init = np.array([0.5, -3.0])
    assert_close(scan_general(a, u, init), loop_scan(a, u, init))
    assert_close(scan_general(a, u), loop_scan(a, u, np.zeros(2)))


def test_toeplitz_is_the_powers_below_the_diagonal():
    np.testing.assert_array_equal(toeplitz(0.0, 3), np.eye(3))
    np.testing.assert_allclose(toeplitz(0.5, 3)[2], [0.25, 0.5, 1.0])


# --------------------------------------------------------------------------------------- gaps
def test_missing_runs_and_fill_forward():
    missing = np.array([0, 1, 4, 6, 7, 8])
    first, length = missing_runs(missing)
    np.testing.assert_array_equal(first, [0, 4, 6])
    np.testing.assert_array_equal(length, [2, 1, 3])
    y = np.arange(10.0)
    fill_forward(y, missing, first, length, before=-1.0)
    np.testing.assert_array_equal(y, [-1, -1, 2, 3, 3, 5, 5, 5, 5, 9])


# -------------------------------------------------------------------------- ewm_series: oracle
PATTERNS = ["none", "sparse", "dense-gaps", "runs", "edges", "alternate", "all"]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("alpha", [1e-3, 0.05, 0.6, 0.97, 1.0])
def test_slabs_match_the_loop_in_every_mode(pattern, alpha):
    x = series(700, pattern)
    for mode, ignore_na, slab in itertools.product(MODES, [False, True], [8, 24, 1 << 17]):
        if alpha == 1.0 and mode != "first":
            continue
        for minp in (0, 1, 40):
            want = loop_ewm(x, alpha, mode, ignore_na, minp)
            assert_close(run_series(x, alpha, mode, ignore_na, minp, slab), want)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_slabs_match_pandas(pattern):
    x = series(5000, pattern)
    s = pd.Series(x)
    for alpha, adjust, ignore_na in itertools.product([0.003, 0.2, 0.9], [True, False],
                                                      [False, True]):
        want = s.ewm(alpha=alpha, adjust=adjust, ignore_na=ignore_na, min_periods=3).mean()
        mode = "adjusted" if adjust else "first"
        for slab in (64, 1 << 17):
            got = run_series(x, alpha, mode, ignore_na, 3, slab)
            assert_close(got, want.to_numpy())


def test_the_result_does_not_depend_on_the_slab_size():
    x = series(3000, "runs")
    for mode, ignore_na in itertools.product(MODES, [False, True]):
        ref = run_series(x, 0.01, mode, ignore_na)
        for slab in (8, 16, 56, 1000):
            assert_close(run_series(x, 0.01, mode, ignore_na, slab=slab), ref, rtol=1e-13)


def test_gaps_across_slab_boundaries():
    # a gap that starts in one slab and ends in the next, one that covers a whole slab, and an
    # observation right at a slab's start after a gap (slab = 16)
    x = 10.0 + RNG.standard_normal(96)
    x[12:20] = np.nan  # 4 in slab 0, 4 in slab 1; slab 1 opens missing
    x[28:32] = np.nan  # slab 1 ends in a gap; slab 2 opens on the observation after it
    x[40:70] = np.nan  # slab 3 is all missing
    for mode, ignore_na in itertools.product(MODES, [False, True]):
        for alpha in (0.1, 0.7):
            want = loop_ewm(x, alpha, mode, ignore_na)
            assert_close(run_series(x, alpha, mode, ignore_na, slab=16), want)


def test_long_gaps_do_not_underflow():
    x = np.full(200_000, np.nan)
    x[[0, 1, 150_000, 199_999]] = [1.0, 2.0, 5.0, 7.0]
    for mode, ignore_na in itertools.product(MODES, [False, True]):
        got = run_series(x, 0.6, mode, ignore_na)
        assert np.isfinite(got).all()
        assert_close(got, loop_ewm(x, 0.6, mode, ignore_na))


def test_a_missing_value_keeps_the_last_average_exactly():
    x = series(6000, "runs")
    for mode, ignore_na in itertools.product(MODES, [False, True]):
        y = run_series(x, 0.02, mode, ignore_na, slab=512)
        gap = ~np.isfinite(x)
        gap[: int(np.argmax(np.isfinite(x))) + 1] = False
        prev = np.flatnonzero(gap) - 1
        np.testing.assert_array_equal(y[gap], y[prev])


# --------------------------------------------- adjust=False with gaps: the scale and its limit
def test_adjust_false_when_the_scale_must_restart_within_a_slab():
    # alpha = 0.6 with every other value missing: each observation multiplies R by
    # 1 / (0.4^2 + 0.6) = 2^0.40, so R passes 2^400 after ~1000 gaps and the slab ends early.
    x = series(20_000, "alternate")
    got = run_series(x, 0.6, "first", False)
    assert_close(got, loop_ewm(x, 0.6, "first", False))
    assert_close(got, pd.Series(x).ewm(alpha=0.6, adjust=False).mean().to_numpy())


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-30, 1e200, 1e300])
def test_adjust_false_with_gaps_keeps_its_accuracy_at_extreme_magnitudes(scale):
    # tiny values lower the limit on R (u / R must stay a normal number)
    x = series(20_000, "alternate") / 40.0 * scale
    got = run_series(x, 0.6, "first", False)
    want = loop_ewm(x, 0.6, "first", False)
    assert_close(got, want)


def test_adjust_false_at_the_smallest_alpha():
    x = series(5000, "runs")
    a = 2.0**-53
    assert_close(run_series(x, a, "first", False, slab=128), loop_ewm(x, a, "first", False))
    assert_close(run_series(x, a, "adjusted", False, slab=128),
                 loop_ewm(x, a, "adjusted", False), rtol=1e-11)


def test_rows_share_buffers_but_not_state():
    # one call, several series of one length: each row as if alone (state reset per row)
    rows = np.stack([series(3000, p) for p in ("runs", "all", "edges", "sparse")])
    rows[3] *= 1e-300  # a tiny row after ordinary ones: its own power-of-two scaling
    for mode, ignore_na in itertools.product(MODES, [False, True]):
        out = np.empty_like(rows)
        ewm_series(rows, out, 0.2, mode, ignore_na, 3, slab=256)
        for row, got in zip(rows, out):
            assert_close(got, loop_ewm(row, 0.2, mode, ignore_na, 3))


# ----------------------------------------------------------------- through the public ewm
@pytest.mark.parametrize(("ndim", "axis"), [(2, 0), (2, 1), (2, -1), (3, 0), (3, 1), (3, 2)])
def test_long_nd_series_along_each_axis(ndim, axis):
    shape = [3, 2, 2][:ndim]
    shape[axis] = 4500
    x = RNG.standard_normal(shape) + 5.0
    x[RNG.random(x.shape) < 0.15] = np.nan
    for adjust, ignore_na in itertools.product([True, False], [True, False]):
        got = ewm(x, alpha=0.05, adjust=adjust, ignore_na=ignore_na, axis=axis)
        moved = np.moveaxis(x, axis, -1)
        want = np.stack([pd.Series(r).ewm(alpha=0.05, adjust=adjust, ignore_na=ignore_na)
                         .mean().to_numpy() for r in moved.reshape(-1, moved.shape[-1])])
        assert_close(got, np.moveaxis(want.reshape(moved.shape), -1, axis))


def test_long_and_short_series_agree():
    x = series(5000, "sparse")
    for mode, ignore_na in itertools.product(MODES, [False, True]):
        batch = ewm_rows(x[None, :], 0.03, mode, ignore_na, 2)[0]
        assert_close(run_series(x, 0.03, mode, ignore_na, 2), batch)


# ----------------------------------------------------------------------------- properties
finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(c=finite, n=st.integers(1, 400), alpha=st.floats(1e-6, 1.0),
       mode=st.sampled_from(MODES), ignore_na=st.booleans(), every=st.integers(2, 9),
       slab=st.sampled_from([8, 16, 64]))
def test_constant_series_with_gaps_stay_exactly_constant(c, n, alpha, mode, ignore_na, every,
                                                         slab):
    if alpha == 1.0 and mode != "first":
        mode = "first"
    x = np.full(n, c)
    x[1::every] = np.nan
    y = run_series(x, alpha, mode, ignore_na, slab=slab)
    if mode == "zeros":  # zero-started: not constant by design
        assert_close(y, loop_ewm(x, alpha, mode, ignore_na))
    else:
        assert (y == c).all()


@settings(max_examples=80, deadline=None)
@given(x=hnp.arrays(np.float64, st.integers(1, 300),
                    elements=st.one_of(finite, st.just(np.nan), st.just(np.inf))),
       alpha=st.floats(1e-4, 1.0), mode=st.sampled_from(MODES), ignore_na=st.booleans(),
       minp=st.integers(0, 5), slab=st.sampled_from([8, 32, 1 << 17]))
def test_random_series_match_the_loop(x, alpha, mode, ignore_na, minp, slab):
    if alpha == 1.0 and mode != "first":
        mode = "first"
    want = loop_ewm(x, alpha, mode, ignore_na, minp)
    # relative to the inputs too: after long gaps the results can be tiny next to them
    # (hypothesis: x = [1, 52 NaN, 0] gives 2^-53, computed as 0; [1, 21 NaN, 0, 3 NaN, 0]
    # 1.4e-8, off by 2.7e-17: both within rounding of the inputs' 1)
    assert_close(run_series(x, alpha, mode, ignore_na, minp, slab), want, rtol=1e-10, data=x)


# --------------------------------------------------------------------------------- errors
def test_bad_slab_and_mode_are_refused():
    out = np.empty(3)
    with pytest.raises(ValueError, match="slab must be a positive multiple of 8, got 12"):
        ewm_series(np.ones(3), out, 0.5, "first", False, 0, slab=12)
    with pytest.raises(ValueError, match="alpha=1 needs mode 'first', got mode 'adjusted'"):
        ewm_series(np.ones(3), out, 1.0, "adjusted", False, 0)


def test_adjust_false_with_few_gaps_and_tiny_values():
    # three long gaps multiply R by ~1/alpha = 1e3 each: small next to 2^400, yet alpha * x / R
    # would be subnormal without the scaling by a power of two
    x = 1e-306 * (3.0 + RNG.standard_normal(100_000))
    for start in (10_000, 35_000, 60_000):
        x[start:start + 20_000] = np.nan
    got = run_series(x, 1e-3, "first", False)
    assert_close(got, loop_ewm(x, 1e-3, "first", False))


@pytest.mark.parametrize(("n", "slab"), [(1 << 17, 1 << 17), (5000, 2048), (4097, 1024)])
def test_adjust_false_rows_end_where_a_slab_ends(n, slab):
    # R restarts in rows of 1024 (alternating gaps, alpha = 0.6); slabs that are whole rows
    x = series(n, "alternate")
    got = run_series(x, 0.6, "first", False, slab=slab)
    assert_close(got, loop_ewm(x, 0.6, "first", False))
