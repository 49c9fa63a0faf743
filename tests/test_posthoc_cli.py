"""``emakit posthoc info | synthesize | sweep`` and ``emakit demo --posthoc``."""

import json
import re

import numpy as np
import pytest

from emakit.cli import main
from emakit.io import read_weights
from emakit.posthoc import Snapshots, synthesize

torch = pytest.importorskip("torch")
PNG = b"\x89PNG\r\n\x1a\n"


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "snaps"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Snapshots(model, path, snapshot_every=25)
    rec.attach(opt)
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x + 0.5 * torch.randn_like(x)), y).backward()
        opt.step()
    return path


EVALUATE = '''
import torch

def evaluate(state):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 1))
    model.load_state_dict(state)
    model.eval()
    x = torch.randn(256, 4)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).item()

not_a_function = 3
'''


def test_info_text_and_json(capsys, folder):
    rc, out, _ = _run(capsys, "posthoc", "info", folder)
    assert rc == 0
    assert re.search(r"40 snapshots \(.* MB\) of 9 tensors \(torch\), steps 25\.\.500 every 25, "
                     r"sigma_rels 0\.05, 0\.1", out), out
    assert re.search(r"at step 500: supported sigma_rel 0\.0\d+-0\.2\d+ \(profile error <= 0\.02\)",
                     out), out
    rc, out, _ = _run(capsys, "posthoc", "info", folder, "--json", "--step", 250,
                      "--max-profile-error", 0.05)
    info = json.loads(out)
    assert rc == 0 and info["step"] == 250 and info["snapshots"] == 40
    assert info["max_profile_error"] == 0.05 and len(info["supported_sigma_rels"]) == 1


def test_synthesize_writes_a_plain_state_dict(capsys, folder, tmp_path):
    out = tmp_path / "model.safetensors"
    rc, stdout, err = _run(capsys, "posthoc", "synthesize", folder, "--sigma-rel", 0.07,
                           "--out", out)
    assert rc == 0, err
    assert re.search(r"the average of sigma_rel 0\.07 at step 500, from 40 snapshots \(profile "
                     r"error 0\.00\d+\), 9 tensors", stdout), stdout
    tensors, meta = read_weights(out)
    expected = synthesize(folder, 0.07)
    assert set(tensors) == set(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert meta["emakit.posthoc.sigma_rel"] == "0.07" and meta["emakit.posthoc.step"] == "500"
    rc, _, err = _run(capsys, "posthoc", "synthesize", folder, "--sigma-rel", 0.1, "--step", 250,
                      "--out", tmp_path / "early.pt")
    assert rc == 0, err
    early = torch.load(tmp_path / "early.pt", weights_only=True)
    assert torch.equal(early["0.weight"], synthesize(folder, 0.1, step=250)["0.weight"])


def test_sweep_with_a_users_evaluate_file(capsys, folder, tmp_path):
    script = tmp_path / "my_eval.py"
    script.write_text(EVALUATE)
    rc, out, err = _run(capsys, "posthoc", "sweep", folder, "--evaluate", f"{script}:evaluate",
                        "--sigma-rels", "0.04:0.16:5", "--out", tmp_path / "best.safetensors",
                        "--plot", tmp_path / "sweep.png", "--json", tmp_path / "sweep.json")
    assert rc == 0, err
    assert "step 500: metric by sigma_rel (min is best)" in out and "*best" in out
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["sigma_rel"] for r in data["rows"]] == [0.04, 0.05657, 0.08, 0.1131, 0.16]
    assert f"best: sigma_rel {data['best_sigma_rel']:.4g}" in out
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG
    best, meta = read_weights(tmp_path / "best.safetensors")
    assert float(meta["emakit.posthoc.sigma_rel"]) == data["best_sigma_rel"]
    assert set(best) == set(synthesize(folder, 0.07))
    rc, out, err = _run(capsys, "posthoc", "sweep", folder, "--evaluate", f"{script}:evaluate",
                        "--sigma-rels", "0.05,0.1", "--mode", "max")
    assert rc == 0, err
    assert len(re.findall(r"^\s+0\.\d+\s", out, re.M)) == 2


