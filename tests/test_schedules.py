import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emakit
from emakit import schedules as S

ALL = [
    S.Constant(0.99),
    S.InverseGamma(inv_gamma=2.0, power=0.75, min_decay=0.1, max_decay=0.999, update_after_step=3),
    S.TFWarmup(0.999),
    S.ExponentialRamp(decay=0.999, tau=50.0),
    S.PowerFunction(gamma=4.0),
]


def test_constant_is_constant_and_interval_is_power():
    s = S.Constant(0.97)
    assert [s(t) for t in (1, 2, 1000)] == [0.97, 0.97, 0.97]
    assert s.interval(10, 17) == pytest.approx(0.97**7, rel=1e-15)
    assert s.interval(5, 5) == 1.0


def test_inverse_gamma_closed_forms():
    # power=1, inv_gamma=1: d = 1 - 1/(1+e) = e/(1+e) with e = t - 1 (no delay)
    s = S.InverseGamma(inv_gamma=1.0, power=1.0, max_decay=1.0)
    assert s(1) == 0.0
    for t in (2, 11, 101):
        e = t - 1
        assert s(t) == pytest.approx(e / (1 + e), rel=1e-15)
    # power=1/2, inv_gamma=4: d = 1 - 2/sqrt(4+e)
    s = S.InverseGamma(inv_gamma=4.0, power=0.5, max_decay=1.0)
    assert s(13) == pytest.approx(1 - 2 / math.sqrt(16), rel=1e-15)
    # delay: decay 0 (copy) through step update_after_step + 1
    s = S.InverseGamma(power=1.0, update_after_step=5, max_decay=1.0)
    assert [s(t) for t in range(1, 7)] == [0.0] * 6
    assert s(8) == pytest.approx(2 / 3, rel=1e-15)
    # clamps
    s = S.InverseGamma(power=1.0, min_decay=0.5, max_decay=0.9)
    assert s(2) == 0.5 and s(10**6) == 0.9


def test_tf_warmup_and_exponential_ramp_closed_forms():
    s = S.TFWarmup(0.999)
    assert s(1) == pytest.approx(2 / 11, rel=1e-15)
    assert s(90) == pytest.approx(91 / 100, rel=1e-15)
    assert s(10**7) == 0.999
    r = S.ExponentialRamp(decay=0.9, tau=100.0)
    assert r(100) == pytest.approx(0.9 * (1 - 1 / math.e), rel=1e-15)
    assert r(200) == pytest.approx(0.9 * (1 - math.e**-2), rel=1e-15)


def test_power_function_gamma_zero_is_running_mean_weights():
    s = S.PowerFunction(gamma=0.0)
    assert [s(t) for t in (1, 2, 4)] == [0.0, 0.5, 0.75]
    s = S.PowerFunction(gamma=1.0)
    assert s(3) == pytest.approx((2 / 3) ** 2, rel=1e-15)


def test_sigma_rel_gamma_conversions_match_edm2():
    # Karras et al. 2024, Table / sec. 3: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert S.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert S.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for g in (0.5, 3.0, 6.94, 16.97, 100.0):
        assert S.sigma_rel_to_gamma(S.gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-9)
    p = S.PowerFunction(sigma_rel=0.1)
    assert p.gamma == pytest.approx(6.94, abs=0.005)
    assert p.sigma_rel == pytest.approx(0.1, rel=1e-12)


def test_half_life_conversions():
    d = S.half_life_to_decay(2000)
    assert d**2000 == pytest.approx(0.5, rel=1e-12)
    assert S.decay_to_half_life(d) == pytest.approx(2000, rel=1e-12)
    assert S.Constant.from_half_life(1).decay == 0.5


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.kind)
def test_to_dict_round_trips_through_json(schedule):
    data = json.loads(json.dumps(schedule.to_dict()))
    again = S.from_dict(data)
    assert again == schedule
    assert [again(t) for t in range(1, 50)] == [schedule(t) for t in range(1, 50)]


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: s.kind)
def test_interval_is_the_brute_force_product(schedule):
    for a, b in [(0, 1), (0, 7), (3, 40), (100, 103)]:
        brute = math.prod(schedule(t) for t in range(a + 1, b + 1))
        assert schedule.interval(a, b) == pytest.approx(brute, rel=1e-13, abs=0)


@given(st.sampled_from(ALL), st.integers(0, 300), st.integers(0, 300), st.integers(0, 300))
def test_interval_composes(schedule, a, b, c):
    a, b, c = sorted((a, b, c))
    assert schedule.interval(a, c) == pytest.approx(
        schedule.interval(a, b) * schedule.interval(b, c), rel=1e-12, abs=1e-300)


