"""emakit.compat.timm.ModelEmaV3 / ModelEmaV2 against timm's own classes.

timm's ``model_ema.py`` is loaded from its file (``timm.utils`` imports torchvision, whose PyPI
wheel does not load with the CPU torch: see tests/peers.py). The same trajectory through timm
and through the shim: ``ModelEmaV3`` bitwise (both ``lerp``), ``ModelEmaV2`` to a few ulp (timm
computes ``d * e + (1 - d) * m``). Then timm's documented behaviour: ``.module`` is the EMA
model (eval mode, ``forward``), its ``state_dict`` is timm's ``state_dict_ema``, loading into
it (timm's resume) sets the average, ``set``, ``get_decay``, ``exclude_buffers``.
"""

import pytest

torch = pytest.importorskip("torch")

from emakit.bench.contenders import timm_model_ema
from emakit.compat.timm import ModelEmaV2, ModelEmaV3
from peers import net, train

try:
    TIMM = timm_model_ema()
except ImportError:  # timm not installed (it is in CI: .ci/run)
    pytest.skip("timm is not installed", allow_module_level=True)
VARIANTS = [{}, {"use_warmup": True}, {"use_warmup": True, "warmup_power": 0.75,
                                       "min_decay": 0.5, "update_after_step": 3},
            {"update_after_step": 2}, {"exclude_buffers": True},
            {"use_warmup": True, "min_decay": 0.995}]  # min_decay above decay: timm's wins


def same(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def run(kwargs, *, with_step=True, steps=12, cls=("ModelEmaV3",)):
    model = net()
    ref = getattr(TIMM, cls[0])(model, decay=0.9, **kwargs)
    shim = {"ModelEmaV3": ModelEmaV3, "ModelEmaV2": ModelEmaV2}[cls[0]](model, decay=0.9,
                                                                      **kwargs)
    count = [0]

    def after():
        count[0] += 1
        if with_step:
            ref.update(model, step=count[0])
            shim.update(model, step=count[0])
        else:
            ref.update(model)
            shim.update(model)

    train(model, after, steps=steps)
    return model, ref, shim


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: ",".join(k) or "default")
def test_v3_with_steps_is_bitwise_timms(kwargs):
    _, ref, shim = run(kwargs)
    assert same(ref.module.state_dict(), shim.module.state_dict())
    assert same(ref.state_dict(), shim.state_dict())  # keys "module.*" as in timm


def test_v3_without_steps_is_bitwise_timms():
    _, ref, shim = run({}, with_step=False)
    assert same(ref.module.state_dict(), shim.module.state_dict())


def test_v2_agrees_to_an_ulp_and_copies_integer_buffers():
    model, ref, shim = run({}, with_step=False, cls=("ModelEmaV2",))
    a, b = shim.module.state_dict(), ref.module.state_dict()
    for name, value in b.items():
        if value.is_floating_point():
            scale = 2.0**-23 * value.abs().max().double()
            # three roundings against lerp's one: measured at most 2.9 ulp of the largest
            # magnitude after 12 updates
            assert float((a[name].double() - value.double()).abs().max()) <= 4 * scale, name
    # timm averages num_batches_tracked in floating point and truncates; emakit copies it
    assert a["body.1.num_batches_tracked"] == model.body[1].num_batches_tracked == 12


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: ",".join(k) or "default")
def test_get_decay_is_timms(kwargs):
    ref, shim = TIMM.ModelEmaV3(net(), decay=0.99, **kwargs), ModelEmaV3(net(), decay=0.99,
                                                                         **kwargs)
    for step in [None, 0, *range(1, 40), 1000, 10**6]:
        assert shim.get_decay(step) == ref.get_decay(step), step


def test_module_is_the_ema_model_and_its_tensors_are_the_average():
    model, _, shim = run({})
    assert not shim.module.training
    x = torch.randn(3, 4)
    assert torch.equal(shim(x), shim.module(x))
    averaged = shim.ema.averaged()
    state = shim.module.state_dict()
    assert all(state[k].data_ptr() == v.data_ptr() for k, v in averaged.items())  # no copy
    shim.set(model)
    assert same(shim.module.state_dict(), model.state_dict())


