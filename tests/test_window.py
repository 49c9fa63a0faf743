"""emakit.window.step_weights against the float64 weighted-sum oracle."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emakit import schedules
from emakit.window import step_weights
from oracle import weighted_sum

SCHEDULES = [
    schedules.Constant(0.9),
    schedules.Constant(0.0),
    schedules.Constant(1.0),
    schedules.InverseGamma(power=0.75, max_decay=0.99),
    schedules.TFWarmup(0.95),
    schedules.ExponentialRamp(decay=0.99, tau=5),
    schedules.PowerFunction(gamma=3.0),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize(("steps", "every"), [(1, 1), (12, 1), (12, 3), (13, 4), (3, 5)])
def test_matches_the_weighted_sum_oracle(schedule, steps, every):
    w = step_weights(schedule, steps, every=every)
    ends = list(range(every, steps + 1, every))
    size = len(ends) + 1
    basis = np.eye(size)  # the initial weights and each update get their own coordinate
    want = weighted_sum(basis[0], [(t, basis[j + 1]) for j, t in enumerate(ends)], schedule)
    assert w.steps.tolist() == ends
    np.testing.assert_allclose(w.initial, want[0], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(w.weights, want[1:], rtol=1e-9, atol=1e-15)
    assert w.initial + w.weights.sum() == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(d=st.floats(0.0, 0.999), steps=st.integers(1, 400), every=st.integers(1, 7))
def test_shares_sum_to_one_and_last_shares_grow(d, steps, every):
    w = step_weights(schedules.Constant(d), steps, every=every)
    assert w.initial + w.weights.sum() == pytest.approx(1.0, abs=1e-9)
    shares = [w.share_of_last(n) for n in (1, 10, 100, 10**6)]
    assert all(a <= b + 1e-15 for a, b in itertools.pairwise(shares))


def test_constant_mean_age_and_half_life():
    w = step_weights(schedules.Constant.from_half_life(100), 100_000)
    assert w.share_of_last(100) == pytest.approx(0.5, abs=1e-9)
    d = schedules.half_life_to_decay(100)
    assert w.mean_age() == pytest.approx(d / (1 - d), rel=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        step_weights(schedules.Constant(0.9), 0)
    with pytest.raises(ValueError, match=r"every must be an int >= 1, got 1\.5"):
        step_weights(schedules.Constant(0.9), 5, every=1.5)
    with pytest.raises(ValueError, match="steps must be <= "):
        step_weights(schedules.Constant(0.9), 10**9)
