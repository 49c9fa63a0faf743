"""The sigma_rel sweep: metrics per width, the best written out, a table and a plot; the model
it loads into gets its own weights back."""

import json
import math

import numpy as np
import pytest

from emakit.io import read_weights
from emakit.posthoc import Snapshots, open_record, sweep, synthesize
from emakit.posthoc.metric_sweep import default_sigma_rels

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Weights that drift from 1 to 3 in the second half of the run, with heavy noise: the
    metric is the distance from the end value, 3.0. Narrow averages keep the noise, wide ones
    lag behind the drift: the best width is a compromise the sweep must find."""
    path = tmp_path_factory.mktemp("sweep") / "snaps"
    w = {"w": np.zeros(64), "n": np.zeros(2)}
    rec = Snapshots(w, path, snapshot_every=100)
    rng = np.random.default_rng(0)
    for step in range(1, 2001):
        w["w"][:] = 1.0 + 8.0 * rng.normal(size=64) + max(0, step - 1000) * 0.002
        w["n"][:] = step
        rec.update()
    return path


def _distance(sd):
    return float(np.abs(sd["w"] - 3.0).mean())


def test_the_sweep_finds_the_best_width_and_writes_it(folder, tmp_path):
    widths = [0.04, 0.06, 0.08, 0.1, 0.13, 0.17]
    seen = []

    def evaluate(sd):
        seen.append(sd)
        return _distance(sd)

    result = sweep(folder, widths, evaluate, out=tmp_path / "best.safetensors",
                   plot=tmp_path / "sweep.png")
    assert result.sigma_rels == tuple(widths) and result.step == 2000
    expected = [_distance(synthesize(folder, s)) for s in widths]
    assert list(result.metrics) == expected
    assert result.best_index == int(np.argmin(expected))
    assert result.best_sigma_rel == widths[result.best_index]
    assert 0 < result.best_index < len(widths) - 1  # a compromise, not an end
    best, meta = read_weights(tmp_path / "best.safetensors", framework="numpy")
    np.testing.assert_array_equal(best["w"], synthesize(folder, result.best_sigma_rel)["w"])
    assert meta["emakit.posthoc.sigma_rel"] == repr(result.best_sigma_rel)
    assert meta["emakit.posthoc.step"] == "2000" and meta["emakit.posthoc.mode"] == "min"
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG
    assert result.out == tmp_path / "best.safetensors" and result.plot == tmp_path / "sweep.png"
    lines = result.table().splitlines()
    assert lines[0] == "step 2000: metric by sigma_rel (min is best)"
    assert lines[3 + result.best_index].endswith("*best")
    assert sum(line.endswith("*best") for line in lines) == 1
    json.dumps(result.to_dict())
    assert all(0 <= e < 0.02 for e in result.profile_errors)


def test_mode_max_nan_and_numpy_scalars(folder):
    metrics = iter([np.float32(0.5), float("nan"), np.float64(0.9), 0.7])
    result = sweep(folder, [0.05, 0.07, 0.1, 0.12], lambda sd: next(metrics), mode="max")
    assert result.best_sigma_rel == 0.1 and math.isnan(result.metrics[1])
    assert result.to_dict()["rows"][1]["metric"] is None


def test_every_metric_nan_is_an_error(folder):
    with pytest.raises(ValueError, match="returned NaN for every sigma_rel"):
        sweep(folder, [0.05, 0.1], lambda sd: float("nan"))


@pytest.mark.parametrize("bad", [None, "0.5", True, [1.0], object()])
def test_a_metric_that_is_not_a_number(folder, bad):
    with pytest.raises(TypeError, match="must return a number"):
        sweep(folder, [0.05], lambda sd: bad)


def test_unsupported_widths_are_refused_before_anything_is_evaluated(folder, tmp_path):
    calls = []
    with pytest.raises(ValueError, match=r"do not support sigma_rel 0\.01"):
        sweep(folder, [0.05, 0.01], lambda sd: calls.append(1) or 0.0,
              out=tmp_path / "best.safetensors")
    assert calls == [] and not (tmp_path / "best.safetensors").exists()


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"mode": "best"}, ValueError, "mode must be 'min'"),
    ({"out": "best.bin"}, ValueError, "use one of the suffixes"),
    ({"plot": "sweep.jpg"}, ValueError, "end the name in .png"),
    ({"out": "missing/best.pt"}, FileNotFoundError, "does not exist"),
    ({"step": 150}, ValueError, "not a snapshot step"),
    ({"model": 3}, TypeError, "model must be an nn.Module"),
])
def test_bad_options(folder, tmp_path, monkeypatch, kwargs, error, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        sweep(folder, [0.05], _distance, **kwargs)


def test_empty_widths(folder):
    with pytest.raises(ValueError, match="sigma_rels is empty"):
        sweep(folder, [], _distance)


def test_default_widths_span_the_supported_range(folder):
    record = open_record(folder)
    widths = default_sigma_rels(record)
    assert len(widths) == 12 and widths == sorted(widths)
    assert 0.03 < widths[0] < 0.04 and 0.18 < widths[-1] < 0.22
    result = sweep(record, None, _distance, step=1000)
    assert result.step == 1000 and len(result.sigma_rels) == 12


def test_a_numpy_model_is_loaded_and_put_back(folder):
    model = {"w": np.full(64, 7.0), "n": np.zeros(2), "other": np.ones(3)}
    original = {k: v.copy() for k, v in model.items()}
    seen = []

    def evaluate(m):
        assert m is model
        seen.append((m["w"].copy(), m["other"].copy()))
        return _distance(m)

    sweep(folder, [0.05, 0.1], evaluate, model=model)
    np.testing.assert_array_equal(seen[0][0], synthesize(folder, 0.05)["w"])
    np.testing.assert_array_equal(seen[0][1], original["other"])  # not in the snapshots: kept
    for k in model:
        np.testing.assert_array_equal(model[k], original[k])
    with pytest.raises(ValueError, match=r"differ in shape from the snapshots': \['w: \(3,\)"):
        sweep(folder, [0.05], _distance, model={"w": np.zeros(3), "n": np.zeros(2)})


def test_a_torch_model_gets_its_weights_back_even_when_evaluate_fails(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Snapshots(model, tmp_path, snapshot_every=10)
    rec.attach(opt)
    for _ in range(200):
        opt.zero_grad()
        model(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = []

    def evaluate(m):
        loaded.append(m[0].weight.detach().clone())
        return float(m[0].weight.detach().sum())

    result = sweep(tmp_path, [0.05, 0.1], evaluate, model=model)
    assert torch.equal(loaded[1], synthesize(tmp_path, 0.1)["0.weight"])
    assert result.best_metric == min(result.metrics)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    def failing(m):
        raise RuntimeError("evaluation crashed")

    with pytest.raises(RuntimeError, match="evaluation crashed"):
        sweep(tmp_path, [0.05, 0.1], failing, model=model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    other = torch.nn.Linear(3, 4)  # lacks the BatchNorm's tensors
    with pytest.raises(ValueError, match="the snapshots hold tensors the model lacks"):
        sweep(tmp_path, [0.05], lambda m: 0.0, model=other)
