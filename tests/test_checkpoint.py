"""emakit.save / emakit.load: the file format, atomic writes, clear errors, golden files."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

import emakit
from emakit.io import safetensors_stream
from emakit.io.checkpoint import HEADER_CRC_KEY, HEADER_KEY, read_header
from golden import recipes
from oracle import weighted_sum

GOLDEN = Path(__file__).parent / "golden"
ADDED_IN_V1 = {"checksums", "aliases"}
"""Header keys added after the v1 golden files were made; readers of v1 ignore unknown keys."""


def _bn_model(dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(dtype)


def _train(model: torch.nn.Module, ema: emakit.EMA, steps: range) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in steps:
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(8, 4, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
        ema.update(step=t)


def _ema(model: torch.nn.Module) -> emakit.EMA:
    return emakit.EMA(model, decay=emakit.schedules.TFWarmup(0.99), every=3)


def _same(a: emakit.EMA, b: emakit.EMA) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert {k: v for k, v in sa.items() if k != "shadows"} == \
        {k: v for k, v in sb.items() if k != "shadows"}
    for name, t in sa["shadows"].items():
        assert t.dtype == sb["shadows"][name].dtype
        assert torch.equal(t, sb["shadows"][name]), name


def test_round_trip_resumes_bitwise(tmp_path: Path) -> None:
    """save at step 10, load into a fresh EMA, go on: equal to the uninterrupted run."""
    model = _bn_model()
    ema = _ema(model)
    _train(model, ema, range(1, 11))
    emakit.save(ema, tmp_path / "ema.safetensors")
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, ema, range(11, 21))

    resumed_model = _bn_model()
    resumed_model.load_state_dict(model_state)
    resumed = _ema(resumed_model)
    assert emakit.load(resumed, tmp_path / "ema.safetensors") == emakit.LoadResult([], [], {})
    assert resumed.step == 10 and resumed.averaged()["0.weight"].dtype == torch.float32
    _train(resumed_model, resumed, range(11, 21))
    _same(ema, resumed)


def test_header_holds_the_settings(tmp_path: Path) -> None:
    model = _bn_model()
    ema = emakit.EMA(model, half_life=100, every=2)
    _train(model, ema, range(1, 6))
    emakit.save(ema, tmp_path / "e.safetensors", metadata={"run": "a1"})
    header = read_header(tmp_path / "e.safetensors")
    assert header["format_version"] == emakit.FORMAT_VERSION == 1
    assert header["emakit_version"] == emakit.__version__
    assert (header["step"], header["last_update_step"], header["num_updates"]) == (5, 4, 2)
    assert header["decay"] == {"kind": "Constant", "decay": ema.schedule(1)}
    assert header["half_life"] == pytest.approx(100)
    assert header["shadow_dtypes"]["0.weight"] == "float32"
    assert header["source_dtypes"]["0.weight"] == "bfloat16"
    assert header["shadow_dtypes"]["1.num_batches_tracked"] == "int64"
    assert header["policy"] == ema.state_dict()["policy"]
    assert header["user"] == {"run": "a1"}
    # readable without emakit: the raw shadows by model name
    raw = safetensors.torch.load_file(tmp_path / "e.safetensors")
    assert torch.equal(raw["0.weight"], ema.averaged()["0.weight"])


def test_numpy_round_trip_with_zero_init(tmp_path: Path) -> None:
    w = {"a": np.linspace(0, 1, 5), "n": np.arange(3)}
    ema = emakit.EMA(w, decay=0.8, start="zeros")
    for _ in range(3):
        w["a"] += 0.5
        w["n"] += 1
        ema.update()
    emakit.save(ema, tmp_path / "n.safetensors")
    fresh = emakit.EMA({"a": np.zeros(5), "n": np.zeros(3, dtype=np.int64)}, decay=0.8,
                       start="zeros")
    emakit.load(fresh, tmp_path / "n.safetensors")
    np.testing.assert_array_equal(fresh.averaged()["a"], ema.averaged()["a"])
    np.testing.assert_array_equal(fresh.averaged()["n"], [3, 4, 5])


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = _bn_model()
    ema = _ema(model)
    path = tmp_path / "ema.safetensors"
    emakit.save(ema, path)
    before = path.read_bytes()
    _train(model, ema, range(1, 4))

    def crash(f: Any, raws: Any, metadata: Any = None) -> None:
        f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_stream, "write_safetensors", crash)
    with pytest.raises(OSError, match="No space left"):
        emakit.save(ema, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema.safetensors"]


def test_saving_inside_swapped_is_refused(tmp_path: Path) -> None:
    """Inside swapped() the model holds the EMA weights: no training checkpoint may be taken."""
    model = _bn_model(torch.float32)
    ema = emakit.EMA(model, decay=0.5)
    _train(model, ema, range(1, 3))
    with ema.swapped():
        with pytest.raises(emakit.SwapError, match=r"state_dict.*swapped.*after the swapped"):
            ema.state_dict()
        with pytest.raises(emakit.SwapError, match="swapped"):
            emakit.save(ema, tmp_path / "e.safetensors")
        # what the model returns in here is the EMA model (use it to export the EMA weights)
        assert torch.equal(model.state_dict()["0.weight"], ema.averaged()["0.weight"])
        exported = ema.model_state_dict()
    assert not (tmp_path / "e.safetensors").exists()
    emakit.save(ema, tmp_path / "e.safetensors")
    assert torch.equal(exported["0.weight"], ema.averaged()["0.weight"])


# ------------------------------------------------------------------------------- bad input
def _saved(tmp_path: Path) -> tuple[Path, emakit.EMA]:
    model = _bn_model()
    ema = _ema(model)
    _train(model, ema, range(1, 7))
    path = tmp_path / "ema.safetensors"
    emakit.save(ema, path)
    return path, ema


def _rewrite(path: Path, edit: Any, raw: Any = None) -> None:
    """Rewrite a checkpoint with ``edit(tensors, header)`` applied (a hand-made bad file).

    The header's checksum is recomputed (an edit, not damage), so the checks behind it are the
    ones tested; ``raw(text) -> text`` edits the JSON text instead of the parsed header.
    """
    tensors = safetensors.torch.load_file(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    header = json.loads(meta[HEADER_KEY])
    edit(tensors, header)
    text = json.dumps(header) if raw is None else raw(json.dumps(header))
    safetensors.torch.save_file(tensors, path, metadata={
        HEADER_KEY: text, HEADER_CRC_KEY: f"{zlib.crc32(text.encode()):08x}"})


def _untouched(ema: emakit.EMA, path: Path, match: str) -> None:
    before = {k: v.clone() for k, v in ema.averaged().items()}
    step = ema.step
    with pytest.raises(emakit.StateDictError, match=match):
        emakit.load(ema, path)
    assert ema.step == step
    assert all(torch.equal(before[k], v) for k, v in ema.averaged().items())


def test_truncated_file(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    _untouched(_ema(_bn_model()), path, r"ema.safetensors.*not a readable .safetensors file")
    path.write_bytes(b"")
    _untouched(_ema(_bn_model()), path, "not a readable")


def test_unknown_format_version(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    _rewrite(path, lambda t, h: h.update(format_version=99, emakit_version="9.0"))
    _untouched(_ema(_bn_model()), path,
               r"ema.safetensors.*unknown format_version 99.*reads format_version 1.*Upgrade "
               r"emakit.*9.0")


def test_not_an_emakit_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(dict(_bn_model().state_dict()), path)
    _untouched(_ema(_bn_model()), path,
               r"model.safetensors.*not an emakit checkpoint.*EMA.from_checkpoint")


def test_corrupt_header(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file(tensors, path, metadata={HEADER_KEY: "{not json"})
    _untouched(_ema(_bn_model()), path, r"header entry 'emakit' is not valid JSON")
    safetensors.torch.save_file(tensors, path, metadata={HEADER_KEY: '{"kind": "other"}'})
    _untouched(_ema(_bn_model()), path, r"has kind 'other', not 'ema-state'")


def test_tensor_missing_from_file_names_the_key(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    _rewrite(path, lambda t, h: t.pop("1.running_var"))
    _untouched(_ema(_bn_model()), path,
               r"ema.safetensors': the tensors do not match the header.*missing \(1\): "
               r"'1.running_var'")


def test_dtype_in_file_differs_from_header(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    _rewrite(path, lambda t, h: t.update({"0.bias": t["0.bias"].double()}))
    _untouched(_ema(_bn_model()), path, r"0.bias: dtype float64 but the header says float32")


def test_file_for_another_model(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))
    _untouched(_ema(other.to(torch.bfloat16)), path,
               r"ema.safetensors': the state does not fit this EMA.*0.weight: shape")
    fewer = emakit.EMA(torch.nn.Sequential(torch.nn.Linear(4, 3)).to(torch.bfloat16))
    _untouched(fewer, path, r"unexpected \(5\): '1.weight'")
    fp32 = _ema(_bn_model(torch.float64))
    _untouched(fp32, path, r"0.weight: dtype float32 != float64")


def test_save_argument_errors(tmp_path: Path) -> None:
    ema = _ema(_bn_model())
    with pytest.raises(ValueError, match=r"must end in '.safetensors', got '.*e.pt'"):
        emakit.save(ema, tmp_path / "e.pt")
    with pytest.raises(ValueError, match="metadata must map str to str; 'step' -> 3"):
        emakit.save(ema, tmp_path / "e.safetensors", metadata={"step": 3})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"ema must be an emakit.EMA.*emakit.load\(ema, path\)"):
        emakit.load(_bn_model(), tmp_path / "e.safetensors")  # type: ignore[arg-type]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        emakit.load(_ema(_bn_model()), tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------- golden files
def _golden_versions() -> list[Path]:
    return sorted(p for p in GOLDEN.iterdir() if p.is_dir() and p.name.startswith("v"))


def test_every_format_version_has_golden_files() -> None:
    versions = [int(p.name[1:]) for p in _golden_versions()]
    assert versions == list(range(1, emakit.FORMAT_VERSION + 1))


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("folder", _golden_versions(), ids=lambda p: p.name)
def test_golden_torch_files_keep_loading(folder: Path) -> None:
    model = recipes.torch_model()
    decay = emakit.schedules.TFWarmup(0.9)
    for source in ("torch-bf16-model.safetensors", "torch-state.pt"):
        ema = recipes.torch_ema(model)
        if source.endswith(".pt"):
            state = torch.load(folder / source, weights_only=True)["ema"]
            ema.load_state_dict(state)
        else:
            emakit.load(ema, folder / source)
        assert (ema.step, ema.num_updates) == (recipes.TORCH_STEPS, 3)
        for name, shadow in ema.averaged().items():
            if name.endswith("num_batches_tracked"):
                assert int(shadow) == 6  # copied at the last update (step 6)
                continue
            shape = tuple(shadow.shape)
            updates = [(t, _bf16(recipes.weights_at(name, shape, t))) for t in (2, 4, 6)]
            want = weighted_sum(_bf16(recipes.weights_at(name, shape, 0)), updates, decay)
            np.testing.assert_allclose(shadow.double().numpy(), want, rtol=1e-6, err_msg=name)
    header = read_header(folder / "torch-bf16-model.safetensors")
    assert header["source_dtypes"]["0.weight"] == "bfloat16"
    assert header["user"] == {"recipe": "torch"}


@pytest.mark.parametrize("folder", _golden_versions(), ids=lambda p: p.name)
def test_golden_numpy_file_keeps_loading(folder: Path) -> None:
    weights = recipes.numpy_weights(0)
    ema = recipes.numpy_ema(weights)
    emakit.load(ema, folder / "numpy-zeros.safetensors")
    decay = emakit.schedules.Constant.from_half_life(3.0)
    for name, value in ema.averaged().items():
        updates = [(t, recipes.numpy_weights(t)[name]) for t in range(1, recipes.NUMPY_STEPS + 1)]
        want = weighted_sum(np.zeros_like(value), updates, decay, zeros=True)
        np.testing.assert_allclose(value, want, rtol=1e-12, err_msg=name)
    raw = safetensors.numpy.load_file(folder / "numpy-zeros.safetensors")
    assert raw["w"].dtype == np.float64


def test_the_recipe_still_reproduces_the_current_golden_files(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe still writes files equal (in content) to the committed current version."""
    monkeypatch.setattr(recipes, "HERE", tmp_path)
    recipes.write(emakit.FORMAT_VERSION)
    now = tmp_path / f"v{emakit.FORMAT_VERSION}"
    committed = GOLDEN / f"v{emakit.FORMAT_VERSION}"
    for name, read in (("torch-bf16-model.safetensors", safetensors.torch.load_file),
                       ("numpy-zeros.safetensors", safetensors.numpy.load_file)):
        new, old = read(now / name), read(committed / name)
        assert new.keys() == old.keys()
        for key in new:
            assert (new[key] == old[key]).all(), (name, key)
        h_new, h_old = read_header(now / name), read_header(committed / name)
        h_new.pop("emakit_version")
        h_old.pop("emakit_version")
        assert set(h_new) - set(h_old) <= ADDED_IN_V1
        # Policy gained nonfinite= later; its default is what the old files meant
        assert h_new["policy"].pop("nonfinite", "average") == "average"
        assert {k: v for k, v in h_new.items() if k in h_old} == h_old


