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
    assert torch.equal(tensors["head.weight"], ema.shadows["head.weight"])
    assert meta["emakit.step"] == "5"
    out16 = tmp_path / "fp16.safetensors"
    assert main(["export", str(path), "--out", str(out16), "--dtype", "float16",
                 "--strip-prefix", "body."]) == 0
    half = safetensors.torch.load_file(out16)
    assert half["0.weight"].dtype == torch.float16
    assert half["1.num_batches_tracked"].dtype == torch.int64


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
