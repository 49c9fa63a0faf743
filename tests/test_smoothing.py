"""emakit.smoothing.ewm against pandas, a float64 loop and weighted sums; properties; errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emakit.ewm_slabs import ewm_series
from emakit.scan import scan_const
from emakit.smoothing import alpha_from, ewm
from oracle import ewm_loop, ewm_sum

pd = pytest.importorskip("pandas")

RNG = np.random.default_rng(1234)


def _series(n: int, missing: float, *, inf: bool = False) -> np.ndarray:
    x = RNG.standard_normal(n) * 5 + 2
    x[RNG.random(n) < missing] = np.nan
    if inf and n > 3:
        x[n // 3] = np.inf
        x[n // 2] = -np.inf
    return x


def _close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-10) -> None:
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    ok = ~np.isnan(want)
    scale = np.max(np.abs(want[ok]), initial=1.0)
    np.testing.assert_allclose(got[ok], want[ok], rtol=rtol, atol=rtol * scale)


# Lengths around the 64-sample block and its recursion (64*64 = 4096).
LENGTHS = [1, 2, 63, 64, 65, 130, 4097]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("missing", [0.0, 0.3, 0.95])
@pytest.mark.parametrize("alpha", [1e-4, 0.05, 0.5, 0.97, 1.0])
def test_matches_pandas(n, missing, alpha):
    x = _series(n, missing, inf=missing > 0)
    s = pd.Series(x)
    for adjust, ignore_na, minp in itertools.product([True, False], [True, False], [0, 1, 5]):
        want = s.ewm(alpha=alpha, adjust=adjust, ignore_na=ignore_na, min_periods=minp).mean()
        got = ewm(x, alpha=alpha, adjust=adjust, ignore_na=ignore_na, min_periods=minp)
        if _pandas_com1_quirk(alpha, adjust, ignore_na, x):
            want = ewm_loop(x, alpha, adjust=adjust, ignore_na=ignore_na, min_periods=minp)
        _close(got, np.asarray(want))


def _pandas_com1_quirk(alpha, adjust, ignore_na, x):
    """pandas uses its irregular-times formula when com == 1 exactly (see the next test)."""
    return alpha == 0.5 and not adjust and not ignore_na and (~np.isfinite(x)).any()


def test_pandas_com1_quirk_is_not_copied():
    # pandas (numba and cython alike) sets the new weight to 1 - old_wt when com == 1 and
    # adjust=False, its formula for times=; at any other alpha it uses alpha / (old_wt + alpha).
    # emakit keeps one formula for every alpha, so the result is continuous in alpha.
    x = np.array([1.0, np.nan, 3.0])
    assert pd.Series(x).ewm(alpha=0.5, adjust=False).mean().iloc[-1] == 2.5
    assert ewm(x, alpha=0.5, adjust=False)[-1] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    near = ewm(x, alpha=0.5 + 1e-9, adjust=False)[-1]
    assert near == pytest.approx(ewm(x, alpha=0.5, adjust=False)[-1], abs=1e-8)
    assert near == pytest.approx(pd.Series(x).ewm(alpha=0.5 + 1e-9, adjust=False).mean().iloc[-1])


@pytest.mark.parametrize("kw", [{"span": 10}, {"com": 3.5}, {"half_life": 7}, {"com": 0}])
def test_matches_pandas_parametrisations(kw):
    x = _series(300, 0.1)
    pandas_kw = {("halflife" if k == "half_life" else k): v for k, v in kw.items()}
    _close(ewm(x, **kw), pd.Series(x).ewm(**pandas_kw).mean().to_numpy())


@pytest.mark.parametrize("n", [5, 70, 300])
@pytest.mark.parametrize("missing", [0.0, 0.4])
@pytest.mark.parametrize("alpha", [0.01, 0.3, 0.9])
def test_matches_float64_loop(n, missing, alpha):
    x = _series(n, missing)
    for adjust, ignore_na in itertools.product([True, False], [True, False]):
        _close(ewm(x, alpha=alpha, adjust=adjust, ignore_na=ignore_na),
               ewm_loop(x, alpha, adjust=adjust, ignore_na=ignore_na))


@pytest.mark.parametrize("missing", [0.0, 0.3])
def test_debias_matches_weighted_sums(missing):
    x = _series(150, missing)
    _close(ewm(x, alpha=0.1, debias=True), ewm_sum(x, 0.1))
    _close(ewm(x, alpha=0.1, debias=False), ewm_sum(x, 0.1, zeros=True))
    # debias=True is pandas' adjust=True, bit for bit.
    np.testing.assert_array_equal(ewm(x, alpha=0.1, debias=True), ewm(x, alpha=0.1))


def test_debias_false_is_the_zero_started_hand_written_loop():
    x = _series(200, 0.0)
    acc, want = 0.0, []
    for v in x:
        acc = 0.9 * acc + 0.1 * v
        want.append(acc)
    _close(ewm(x, alpha=0.1, debias=False), np.array(want), rtol=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_nd_along_axis_equals_each_series(axis):
    x = RNG.standard_normal((7, 90, 3))
    x[RNG.random(x.shape) < 0.2] = np.nan
    for adjust, ignore_na in itertools.product([True, False], [True, False]):
        got = ewm(x, alpha=0.2, adjust=adjust, ignore_na=ignore_na, axis=axis)
        moved = np.moveaxis(x, axis, -1)
        want = np.apply_along_axis(
            lambda r, adj=adjust, ign=ignore_na: pd.Series(r).ewm(
                alpha=0.2, adjust=adj, ignore_na=ign).mean().to_numpy(), -1, moved)
        _close(got, np.moveaxis(want, -1, axis))


def test_all_missing_rows_and_empty_series():
    x = np.array([[np.nan, np.nan, np.nan], [1.0, np.nan, 3.0]])
    for adjust, ignore_na in itertools.product([True, False], [True, False]):
        y = ewm(x, alpha=0.4, adjust=adjust, ignore_na=ignore_na, axis=1)
        assert np.isnan(y[0]).all()
        _close(y[1], pd.Series(x[1]).ewm(alpha=0.4, adjust=adjust, ignore_na=ignore_na)
               .mean().to_numpy())
    assert ewm(np.zeros(0), alpha=0.5).shape == (0,)
    assert ewm(np.zeros((3, 0)), alpha=0.5, axis=1).shape == (3, 0)


def test_long_gap_does_not_underflow_into_nan():
    x = np.full(5000, np.nan)
    x[0], x[-1] = 1.0, 3.0
    for adjust in (True, False):
        y = ewm(x, alpha=0.6, adjust=adjust)
        want = pd.Series(x).ewm(alpha=0.6, adjust=adjust).mean().to_numpy()
        _close(y, want)
        assert np.isfinite(y).all()


def test_block_and_slab_sizes_are_implementation_details():
    # the documented knobs of emakit.scan and emakit.ewm_slabs: same numbers to rounding
    x = _series(1000, 0.2)
    for adjust, ignore_na in itertools.product([True, False], [True, False]):
        mode = "adjusted" if adjust else "first"
        want = ewm(x, alpha=0.03, adjust=adjust, ignore_na=ignore_na)  # 1000 < 4096: batch
        for slab in (8, 64, 4096):
            got = np.empty_like(x)
            ewm_series(x, got, 0.03, mode, ignore_na, 0, slab=slab)
            _close(got, want, rtol=1e-12)
    u = RNG.standard_normal((2, 1000))
    want = scan_const(u.copy(), 0.97)
    for block in (8, 16, 64, 1000):
        _close(scan_const(u.copy(), 0.97, block=block), want, rtol=1e-13)


finite = st.floats(-1e6, 1e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(c=finite, n=st.integers(1, 300), alpha=st.floats(1e-6, 1.0),
       adjust=st.booleans(), ignore_na=st.booleans())
def test_constant_series_is_a_fixed_point_exactly(c, n, alpha, adjust, ignore_na):
    x = np.full(n, c)
    x[::5] = np.nan
    x[0] = c
    y = ewm(x, alpha=alpha, adjust=adjust, ignore_na=ignore_na)
    assert (y == c).all()


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float64, st.integers(1, 200), elements=finite),
       alpha=st.floats(1e-4, 1.0), adjust=st.booleans())
def test_average_stays_within_the_range_seen_so_far(x, alpha, adjust):
    y = ewm(x, alpha=alpha, adjust=adjust)
    lo, hi = np.minimum.accumulate(x), np.maximum.accumulate(x)
    tol = 1e-9 * (np.abs(x).max() + 1.0)
    assert (y >= lo - tol).all() and (y <= hi + tol).all()


@settings(max_examples=40, deadline=None)
@given(x=hnp.arrays(np.float64, st.integers(1, 150), elements=finite))
def test_alpha_one_copies(x):
    for adjust in (True, False):
        np.testing.assert_array_equal(ewm(x, alpha=1.0, adjust=adjust), x)


def test_alpha_parametrisations():
    assert alpha_from(span=1) == 1.0
    assert alpha_from(com=0) == 1.0
    assert abs((1 - alpha_from(half_life=50)) ** 50 - 0.5) < 1e-12
    assert alpha_from(alpha=0.25) == 0.25


@pytest.mark.parametrize(("kw", "message"), [
    ({}, "exactly one of alpha, half_life, span or com, got none"),
    ({"alpha": 0.1, "span": 3}, "exactly one of"),
    ({"alpha": 0.0}, r"alpha must be in \(0.0, 1.0\], got 0.0"),
    ({"alpha": 1.5}, r"alpha must be in \(0.0, 1.0\], got 1.5"),
    ({"span": 0.5}, r"span must be in \[1.0, inf\), got 0.5"),
    ({"com": -1}, r"com must be in \[0.0, inf\), got -1"),
    ({"half_life": 0}, r"half_life must be in \(0.0, inf\), got 0"),
    ({"half_life": float("nan")}, r"half_life must be in \(0.0, inf\), got nan"),
])
def test_bad_parameters(kw, message):
    with pytest.raises(ValueError, match=message):
        ewm([1.0, 2.0], **kw)


def test_bad_inputs():
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ewm([1.0], alpha="0.1")
    with pytest.raises(TypeError, match="x must hold numbers"):
        ewm(["a", "b"], alpha=0.1)
    with pytest.raises(ValueError, match="at least one dimension"):
        ewm(3.0, alpha=0.1)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        ewm(np.zeros((2, 2)), alpha=0.1, axis=2)
    with pytest.raises(ValueError, match="min_periods must be an int >= 0, got -1"):
        ewm([1.0], alpha=0.1, min_periods=-1)
    with pytest.raises(ValueError, match="Pass only one of them"):
        ewm([1.0], alpha=0.1, adjust=False, debias=True)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"half_life": 1e300}, r"half_life=1e\+300 gives alpha=6.93e-301, which is too small"),
    ({"span": 1e308}, r"span=1e\+308 gives alpha=2e-308"),
    ({"com": 1e17}, r"com=1e\+17 gives alpha=1e-17"),
    ({"alpha": 1e-17}, r"alpha=1e-17 is too small for float64: 1 - alpha rounds to 1"),
])
def test_an_alpha_lost_in_rounding_is_refused_with_the_limits(kwargs, message):
    with pytest.raises(ValueError, match=message) as exc:
        ewm([1.0, 2.0], **kwargs)
    assert "half_life <= 6.24e+15" in str(exc.value)


def test_the_smallest_alpha_still_averages():
    x = np.array([1.0, 2.0, 3.0, np.nan, 6.0])
    # alpha = 2^-53: beta < 1, so the adjusted mean is the expanding mean to rounding
    np.testing.assert_allclose(ewm(x, alpha=2.0**-53), [1.0, 1.5, 2.0, 2.0, 3.0], rtol=1e-12)
