"""Post-hoc EMA math: the power profiles, their inner products, and the solve (EDM2 Alg. 3).

Oracles are independent of the code under test: numerical quadrature of the profiles on a fine
grid, the engine's own step weights of a PowerFunction schedule (emakit.window), and exact
algebraic properties (one-hot columns, scale invariance, columns summing to 1).
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emakit import schedules
from emakit.posthoc import coefficients, least_squares, solve, solve_gammas, supported_ranges
from emakit.posthoc.profiles import density, gammas_of, inner_products, step_weights
from emakit.window import step_weights as engine_step_weights

EVERY_1000 = [t for t in range(1000, 20001, 1000) for _ in range(2)]
SIGMAS = [0.05, 0.10] * 20


def _quad(f, hi, n=400_001):
    t = np.linspace(0.0, hi, n)
    y = f(t)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(t)) / 2)


# --------------------------------------------------------------------------------- profiles
@pytest.mark.parametrize("gamma", [0.0, 1.5, 6.94, 16.97])
@pytest.mark.parametrize("step", [1, 7, 1000])
def test_step_weights_are_the_engines_power_ema_weights(gamma, step):
    """The closed form telescopes the engine's products of (1 - 1/t)^(gamma+1)."""
    ours = step_weights(gamma=gamma, step=step)
    engine = engine_step_weights(schedules.PowerFunction(gamma=gamma), step)
    assert engine.initial == 0.0  # the first decay is 0: the start is forgotten at step 1
    np.testing.assert_allclose(ours, engine.weights, rtol=1e-9, atol=1e-15)
    assert math.isclose(ours.sum(), 1.0, rel_tol=1e-12)


def test_step_weights_from_a_mid_run_start_hold_the_start():
    w = step_weights(gamma=3.0, step=10, start=4)
    assert w[0] == pytest.approx((4 / 10) ** 4)  # the initial copy's share
    assert len(w) == 7 and math.isclose(w.sum(), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 16.97])
def test_step_weights_integrate_the_density_over_each_step(gamma):
    end = 50
    for s in (1, 17, 50):
        cell = _quad(lambda t, s=s: density(t + s - 1, step=end, gamma=gamma), 1.0, 20_001)
        assert step_weights(gamma=gamma, step=end)[s - 1] == pytest.approx(cell, rel=1e-6, abs=1e-14)


@pytest.mark.parametrize(("ta", "ga", "tb", "gb"), [
    (1000.0, 16.97, 1000.0, 16.97), (1000.0, 16.97, 2000.0, 6.94), (2000.0, 6.94, 1000.0, 16.97),
    (3.0, 0.0, 5.0, 0.0), (700.0, 2.5, 300.0, 30.0)])
def test_inner_products_match_quadrature(ta, ga, tb, gb):
    hi = min(ta, tb)  # the product is zero after the earlier end (the grid ends on the jump)
    expected = _quad(lambda t: density(t, step=ta, gamma=ga) * density(t, step=tb, gamma=gb), hi)
    assert float(inner_products(ta, ga, tb, gb)) == pytest.approx(expected, rel=1e-5)
    assert float(inner_products(ta, ga, tb, gb)) == float(inner_products(tb, gb, ta, ga))


def test_inner_products_do_not_overflow_for_huge_gamma():
    value = inner_products(1.0, 1e6, 2.0, 1e6)
    assert np.isfinite(value) and value >= 0


# ------------------------------------------------------------------------------ the solve
@pytest.mark.parametrize("index", [0, 1, 17, 38, 39])
def test_a_target_equal_to_an_input_is_a_one_hot_column(index):
    c = coefficients(EVERY_1000, SIGMAS, EVERY_1000[index], [SIGMAS[index]],
                     max_profile_error=math.inf)
    expected = np.zeros(len(SIGMAS))
    expected[index] = 1.0
    np.testing.assert_allclose(c[:, 0], expected, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e6])
def test_scaling_all_times_leaves_the_coefficients_unchanged(scale):
    targets = [0.04, 0.07, 0.12]
    base = coefficients(EVERY_1000, SIGMAS, 17_000, targets)
    scaled = coefficients([t * scale for t in EVERY_1000], SIGMAS, 17_000 * scale, targets)
    np.testing.assert_allclose(scaled, base, rtol=1e-6, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.035, 0.2), min_size=1, max_size=6),
       st.integers(10, 20).map(lambda k: 1000 * k))
def test_columns_sum_to_one(targets, out_step):
    c = coefficients(EVERY_1000, SIGMAS, out_step, targets, max_profile_error=math.inf)
    assert c.shape == (len(SIGMAS), len(targets))
    np.testing.assert_allclose(c.sum(axis=0), 1.0, rtol=0, atol=1e-12)


def test_the_profile_error_is_the_distance_of_the_profiles():
    """||sum c_i p_i - p|| / ||p|| computed on a grid equals what the solve reports."""
    steps = [t for t in range(2000, 10001, 2000) for _ in range(2)]
    sigmas = [0.05, 0.10] * 5
    found = solve(steps, sigmas, 9000, [0.07, 0.03])
    g_in, g_out = gammas_of(sigmas), gammas_of([0.07, 0.03])
    t = np.linspace(0, 10000, 2_000_001)
    for j in range(2):
        mix = sum(c * density(t, step=s, gamma=g) for c, s, g in
                  zip(found.coefficients[:, j], steps, g_in))
        target = density(t, step=9000, gamma=g_out[j])
        dist = math.sqrt(np.trapezoid((mix - target) ** 2, t) / np.trapezoid(target ** 2, t))
        assert found.profile_errors[j] == pytest.approx(dist, rel=2e-3)