@given(st.sampled_from(ALL), st.integers(1, 10**9))
def test_every_schedule_stays_in_unit_interval(schedule, t):
    assert 0.0 <= schedule(t) <= 1.0


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: S.Constant(1.5), ValueError, r"decay must be in \[0.0, 1.0\], got 1.5"),
        (lambda: S.Constant(float("nan")), ValueError, r"decay must be in"),
        (lambda: S.Constant(True), TypeError, r"decay must be a real number, got True"),
        (lambda: S.Constant("0.9"), TypeError, r"decay must be a real number, got '0.9'"),
        (lambda: S.InverseGamma(power=0), ValueError, r"power must be in \(0.0, inf\)"),
        (lambda: S.InverseGamma(min_decay=0.5, max_decay=0.4), ValueError,
         r"min_decay must be in \[0.0, 0.4\], got 0.5. min_decay must not exceed max_decay"),
        (lambda: S.InverseGamma(update_after_step=-1), ValueError, r"update_after_step must be >= 0"),
        (lambda: S.ExponentialRamp(tau=0), ValueError, r"tau must be in"),
        (lambda: S.PowerFunction(), ValueError, r"exactly one of gamma or sigma_rel"),
        (lambda: S.PowerFunction(gamma=1, sigma_rel=0.1), ValueError, r"exactly one of gamma"),
        (lambda: S.PowerFunction(sigma_rel=0.5), ValueError, r"sigma_rel must be in"),
        (lambda: S.half_life_to_decay(0), ValueError, r"half_life must be in \(0.0, inf\)"),
        (lambda: S.decay_to_half_life(1.0), ValueError, r"decay 1 never halves"),
        (lambda: S.Constant(0.9)(0), ValueError, r"step must be >= 1, got 0"),
        (lambda: S.Constant(0.9).interval(5, 3), ValueError, r"stop must be >= start"),
        (lambda: S.from_dict({"kind": "Nope"}), ValueError, r"unknown schedule kind 'Nope'"),
        (lambda: S.from_dict({"kind": "Constant", "x": 1}), ValueError, r"bad fields"),
    ],
)
def test_bad_arguments_name_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ------------------------------------------------------------------------ long gaps (interval)
def _in_order(schedule, a, b):
    product = 1.0
    for t in range(a + 1, b + 1):
        product *= schedule(t)
        if product == 0.0:
            break
    return product


WARMUPS = ALL[1:]  # Constant's interval has always been decay ** k


@given(st.sampled_from(WARMUPS), st.integers(0, 10**6), st.integers(0, 300))
def test_short_gaps_multiply_in_order_bit_for_bit(schedule, a, gap):
    """Up to EXACT_STEPS the product is the in-order loop it always was (bitwise resume)."""
    assert schedule.interval(a, a + gap) == _in_order(schedule, a, a + gap)


@pytest.mark.parametrize("schedule", WARMUPS, ids=lambda s: s.kind)
def test_the_exact_threshold_is_the_in_order_loop(schedule):
    for a in (0, 7, 123_456):
        assert schedule.interval(a, a + S.EXACT_STEPS) == _in_order(schedule, a, a + S.EXACT_STEPS)


_LONG = st.one_of(
    st.builds(S.InverseGamma, inv_gamma=st.floats(0.1, 1e4), power=st.floats(0.2, 3.0),
              min_decay=st.floats(0.0, 0.5), max_decay=st.floats(0.9999, 1.0),
              update_after_step=st.integers(0, 10)),
    st.builds(S.TFWarmup, decay=st.floats(0.9999, 1.0)),
    st.builds(S.ExponentialRamp, decay=st.floats(0.99999, 1.0), tau=st.floats(1.0, 1e5)),
    st.builds(S.PowerFunction, gamma=st.floats(0.0, 30.0)),
)


@settings(max_examples=40, deadline=None)
@given(_LONG, st.integers(0, 10**6), st.integers(S.EXACT_STEPS + 1, 60_000))
def test_long_gaps_match_the_float64_product(schedule, a, gap):
    """Oracle: exp of the float64 sum (fsum) of log d_t over every step. Tolerance: 1e-12
    relative, plus the rounding of each per-step decay, which the oracle carries (a closed form
    is closer to the exact real product): 2^-53 per step, times (gamma + 2) for PowerFunction,
    whose (1 - 1/t) ** (gamma + 1) raises the rounding of 1 - 1/t to that power (seen: gamma 4,
    steps 2..10002, 2.26e-12 relative)."""
    b = a + gap
    logs = [math.log(d) if d > 0 else -math.inf for d in (schedule(t) for t in range(a + 1, b + 1))]
    want = 0.0 if -math.inf in logs else math.exp(math.fsum(logs))
    got = schedule.interval(a, b)
    assert 0.0 <= got <= 1.0
    per_step = 2.0**-53 * (getattr(schedule, "gamma", 0.0) + 2.0)
    assert got == pytest.approx(want, rel=1e-12 + gap * per_step, abs=1e-300)


