"""The engine on numpy arrays: float64 oracles, exact skips, bias correction, swap, state."""

import warnings

import numpy as np
import pytest

import emakit
from emakit import schedules as S
from oracle import weighted_sum

SCHEDULES = [
    S.Constant(0.9),
    S.InverseGamma(power=0.75, max_decay=0.99, update_after_step=2),
    S.TFWarmup(0.95),
    S.ExponentialRamp(decay=0.95, tau=5.0),
    S.PowerFunction(gamma=2.0),
]


def trajectory(n, shape=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) for _ in range(n)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.kind)
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("init", ["copy", "zeros"])
def test_matches_float64_weighted_sum(schedule, every, init):
    xs = trajectory(31)
    params = {"w": xs[0].copy()}
    ema = emakit.EMA(params, decay=schedule, every=every, start=init)
    updates = []
    for t, x in enumerate(xs[1:], start=1):
        params["w"][...] = x
        if ema.update():
            updates.append((t, x))
    assert [s for s, _ in updates] == list(range(every, 31, every))
    expected = weighted_sum(xs[0], updates, schedule, zeros=init == "zeros")
    np.testing.assert_allclose(ema.averaged()["w"], expected, rtol=1e-12, atol=1e-13)


def test_every_k_keeps_the_window_in_steps():
    # a weight held for 30 steps then changed: every=3 gives d^3 per update, so after 30 steps the
    # old value carries d^30 of the average with or without skipping.
    d = 0.9
    for every in (1, 3, 5):
        p = {"w": np.array([1.0])}
        ema = emakit.EMA(p, decay=d, every=every)
        p["w"][:] = 0.0
        for _ in range(30):
            ema.update()
        assert ema.averaged()["w"][0] == pytest.approx(d**30, rel=1e-12)


def test_explicit_steps_with_gaps_equal_every_k():
    xs = trajectory(13, seed=1)
    a, b = {"w": xs[0].copy()}, {"w": xs[0].copy()}
    ema_a = emakit.EMA(a, decay=0.8, every=4)
    ema_b = emakit.EMA(b, decay=0.8)
    for t, x in enumerate(xs[1:], start=1):
        a["w"][...] = x
        b["w"][...] = x
        ema_a.update()
        if t % 4 == 0:
            assert ema_b.update(step=t)
            assert not ema_b.update(step=t)  # a repeated step (gradient accumulation) is a no-op
    np.testing.assert_allclose(ema_a.averaged()["w"], ema_b.averaged()["w"], rtol=1e-14)
    assert ema_a.step == ema_b.step == 12


def test_zero_init_debias_of_constant_input_is_the_input():
    p = {"w": np.full(5, 3.0)}
    ema = emakit.EMA(p, decay=0.99, start="zeros")
    ema.update()
    assert ema.state_dict()["shadows"]["w"][0] == pytest.approx(0.03)  # the raw shadow: biased
    np.testing.assert_allclose(ema.averaged()["w"], 3.0, rtol=1e-14)
    for _ in range(50):
        ema.update()
    np.testing.assert_allclose(ema.averaged()["w"], 3.0, rtol=1e-13)


