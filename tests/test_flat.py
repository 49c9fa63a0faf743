"""flatten_parameters and the single-kernel update: same numbers as the plain loop, safe fallback."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("kernels")  # native and torch kernels alike

import emakit
from emakit.backends.torch import layout as torch_layout
from oracle import Cycle


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: Any) -> Any:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def make(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return Net()


def train_step(model: Any, opt: Any, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(6, 3, 8, 8, generator=g)
    model.train()
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def averaged_groups(ema: Any) -> list[Any]:
    return [g for g in ema.update_plan() if g.role == "average"]


def one_kernel(ema: Any) -> bool:
    """The whole average is one kernel over one run (two held 1-D views, or one native call
    over one stretch of memory)."""
    groups = averaged_groups(ema)
    return [(g.kind, g.runs, g.loose) for g in groups] in ([("direct", 1, 0)],
                                                          [("native", 1, 0)])


def storages(model: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in model.state_dict().values()}


def assert_same_shadows(a: Any, b: Any) -> None:
    assert a.names == b.names
    for name in a.names:
        assert a.averaged()[name].dtype == b.averaged()[name].dtype, name
        assert torch.equal(a.averaged()[name], b.averaged()[name]), name


def test_flatten_keeps_values_shapes_strides_and_objects() -> None:
    model = make()
    model.conv.to(memory_format=torch.channels_last)
    before = {k: (v.clone(), v.shape, v.stride()) for k, v in model.state_dict().items()}
    objects = list(model.parameters())
    layout = emakit.flatten_parameters(model)
    assert [(g.dtype, len(g.names)) for g in layout.groups] == [("float32", 8), ("int64", 1)]
    assert layout.skipped == {} and layout.moved == 8  # the lone int64 counter stays put
    assert objects == list(model.parameters())  # the same Parameter objects, re-pointed
    for k, v in model.state_dict().items():
        value, shape, stride = before[k]
        assert torch.equal(v, value) and v.shape == shape and v.stride() == stride, k
    assert len(storages(model)) == 2  # one float32 buffer, one int64 buffer
    again = emakit.flatten_parameters(model)
    assert again.moved == 0 and again.groups == layout.groups


def test_flatten_skips_what_it_must_not_move() -> None:
    class Sub(torch.nn.Parameter):
        pass

    outside = torch.zeros(10)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.ones(3))
    model.view = torch.nn.Parameter(outside[2:5])  # a view into a tensor the module does not own
    model.sub = Sub(torch.ones(2))
    model.gappy = torch.nn.Parameter(torch.zeros(4, 4)[:, ::2])  # non-dense strides
    model.b = torch.nn.Parameter(torch.full((2,), 2.0))
    layout = emakit.flatten_parameters(model)
    assert set(layout.skipped) == {"view", "sub", "gappy"}
    assert "outside the module" in layout.skipped["view"]
    assert layout.groups[0].names == ("a", "b")
    model.view.data.fill_(7.0)
    assert outside[2:5].eq(7.0).all()  # the aliasing the user set up is kept
    assert torch.equal(model.a, torch.ones(3)) and torch.equal(model.b, torch.full((2,), 2.0))


def test_flatten_rejects_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"needs a torch.nn.Module, got dict"):
        emakit.flatten_parameters({"w": torch.zeros(2)})


def test_flat_update_is_one_kernel_and_equals_the_loop_bitwise() -> None:
    flat_model, loop_model = make(), make()
    emakit.flatten_parameters(flat_model)
    flat = emakit.EMA(flat_model, decay=emakit.schedules.InverseGamma(power=0.75), every=2)
    loop = emakit.EMA(loop_model, decay=emakit.schedules.InverseGamma(power=0.75), every=2,
                      foreach=False)
    assert len(storages_of(flat.state_dict()["shadows"])) == 2  # flat: float32 + int64
    opt_f = torch.optim.SGD(flat_model.parameters(), lr=0.1, momentum=0.9)
    opt_l = torch.optim.SGD(loop_model.parameters(), lr=0.1, momentum=0.9)
    for i in range(1, 12):
        train_step(flat_model, opt_f, i)
        train_step(loop_model, opt_l, i)
        flat.update()
        loop.update()
    assert one_kernel(flat)
    copies = [g for g in flat.update_plan() if g.role == "copy"]
    assert [g.runs + g.loose for g in copies] == [1]  # the int64 counter: one copy_
    assert_same_shadows(flat, loop)
    for (name, a), b in zip(flat_model.state_dict().items(), loop_model.state_dict().values()):
        assert torch.equal(a, b), name


def storages_of(tensors: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors.values()}


@pytest.mark.parametrize("staging", [1 << 20, 50])
def test_flat_bf16_model_with_fp32_shadows_equals_the_loop(monkeypatch: Any, kernels: str,
                                                           staging: int) -> None:
    monkeypatch.setattr(torch_layout, "STAGING_ELEMENTS", staging)
    flat_model, loop_model = make().bfloat16(), make().bfloat16()
    emakit.flatten_parameters(flat_model)
    flat = emakit.EMA(flat_model, decay=0.9)
    loop = emakit.EMA(loop_model, decay=0.9, foreach=False)
    for i in range(1, 6):
        with torch.no_grad():
            for a, b in zip(flat_model.parameters(), loop_model.parameters()):
                noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(i))
                a.add_(noise.bfloat16())
                b.add_(noise.bfloat16())
        flat.update()
        loop.update()
    if kernels == "native":  # converted on the fly in one call, no staging
        assert one_kernel(flat)
    else:
        staged = [g for g in averaged_groups(flat) if g.kind == "staged"]
        assert [(g.runs, g.loose) for g in staged] == [(1, 0)]  # the run is held, in chunks
        if staging == 50:
            assert staged[0].chunks > 10
    assert_same_shadows(flat, loop)


def reallocate_to_double(model: Any) -> None:
    model.double()


def reallocate_by_assign(model: Any) -> None:
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)


def reallocate_by_setattr(model: Any) -> None:
    model.head.weight = torch.nn.Parameter(model.head.weight.detach().clone() * 2)


def reallocate_by_data(model: Any) -> None:
    model.conv.bias.data = model.conv.bias.data.clone() - 1


def reallocate_by_swap(model: Any) -> None:
    fresh = torch.nn.Parameter(model.bn.weight.detach().clone() + 3)
    torch.utils.swap_tensors(model.bn.weight, fresh)


def reallocate_by_dict(model: Any) -> None:
    model.head._parameters["bias"] = torch.nn.Parameter(model.head.bias.detach().clone() + 5)


def replace_submodule(model: Any) -> None:
    old = model.head
    model.head = torch.nn.Linear(4 * 6 * 6, 5)
    model.head.load_state_dict(old.state_dict())
    with torch.no_grad():
        model.head.weight.mul_(3)


def replace_submodule_in_dict(model: Any) -> None:
    old = model.bn
    model._modules["bn"] = torch.nn.BatchNorm2d(4)
    model.bn.load_state_dict(old.state_dict())
    with torch.no_grad():
        model.bn.bias.add_(1)


@pytest.mark.parametrize("change", [reallocate_to_double, reallocate_by_assign,
                                    reallocate_by_setattr, reallocate_by_data,
                                    reallocate_by_swap, reallocate_by_dict, replace_submodule,
                                    replace_submodule_in_dict])
def test_reallocated_tensors_are_noticed_and_never_give_wrong_numbers(change: Any) -> None:
    flat_model, loop_model = make(), make()
    emakit.flatten_parameters(flat_model)
    flat = emakit.EMA(flat_model, decay=0.8)
    loop = emakit.EMA(loop_model, decay=0.8, foreach=False)
    opt_f = torch.optim.SGD(flat_model.parameters(), lr=0.1)
    opt_l = torch.optim.SGD(loop_model.parameters(), lr=0.1)
    for i in (1, 2):
        train_step(flat_model, opt_f, i)
        train_step(loop_model, opt_l, i)
        flat.update()
        loop.update()
    assert one_kernel(flat)
    change(flat_model)
    change(loop_model)
    for _ in range(2):
        flat.update()
        loop.update()
        assert_same_shadows(flat, loop)
    # the held memory is let go once the plan no longer fits, and flattening again restores the
    # single kernel
    emakit.flatten_parameters(flat_model)
    emakit.flatten_parameters(loop_model)  # the loop does not care; keeps both models equal
    for _ in range(2):
        flat.update()
        loop.update()
    assert_same_shadows(flat, loop)
    float_tensors = [t for t in flat_model.state_dict().values() if t.is_floating_point()]
    if all(t.dtype == torch.float32 for t in float_tensors):
        assert one_kernel(flat)


def test_removed_tensor_is_an_error_not_a_stale_average() -> None:
    model = make()
    emakit.flatten_parameters(model)
    ema = emakit.EMA(model, decay=0.5)
    ema.update()
    model.head.bias = None
    with pytest.raises(ValueError, match=r"no longer has a tensor named 'head.bias'"):
        ema.update()
    del model.head
    with pytest.raises(ValueError, match=r"no longer has a tensor named 'head.weight'"):
        ema.update()


def test_swap_save_and_resume_with_flat_shadows(tmp_path: Any) -> None:
    model = make()
    emakit.flatten_parameters(model)
    ema = emakit.EMA(model, decay=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(1, 4):
        train_step(model, opt, i)
        ema.update()
    training = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped():
        for name, value in ema.averaged().items():
            assert torch.equal(model.state_dict()[name], value), name
    for k, v in model.state_dict().items():
        assert torch.equal(v, training[k]), k
    path = tmp_path / "ema.safetensors"
    emakit.save(ema, path)
    other = make(5)
    emakit.flatten_parameters(other)
    again = emakit.EMA(other, decay=0.7)
    emakit.load(again, path)
    assert_same_shadows(ema, again)
    # after the swap the model is still flat: the single kernel is still used
    ema.update()
    assert one_kernel(ema)


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1,
                       max_size=6),
       kinds=st.lists(st.sampled_from(["f32", "bf16", "f64", "i64"]), min_size=6, max_size=6),
       decays=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
       every=st.integers(1, 3))
def test_property_flat_equals_loop(shapes: list[list[int]], kinds: list[str],
                                   decays: list[float], every: int) -> None:
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f64": torch.float64,
              "i64": torch.int64}

    def build() -> Any:
        g = torch.Generator().manual_seed(0)
        m = torch.nn.Module()
        for i, shape in enumerate(shapes):
            dtype = dtypes[kinds[i]]
            value = torch.randn(shape, generator=g) * 10
            if dtype == torch.int64:
                m.register_buffer(f"b{i}", value.to(dtype))
            else:
                setattr(m, f"p{i}", torch.nn.Parameter(value.to(dtype)))
        return m

    flat_model, loop_model = build(), build()
    emakit.flatten_parameters(flat_model)
    sched = Cycle(tuple(decays))  # the decay changes every step
    flat = emakit.EMA(flat_model, decay=sched, every=every)
    loop = emakit.EMA(loop_model, decay=sched, every=every, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(1, 9):
        with torch.no_grad():
            for a, b in zip(flat_model.state_dict().values(), loop_model.state_dict().values()):
                delta = (torch.randn(a.shape, generator=g) * 3).to(a.dtype)
                a.add_(delta)
                b.add_(delta)
        flat.update()
        loop.update()
    assert_same_shadows(flat, loop)


def test_deepcopy_of_a_flat_model_stays_correct() -> None:
    model = make()
    emakit.flatten_parameters(model)
    twin = copy.deepcopy(model)  # Parameter.__deepcopy__ clones: the copy is no longer flat
    assert storages(twin).isdisjoint(storages(model)) and len(storages(twin)) > 2
    layout = emakit.flatten_parameters(twin)
    # the buffers were deep-copied as views into a copy of the whole flat buffer, which
    # flatten cannot tell from memory shared with something else: they stay where they are
    assert set(layout.skipped) == {"bn.running_mean", "bn.running_var"}
    assert layout.groups[0].names == ("conv.weight", "conv.bias", "bn.weight", "bn.bias",
                                      "head.weight", "head.bias")
    ema = emakit.EMA(twin, decay=0.5)
    reference = make()
    loop = emakit.EMA(reference, decay=0.5, foreach=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the original moves; the copy must not
        for p in (*twin.parameters(), *reference.parameters()):
            p.mul_(2.0)
    ema.update()
    loop.update()
    # two runs: the parameters, and the two buffers (still back to back in the copied buffer)
    assert [(g.runs, g.loose) for g in averaged_groups(ema)] == [(2, 0)]
    assert_same_shadows(ema, loop)


def test_an_ema_made_before_flattening_keeps_its_per_tensor_update() -> None:
    model = make()
    ema = emakit.EMA(model, decay=0.5)
    reference = make()
    loop = emakit.EMA(reference, decay=0.5, foreach=False)
    emakit.flatten_parameters(model)
    with torch.no_grad():
        for p in (*model.parameters(), *reference.parameters()):
            p.mul_(2.0)
    ema.update()
    loop.update()
    # the shadows were not laid out flat: no run, each tensor on its own (native: each its
    # own stretch of memory)
    groups = averaged_groups(ema)
    assert [g.runs for g in groups] == [0 if g.kind == "direct" else g.tensors for g in groups]
    assert not one_kernel(ema)
    assert_same_shadows(ema, loop)