@pytest.mark.parametrize(("argv", "message"), [
    (["synthesize", "{folder}", "--sigma-rel", "0.01", "--out", "{tmp}/x.safetensors"],
     "do not support sigma_rel 0.01"),
    (["synthesize", "{folder}", "--sigma-rel", "0.07", "--out", "{tmp}/x.bin"],
     "cannot tell the file format"),
    (["synthesize", "{tmp}/none", "--sigma-rel", "0.07", "--out", "{tmp}/x.bin"],
     "cannot tell the file format"),  # checked before the folder is read
    (["synthesize", "{folder}", "--sigma-rel", "0.07", "--out", "{tmp}/no/x.pt"],
     "its folder does not exist"),
    (["synthesize", "{folder}", "--sigma-rel", "0.07", "--out", "{tmp}"], "is a folder"),
    (["synthesize", "{folder}", "--sigma-rel", "0.07", "--step", "260", "--out",
      "{tmp}/x.pt"], "not a snapshot step"),
    (["synthesize", "{tmp}/none", "--sigma-rel", "0.07", "--out", "{tmp}/x.pt"],
     "no post-hoc EMA manifest"),
    (["info", "{folder}", "--step", "9999"], "outside the snapshots' steps 25..500"),
    (["info", "{folder}", "--max-profile-error", "0"], "--max-profile-error must be > 0"),
    (["sweep", "{folder}", "--evaluate", "nope"], "give FILE.py:NAME or module.path:NAME"),
    (["sweep", "{folder}", "--evaluate", "{tmp}/missing.py:f"], "no such file"),
    (["sweep", "{folder}", "--evaluate", "{tmp}/my_eval.py:not_a_function"],
     "has no function 'not_a_function'"),
    (["sweep", "{folder}", "--evaluate", "no_such_module_xyz:f"], "cannot import"),
    (["sweep", "{folder}", "--evaluate", "{tmp}/my_eval.py:evaluate", "--json",
      "{tmp}/no/dir.json"], "its folder does not exist"),
])
def test_errors_are_one_line(capsys, folder, tmp_path, argv, message):
    (tmp_path / "my_eval.py").write_text(EVALUATE)
    args = [a.format(folder=folder, tmp=tmp_path) for a in argv]
    rc, _, err = _run(capsys, "posthoc", *args)
    assert rc == 2 and message in err, err
    assert err.startswith("emakit posthoc: error: ") and err.count("\n") == 1


def test_a_damaged_folder_is_one_line(capsys, folder, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "manifest.json").write_text("{")
    rc, _, err = _run(capsys, "posthoc", "info", copy)
    assert rc == 2 and "is not valid JSON" in err and err.count("\n") == 1


@pytest.mark.parametrize("text", ["", "a,b", "0.1:0.05:3", "0.01:0.1:1", "0:0.1:3", "nan"])
def test_bad_sigma_rels_are_usage_errors(capsys, folder, text):
    with pytest.raises(SystemExit) as exc:
        main(["posthoc", "sweep", str(folder), "--evaluate", "m:f", "--sigma-rels", text])
    assert exc.value.code == 2
    assert "is not a list of widths" in capsys.readouterr().err


def test_help_is_plain_text(capsys):
    for argv in (["posthoc", "--help"], ["posthoc", "sweep", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "``" not in out and not re.search(r":(func|mod|class):`", out), out
    with pytest.raises(SystemExit):
        main(["posthoc", "--help"])
    assert "emakit posthoc: choose the EMA's width after training" in capsys.readouterr().out


# --------------------------------------------------------------------------- the demo
@pytest.mark.slow
def test_demo_posthoc(capsys, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    args = ("demo", "--posthoc", "--epochs", 6, "--out", out, "--no-progress")
    rc, stdout, err = _run(capsys, *args)
    assert rc == 0, err
    for text in ("the synthesised average, by validation loss:", "fixed-decay EMAs",
                 "best synthesised (sigma_rel", "best fixed decay (half-life",
                 "final training weights", "check: sigma_rel 0.07 synthesised vs tracked"):
        assert text in stdout, stdout
    report = json.loads((out / "posthoc-report.json").read_text())
    assert report["settings"]["steps"] == 6 * 68 and report["settings"]["snapshot_every"] == 14
    assert report["snapshots"]["files"] == 2 * (29 + 1)  # 14, 28, ..., 406 and the last, 408
    assert report["summary"]["check_rel_l2"] < 1e-4  # synthesis = the tracked power EMA
    assert len(report["sweep"]) == 12 and len(report["fixed"]) == 6
    assert (out / "posthoc.png").read_bytes()[:8] == PNG
    from safetensors.torch import load_file

    from emakit.cli.demo_setup import build_model

    build_model((1, 1, 8, 8), 10).load_state_dict(load_file(out / "posthoc_best.safetensors"))
    assert not (out / "report.json").exists()  # the default demo did not run
    rc, _, err = _run(capsys, *args)  # again into the same folder: the old snapshots go
    assert rc == 0, err
    (out / "snapshots" / "notes.txt").write_text("mine")
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and "holds other files than a demo's snapshots" in err


def test_demo_posthoc_refuses_a_fixed_decay(capsys, tmp_path):
    rc, _, err = _run(capsys, "demo", "--posthoc", "--decay", "0.99", "--out", tmp_path)
    assert rc == 2 and "drop --decay / --half-life" in err


def test_profile_sigma_rel_of_a_fixed_decay():
    from emakit import schedules
    from emakit.cli.demo_posthoc import profile_sigma_rel

    # a power EMA's own width comes out as its sigma_rel
    assert profile_sigma_rel(schedules.PowerFunction(sigma_rel=0.1), 20000) == \
        pytest.approx(0.1, rel=1e-3)
    # an exponential window: std sqrt(d)/(1-d) steps, relative to the run
    d = schedules.half_life_to_decay(100)
    assert profile_sigma_rel(schedules.Constant(d), 20000) == \
        pytest.approx(np.sqrt(d) / (1 - d) / 20000, rel=1e-3)