def test_zero_started_numpy_loop():
    # a hand-written numpy loop: params -= g; ema = (1 - alpha) * ema + alpha * params from zeros
    alpha = 0.9
    params = np.array([1.0, 2.0, 3.0])
    seed_ema = np.zeros_like(params)
    ema = emakit.EMA({"params": params}, decay=1 - alpha, start="zeros")
    for _ in range(10):
        params -= np.array([0.1, 0.2, 0.3])
        seed_ema = (1 - alpha) * seed_ema + alpha * params
        ema.update()
    np.testing.assert_allclose(ema.state_dict()["shadows"]["params"], seed_ema, rtol=1e-14)
    debiased = seed_ema / (1 - (1 - alpha) ** 10)
    np.testing.assert_allclose(ema.averaged()["params"], debiased, rtol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_flat_fast_path_equals_plain_loop_bitwise(dtype):
    rng = np.random.default_rng(3)
    shapes = [(7,), (3, 5), (1,), (2, 2, 2), (64, 33)]

    def make():
        return {f"t{i}": rng.normal(size=s).astype(dtype) for i, s in enumerate(shapes)}

    src = make()
    fast = emakit.EMA(src, decay=0.97)
    loop = emakit.EMA(src, decay=0.97, foreach=False)
    for _ in range(25):
        for k, v in make().items():
            src[k][...] = v
        fast.update()
        loop.update()
    (group,) = fast.update_plan()  # one flat buffer: one pass
    assert (group.kind, group.tensors, group.runs, group.loose) == ("direct", len(shapes), 1, 0)
    assert [g.kind for g in loop.update_plan()] == ["loop"]
    for k in src:
        assert fast.averaged()[k].dtype == (np.float32 if dtype == np.float16 else dtype)
        np.testing.assert_array_equal(fast.averaged()[k], loop.averaged()[k])


def test_weight_above_one_half_uses_the_other_lerp_branch():
    p = {"w": np.array([1.0, -2.0], dtype=np.float32)}
    ema = emakit.EMA(p, decay=0.25)
    p["w"][:] = [5.0, 6.0]
    ema.update()
    np.testing.assert_array_equal(ema.averaged()["w"], np.array([4.0, 4.0], dtype=np.float32))


def test_integer_and_bool_arrays_are_copied_not_averaged():
    p = {"w": np.zeros(2), "count": np.array(3, dtype=np.int64), "mask": np.array([True, False])}
    ema = emakit.EMA(p, decay=0.9)
    assert dict(ema.actions) == {"w": "average", "count": "copy", "mask": "copy"}
    p["count"][...] = 7
    p["mask"][:] = [False, True]
    ema.update()
    assert ema.averaged()["count"].dtype == np.int64 and int(ema.averaged()["count"]) == 7
    np.testing.assert_array_equal(ema.averaged()["mask"], [False, True])


def test_nonfinite_guard_keeps_shadow_and_counts():
    p = {"a": np.ones(3), "b": np.ones(2)}
    guarded = emakit.EMA(p, decay=0.5, policy=emakit.Policy(nonfinite="skip"))
    plain = emakit.EMA(p, decay=0.5)
    p["a"][:] = [3.0, np.nan, 3.0]
    p["b"][:] = 3.0
    guarded.update()
    plain.update()
    np.testing.assert_array_equal(guarded.averaged()["a"], np.ones(3))
    np.testing.assert_array_equal(guarded.averaged()["b"], np.full(2, 2.0))
    assert guarded.nonfinite_skips() == {"a": 1, "b": 0}
    assert np.isnan(plain.averaged()["a"][1])  # what the guard prevents
    assert guarded.state_dict()["nonfinite_skips"] == {"a": 1, "b": 0}


def test_swapped_puts_average_in_and_restores_bitwise_even_on_error():
    xs = trajectory(4)
    p = {"w": xs[0].copy()}
    ema = emakit.EMA(p, decay=0.5)
    for x in xs[1:]:
        p["w"][...] = x
        ema.update()
    training = p["w"].copy()
    alias = p["w"]
    with ema.swapped():
        np.testing.assert_array_equal(alias, ema.averaged()["w"])  # in place: aliases see it
    np.testing.assert_array_equal(p["w"], training)
    with pytest.raises(KeyError), ema.swapped():
        raise KeyError("boom")
    np.testing.assert_array_equal(p["w"], training)
    assert p["w"] is alias


def test_seed_verbs_and_store_restore():
    p = {"w": np.array([0.0])}
    ema = emakit.EMA(p, 0.5)  # positional decay, as the classic snippet does
    ema.register()
    p["w"][:] = 2.0
    ema.update()
    ema.apply_shadow()
    assert p["w"][0] == 1.0
    with pytest.raises(emakit.SwapError, match="update\\(\\) called while the EMA weights are swapped"):
        ema.update()
    ema.restore()
    assert p["w"][0] == 2.0
    ema.store()
    ema.copy_to()
    assert p["w"][0] == 1.0
    ema.restore()
    assert p["w"][0] == 2.0
    with pytest.raises(emakit.SwapError, match="nothing to restore"):
        ema.restore()


def test_register_restarts_the_average():
    p = {"w": np.array([1.0])}
    ema = emakit.EMA(p, decay=0.5)
    p["w"][:] = 3.0
    ema.update()
    ema.register()
    assert ema.averaged()["w"][0] == 3.0 and ema.num_updates == 0 and ema.step == 1


def test_copy_to_another_mapping_by_name():
    p = {"a": np.array([1.0]), "b": np.array([2.0])}
    ema = emakit.EMA(p, decay=0.5)
    target = {"b": np.zeros(1), "a": np.zeros(1), "extra": np.zeros(1)}
    assert ema.copy_to(target) == []
    assert target["a"][0] == 1.0 and target["b"][0] == 2.0 and target["extra"][0] == 0.0
    partial = {"a": np.zeros(1)}
    with pytest.raises(emakit.StateDictError, match=r"missing \(1\): 'b'"):
        ema.copy_to(partial)
    assert partial["a"][0] == 0.0  # nothing half-copied
    assert ema.copy_to(partial, strict=False) == ["b"]
    with pytest.raises(ValueError, match=r"target tensor 'a' is \(2,\)"):
        ema.copy_to({"a": np.zeros(2), "b": np.zeros(1)})


def test_step_errors_and_no_ops():
    ema = emakit.EMA({"w": np.zeros(1)}, decay=0.5)
    ema.update(step=5)
    with pytest.raises(ValueError, match=r"step=3 is behind the EMA's step 5"):
        ema.update(step=3)
    with pytest.raises(TypeError, match=r"step must be an int"):
        ema.update(step=5.0)


def test_first_update_far_from_creation_warns():
    ema = emakit.EMA({"w": np.zeros(1)}, decay=0.5)
    with pytest.warns(emakit.EMAWarning, match=r"create it with EMA\(..., start=99\)"):
        ema.update(step=100)
    started = emakit.EMA({"w": np.zeros(1)}, decay=0.5, start=99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        started.update(step=100)
    assert started.last_decay == 0.5
    zeros = emakit.EMA({"w": np.zeros(1)}, decay=0.9, start="zeros")  # no initial weights
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zeros.update(step=100)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: emakit.EMA({"w": np.zeros(1)}, decay=1.5), ValueError, r"decay must be in \[0.0, 1.0\]"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, decay="0.9"), TypeError, r"decay must be a float in \[0, 1\] or a schedule"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, decay=0.9, half_life=10), ValueError, r"either decay or half_life"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, every=0), ValueError, r"every must be >= 1, got 0"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, start="ones"), TypeError, r"start must be an optimizer step \(int\), 'zeros'"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, start=-1), ValueError, r"start step must be an int >= 0, got -1"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, every="2"), TypeError, r"every must be an int, got '2'"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, init="zeros"), TypeError, r"'init'; it moved: use start='zeros'"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, step=3), TypeError, r"'step'; it moved: use start=STEP"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, skip_nonfinite=True), TypeError, r"use policy=emakit.Policy\(nonfinite='skip'\)"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, dtype="int32"), ValueError, r"dtype must be a floating dtype"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, device="cuda"), ValueError, r"device='cuda' is not available for numpy"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, policy="copy"), TypeError, r"policy must be an emakit.Policy"),
        (lambda: emakit.EMA(np.zeros(3)), TypeError, r"Wrap a single array in a dict"),
        (lambda: emakit.EMA(42), TypeError, r"source must be a torch.nn.Module, a mapping"),
        (lambda: emakit.EMA({}), ValueError, r"the source holds no tensors"),
        (lambda: emakit.EMA({"w": [1.0]}), TypeError, r"source entry 'w' is a list"),
        (lambda: emakit.EMA({1: np.zeros(1)}), TypeError, r"source keys must be tensor names"),
        (lambda: emakit.EMA([("a", np.zeros(1)), ("a", np.zeros(1))]), ValueError, r"'a' appears twice"),
        (lambda: emakit.EMA([np.zeros(1)]), TypeError, r"must yield \(name, tensor\) tuples"),
        (lambda: emakit.EMA({"w": np.zeros(1)}, policy=emakit.Policy(exclude="*")), ValueError, r"tracks no tensor"),
    ],
)
def test_constructor_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_source_changes_are_caught_by_name():
    p = {"w": np.zeros(3)}
    ema = emakit.EMA(p, decay=0.5)
    p["w"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"source tensor 'w' has shape \(4,\) but its shadow has shape \(3,\)"):
        ema.update()
    p["w"] = [0.0, 0.0, 0.0]
    with pytest.raises(TypeError, match=r"source tensor 'w' is now a list"):
        ema.update()
    del p["w"]
    with pytest.raises(ValueError, match=r"no longer has a tensor named 'w'"):
        ema.update()


def test_rebound_entries_are_followed():
    p = {"w": np.zeros(2)}
    ema = emakit.EMA(p, decay=0.5)
    p["w"] = np.full(2, 4.0)  # rebound, not written in place
    ema.update()
    np.testing.assert_array_equal(ema.averaged()["w"], [2.0, 2.0])


def test_pairs_source():
    a = np.ones(2)
    ema = emakit.EMA([("a", a)], decay=0.5)
    a[:] = 3.0
    ema.update()
    np.testing.assert_array_equal(ema.averaged()["a"], [2.0, 2.0])


def test_warnings_point_at_the_users_line():
    import inspect

    ema = emakit.EMA({"w": np.zeros(1)}, decay=0.5)
    line = inspect.currentframe().f_lineno + 2
    with pytest.warns(emakit.EMAWarning) as seen:
        ema.update(step=100)  # the first update discards the initial weights: warns
    assert [(w.filename, w.lineno) for w in seen] == [(__file__, line)]