def test_normalised_columns_fit_the_profile_nearly_as_well_as_the_raw_solve():
    """Normalising moves the least-squares optimum only a little (EDM2 normalises too)."""
    found = solve(EVERY_1000, SIGMAS, 20000, [0.04, 0.15])
    assert np.all(found.profile_errors < 0.01)


# -------------------------------------------------------------------- support and refusals
def test_supported_ranges_agree_with_the_refusal():
    ranges = supported_ranges(EVERY_1000, gammas_of(SIGMAS), 20000)
    assert len(ranges) == 1
    lo, hi = ranges[0]
    assert 0.025 < lo < 0.04 and 0.18 < hi < 0.25  # measured: 0.0323 - 0.211
    coefficients(EVERY_1000, SIGMAS, 20000, [lo, hi, 0.04, 0.15])  # accepted
    for outside in (lo * 0.97, hi * 1.03):
        with pytest.raises(ValueError, match="do not support sigma_rel"):
            coefficients(EVERY_1000, SIGMAS, 20000, [outside])


def test_sparse_snapshots_support_only_the_widths_near_the_recorded_ones():
    steps = [t for t in (5000, 10000, 15000, 20000) for _ in range(2)]
    ranges = supported_ranges(steps, gammas_of([0.05, 0.10] * 4), 20000)
    assert len(ranges) == 2 and ranges[0][0] < 0.05 < ranges[0][1] < 0.07 < ranges[1][0] < 0.1
    with pytest.raises(ValueError, match=r"0\.07 \(profile error 0\.03.*Supported at this step: "
                                         r"sigma_rel 0\.04.*, 0\.0"):
        coefficients(steps, [0.05, 0.10] * 4, 20000, [0.07])


def test_an_unsupported_target_names_itself_the_range_and_the_fixes():
    with pytest.raises(ValueError, match="do not support") as exc:
        coefficients(EVERY_1000, SIGMAS, 20000, [0.01])
    message = str(exc.value)
    for part in ("sigma_rel 0.01 (profile error 0.3", "at step 20000", "0.0323-0.211",
                 "snapshot more often", "max_profile_error"):
        assert part in message, message


def test_out_step_after_the_last_snapshot_is_refused():
    with pytest.raises(ValueError, match=r"out_step=20001 is after the last snapshot \(step 20000"):
        coefficients(EVERY_1000, SIGMAS, 20001, [0.05])


@pytest.mark.parametrize(("args", "message"), [
    ((EVERY_1000, SIGMAS, 20000, [0.3]), "sigma_rel must be in"),
    ((EVERY_1000, SIGMAS, 20000, [0.0]), "sigma_rel must be in"),
    ((EVERY_1000, [0.05, 0.5] * 20, 20000, [0.1]), "sigma_rel must be in"),
    (([1000, 1000], [0.05, 0.05], 1000, [0.05]), "are the same snapshot"),
    (([1000, 2000], [0.05], 1000, [0.05]), "one step per sigma_rel"),
    (([], [], 1000, [0.05]), "one step per sigma_rel"),
    (([1000, -5], [0.05, 0.1], 1000, [0.05]), "in_steps must hold optimizer steps"),
    (([1000, True], [0.05, 0.1], 1000, [0.05]), "in_steps must hold optimizer steps"),
    (([1000, float("nan")], [0.05, 0.1], 1000, [0.05]), "in_steps must hold optimizer steps"),
    (([1000, 2000], [0.05, 0.1], 0, [0.05]), "out_step must hold optimizer steps"),
    (([1000, 2000], [0.05, 0.1], 2000, []), "at least one target"),
])
def test_malformed_requests_are_clear_errors(args, message):
    with pytest.raises(ValueError, match=message):
        coefficients(*args)


def test_the_number_of_inputs_is_bounded(monkeypatch):
    """An edited manifest with very many snapshots costs no more than MAX_INPUTS of them."""
    assert least_squares.MAX_INPUTS == 2048
    monkeypatch.setattr(least_squares, "MAX_INPUTS", 39)
    with pytest.raises(ValueError, match=r"40 snapshots are more than one solve takes \(39"):
        coefficients(EVERY_1000, SIGMAS, 20000, [0.07])


@pytest.mark.parametrize("limit", [0, -1.0, float("nan"), True, "0.02"])
def test_max_profile_error_is_checked(limit):
    with pytest.raises(ValueError, match="max_profile_error must be a number > 0"):
        coefficients(EVERY_1000, SIGMAS, 20000, [0.07], max_profile_error=limit)


def test_gammas_are_the_authoritative_form():
    g = [schedules.PowerFunction(sigma_rel=s).gamma for s in SIGMAS]
    by_gamma = solve_gammas(EVERY_1000, g, 20000, gammas_of([0.07])).coefficients
    np.testing.assert_array_equal(by_gamma, coefficients(EVERY_1000, SIGMAS, 20000, [0.07]))
