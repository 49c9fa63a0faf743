"""EMA.load_state_dict: every malformed entry is a StateDictError and nothing half-loads."""

import copy

import numpy as np
import pytest

import emakit

torch = pytest.importorskip("torch")


def _trained(**options):
    w = {"w": torch.arange(4.0), "n": torch.tensor([3])}
    ema = emakit.EMA(w, decay=0.9, policy=emakit.Policy(nonfinite="skip"), **options)
    w["w"] += 1.0
    ema.update()
    ema.update()
    return w, ema


def _fingerprint(ema):
    state = ema.state_dict()
    shadows = {k: v.clone() for k, v in state.pop("shadows").items()}
    return copy.deepcopy(state), shadows


def _same(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


BAD = {
    "skips not a dict": ("nonfinite_skips", "oops"),
    "skip not an int": ("nonfinite_skips", {"w": "x"}),
    "skip beyond int64": ("nonfinite_skips", {"w": 10 ** 30}),
    "skip negative": ("nonfinite_skips", {"w": -1}),
    "version True": ("format_version", True),
    "version 1.0": ("format_version", 1.0),
    "version tensor": ("format_version", torch.tensor(1)),
    "step inf": ("step", float("inf")),
    "step huge": ("step", 10 ** 30),
    "every str": ("every", "3"),
    "every 0": ("every", 0),
    "actions null": ("actions", None),
    "action unknown": ("actions", {"w": "blend", "n": "copy"}),
    "decay not a dict": ("decay", 0.9),
    "policy null": ("policy", None),
    "product bool": ("decay_product", True),
    "product nan": ("decay_product", float("nan")),
    "shadows list": ("shadows", [1, 2]),
    "meta shadow": ("shadows", {"w": torch.empty(4, device="meta"), "n": torch.tensor([3])}),
    "sparse shadow": ("shadows", {"w": torch.arange(4.0).to_sparse(), "n": torch.tensor([3])}),
    "object array": ("shadows", {"w": np.array([object()] * 4), "n": torch.tensor([3])}),
    "aliases not str": ("aliases", {"a": 1}),
    "products out of range": ("decay_products", {"w": 2.0}),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_malformed_entry_is_refused_and_changes_nothing(case):
    key, value = BAD[case]
    _, source = _trained()
    state = source.state_dict()
    state[key] = value
    _, ema = _trained()
    with torch.no_grad():
        next(iter(ema.averaged().values())).add_(5.0)  # differs from the state it refuses
    before = _fingerprint(ema)
    with pytest.raises(emakit.StateDictError) as info:
        ema.load_state_dict(state)
    assert "Nothing was loaded" in str(info.value)
    assert len(str(info.value)) < 600  # names the entry; never prints a whole tensor
    _same(before, _fingerprint(ema))


def test_a_bad_second_average_of_a_multi_ema_leaves_the_first_as_it_was():
    w = {"w": torch.arange(4.0)}
    emas = emakit.MultiEMA(w, decays=(0.5, 0.9), policy=emakit.Policy(nonfinite="skip"))
    w["w"] += 1.0
    emas.update()
    state = emas.state_dict()
    state["members"][0]["shadows"]["w"] = state["members"][0]["shadows"]["w"] + 7.0
    state["members"][1]["nonfinite_skips"] = {"w": "oops"}
    before = [_fingerprint(m) for m in emas]
    with pytest.raises(emakit.StateDictError, match=r"average 1: state\['nonfinite_skips'\]"):
        emas.load_state_dict(state)
    for m, b in zip(emas, before):
        _same(b, _fingerprint(m))


def test_a_good_state_still_loads_and_extra_informational_keys_are_kept_out():
    _, source = _trained()
    state = source.state_dict()
    assert state["source_dtypes"] == {"w": "float32", "n": "int64"}
    _, ema = _trained()
    result = ema.load_state_dict(state)
    assert result == emakit.LoadResult([], [], {})
    _same(_fingerprint(source), _fingerprint(ema))


def test_the_message_reads_problem_first_with_or_without_a_fix_or_a_listing():
    import torch

    ema = emakit.EMA(torch.nn.Linear(2, 2), decay=0.7)
    ema.update()
    state = ema.state_dict()
    state["step"] = -1
    with pytest.raises(emakit.StateDictError) as info:
        ema.load_state_dict(state)
    assert str(info.value) == ("state['step'] must be an int in [0, 2**63), got -1. Nothing was "
                               "loaded.")
    listed = emakit.StateDictError("the state does not fit", missing=["a"])
    assert str(listed) == "the state does not fit; missing (1): 'a'. Nothing was loaded."


def test_a_mismatch_after_a_renaming_says_which_renaming(tmp_path):
    import torch

    small = emakit.EMA(torch.nn.Linear(3, 3), decay=0.9)
    small.update()
    emakit.save(small, tmp_path / "lin.safetensors")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(emakit.StateDictError, match=r"its names read with add '0\.'.*"
                                                    r"'0\.weight: shape \(3, 3\) != \(8, 4\)'"):
        emakit.load(emakit.EMA(model, decay=0.9), tmp_path / "lin.safetensors")
