"""The engine on torch: policies, fp32 shadows of bf16 models, fast path == loop, swap, hooks."""

import copy
import io
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("kernels")  # native and torch kernels alike

import emakit
from emakit.backends.torch import layout as torch_layout
from oracle import Cycle, weighted_sum


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 6 * 6, 5)
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        self.register_buffer("mask", torch.ones(3), persistent=False)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1)) + self.frozen.sum()


def train_steps(model, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(n):
        x = torch.randn(8, 3, 8, 8, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def make(seed=0):
    torch.manual_seed(seed)
    model = Net()
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_policy_on_a_real_module():
    model, _ = make()
    ema = emakit.EMA(model)
    assert ema.actions["bn.num_batches_tracked"] == "copy"
    assert ema.actions["bn.running_mean"] == "average"
    assert ema.actions["frozen"] == "average"
    assert "mask" not in ema.actions  # non-persistent buffer: not model state
    assert ema.averaged()["bn.num_batches_tracked"].dtype == torch.int64
    copied = emakit.EMA(model, policy=emakit.Policy(buffers="copy", exclude=("head.*",)))
    assert copied.actions["bn.running_var"] == "copy"
    assert not any(n.startswith("head.") for n in copied.actions)


def test_buffers_follow_policy_through_training():
    model, opt = make()
    avg = emakit.EMA(model, decay=0.9)
    cpy = emakit.EMA(model, decay=0.9, policy=emakit.Policy(buffers="copy"))
    history = [model.bn.running_mean.double().clone()]
    for i in range(1, 6):
        train_steps(model, opt, 1, seed=i)
        avg.update()
        cpy.update()
        history.append(model.bn.running_mean.double().clone())
    assert torch.equal(cpy.averaged()["bn.running_mean"], model.bn.running_mean)
    expected = weighted_sum(history[0].numpy(), list(enumerate(history[1:], 1)),
                            lambda t: 0.9)
    np.testing.assert_allclose(avg.averaged()["bn.running_mean"].numpy(), expected, rtol=1e-5)
    assert int(avg.averaged()["bn.num_batches_tracked"]) == 5


def test_fp32_shadow_of_bf16_model_matches_float64_oracle():
    torch.manual_seed(1)
    lin = torch.nn.Linear(16, 16).bfloat16()
    ema = emakit.EMA(lin, decay=0.999)
    assert ema.averaged()["weight"].dtype == torch.float32
    hist = [lin.weight.detach().double().clone()]
    for _t in range(1, 201):
        with torch.no_grad():
            lin.weight.add_(torch.randn_like(lin.weight) * 1e-3)
        ema.update()
        hist.append(lin.weight.detach().double().clone())
    expected = weighted_sum(hist[0].numpy(), [(t, h.numpy()) for t, h in enumerate(hist[1:], 1)],
                            lambda t: 0.999)
    np.testing.assert_allclose(ema.averaged()["weight"].double().numpy(), expected, rtol=0, atol=1e-6)
    # a bf16 shadow would have stalled: each step's change is below bf16's resolution
    with pytest.warns(emakit.EMAWarning, match=r"bfloat16 shadow with decay 0.999 stalls"):
        emakit.EMA(lin, decay=0.999, dtype=torch.bfloat16)


def test_float64_stays_float64_and_dtype_override():
    p = {"w": torch.zeros(3, dtype=torch.float64), "h": torch.zeros(3, dtype=torch.float16)}
    assert emakit.EMA(p).averaged()["w"].dtype == torch.float64
    assert emakit.EMA(p).averaged()["h"].dtype == torch.float32
    assert emakit.EMA(p, dtype="float64").averaged()["h"].dtype == torch.float64
    with pytest.raises(ValueError, match=r"dtype must be a floating dtype .* got torch.int32"):
        emakit.EMA(p, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"dtype must be a torch floating dtype or its name, got 'f33'"):
        emakit.EMA(p, dtype="f33")


def mixed_source(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(5, 7, generator=g),
        "b": torch.randn(33, generator=g).bfloat16(),
        "c": torch.randn(4, 4, generator=g).double(),
        "d": torch.randn(2, 3, generator=g).half(),
        "e": torch.randn(3, 8, 8, 2, generator=g).to(memory_format=torch.channels_last),
        "n": torch.tensor(3),
        "f": torch.randn(1000, generator=g).bfloat16(),
    }


@pytest.mark.parametrize("staging", [1 << 22, 40])
@pytest.mark.parametrize("decays", [(0.9, 0.3, 0.999), (0.0, 1.0, 0.5)])
def test_fast_path_equals_plain_loop_bitwise(monkeypatch, kernels, staging, decays):
    monkeypatch.setattr(torch_layout, "STAGING_ELEMENTS", staging)
    src = mixed_source(0)
    fast = emakit.EMA(src, decay=Cycle(decays))  # the decay changes every step
    loop = emakit.EMA(src, decay=Cycle(decays), foreach=False)
    for i in range(1, 13):
        new = mixed_source(i)
        for k in src:
            src[k].copy_(new[k])
        fast.update()
        loop.update()
    assert "loop" not in {g.kind for g in fast.update_plan()}
    assert {g.kind for g in loop.update_plan()} == {"loop"}
    for k in src:
        assert fast.averaged()[k].dtype == loop.averaged()[k].dtype
        assert torch.equal(fast.averaged()[k], loop.averaged()[k]), k
    if staging == 40 and kernels == "eager":
        assert any(g.kind == "staged" and g.chunks > 1 for g in fast.update_plan())
    if kernels == "native":  # every group of this CPU source
        assert {g.kind for g in fast.update_plan()} == {"native"}


def test_torch_and_numpy_backends_agree_bitwise_in_float32():
    g = torch.Generator().manual_seed(5)
    t_src = {"w": torch.randn(300, generator=g), "v": torch.randn(4, 5, generator=g)}
    n_src = {k: v.numpy().copy() for k, v in t_src.items()}
    sched = emakit.schedules.InverseGamma(power=0.75, max_decay=0.999)
    et, en = emakit.EMA(t_src, decay=sched), emakit.EMA(n_src, decay=sched)
    for _ in range(40):
        for k in t_src:
            step = torch.randn(t_src[k].shape, generator=g)
            t_src[k].add_(step)
            n_src[k] += step.numpy()
        et.update()
        en.update()
    for k in t_src:
        np.testing.assert_array_equal(et.averaged()[k].numpy(), en.averaged()[k])


def test_torch_and_numpy_backends_agree_in_float64():
    g = torch.Generator().manual_seed(6)
    t_src = {"w": torch.randn(500, generator=g, dtype=torch.float64)}
    n_src = {"w": t_src["w"].numpy().copy()}
    et, en = emakit.EMA(t_src, decay=0.99), emakit.EMA(n_src, decay=0.99)
    for _ in range(40):
        step = torch.randn(500, generator=g, dtype=torch.float64)
        t_src["w"].add_(step)
        n_src["w"] += step.numpy()
        et.update()
        en.update()
    np.testing.assert_allclose(et.averaged()["w"].numpy(), en.averaged()["w"], rtol=1e-13, atol=1e-14)


def test_update_neither_syncs_nor_records_autograd(monkeypatch, kernels):
    """The plain update never reads a tensor value back; the guard reads one list per update
    on torch's kernels (its peaks check, which the policy asks for; the native kernel's check
    returns its answer from the call, no tensor read) and one at the first update to bound the
    shadows."""
    model, opt = make()
    for guard in (False, True):
        ema = emakit.EMA(model, policy=emakit.Policy(nonfinite="skip" if guard else "average"))
        train_steps(model, opt, 1)
        reads: list[str] = []

        def no_sync(*a, **k):
            raise AssertionError("host/device sync in update()")

        def one_read(name, reads=reads):
            real = getattr(torch.Tensor, name)

            def read(self, *a, **k):
                reads.append(name)
                return real(self, *a, **k)
            return read

        with monkeypatch.context() as patched:
            for name in ("item", "tolist", "__bool__", "numpy"):
                patched.setattr(torch.Tensor, name, one_read(name)
                                if guard and name in ("item", "tolist") else no_sync)
            for _ in range(3):
                ema.update()
        per_update = 1 if kernels == "eager" else 0
        assert len(reads) == (1 + 3 * per_update if guard else 0), reads
        for s in ema.averaged().values():
            assert not s.requires_grad and s.grad_fn is None


def test_nonfinite_guard_on_torch():
    p = {"a": torch.ones(3), "b": torch.ones(2).bfloat16(), "n": torch.tensor(1)}
    ema = emakit.EMA(p, decay=0.5, policy=emakit.Policy(nonfinite="skip"))
    p["a"][1] = float("inf")
    p["b"].fill_(3.0)
    p["n"].fill_(4)
    ema.update()
    assert torch.equal(ema.averaged()["a"], torch.ones(3))
    assert torch.equal(ema.averaged()["b"], torch.full((2,), 2.0))
    assert ema.nonfinite_skips() == {"a": 1, "b": 0, "n": 0}
    assert int(ema.averaged()["n"]) == 4


def snapshot(model):
    return {k: (v.clone(), v.data_ptr()) for k, v in model.state_dict().items()}


def test_swapped_computes_with_ema_and_restores_bitwise():
    model, opt = make()
    ema = emakit.EMA(model, decay=0.8)
    train_steps(model, opt, 4)
    ema.update()
    train_steps(model, opt, 2, seed=1)
    ema.update()
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model)
    ema.copy_to(reference)
    before = snapshot(model)
    opt_state = copy.deepcopy(opt.state_dict())
    params_before = list(model.parameters())
    with ema.swapped():
        assert torch.equal(model(x), reference(x))
        assert model.conv.weight.data_ptr() == ema.averaged()["conv.weight"].data_ptr()  # no copy
    after = snapshot(model)
    for k, (v, ptr) in before.items():
        assert torch.equal(after[k][0], v) and after[k][1] == ptr, k
    assert list(model.parameters()) == params_before
    state = opt.state_dict()
    for i, s in opt_state["state"].items():
        assert torch.equal(state["state"][i]["momentum_buffer"], s["momentum_buffer"])
    with pytest.raises(RuntimeError, match="boom"), ema.swapped():
        raise RuntimeError("boom")
    for k, (v, ptr) in before.items():
        assert torch.equal(model.state_dict()[k], v) and model.state_dict()[k].data_ptr() == ptr


def test_swapped_copies_when_dtypes_differ_and_with_zero_init():
    torch.manual_seed(2)
    lin = torch.nn.Linear(4, 4).bfloat16()
    for ema in (emakit.EMA(lin, decay=0.7), emakit.EMA(lin, decay=0.7, start="zeros")):
        before = snapshot(lin)
        with torch.no_grad():
            lin.weight.mul_(2)
        ema.update()
        training = snapshot(lin)
        with ema.swapped():
            expected = ema.averaged()["weight"].bfloat16()
            assert torch.equal(lin.weight, expected)
        after = snapshot(lin)
        for k, (v, ptr) in training.items():
            assert torch.equal(after[k][0], v) and after[k][1] == ptr
        with torch.no_grad():
            lin.weight.copy_(before["weight"][0])


def test_swapped_with_shadow_offloaded_to_other_device_argument():
    model, opt = make()
    ema = emakit.EMA(model, device="cpu", dtype=torch.float64)
    train_steps(model, opt, 1)
    ema.update()
    before = snapshot(model)
    with ema.swapped():
        assert model.conv.weight.dtype == torch.float32
        assert torch.equal(model.conv.weight, ema.averaged()["conv.weight"].float())
    for k, (v, _) in before.items():
        assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(ValueError, match=r"device='gpu0' is not a torch device"):
        emakit.EMA(model, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda': this torch .* sees no CUDA"):
            emakit.EMA(model, device="cuda")


def test_attach_updates_after_each_optimizer_step_until_removed():
    model, opt = make()
    ema = emakit.EMA(model, decay=0.5)
    handle = ema.attach(opt)
    train_steps(model, opt, 3)
    assert ema.step == 3 and ema.num_updates == 3
    handle.remove()
    train_steps(model, opt, 2)
    assert ema.step == 3
    with pytest.raises(TypeError, match=r"attach\(\) needs a torch.optim.Optimizer"):
        ema.attach(object())


class ClassicSnippet:
    """The classic shadow-weights snippet (register/update/apply_shadow/restore), in behaviour."""

    def __init__(self, model, decay):
        self.model, self.decay, self.shadow, self.backup = model, decay, {}, {}

    def register(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                self.shadow[name] = param.data.clone()

    def update(self):
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                new_average = (1.0 - self.decay) * param.data + self.decay * self.shadow[name]
                self.shadow[name] = new_average.clone()


def test_classic_snippet_users_can_switch_by_changing_the_import():
    model, opt = make()
    classic = ClassicSnippet(model, 0.99)
    ours = emakit.EMA(model, 0.99, policy=emakit.Policy(frozen="skip", buffers="skip"))
    classic.register()
    ours.register()
    for i in range(20):
        train_steps(model, opt, 1, seed=i)
        classic.update()
        ours.update()
    assert set(ours.actions) == set(classic.shadow)
    for name, value in classic.shadow.items():
        torch.testing.assert_close(ours.averaged()[name], value, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    raw = model(x)
    ours.apply_shadow()
    with_ema = model(x)
    ours.restore()
    assert torch.equal(model(x), raw) and not torch.equal(with_ema, raw)


def test_copy_to_plain_model_and_write_back():
    model, opt = make()
    ema = emakit.EMA(model, decay=0.5)
    train_steps(model, opt, 2)
    ema.update()
    fresh = Net()
    ema.copy_to(fresh)
    fresh_state = fresh.state_dict()
    for name, value in ema.averaged().items():
        assert torch.equal(fresh_state[name], value), name
    ema.copy_to()  # write-back: the EMA becomes the training weights
    assert torch.equal(model.conv.weight, ema.averaged()["conv.weight"])
    assert model.conv.weight.data_ptr() != ema.averaged()["conv.weight"].data_ptr()


def test_source_that_changes_dtype_or_shape():
    model, _opt = make()
    ema = emakit.EMA(model, decay=0.5)
    model.double()  # parameters re-allocated in float64: found again by name, shadows stay fp32
    ema.update()
    assert ema.averaged()["conv.weight"].dtype == torch.float32
    model.head = torch.nn.Linear(4 * 6 * 6, 7).double()
    with pytest.raises(ValueError, match=re.escape(
            "source tensor 'head.weight' has shape (7, 144) but its shadow has shape (5, 144)")):
        ema.update()
    del model.head
    with pytest.raises(ValueError, match=r"no longer has a tensor named 'head.weight'"):
        ema.update()


def test_state_dict_survives_torch_save_with_weights_only():
    torch.manual_seed(3)
    lin = torch.nn.Linear(3, 3).bfloat16()
    ema = emakit.EMA(lin, decay=emakit.schedules.InverseGamma(power=0.75), every=2)
    for _ in range(5):
        with torch.no_grad():
            lin.weight.add_(1)
        ema.update()
    buf = io.BytesIO()
    torch.save({"ema": ema.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["ema"]
    other = emakit.EMA(lin, decay=emakit.schedules.InverseGamma(power=0.75), every=2)
    other.load_state_dict(loaded)
    assert other.averaged()["weight"].dtype == torch.float32
    assert torch.equal(other.averaged()["weight"], ema.averaged()["weight"])
    assert (other.step, other.num_updates) == (5, 2)


def test_load_mismatches_are_reported_by_name_and_load_nothing():
    model, opt = make()
    ema = emakit.EMA(model, decay=0.5)
    train_steps(model, opt, 1)
    ema.update()
    good = ema.state_dict()
    target = emakit.EMA(model, decay=0.5)
    keep = {k: v.clone() for k, v in target.averaged().items()}

    def unchanged():
        assert target.step == 0
        assert all(torch.equal(target.averaged()[k], v) for k, v in keep.items())

    bad = dict(good, shadows={**good["shadows"], "conv.weight": good["shadows"]["conv.weight"].double()})
    with pytest.raises(emakit.StateDictError, match=r"mismatched \(1\): 'conv.weight: dtype float64 != float32'"):
        target.load_state_dict(bad)
    unchanged()
    shadows = dict(good["shadows"])
    shadows["head.bias"] = torch.zeros(9)
    with pytest.raises(emakit.StateDictError, match=r"head.bias: shape \(9,\) != \(5,\)"):
        target.load_state_dict(dict(good, shadows=shadows))
    unchanged()
    shadows = {k: v for k, v in good["shadows"].items() if k != "bn.weight"}
    shadows["extra"] = torch.zeros(1)
    with pytest.raises(emakit.StateDictError, match=r"missing \(1\): 'bn.weight'; unexpected \(1\): 'extra'"):
        target.load_state_dict(dict(good, shadows=shadows))
    unchanged()
    result = target.load_state_dict(dict(good, shadows=shadows), strict=False)
    assert result.missing == ["bn.weight"] and result.unexpected == ["extra"]
    assert torch.equal(target.averaged()["bn.weight"], keep["bn.weight"])
    assert torch.equal(target.averaged()["conv.weight"], ema.averaged()["conv.weight"])


def test_grad_accumulation_updates_once_per_optimizer_step():
    model, _opt = make()
    ema = emakit.EMA(model, decay=0.5)
    for micro in range(8):
        global_step = micro // 4 + 1
        ema.update(step=global_step)
    assert ema.num_updates == 2 and ema.step == 2


def test_state_moves_between_numpy_and_torch():
    t_src = {"w": torch.arange(4.0), "n": torch.tensor(2)}
    n_src = {"w": np.arange(4.0, dtype=np.float32), "n": np.array(2)}
    et, en = emakit.EMA(t_src, decay=0.5), emakit.EMA(n_src, decay=0.5)
    t_src["w"].add_(2.0)
    et.update()
    en.load_state_dict(et.state_dict())
    np.testing.assert_array_equal(en.averaged()["w"], [1.0, 2.0, 3.0, 4.0])
    assert en.step == 1
    et2 = emakit.EMA({"w": torch.zeros(4), "n": torch.tensor(0)}, decay=0.5)
    et2.load_state_dict(en.state_dict())
    assert torch.equal(et2.averaged()["w"], et.averaged()["w"])
