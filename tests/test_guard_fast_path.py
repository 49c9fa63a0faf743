"""The non-finite guard's check-then-group path gives the guard's per-tensor semantics exactly.

``Policy(nonfinite="skip")`` first reads back the largest magnitude of the weights (one number
per role), runs the plain grouped kernels when no result can be non-finite, and otherwise goes
tensor by tensor. These tests hold it to a plain per-tensor reference written here in float64
terms: ``new = lerp(shadow, weight)``; keep it only where every element is finite.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emakit

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("kernels")  # native and torch kernels alike
nn = torch.nn
SKIP = emakit.Policy(nonfinite="skip")


def reference_step(shadows, weights, decay):
    """One guarded update, tensor by tensor, as the policy defines it."""
    out, skipped = {}, {}
    for name, s in shadows.items():
        w = weights[name].to(s.dtype)
        new = torch.lerp(s, w, 1.0 - decay)
        ok = bool(torch.isfinite(new).all())
        out[name] = new if ok else s
        skipped[name] = int(not ok)
    return out, skipped


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_training_gives_bitwise_the_plain_update(flat, dtype):
    model = mlp().to(dtype)
    if flat:
        emakit.flatten_parameters(model)
    guarded = emakit.EMA(model, decay=0.9, dtype=torch.float32, policy=SKIP)
    plain = emakit.EMA(model, decay=0.9, dtype=torch.float32)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        guarded.update()
        plain.update()
    for name, value in plain.averaged().items():
        assert torch.equal(guarded.averaged()[name], value), name
    assert set(guarded.nonfinite_skips().values()) == {0}


@pytest.mark.parametrize("flat", [False, True])
def test_one_bad_tensor_is_skipped_alone_in_a_flattened_model(flat):
    model = mlp()
    if flat:
        emakit.flatten_parameters(model)
    ema = emakit.EMA(model, decay=0.5, policy=SKIP)
    before = {k: v.clone() for k, v in ema.averaged().items()}
    with torch.no_grad():
        model[0].bias[3] = float("nan")
        model[2].weight.mul_(2.0)
    ema.update()
    skips = ema.nonfinite_skips()
    assert skips["0.bias"] == 1 and sum(skips.values()) == 1
    assert torch.equal(ema.averaged()["0.bias"], before["0.bias"])
    expected = torch.lerp(before["2.weight"], model[2].weight.detach(), 0.5)
    assert torch.equal(ema.averaged()["2.weight"], expected)
    with torch.no_grad():  # the next finite update takes the grouped path again
        model[0].bias.zero_()
    ema.update()
    assert ema.nonfinite_skips()["0.bias"] == 1
    assert torch.equal(ema.averaged()["0.bias"], torch.lerp(before["0.bias"], torch.zeros(16), 0.5))


def test_a_loaded_huge_shadow_is_bounded_before_the_grouped_path_is_trusted():
    """A finite weight (1e38, below the headroom) against a loaded shadow of 3e38: the lerp's
    difference overflows, so the update must be skipped -- the guard reads the shadows' bound
    after a load instead of assuming it."""
    w = {"w": torch.tensor([1.0, 1.0])}
    ema = emakit.EMA(w, decay=0.5, policy=SKIP)
    state = ema.state_dict()
    state["shadows"] = {"w": torch.tensor([3e38, 0.0])}
    ema.load_state_dict(state)
    w["w"].copy_(torch.tensor([-1e38, 1.0]))
    ema.update()
    assert ema.nonfinite_skips() == {"w": 1}
    assert torch.equal(ema.averaged()["w"], torch.tensor([3e38, 0.0]))


def test_a_copied_buffer_with_inf_is_skipped_while_the_averages_update():
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("mask", torch.zeros(3))

    model = WithMask()
    ema = emakit.EMA(model, decay=0.5, policy=emakit.Policy(nonfinite="skip", buffers="copy"))
    with torch.no_grad():
        model.mask[0] = -float("inf")
        model.lin.weight.add_(1.0)
    before = ema.averaged()["lin.weight"].clone()
    ema.update()
    assert ema.nonfinite_skips() == {"lin.weight": 0, "lin.bias": 0, "mask": 1}
    assert torch.equal(ema.averaged()["lin.weight"],
                       torch.lerp(before, model.lin.weight.detach(), 0.5))
    assert torch.equal(ema.averaged()["mask"], torch.zeros(3))


def test_half_shadows_take_the_per_tensor_path_above_their_headroom():
    """fp16 shadows hold at most 65504: a weight of 40000 is finite there (updated), 70000 is
    not (skipped); both are above half the range, where the grouped path is not trusted."""
    w = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}
    ema = emakit.EMA(w, decay=0.0 + 0.5, dtype=torch.float16, policy=SKIP)
    w["a"].fill_(40000.0)
    w["b"].fill_(70000.0)
    ema.update()
    assert ema.nonfinite_skips() == {"a": 0, "b": 1}
    assert ema.averaged()["a"].item() == torch.lerp(torch.tensor([1.0], dtype=torch.float16),
                                                    torch.tensor([40000.0]).half(), 0.5).item()


special = st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf"), -float("inf"),
                           1e38, -3e38, 3.3e38])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5), special), max_size=4),
       st.sampled_from([0.5, 0.9, 0.999]), st.booleans())
def test_guard_matches_the_per_tensor_reference(pokes, decay, flat):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    if flat:
        emakit.flatten_parameters(model)
    ema = emakit.EMA(model, decay=decay, policy=SKIP)
    params = dict(model.named_parameters())
    names = list(params)
    shadows = {k: v.detach().clone() for k, v in params.items()}
    skips = dict.fromkeys(names, 0)
    for round_ in range(3):
        with torch.no_grad():
            for p in params.values():
                p.add_(0.25)
            for which, at, value in pokes[round_::3]:
                flat_view = params[names[which]].view(-1)
                flat_view[at % flat_view.numel()] = value
        ema.update()
        shadows, skipped = reference_step(shadows, {k: v.detach() for k, v in params.items()},
                                          decay)
        skips = {k: skips[k] + skipped[k] for k in names}
        got = ema.averaged()
        for k in names:
            assert torch.equal(got[k], shadows[k]) or (
                torch.isnan(got[k]).equal(torch.isnan(shadows[k]))
                and torch.equal(torch.nan_to_num(got[k]), torch.nan_to_num(shadows[k]))), k
        assert ema.nonfinite_skips() == skips


def test_a_long_finite_run_stays_on_the_grouped_path(monkeypatch):
    """The shadows' magnitude bound must not creep up update after update (it would end up
    above the headroom and send every update tensor by tensor). float16 shadows have a
    headroom of 32752: a bound grown by 2**-10 per update would pass it within 10000 updates.
    Over 20000 updates, not one makes a per-tensor check (which asks a tensor for its truth
    value)."""
    w = {"a": torch.full((4,), 3.0), "b": torch.ones(3)}
    ema = emakit.EMA(w, decay=0.5, dtype=torch.float16, policy=SKIP)
    checks = []

    def per_tensor_check(self, checks=checks):
        checks.append(1)
        return True

    with monkeypatch.context() as patched:
        patched.setattr(torch.Tensor, "__bool__", per_tensor_check)
        for _ in range(20_000):
            ema.update()
    assert checks == []
    assert ema.nonfinite_skips() == {"a": 0, "b": 0}