def test_huge_gaps_have_closed_forms():
    """Gaps no loop could walk (10^9 to 10^15 steps), against exact or high-precision values."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    a, b = 10**12, 10**12 + 10**9
    # TFWarmup without a cap: prod (1+t)/(10+t) telescopes to 9 factors, exact in rationals
    want = math.prod(Fraction(a + 1 + i, b + 1 + i) for i in range(1, 10))  # t = a+1 .. b
    assert S.TFWarmup(1.0).interval(a, b) == pytest.approx(float(want), rel=1e-14)
    assert S.TFWarmup(0.999).interval(a, b) == pytest.approx(0.999 ** (b - a), rel=1e-9)
    # PowerFunction: (a/b)^(gamma+1)
    for g in (0.0, 6.94, 16.97):
        want = mp.power(mp.mpf(a) / b, g + 1)
        assert S.PowerFunction(gamma=g).interval(a, b) == pytest.approx(float(want), rel=1e-13)
    assert S.PowerFunction(gamma=1.0).interval(0, 10**15) == 0.0  # d_1 = 0
    # InverseGamma and ExponentialRamp, where the ramp still moves: Euler-Maclaurin in mpmath
    ig = S.InverseGamma(inv_gamma=1.0, power=2 / 3, max_decay=1.0)
    want = mp.exp(mp.sumem(lambda t: mp.log(1 - (1 + (t - 1)) ** (-mp.mpf(2) / 3)), [a + 1, b]))
    assert ig.interval(a, b) == pytest.approx(float(want), rel=1e-13)
    er = S.ExponentialRamp(decay=1.0, tau=1e12)
    want = mp.exp(mp.sumem(lambda t: mp.log(1 - mp.exp(-t / mp.mpf(1e12))), [a + 1, b]))
    assert er.interval(a, b) == pytest.approx(float(want), rel=1e-12)
    # the clamps: every step of the gap at max_decay / min_decay
    s = S.InverseGamma(power=1.0, min_decay=0.5, max_decay=0.9)
    assert s.interval(10**6, 10**6 + 10**9) == 0.9 ** 10**9 == 0.0
    s = S.InverseGamma(inv_gamma=1e30, power=1.0, min_decay=0.999999999, max_decay=1.0)
    assert s.interval(10, 10 + 10**9) == pytest.approx(0.999999999 ** 10**9, rel=1e-12)
    assert S.InverseGamma(update_after_step=10**13).interval(0, 10**14) == 0.0  # copies first


class Ramp(S.Schedule):
    """A user's schedule without a closed form: d_t = t / (t + 1), counting its calls."""

    kind = "Ramp"

    def __init__(self):
        self.calls = 0

    def __call__(self, step):
        self.calls += 1
        return step / (step + 1)


def test_user_schedules_get_a_bounded_documented_fallback():
    r = Ramp()
    a, b = 5, 10**12
    got = r.interval(a, b)
    assert r.calls < S.FALLBACK_STEPS + 64 * 64  # exact head, then 64 steps per doubling
    # the product telescopes to (a + 1) / (b + 1); the sampled tail is documented to ~1e-4
    # per doubling of the range
    assert got == pytest.approx((a + 1) / (b + 1), rel=1e-3)
    r = Ramp()
    assert r.interval(a, a + S.FALLBACK_STEPS) == pytest.approx(
        (a + 1) / (a + S.FALLBACK_STEPS + 1), rel=1e-9)  # all of it exact


def test_an_update_after_a_huge_gap_is_immediate_and_exact():
    np = pytest.importorskip("numpy")
    import emakit

    schedule = S.TFWarmup(1.0)
    src = {"w": np.ones(2)}
    ema = emakit.EMA(src, decay=schedule)
    ema.update(step=1)
    for w, step in ((2.0, 10**9), (3.0, 2 * 10**9)):  # not loops over 10^9 steps
        before = ema.step
        src["w"][:] = w
        ema.update(step=step)
        d = schedule.interval(before, step)
        assert d == pytest.approx(
            math.prod((before + 1 + i) / (step + 1 + i) for i in range(1, 10)), rel=1e-14)
    assert ema.step == 2 * 10**9
    d1, d2 = schedule.interval(1, 10**9), schedule.interval(10**9, 2 * 10**9)
    want = d2 * (d1 * 1.0 + (1.0 - d1) * 2.0) + (1.0 - d2) * 3.0
    np.testing.assert_allclose(ema.averaged()["w"], want, rtol=1e-14)


