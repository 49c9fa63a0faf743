"""Invariants under hypothesis: decay 0 copies, 1 freezes, constants are fixed points, the
shadow stays inside the history's range, and interrupt + resume equals an uninterrupted run."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import emakit
from emakit import schedules as S
from oracle import Cycle

torch = pytest.importorskip("torch")

FLOATS = st.floats(-1e6, 1e6, allow_nan=False, width=32)
ARRAYS = hnp.arrays(np.float32, st.integers(1, 40), elements=FLOATS)
DECAY = st.floats(0.0, 1.0)
BACKENDS = st.sampled_from(["numpy", "torch"])


def as_backend(x, backend):
    return torch.tensor(x) if backend == "torch" else np.array(x)


def to_numpy(x):
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@pytest.mark.parametrize("decay", [0.0, 1.0], ids=["decay 0 copies", "decay 1 freezes"])
@given(a=ARRAYS, b=ARRAYS, backend=BACKENDS, fast=st.booleans())
def test_decay_zero_copies_and_decay_one_freezes(decay, a, b, backend, fast):
    b = np.resize(b, a.shape)
    p = {"w": as_backend(a, backend)}
    ema = emakit.EMA(p, decay=decay, foreach=fast)
    p["w"][...] = as_backend(b, backend)
    for _ in range(3):
        ema.update()
    np.testing.assert_array_equal(to_numpy(ema.averaged()["w"]), b if decay == 0.0 else a)


@given(ARRAYS, st.lists(DECAY, min_size=1, max_size=6), BACKENDS)
def test_constant_input_is_a_fixed_point(a, decays, backend):
    p = {"w": as_backend(a, backend)}
    ema = emakit.EMA(p, decay=Cycle(tuple(decays)))  # the decay changes every step
    for _ in decays:
        ema.update()
    np.testing.assert_array_equal(to_numpy(ema.averaged()["w"]), a)


@given(st.lists(ARRAYS, min_size=2, max_size=8), st.lists(DECAY, min_size=1, max_size=8),
       BACKENDS)
def test_shadow_stays_inside_the_range_of_the_history(history, decays, backend):
    shape = history[0].shape
    history = [np.resize(h, shape) for h in history]
    p = {"w": as_backend(history[0], backend)}
    ema = emakit.EMA(p, decay=Cycle(tuple(decays)))
    for h in history[1:]:
        p["w"][...] = as_backend(h, backend)
        ema.update()
    shadow = to_numpy(ema.averaged()["w"])
    stack = np.stack(history)
    assert np.all(shadow >= stack.min(axis=0))
    assert np.all(shadow <= stack.max(axis=0))


SCHEDULES = st.sampled_from([
    S.Constant(0.9),
    S.InverseGamma(power=0.75, max_decay=0.99, update_after_step=2),
    S.TFWarmup(0.95),
    S.ExponentialRamp(0.97, tau=3.0),
    S.PowerFunction(gamma=3.0),
])


def torch_source(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 5, generator=g),
        "h": torch.randn(7, generator=g).bfloat16(),
        "bn.running_mean": torch.randn(3, generator=g),
        "bn.num_batches_tracked": torch.tensor(seed),
    }


def step_source(src, t):
    new = torch_source(1000 + t)
    for k in src:
        src[k].copy_(new[k])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SCHEDULES, st.integers(1, 3), st.sampled_from(["copy", "zeros"]), st.integers(1, 14),
       st.booleans(), st.booleans())
def test_interrupt_and_resume_equals_uninterrupted(schedule, every, init, cut, guard, explicit):
    total = 15
    options = {"decay": schedule, "every": every, "start": init,
               "policy": emakit.Policy(nonfinite="skip" if guard else "average")}
    src = torch_source(0)
    whole = emakit.EMA(src, **options)
    for t in range(1, total + 1):
        step_source(src, t)
        whole.update(step=t) if explicit else whole.update()

    src = torch_source(0)
    first = emakit.EMA(src, **options)
    for t in range(1, cut + 1):
        step_source(src, t)
        first.update(step=t) if explicit else first.update()
    buf = io.BytesIO()
    torch.save({"model": src, "ema": first.state_dict()}, buf)
    del first, src
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # a fresh process: new tensors for everything
    src = ckpt["model"]
    resumed = emakit.EMA(src, **options)
    resumed.load_state_dict(ckpt["ema"])
    for t in range(cut + 1, total + 1):
        step_source(src, t)
        resumed.update(step=t) if explicit else resumed.update()
    assert (resumed.step, resumed.num_updates) == (whole.step, whole.num_updates)
    for k, v in whole.state_dict()["shadows"].items():  # the raw shadows, then the averages
        assert torch.equal(resumed.state_dict()["shadows"][k], v), k
    for k, v in whole.averaged().items():
        assert torch.equal(resumed.averaged()[k], v), k