def test_timm_style_resume_through_module_state_dict_is_bitwise():
    """timm's train.py saves model_ema.module.state_dict() and, on resume, loads it into
    model_ema.module, then updates with the running step count."""
    model, whole, _ = run({"use_warmup": True}, steps=0)
    whole = ModelEmaV3(model, decay=0.9, use_warmup=True)
    first = ModelEmaV3(model, decay=0.9, use_warmup=True)
    count = [0]

    def after_first():
        count[0] += 1
        whole.update(model, step=count[0])
        if count[0] <= 5:
            first.update(model, step=count[0])

    train(model, after_first, steps=5)
    saved = {k: v.clone() for k, v in first.module.state_dict().items()}
    resumed = ModelEmaV3(net(seed=9), decay=0.9, use_warmup=True)  # other weights at first
    resumed.module.load_state_dict(saved)

    def after_second():
        count[0] += 1
        whole.update(model, step=count[0])
        resumed.update(model, step=count[0])

    train(model, after_second, steps=5)
    assert same(whole.module.state_dict(), resumed.module.state_dict())


def test_wrapped_models_are_unwrapped_and_other_models_refused():
    model = net()
    shim = ModelEmaV3(model, decay=0.9)
    shim.update(torch.nn.DataParallel(model), step=1)  # no GPU: a plain wrapper
    assert same(shim.module.state_dict(), model.state_dict())
    with pytest.raises(ValueError, match=r"the model lacks 9 tensor\(s\)"):
        shim.update(torch.nn.Linear(2, 2), step=2)
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module"):
        shim.update({"w": torch.zeros(1)}, step=2)


def test_mixing_step_and_no_step_is_refused():
    model = net()
    shim = ModelEmaV3(model, decay=0.9)
    shim.update(model, step=1)
    with pytest.raises(ValueError, match="pass step= on every call"):
        shim.update(model)


def test_moving_the_module_away_from_the_average_is_refused():
    shim = ModelEmaV3(net(), decay=0.9)
    with pytest.raises(TypeError, match="Pass device= \\(and dtype=\\) to the constructor"):
        shim.to(torch.float64)


def test_half_precision_models_keep_their_dtype_in_module_over_a_float32_average():
    """timm's .module keeps a bf16 model's dtype (so it runs on the model's inputs); here it
    holds the float32 average, rounded once after each update."""
    model = net().to(torch.bfloat16)
    shim = ModelEmaV3(model, decay=0.9)
    averaged = shim.ema.averaged()
    assert all(v.dtype == torch.float32 for v in averaged.values() if v.is_floating_point())
    for t in range(1, 7):  # "optimizer steps"
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * t)
        shim.update(model)
    module = shim.module.state_dict()
    for name, value in shim.ema.averaged().items():
        assert module[name].dtype == model.state_dict()[name].dtype, name
        assert torch.equal(module[name], value.to(module[name].dtype)), name
    x = torch.randn(2, 4).to(torch.bfloat16)
    assert shim(x).dtype == torch.bfloat16
    # a checkpoint loaded into .module (timm's resume) becomes the average
    saved = {k: v.clone() for k, v in module.items()}
    other = ModelEmaV3(net().to(torch.bfloat16), decay=0.9)
    other.module.load_state_dict(saved)
    other.update(model)
    want = torch.lerp(saved["head.weight"].float(), model.head.weight.float(), 1 - 0.9)
    assert torch.equal(other.ema.averaged()["head.weight"], want)
    # read before any update, the engine holds what was loaded too
    third = ModelEmaV3(net().to(torch.bfloat16), decay=0.9)
    third.module.load_state_dict(saved)
    assert torch.equal(third.ema.averaged()["head.weight"], saved["head.weight"].float())


def test_device_and_dtype_arguments():
    model = net()
    shim = ModelEmaV3(model, decay=0.9, device="cpu", dtype=torch.float64)
    assert shim.module.body[0].weight.dtype == torch.float64
    shim.update(model, step=2)
    torch.testing.assert_close(shim.module.body[0].weight, model.body[0].weight.double())