# ------------------------------------------------------------- PowerFunction: weights, range
@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.7, 16.97])
def test_power_function_weighs_steps_exactly_by_differences_of_powers(gamma):
    """After T steps step s holds (s^(g+1) - (s-1)^(g+1)) / T^(g+1): checked against the
    brute-force float64 products (1 - d_s) prod_{u>s} d_u; s^g is only the large-s limit."""
    from emakit.window import step_weights

    s_, t_end = S.PowerFunction(gamma=gamma), 200
    d = [s_(u) for u in range(1, t_end + 1)]
    brute = [(1 - d[s - 1]) * math.prod(d[s:]) for s in range(1, t_end + 1)]
    exact = [(s ** (gamma + 1) - (s - 1) ** (gamma + 1)) / t_end ** (gamma + 1)
             for s in range(1, t_end + 1)]
    assert brute == pytest.approx(exact, rel=1e-12, abs=1e-300)
    w = step_weights(s_, t_end)
    assert w.initial == 0.0 and w.weights.tolist() == pytest.approx(exact, rel=1e-12, abs=1e-300)
    assert math.fsum(exact) == pytest.approx(1.0, rel=1e-14)
    # proportional to s^gamma only asymptotically: the ratio is 1 - gamma/(2s) + O(1/s^2)
    for s in (10, 100, 200):
        ratio = exact[s - 1] / ((gamma + 1) * s**gamma / t_end ** (gamma + 1))
        assert ratio == pytest.approx(1 - gamma / (2 * s), abs=gamma**2 / s**2 + 1e-12)


def test_power_function_range_is_edm2s_gamma_at_least_zero():
    assert S.PowerFunction(gamma=0.0).sigma_rel == pytest.approx(1 / math.sqrt(12), rel=1e-15)
    assert 0.0 < S.PowerFunction(sigma_rel=0.2886).gamma < 0.01  # near the running mean
    for make, message in [
        (lambda: S.PowerFunction(gamma=-0.5), r"gamma must be in \[0.0, inf\), got -0.5. gamma 0"),
        (lambda: S.PowerFunction(sigma_rel=0.29), r"sigma_rel must be in \(0.0, 0.2886751"),
        (lambda: S.PowerFunction(sigma_rel=0.3), r"would need gamma <= 0"),
        (lambda: S.gamma_to_sigma_rel(-0.2), r"gamma must be in \[0.0, inf\)"),
        (lambda: S.sigma_rel_to_gamma(1e-320), r"sigma_rel=1e-320 is too small"),
        (lambda: S.from_dict({"kind": "PowerFunction", "gamma": -0.5, "sigma_rel": 0.29}),
         r"gamma must be in \[0.0, inf\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    assert S.sigma_rel_to_gamma(1e-300) == pytest.approx(1e300, rel=1e-9)


def test_a_new_schedule_is_one_class():
    """Subclassing registers the kind: from_dict, checkpoints and `emakit plan` know it."""
    import dataclasses
    from typing import ClassVar

    from emakit.cli.plan import parse_schedule

    @dataclasses.dataclass(frozen=True)
    class HalfThenFull(S.Schedule):
        late: float = 0.9
        kind: ClassVar[str] = "HalfThenFull"

        def __call__(self, step: int) -> float:
            return 0.5 if step < 3 else self.late

    assert S.REGISTRY["HalfThenFull"] is HalfThenFull
    assert S.from_dict({"kind": "HalfThenFull", "late": 0.8}) == HalfThenFull(0.8)
    assert parse_schedule("half-then-full:late=0.7") == HalfThenFull(0.7)
    assert parse_schedule("power:gamma=2").gamma == 2.0  # an alias
    assert HalfThenFull().interval(0, 4) == 0.5 * 0.5 * 0.9 * 0.9


def test_a_schedule_the_state_could_not_record_is_refused_when_the_ema_is_made():
    class NotADataclass(S.Schedule):
        def __call__(self, step):
            return 0.9

    with pytest.raises(TypeError, match="Make the class a frozen dataclass with a kind"):
        emakit.EMA({"w": np.zeros(2)}, decay=NotADataclass())

    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class NotJSON(S.Schedule):  # a field the state's JSON cannot hold
        kind = "not_json_for_this_test"
        fn: object = print

        def __call__(self, step):
            return 0.9

    with pytest.raises(TypeError, match="not JSON serializable"):
        emakit.EMA({"w": np.zeros(2)}, decay=NotJSON())
    del S.REGISTRY[NotJSON.kind]


def test_a_file_with_a_schedule_this_process_does_not_know_says_so(tmp_path):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Elsewhere(S.Schedule):
        kind = "defined_elsewhere_for_this_test"
        d: float = 0.9

        def __call__(self, step):
            return self.d

    ema = emakit.EMA({"w": np.zeros(2)}, decay=Elsewhere())
    ema.update()
    emakit.save(ema, tmp_path / "e.safetensors")
    del S.REGISTRY[Elsewhere.kind]  # as in a process that never imported its module
    with pytest.raises(emakit.StateDictError, match="Import the module that defines"):
        emakit.read_state(tmp_path / "e.safetensors")
