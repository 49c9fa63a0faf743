"""BEMA: an independent float64 oracle, TRL's BEMACallback update, exact resume, the verbs."""

import numpy as np
import pytest

import emakit
from emakit.bema import BEMASchedule

torch = pytest.importorskip("torch")


def oracle(thetas, *, kappa=0.5, eta=0.2, rho=10.0, gamma=1.0, floor=0.0, tau=0):
    """BEMA_t for t = 1..T in float64, written from the paper's formulas: EMA and theta_0 set
    to theta_tau at step tau, then EMA_t = (1-b) EMA + b theta_t, BEMA_t = EMA_t + a (theta_t -
    theta_0), b = max((rho + gamma t)^-kappa, floor), a = (rho + gamma t)^-eta."""
    ema = theta0 = np.array(thetas[0], dtype=np.float64)
    out = []
    for t in range(1, len(thetas)):
        theta = np.asarray(thetas[t], dtype=np.float64)
        if t <= tau:
            ema = theta0 = theta.copy()
            out.append(ema.copy())
            continue
        b = min(1.0, max((rho + gamma * t) ** -kappa, floor))
        ema = (1 - b) * ema + b * theta
        out.append(ema + (rho + gamma * t) ** -eta * (theta - theta0))
    return out


def trajectory(n=40, size=6, seed=0):
    rng = np.random.default_rng(seed)
    steps = np.cumsum(rng.normal(0.1, 1.0, size=(n, size)), axis=0)  # drift + random walk
    return [s + rng.normal(0, 0.3, size) for s in steps]


@pytest.mark.parametrize("tau", [0, 5])
@pytest.mark.parametrize(("kappa", "eta", "floor"), [(0.5, 0.2, 0.0), (0.7, 0.4, 0.05),
                                                     (0.5, 0.0, 0.0)])
def test_equals_the_float64_formula(tau, kappa, eta, floor):
    thetas = trajectory()
    w = {"w": thetas[0].copy()}
    bema = emakit.BEMA(w, ema_power=kappa, bias_power=eta, min_ema_multiplier=floor,
                       update_after=tau)
    want = oracle(thetas, kappa=kappa, eta=eta, floor=floor, tau=tau)
    for t in range(1, len(thetas)):
        w["w"][:] = thetas[t]
        bema.update()
        np.testing.assert_allclose(bema.averaged()["w"], want[t - 1], rtol=1e-12, atol=1e-12,
                                   err_msg=f"step {t}")


def trl_bema(params, steps, *, ema_power, bias_power, lag, multiplier, floor, tau, train):
    """TRL's BEMACallback at update_freq=1, as its on_step_end runs (fp32, mul_/add_)."""
    theta0 = [p.detach().clone() for p in params]
    ema = [p.detach().clone() for p in params]
    running = None
    for step in range(1, steps + 1):
        train(step)
        if step < tau:
            continue
        if step == tau:
            for t0, e, p in zip(theta0, ema, params):
                t0.copy_(p)
                e.copy_(p)
            continue
        beta = max((lag + multiplier * step) ** (-ema_power), floor)
        alpha = (lag + multiplier * step) ** (-bias_power)
        running = []
        for p, t0, e in zip(params, theta0, ema):
            e.mul_(1 - beta).add_(p.detach(), alpha=beta)
            running.append(e + alpha * (p.detach() - t0))
    return running


@pytest.mark.parametrize("tau", [0, 3])
def test_agrees_with_trls_bema_callback(tau):
    def run(seed):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def train(step):
            g = torch.Generator().manual_seed(seed + step)
            opt.zero_grad()
            model(torch.randn(16, 4, generator=g)).square().mean().backward()
            opt.step()
        return model, train

    options = {"ema_power": 0.5, "bias_power": 0.2, "lag": 10.0, "multiplier": 1.0,
               "floor": 0.01, "tau": tau}
    model, train = run(1)
    want = trl_bema(list(model.parameters()), 25, train=train, **options)
    model, train = run(1)
    bema = emakit.BEMA(model, ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0,
                       min_ema_multiplier=0.01, update_after=tau)
    for step in range(1, 26):
        train(step)
        bema.update()
    got = bema.averaged()
    for (name, _), value in zip(model.named_parameters(), want):
        torch.testing.assert_close(got[name], value, rtol=2e-6, atol=1e-6)  # lerp vs mul/add