def test_permissions_follow_the_umask(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path)
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_torch_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    """emakit.load of a torch.save file says what it is and what to use instead."""
    ema = _ema(_bn_model())
    torch.save({"model": _bn_model().state_dict(), "ema": ema.state_dict()},
               tmp_path / "train.pt")
    _untouched(_ema(_bn_model()), tmp_path / "train.pt",
               r"train\.pt' is a torch\.save checkpoint, not an emakit\.save file.*"
               r"ema\.load_state_dict\(torch\.load\(path, weights_only=True\)\[key\]\).*"
               r"EMA\.from_checkpoint\(model, path\).*emakit inspect FILE")
    (tmp_path / "log.csv").write_text("step,loss\n1,0.5\n")
    _untouched(_ema(_bn_model()), tmp_path / "log.csv",
               r"log\.csv' is a text file \(it starts with 'step,loss'\), not an emakit\.save")


def test_swapped_arguments_are_named(tmp_path: Path) -> None:
    ema = _ema(_bn_model())
    path = tmp_path / "e.safetensors"
    with pytest.raises(TypeError, match=r"emakit\.save got its arguments swapped: call "
                                        r"emakit\.save\(ema, path\) \(the path '.*e\.safetensors'"):
        emakit.save(path, ema)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"emakit\.save got its arguments swapped"):
        emakit.save(str(path), ema)  # type: ignore[arg-type]
    emakit.save(ema, path)
    with pytest.raises(TypeError, match=r"emakit\.load got its arguments swapped: call "
                                        r"emakit\.load\(ema, path\)"):
        emakit.load(path, ema)  # type: ignore[arg-type]
    emakit.load(ema, path)
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
        emakit.save(ema, 3)  # type: ignore[arg-type]
    multi = emakit.MultiEMA(_bn_model(), decays=(0.5, 0.9))
    with pytest.raises(TypeError, match=r"got MultiEMA.*emakit\.save\(emas\[k\], path\)"):
        emakit.save(multi, path)  # type: ignore[arg-type]


