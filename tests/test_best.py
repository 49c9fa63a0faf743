"""KeepBest: saves the EMA weights (never the training weights) when the metric improves."""

import math

import numpy as np
import pytest

import emakit
from emakit.io import read_weights

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.bn = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Linear(3 * 4 * 4, 4)
        self.register_buffer("mask", torch.ones(2), persistent=False)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def _train(model, opt, steps, ema=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 1, 6, 6, generator=g).to(model.head.weight.dtype)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        if ema is not None:
            ema.update()


def _setup(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = Net().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = emakit.EMA(model, decay=0.9, **kw)
    return model, opt, ema


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _expected(ema, model):
    averaged = ema.averaged()
    return {k: (averaged[k].to(v.dtype) if k in averaged else v)
            for k, v in model.state_dict().items()}


def test_saved_file_is_the_ema_and_loads_into_a_plain_model(tmp_path):
    model, opt, ema = _setup()
    keep = emakit.KeepBest(ema, tmp_path / "best.safetensors")
    _train(model, opt, 5, ema)
    seen = {}

    def evaluate():
        seen.update(_snapshot(model))
        return 0.5

    before = _snapshot(model)
    assert keep.evaluate(evaluate) == 0.5
    want = _expected(ema, model)
    for k, v in want.items():  # fn saw the EMA weights
        assert torch.equal(seen[k], v), k
    for k, v in before.items():  # and the training weights are back
        assert torch.equal(model.state_dict()[k], v), k
    plain = Net()
    result = plain.load_state_dict(safetensors_torch.load_file(tmp_path / "best.safetensors"))
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in want.items():
        assert torch.equal(plain.state_dict()[k], v), k
    _, meta = read_weights(tmp_path / "best.safetensors")
    assert meta["emakit.metric"] == "0.5" and meta["emakit.step"] == "5"


@pytest.mark.parametrize("swapped", [False, True])
def test_observe_never_saves_the_training_weights(tmp_path, swapped):
    model, opt, ema = _setup()
    keep = emakit.KeepBest(ema, tmp_path / "best.pt")
    _train(model, opt, 3, ema)
    _train(model, opt, 2)  # move the training weights away from the EMA
    if swapped:
        with ema.swapped():
            keep.observe(1.0)
    else:
        keep.observe(1.0)
    saved, _ = read_weights(tmp_path / "best.pt")
    for k, v in _expected(ema, model).items():
        assert torch.equal(saved[k], v), k
    assert not torch.equal(saved["head.weight"], model.head.weight.detach())


def test_evaluate_restores_the_training_weights_when_fn_raises(tmp_path):
    model, opt, ema = _setup()
    keep = emakit.KeepBest(ema, tmp_path / "best.safetensors")
    _train(model, opt, 3, ema)
    before = _snapshot(model)

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        keep.evaluate(broken)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v)
    assert not (tmp_path / "best.safetensors").exists() and keep.best is None