def test_resume_is_exact_through_state_dict_and_file(tmp_path):
    thetas = trajectory(seed=3)
    kw = {"ema_power": 0.6, "bias_power": 0.3, "update_after": 4}

    def fresh():
        src = {"w": torch.tensor(thetas[0], dtype=torch.float32)}
        return src, emakit.BEMA(src, **kw)

    src, whole = fresh()
    for t in range(1, 30):
        src["w"].copy_(torch.tensor(thetas[t]))
        whole.update()
    for via in ("state_dict", "file"):
        src, first = fresh()
        for t in range(1, 12):
            src["w"].copy_(torch.tensor(thetas[t]))
            first.update()
        if via == "file":
            emakit.save(first, tmp_path / "bema.safetensors")
        state = first.state_dict()
        assert set(state["extras"]["bema_origin"]) == {"w"}
        src, resumed = fresh()
        if via == "file":
            emakit.load(resumed, tmp_path / "bema.safetensors")
        else:
            resumed.load_state_dict(state)
        for t in range(12, 30):
            src["w"].copy_(torch.tensor(thetas[t]))
            resumed.update()
        assert torch.equal(resumed.averaged()["w"], whole.averaged()["w"]), via
        assert torch.equal(resumed.state_dict()["shadows"]["w"], whole.state_dict()["shadows"]["w"])


def test_a_bema_state_does_not_load_into_a_plain_ema_and_back():
    src = {"w": torch.zeros(3)}
    bema = emakit.BEMA(src)
    src["w"] += 1.0
    bema.update()
    plain = emakit.EMA({"w": torch.zeros(3)}, decay=bema.schedule)
    with pytest.raises(emakit.StateDictError, match=r"bema_origin.*emakit.BEMA"):
        plain.load_state_dict(bema.state_dict())
    plain.update()
    state = plain.state_dict()
    with pytest.raises(emakit.StateDictError, match=r"no BEMA origin"):
        emakit.BEMA({"w": torch.zeros(3)}).load_state_dict(state)


def test_the_verbs_read_the_corrected_weights(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    bema = emakit.BEMA(model, lag=2.0)
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(0.5 * step)
        bema.update()
    corrected = bema.averaged()
    before = model.weight.detach().clone()
    with bema.swapped():
        assert torch.equal(model.weight, corrected["weight"])
    assert torch.equal(model.weight, before)
    keep = emakit.KeepBest(bema, tmp_path / "best.safetensors")
    keep.observe(1.0)
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "best.safetensors")["weight"], corrected["weight"])
    assert not torch.equal(corrected["weight"], bema.state_dict()["shadows"]["weight"])


def test_with_the_guard_a_nonfinite_step_stays_out():
    w = {"w": np.ones(2)}
    bema = emakit.BEMA(w, policy=emakit.Policy(nonfinite="skip"))
    w["w"][:] = 2.0
    bema.update()
    w["w"][:] = np.nan
    bema.update()
    assert bema.nonfinite_skips() == {"w": 1}
    w["w"][:] = 2.0
    assert np.isfinite(bema.averaged()["w"]).all()


def test_schedule_values_and_errors():
    s = BEMASchedule(ema_power=0.5, lag=10.0, update_after=2)
    assert s(1) == s(2) == 0.0 and s(6) == pytest.approx(0.75)
    assert emakit.schedules.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="ema_power must be in"):
        BEMASchedule(ema_power=-1.0)
    with pytest.raises(ValueError, match="update_after must be an int >= 0"):
        BEMASchedule(update_after=-1)
    with pytest.raises(ValueError, match="start='zeros' has no meaning"):
        emakit.BEMA({"w": np.ones(2)}, start="zeros")


def test_the_average_read_inside_swapped_is_the_average_read_outside(tmp_path):
    """BEMA corrects with the training weights; inside swapped() the model holds BEMA's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    bema = emakit.BEMA(model)
    bema.attach(opt)
    for _ in range(10):
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    outside = bema.model_state_dict()
    keep = emakit.KeepBest(bema, tmp_path / "best.safetensors")
    with bema.swapped():
        assert torch.equal(model.weight, outside["weight"])
        inside = bema.model_state_dict()
        keep.observe(1.0)
    assert all(torch.equal(inside[k], v) for k, v in outside.items())
    saved, _ = emakit.io.read_weights(tmp_path / "best.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in outside.items())
