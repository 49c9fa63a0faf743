"""``emakit inspect`` and ``emakit export`` on emakit and other libraries' checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import emakit
import peers
from emakit.cli import main


def _trained(tmp_path: Path) -> tuple[torch.nn.Module, emakit.EMA, Path]:
    model = peers.net().to(torch.bfloat16)
    ema = emakit.EMA(model, half_life=3)
    for t in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * t)
        ema.update()
    path = tmp_path / "ema.safetensors"
    emakit.save(ema, path)
    return model, ema, path


def test_export_loads_into_a_plain_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, ema, path = _trained(tmp_path)
    out = tmp_path / "model.safetensors"
    assert main(["export", str(path), "--out", str(out)]) == 0
    assert "wrote 9 tensors" in capsys.readouterr().out
    state = safetensors.torch.load_file(out)
    plain = peers.net().to(torch.bfloat16)
    plain.load_state_dict(state)  # strict, no emakit involved
    want = ema.model_state_dict()
    for name, value in plain.state_dict().items():
        assert value.dtype == want[name].dtype
        assert torch.equal(value, want[name]), name


def test_export_dtype_and_prefix(tmp_path: Path) -> None:
    _, ema, path = _trained(tmp_path)
    out = tmp_path / "fp32.pt"
    assert main(["export", str(path), "--out", str(out), "--dtype", "keep"]) == 0
    tensors, meta = emakit.io.read_weights(out)
    assert tensors["head.weight"].dtype == torch.float32
    assert torch.equal(tensors["head.weight"], ema.averaged()["head.weight"])
    assert meta["emakit.step"] == "5"
    out16 = tmp_path / "fp16.safetensors"
    assert main(["export", str(path), "--out", str(out16), "--dtype", "float16",
                 "--strip-prefix", "body."]) == 0
    half = safetensors.torch.load_file(out16)
    assert half["0.weight"].dtype == torch.float16
    assert half["1.num_batches_tracked"].dtype == torch.int64


def test_export_refuses_a_prefix_no_name_has_or_one_that_merges_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, path = _trained(tmp_path)
    out = tmp_path / "out.safetensors"
    assert main(["export", str(path), "--out", str(out), "--strip-prefix", "module."]) == 2
    assert "no name in" in capsys.readouterr().err and not out.exists()
    merged = {"a.w": torch.zeros(2), "w": torch.ones(2)}
    ema = emakit.EMA(merged, decay=0.5)
    emakit.save(ema, tmp_path / "two.safetensors")
    assert main(["export", str(tmp_path / "two.safetensors"), "--out", str(out),
                 "--strip-prefix", "a."]) == 2
    assert "makes two names 'w'" in capsys.readouterr().err and not out.exists()


def test_export_from_peers(tmp_path: Path) -> None:
    pytest.importorskip("torch_ema")  # the peers extra; test_layouts checks CI has it
    pytest.importorskip("ema_pytorch")
    ckpt = tmp_path / "ep.pt"
    expected = peers.write_ema_pytorch(ckpt)
    out = tmp_path / "ep.safetensors"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    got = safetensors.torch.load_file(out)
    for name, value in expected.items():
        assert torch.equal(got[name].double() if got[name].is_floating_point() else got[name],
                           torch.from_numpy(value)), name
    tema = tmp_path / "te.pt"
    peers.write_torch_ema(tema)
    assert main(["export", str(tema), "--out", str(out)]) == 2  # a bare list needs names
    names = tmp_path / "names.txt"
    names.write_text("\n".join(n for n, _ in peers.net().named_parameters()))
    assert main(["export", str(tema), "--out", str(out), "--names", str(names)]) == 0
    assert set(safetensors.torch.load_file(out)) == {n for n, _ in peers.net().named_parameters()}


def test_inspect_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, ema, path = _trained(tmp_path)
    assert main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert "layout             emakit" in table
    assert "half-life 3.0 steps" in table
    assert "float32 (8), int64 (1)" in table and "bfloat16 (8), int64 (1)" in table
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n = sum(p.numel() for p in peers.net().state_dict().values())
    assert info["layout"] == "emakit" and info["step"] == 5 and info["num_updates"] == 5
    assert info["tensors"] == 9 and info["elements"] == n
    assert info["tensor_bytes"] == 4 * (n - 1) + 8
    assert info["decay"] == ema.schedule.to_dict()
    assert info["half_life"] == pytest.approx(3.0)


def test_inspect_and_export_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path / "absent.pt")]) == 2
    assert "emakit inspect: error: no such checkpoint" in capsys.readouterr().err
    torch.save({"epoch": 1}, tmp_path / "x.pt")
    assert main(["inspect", str(tmp_path / "x.pt")]) == 2
    assert "holds no EMA layout emakit knows" in capsys.readouterr().err
    _, _, path = _trained(tmp_path)
    assert main(["export", str(path), "--out", str(path)]) == 2
    assert "--out is the checkpoint itself" in capsys.readouterr().err
    assert main(["export", str(path), "--out", str(tmp_path / "m.bin")]) == 2
    assert "cannot tell the file format" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(path), "--out", "m.safetensors", "--dtype", "int8"])


def test_export_to_npz_and_pt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """.npz takes torch weights (bf16 needs --dtype float32); .pt loads into a plain model."""
    import numpy as np

    _, ema, path = _trained(tmp_path)
    npz = tmp_path / "m.npz"
    assert main(["export", str(path), "--out", str(npz)]) == 2
    err = capsys.readouterr().err
    assert "emakit export: error: cannot write" in err and ".npz (numpy) has no bfloat16" in err
    assert "--dtype float32" in err and "write .safetensors or .pt" in err
    assert not npz.exists()
    assert main(["export", str(path), "--out", str(npz), "--dtype", "float32"]) == 0
    want = ema.model_state_dict()
    with np.load(npz) as z:
        assert set(z.files) == set(want) | {"__metadata__"}
        np.testing.assert_array_equal(z["head.weight"], ema.averaged()["head.weight"].numpy())
    pt = tmp_path / "m.pt"
    assert main(["export", str(path), "--out", str(pt)]) == 0
    plain = peers.net().to(torch.bfloat16)
    plain.load_state_dict(torch.load(pt, weights_only=True))  # strict, no emakit involved
    for name, value in plain.state_dict().items():
        assert torch.equal(value, want[name]), name


def test_help_lists_the_formats_and_dtypes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{model,keep,float32,bfloat16,float16,float64}" in text
    assert ".safetensors (recommended), .pt or .npz" in text and "--no-verify" in text


def _bf16_state(tmp_path: Path, *, recorded: bool) -> tuple[emakit.EMA, Path]:
    model = peers.net().to(torch.bfloat16)
    ema = emakit.EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update()
    state = ema.state_dict()
    if not recorded:  # a state saved before emakit recorded the model's dtypes
        state.pop("source_dtypes")
    torch.save({"ema": state}, tmp_path / "train.pt")
    return ema, tmp_path / "train.pt"


def test_export_of_a_torch_saved_bf16_state(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The state records the model dtypes, so torch.save exports bf16 like emakit.save does."""
    ema, path = _bf16_state(tmp_path, recorded=True)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().err == ""
    got = safetensors.torch.load_file(out)
    assert got["head.weight"].dtype == torch.bfloat16
    assert torch.equal(got["head.weight"], ema.model_state_dict()["head.weight"])


def test_export_of_an_older_state_says_what_it_chose(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, path = _bf16_state(tmp_path, recorded=False)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("emakit export: note: the file does not record the model's dtypes")
    assert "wrote the stored dtypes (float32, int64)" in err and "--dtype" in err
    assert safetensors.torch.load_file(out)["head.weight"].dtype == torch.float32
    assert main(["inspect", str(path)]) == 0
    assert "the model's dtypes are not recorded" in capsys.readouterr().out
    assert main(["export", str(path), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert safetensors.torch.load_file(out)["head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("how", ["emakit.save", "torch.save"])
def test_export_refuses_a_zero_init_ema_before_its_first_update(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    ema = emakit.EMA(peers.net(), decay=0.9, start="zeros")
    path = tmp_path / ("ema.safetensors" if how == "emakit.save" else "ema.pt")
    if how == "emakit.save":
        emakit.save(ema, path)
    else:
        torch.save(ema.state_dict(), path)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(path), "--out", str(out)]) == 2
    assert "holds no average yet: the EMA (start='zeros') was saved before its first update" in \
        capsys.readouterr().err
    assert not out.exists()
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["empty"] is True and any("no average" in n for n in info["notes"])
