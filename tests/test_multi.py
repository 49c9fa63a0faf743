"""MultiEMA: several averages, one read of the weights, each equal to its own EMA."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("kernels")  # native and torch kernels alike

import emakit
from emakit.backends.torch import layout as torch_layout
from emakit.backends.torch import shared as torch_shared


def model(seed: int = 0, dtype: Any = None) -> Any:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.BatchNorm1d(9), torch.nn.Linear(9, 3))
    return m if dtype is None else m.to(dtype)


def step(m: Any, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    with torch.no_grad():
        for t in m.state_dict().values():
            t.add_((torch.randn(t.shape, generator=g) * 3).to(t.dtype))


def assert_equal(a: Any, b: Any) -> None:
    for name in a.names:
        assert torch.equal(a.averaged()[name], b.averaged()[name]), name


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_each_average_equals_its_own_ema_bitwise(monkeypatch: Any, kernels: str, flat: bool,
                                                 dtype: Any) -> None:
    monkeypatch.setattr(torch_shared, "SHARED_CHUNK", 40)  # many chunks on a small model
    monkeypatch.setattr(torch_layout, "STAGING_ELEMENTS", 30)
    decays = (0.5, emakit.schedules.InverseGamma(power=0.75), 0.99)
    m, refs = model(dtype=dtype), [model(dtype=dtype) for _ in decays]
    if flat:
        emakit.flatten_parameters(m)
    multi = emakit.MultiEMA(m, decays=decays, every=2)
    singles = [emakit.EMA(r, decay=d, every=2, foreach=False) for r, d in zip(refs, decays)]
    for i in range(1, 10):
        for x in (m, *refs):
            step(x, i)
        assert multi.update() == (i % 2 == 0)
        for e in singles:
            e.update()
    # one read (one conversion for bf16), chunk by chunk: torch's kernels need a flat model,
    # the native one walks every tensor in the one call
    assert multi.one_pass == (flat or kernels == "native")
    for got, want in zip(multi, singles):
        assert got.step == want.step == 9 and got.num_updates == want.num_updates == 4
        assert_equal(got, want)


def test_numpy_and_guard_paths() -> None:
    w = {"w": np.arange(4.0)}
    multi = emakit.MultiEMA(w, decays=(0.5, 0.75), policy=emakit.Policy(nonfinite="skip"))
    w["w"] += 2.0
    multi.update()
    np.testing.assert_array_equal(multi[0].averaged()["w"], np.arange(4.0) + 1.0)
    np.testing.assert_array_equal(multi[1].averaged()["w"], np.arange(4.0) + 0.5)
    w["w"][0] = np.nan
    multi.update()
    assert multi[0].nonfinite_skips() == {"w": 1} and multi[1].nonfinite_skips() == {"w": 1}


def test_state_round_trip_and_all_or_nothing_load(tmp_path: Any) -> None:
    m = model()
    emakit.flatten_parameters(m)
    multi = emakit.MultiEMA(m, decays=(0.9, 0.99))
    for i in range(1, 4):
        step(m, i)
        multi.update()
    path = tmp_path / "multi.pt"
    torch.save(multi.state_dict(), path)
    again = emakit.MultiEMA(model(1), decays=(0.9, 0.99))
    results = again.load_state_dict(torch.load(path, weights_only=True))
    assert [r.missing for r in results] == [[], []]
    for a, b in zip(multi, again):
        assert a.step == b.step == 3
        assert_equal(a, b)
    state = multi.state_dict()
    bad = dict(state["members"][1])
    bad["shadows"] = {k: (v[:1] if v.ndim else v) for k, v in bad["shadows"].items()}
    before = [e.averaged() for e in again]
    before = [{k: v.clone() for k, v in s.items()} for s in before]
    with pytest.raises(emakit.StateDictError, match=r"average 1: the state does not fit"):
        again.load_state_dict({**state, "members": [state["members"][0], bad]})
    for e, b in zip(again, before):  # average 0 was not loaded either
        for k, v in b.items():
            assert torch.equal(e.averaged()[k], v)
    with pytest.raises(emakit.StateDictError, match=r"holds 1 averages, this MultiEMA has 2"):
        again.load_state_dict({**state, "members": state["members"][:1]})
    with pytest.raises(emakit.StateDictError, match=r"not a MultiEMA.state_dict"):
        again.load_state_dict(multi[0].state_dict())


def test_bad_arguments_and_out_of_step_members() -> None:
    m = model()
    with pytest.raises(ValueError, match=r"two or more decays, got \(0.9,\)"):
        emakit.MultiEMA(m, decays=(0.9,))
    with pytest.raises(ValueError, match=r"two or more decays, got 0.9"):
        emakit.MultiEMA(m, decays=0.9)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"not decay= or half_life="):
        emakit.MultiEMA(m, decays=(0.9, 0.99), half_life=100)
    multi = emakit.MultiEMA(m, decays=(0.9, 0.99))
    assert "2 averages" in repr(multi) and len(multi.schedules) == 2
    multi[0].update()
    with pytest.raises(ValueError, match=r"different steps \[0, 1\]"):
        multi.update()
