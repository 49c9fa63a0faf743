"""emakit.compat.torch_ema.ExponentialMovingAverage against torch-ema itself.

The same training trajectory goes through torch-ema and through the shim: the averages agree
to a few ulp (torch-ema rounds ``s - (1 - d)(s - w)`` twice, emakit's ``lerp`` once, so they are
not bitwise equal), the counters exactly; and the shim passes tests of torch-ema's documented
behaviour (its README and docstrings): the verbs with and without ``parameters``, the
``average_parameters()`` context, and ``state_dict`` moving both ways between the two.
"""

import pytest

torch = pytest.importorskip("torch")
torch_ema = pytest.importorskip("torch_ema")

import emakit
from emakit.compat.torch_ema import ExponentialMovingAverage
from peers import net, train


def ulps(a, b):
    """Largest difference, in ulp of the tensor's largest magnitude (float32: 2**-23 at 1)."""
    return float((a.double() - b.double()).abs().max() / (2.0**-23 * b.double().abs().max()))


def both(decay, use_num_updates, steps=12):
    model = net()
    ref = torch_ema.ExponentialMovingAverage(model.parameters(), decay=decay,
                                             use_num_updates=use_num_updates)
    shim = ExponentialMovingAverage(model.parameters(), decay=decay,
                                    use_num_updates=use_num_updates)
    train(model, lambda: (ref.update(), shim.update()), steps=steps)
    return model, ref, shim


@pytest.mark.parametrize(("decay", "use_num_updates"), [(0.9, True), (0.9, False),
                                                         (0.999, True), (0.5, False)])
def test_the_same_trajectory_gives_the_same_average_to_a_few_ulp(decay, use_num_updates):
    _, ref, shim = both(decay, use_num_updates)
    assert shim.num_updates == ref.num_updates
    assert len(shim.shadow_params) == len(ref.shadow_params)
    worst = max(ulps(a, b) for a, b in zip(shim.shadow_params, ref.shadow_params))
    assert worst <= 2, worst  # measured: at most 0.72 (12 updates); not bitwise


def test_the_decay_is_torch_emas_warmup():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    shim = ExponentialMovingAverage(model.parameters(), decay=0.99)
    with torch.no_grad():
        model.weight.fill_(11.0)
    shim.update()  # decay min(0.99, (1 + 1) / (10 + 1)) = 2/11: 0 + 9/11 * 11 = 9
    assert shim.shadow_params[0].item() == pytest.approx(9.0, abs=1e-6)
    assert shim.ema.schedule == emakit.schedules.TFWarmup(0.99)
    assert ExponentialMovingAverage(model.parameters(), 0.9, use_num_updates=False).num_updates \
        is None


def test_average_parameters_swaps_in_the_average_and_back_bitwise():
    model, _, shim = both(0.9, True)
    before = [p.detach().clone() for p in model.parameters()]
    with shim.average_parameters():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), shim.shadow_params))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(KeyError), shim.average_parameters():  # also on an exception
        raise KeyError("inside")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_store_copy_to_restore_with_and_without_parameters():
    model, _, shim = both(0.9, True)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    shim.store()
    shim.copy_to()
    assert all(torch.equal(p, s) for p, s in zip(params, shim.shadow_params))
    shim.restore()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    other = net(seed=3)
    shim.copy_to(other.parameters())  # into another model's parameters, by position
    assert all(torch.equal(p, s) for p, s in zip(other.parameters(), shim.shadow_params))
    shim.restore(other.parameters())  # torch-ema keeps the stored tensors: restore again
    assert all(torch.equal(p, b) for p, b in zip(other.parameters(), before))


def test_update_with_given_parameters_reads_them_once():
    model = net()
    ref = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.5)
    shim = ExponentialMovingAverage(model.parameters(), decay=0.5)
    other = net(seed=4)
    ref.update(other.parameters())
    shim.update(other.parameters())
    ref.update()
    shim.update()  # the parameters given at creation again
    assert max(ulps(a, b) for a, b in zip(shim.shadow_params, ref.shadow_params)) <= 2