def test_bf16_model_fp32_shadow_saves_model_dtype(tmp_path):
    model, opt, ema = _setup(dtype=torch.bfloat16)
    assert ema.averaged()["head.weight"].dtype == torch.float32
    keep = emakit.KeepBest(ema, tmp_path / "best.safetensors")
    _train(model, opt, 4, ema)
    keep.observe(0.1)
    saved = safetensors_torch.load_file(tmp_path / "best.safetensors")
    assert saved["head.weight"].dtype == torch.bfloat16
    assert saved["bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(saved["head.weight"], ema.averaged()["head.weight"].to(torch.bfloat16))
    Net().to(torch.bfloat16).load_state_dict(saved)


@pytest.mark.parametrize(("mode", "metrics", "saved_at"), [
    ("max", [0.5, 0.4, 0.6, 0.6, 0.61], [0, 2, 4]),
    ("min", [0.5, 0.6, 0.4, 0.4, 0.39], [0, 2, 4]),
])
def test_modes(tmp_path, mode, metrics, saved_at):
    _model, _opt, ema = _setup()
    keep = emakit.KeepBest(ema, tmp_path / "b.safetensors", mode=mode)
    saves = [i for i, m in enumerate(metrics) if keep.observe(m)]
    assert saves == saved_at
    assert keep.best == metrics[saved_at[-1]] and keep.saves == len(saved_at)


def test_min_delta_and_sanity_checks_and_nan(tmp_path):
    _model, _opt, ema = _setup()
    keep = emakit.KeepBest(ema, tmp_path / "b.safetensors", min_delta=0.1)
    assert not keep.observe(0.9, sanity_check=True)
    assert not (tmp_path / "b.safetensors").exists() and keep.best is None
    assert keep.observe(0.5)
    assert not keep.observe(0.59)
    assert keep.observe(0.61)
    with pytest.warns(emakit.EMAWarning, match="metric is NaN"):
        assert not keep.observe(math.nan)
    assert keep.best == 0.61
    assert keep.evaluate(lambda: 0.99, sanity_check=True) == 0.99
    assert keep.best == 0.61
    assert keep.observe(torch.tensor(0.8))  # a 0-d tensor metric
    assert keep.observe(np.float32(0.95))


def test_resume_keeps_the_best(tmp_path):
    _model, _opt, ema = _setup()
    keep = emakit.KeepBest(ema, tmp_path / "b.safetensors")
    keep.observe(0.9)
    state = keep.state_dict()
    again = emakit.KeepBest(ema, tmp_path / "b.safetensors")
    again.load_state_dict(state)
    assert not again.observe(0.8)
    assert again.best == 0.9 and again.best_step == 0
    with pytest.raises(ValueError, match="mode='max', this one mode='min'"):
        emakit.KeepBest(ema, tmp_path / "b.safetensors", mode="min").load_state_dict(state)
    with pytest.raises(ValueError, match="not a KeepBest state"):
        again.load_state_dict({"x": 1})


def test_numpy_engine(tmp_path):
    w = {"w": np.zeros(3, dtype=np.float32), "n": np.array([0])}
    ema = emakit.EMA(w, decay=0.5)
    for path in (tmp_path / "b.npz", tmp_path / "b.safetensors"):
        keep = emakit.KeepBest(ema, path)
        w["w"][:] = 2.0
        w["n"][:] = 7
        ema.update()
        assert keep.evaluate(lambda: float(w["w"][0])) == 1.0
        assert w["w"][0] == 2.0
        tensors, meta = read_weights(path, framework="numpy")
        np.testing.assert_array_equal(tensors["w"], np.ones(3, dtype=np.float32))
        assert tensors["n"].tolist() == [7] and meta["emakit.kind"] == "best_ema"
        w["w"][:] = 0.0
        ema.register()


def test_custom_saver(tmp_path):
    model, _opt, ema = _setup()
    calls = []
    keep = emakit.KeepBest(ema, tmp_path / "anything.bin",
                           save=lambda t, p, m: calls.append((sorted(t), p, m["emakit.mode"])))
    keep.observe(1.0)
    assert calls == [(sorted(model.state_dict()), tmp_path / "anything.bin", "max")]


def test_bad_arguments(tmp_path):
    model, _opt, ema = _setup()
    with pytest.raises(TypeError, match=r"ema must be an emakit\.EMA, got Net"):
        emakit.KeepBest(model, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=r"mode must be 'max'.*got 'best'"):
        emakit.KeepBest(ema, tmp_path / "b.pt", mode="best")
    with pytest.raises(ValueError, match=r"min_delta must be in \[0.0, inf\), got -1"):
        emakit.KeepBest(ema, tmp_path / "b.pt", min_delta=-1)
    with pytest.raises(ValueError, match=r"must end in one of \.safetensors"):
        emakit.KeepBest(ema, tmp_path / "b.ckpt")
    with pytest.raises(TypeError, match="save must be callable"):
        emakit.KeepBest(ema, tmp_path / "b.pt", save="yes")
    keep = emakit.KeepBest(ema, tmp_path / "b.pt")
    with pytest.raises(TypeError, match="metric must be a number"):
        keep.observe("0.5")
    with pytest.raises(TypeError, match="metric must be a number"):
        keep.observe(torch.ones(2))
    with pytest.raises(TypeError, match="metric must be a number, got True"):
        keep.observe(True)


def test_a_format_that_cannot_hold_the_weights_is_refused_when_made(tmp_path):
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"\.npz \(numpy\) has no bfloat16"):
        emakit.KeepBest(emakit.EMA(model), tmp_path / "best.npz")
    emakit.KeepBest(emakit.EMA(model), tmp_path / "best.safetensors")  # fine


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_a_torch_file_without_torch_is_refused_when_made(tmp_path, monkeypatch, suffix):
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else find(name, *a))
    ema = emakit.EMA({"w": np.zeros(2)}, decay=0.5)
    with pytest.raises(ValueError, match="needs torch, which is not installed"):
        emakit.KeepBest(ema, tmp_path / f"best{suffix}")