def test_save_holds_the_lock_until_the_file_is_written(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread cannot update the shadows between their checksums and their bytes."""
    import threading

    ema = _ema(_bn_model())
    real = safetensors_stream.write_safetensors
    others: list[bool] = []

    def write(f: Any, raws: Any, metadata: Any = None) -> None:
        def try_lock() -> None:
            got = ema.lock.acquire(blocking=False)
            others.append(got)
            if got:
                ema.lock.release()

        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()
        real(f, raws, metadata)

    monkeypatch.setattr(safetensors_stream, "write_safetensors", write)
    emakit.save(ema, tmp_path / "e.safetensors")
    assert others == [False]
    emakit.load(_ema(_bn_model()), tmp_path / "e.safetensors")


def test_a_0_d_array_round_trips_as_0_d(tmp_path: Path) -> None:
    """np.ascontiguousarray makes a 0-d array 1-d; the file keeps the shape ()."""
    w = {"scale": np.array(2.0), "w": np.ones(3)}
    ema = emakit.EMA(w, decay=0.5)
    emakit.save(ema, tmp_path / "s.safetensors")
    again = emakit.EMA({"scale": np.array(0.0), "w": np.zeros(3)}, decay=0.5)
    emakit.load(again, tmp_path / "s.safetensors")
    assert again.averaged()["scale"].shape == () and again.averaged()["scale"] == 2.0


def test_load_takes_a_trainer_checkpoint_folder_and_names_a_folder_without_one(tmp_path):
    ema = emakit.EMA(torch.nn.Linear(2, 2), decay=0.7)
    ema.update()
    (tmp_path / "checkpoint-10").mkdir()
    emakit.save(ema, tmp_path / "checkpoint-10" / "ema.safetensors")
    other = emakit.EMA(torch.nn.Linear(2, 2), decay=0.7)
    emakit.load(other, tmp_path / "checkpoint-10")
    assert all(torch.equal(a, b) for a, b in zip(other.averaged().values(),
                                                 ema.averaged().values()))
    assert emakit.read_state(tmp_path / "checkpoint-10")["step"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"is a folder without an ema\.safetensors"):
        emakit.load(other, tmp_path / "empty")