def test_documented_errors():
    model = net()
    shim = ExponentialMovingAverage(model.parameters(), decay=0.9)
    with pytest.raises(RuntimeError, match="restore\\(\\) called before store\\(\\)"):
        shim.restore()
    with pytest.raises(ValueError, match="parameters holds 1 tensors"):
        shim.update([torch.zeros(2)])
    with pytest.raises(ValueError, match="decay must be in"):
        ExponentialMovingAverage(model.parameters(), decay=1.5)
    with pytest.raises(TypeError, match="iterable of tensors"):
        ExponentialMovingAverage(model, decay=0.9)
    with pytest.raises(ValueError, match="parameters is empty"):
        ExponentialMovingAverage([], decay=0.9)


def test_state_dict_moves_both_ways_between_torch_ema_and_the_shim():
    model, ref, shim = both(0.9, True)
    state = ref.state_dict()
    assert set(shim.state_dict()) == set(state)
    fresh = ExponentialMovingAverage(model.parameters(), decay=0.1, use_num_updates=False)
    fresh.load_state_dict(state)  # decay and num_updates are applied, as torch-ema does
    assert (fresh.decay, fresh.num_updates) == (0.9, 12)
    assert all(torch.equal(a, b) for a, b in zip(fresh.shadow_params, ref.shadow_params))
    back = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.5)
    back.load_state_dict(shim.state_dict())
    assert back.num_updates == 12
    assert all(torch.equal(a, b) for a, b in zip(back.shadow_params, shim.shadow_params))
    # through torch.save / torch.load(weights_only=True), with stored parameters
    fresh.store()
    import io
    buffer = io.BytesIO()
    torch.save(fresh.state_dict(), buffer)
    buffer.seek(0)
    again = ExponentialMovingAverage(model.parameters(), decay=0.9)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(again.collected_params,
                                                  fresh.collected_params))


def test_a_state_for_other_parameters_is_refused_and_nothing_changes():
    _, _, shim = both(0.9, True)
    before = [s.clone() for s in shim.shadow_params]
    state = shim.state_dict()
    with pytest.raises(emakit.StateDictError, match="holds 5 tensors"):
        shim.load_state_dict({**state, "shadow_params": state["shadow_params"][:5]})
    bad = [s.clone() for s in state["shadow_params"]]
    bad[2] = torch.zeros(7)
    with pytest.raises(emakit.StateDictError, match=r"\[2\] has shape \(7,\)"):
        shim.load_state_dict({**state, "shadow_params": bad})
    with pytest.raises(emakit.StateDictError, match="num_updates"):
        shim.load_state_dict({**state, "num_updates": -1})
    with pytest.raises(emakit.StateDictError, match="lacks"):
        shim.load_state_dict({"decay": 0.9})
    assert all(torch.equal(a, b) for a, b in zip(shim.shadow_params, before))
    assert shim.num_updates == 12


def test_to_moves_the_average_and_keeps_averaging():
    model, ref, shim = both(0.9, True, steps=3)
    shim.to(dtype=torch.float64)
    ref.to(dtype=torch.float64)
    assert all(s.dtype == torch.float64 for s in shim.shadow_params)
    train(model, lambda: (ref.update(), shim.update()), steps=3)
    for a, b in zip(shim.shadow_params, ref.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_decay_can_be_changed_as_in_torch_ema():
    model, ref, shim = both(0.9, False, steps=2)
    ref.decay = shim.decay = 0.5
    train(model, lambda: (ref.update(), shim.update()), steps=2)
    assert max(ulps(a, b) for a, b in zip(shim.shadow_params, ref.shadow_params)) <= 2


def test_half_precision_parameters_get_float32_shadows():
    model = net().to(torch.bfloat16)
    shim = ExponentialMovingAverage(model.parameters(), decay=0.9)
    assert all(s.dtype == torch.float32 for s in shim.shadow_params)
    with shim.average_parameters():
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
