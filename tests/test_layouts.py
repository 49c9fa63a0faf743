"""Reading other libraries' EMA checkpoints (real library output, see tests/peers.py)."""

from __future__ import annotations

import collections
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import emakit
import peers
from emakit.io.adopt import match_names
from emakit.io.layouts import read_checkpoint

PEER_MODULES = {"timm": "timm", "ema-pytorch": "ema_pytorch", "torch-ema": "torch_ema",
                "diffusers": "diffusers", "lightning": "lightning"}

CASES = [
    # layout, writer, decay to pass (None: the file records it), recorded step
    ("timm", peers.write_timm, 0.9, None),
    ("ema-pytorch", peers.write_ema_pytorch, 0.9, peers.STEPS),
    ("torch-ema", peers.write_torch_ema, None, peers.STEPS),
    ("diffusers", peers.write_diffusers, None, peers.STEPS),
    ("averaged-model", peers.write_averaged_model, 0.9, None),
    ("ultralytics", peers.write_ultralytics, 0.9, peers.STEPS),
    ("lightning", peers.write_lightning, 0.9, 5),
]


def _needs(layout: str) -> None:
    module = PEER_MODULES.get(layout)
    if module and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[peers]')")


def test_peers_are_installed_in_ci() -> None:
    """CI installs the peers extra, so the real-library tests below never skip there."""
    if not os.environ.get("CI"):
        pytest.skip("only checked in CI")
    absent = [m for m in PEER_MODULES.values() if importlib.util.find_spec(m) is None]
    assert not absent, f"the peers extra is not installed: {absent}"
    assert importlib.util.find_spec("torchvision") is None, "torchvision breaks the peers"


def _write(layout: str, writer: Any, tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    _needs(layout)
    path = tmp_path / f"{layout}.ckpt"
    return path, writer(path)


@pytest.mark.parametrize(("layout", "writer", "decay", "step"), CASES,
                         ids=[c[0] for c in CASES])
def test_detects_and_starts_from_peer(layout: str, writer: Any, decay: float | None,
                                      step: int | None, tmp_path: Path) -> None:
    path, expected = _write(layout, writer, tmp_path)
    found = read_checkpoint(path, names=peers.net())
    assert found.layout == layout
    assert found.step == step
    kwargs = {} if decay is None else {"decay": decay}
    fresh = peers.net(seed=7)  # other weights: everything must come from the file
    ema = emakit.EMA.from_checkpoint(fresh, path, **kwargs)
    averaged = {k: v.double().numpy() if v.is_floating_point() else v.numpy()
                for k, v in ema.averaged().items()}
    for name, value in expected.items():
        np.testing.assert_array_equal(averaged[name], value, err_msg=name)
    if found.scope == "parameters":  # buffers are not averaged there: they start from the model
        bn = fresh.body[1]
        torch.testing.assert_close(ema.averaged()["body.1.running_mean"], bn.running_mean)
    assert ema.step == (step or 0)
    assert "ultralytics" not in sys.modules  # the pickled class was never imported
    # it goes on averaging
    with torch.no_grad():
        fresh.head.weight.add_(1.0)
    assert ema.update()


def test_recorded_decay_matches_the_library(tmp_path: Path) -> None:
    """torch-ema and diffusers record their decay; the emakit schedule gives the same numbers."""
    _needs("diffusers")
    _needs("torch-ema")
    from diffusers.training_utils import EMAModel
    from torch_ema import ExponentialMovingAverage

    model = peers.net()
    diff = EMAModel(model.parameters(), decay=0.95, use_ema_warmup=True, power=0.75,
                    update_after_step=2, min_decay=0.1, inv_gamma=3.0)
    tema = ExponentialMovingAverage(model.parameters(), decay=0.95)
    torch.save(diff.state_dict(), tmp_path / "d.pt")
    torch.save(tema.state_dict(), tmp_path / "t.pt")
    sched_d = emakit.schedules.from_dict(read_checkpoint(tmp_path / "d.pt", names=model).decay)
    sched_t = emakit.schedules.from_dict(read_checkpoint(tmp_path / "t.pt", names=model).decay)
    for t in range(1, 60):
        assert sched_d(t) == pytest.approx(diff.get_decay(t), abs=1e-15)
        assert sched_t(t) == pytest.approx(min(0.95, (1 + t) / (10 + t)), abs=1e-15)


def test_diffusers_without_warmup_asks_for_decay(tmp_path: Path) -> None:
    _needs("diffusers")
    path, _ = tmp_path / "d.pt", peers.write_diffusers(tmp_path / "d.pt", warmup=False)
    with pytest.raises(ValueError, match=r"does not record its decay exactly.*pass decay="):
        emakit.EMA.from_checkpoint(peers.net(), path)


def test_timm_without_decay_is_refused(tmp_path: Path) -> None:
    _needs("timm")
    path = tmp_path / "t.pth.tar"
    peers.write_timm(path)
    with pytest.raises(ValueError, match=r"timm layout does not record its decay.*half_life="):
        emakit.EMA.from_checkpoint(peers.net(), path)


def test_inert_reader_runs_no_code(tmp_path: Path) -> None:
    """A pickle whose reduce would run a command is read as an inert record, never executed."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    torch.save({"ema": {"w": torch.ones(2)}, "updates": 3, "payload": Evil()},
               tmp_path / "evil.pt")
    found = read_checkpoint(tmp_path / "evil.pt")
    assert found.layout == "ultralytics" and found.num_updates == 3
    assert not marker.exists()


def test_names_are_matched_through_wrapper_prefixes() -> None:
    wanted = ["fc.weight", "fc.bias"]
    for prefix, how in [("module.", "strip 'module.'"), ("_orig_mod.", "strip '_orig_mod.'"),
                        ("net.", "strip 'net.'"), ("", "as is")]:
        found = [prefix + n for n in wanted]
        renamed, label = match_names(found, wanted)
        assert label == how and renamed == dict(zip(found, wanted))
    renamed, label = match_names(["weight", "bias"], ["net.weight", "net.bias"])
    assert label == "add 'net.'" and renamed == {"weight": "net.weight", "bias": "net.bias"}


def test_shadow_list_needs_the_right_model(tmp_path: Path) -> None:
    _needs("torch-ema")
    path = tmp_path / "t.pt"
    peers.write_torch_ema(path)
    with pytest.raises(ValueError, match="holds 6 shadow tensors but 2 parameter names"):
        read_checkpoint(path, names=["a", "b"])
    numbered = read_checkpoint(path)
    assert next(iter(numbered.weights)) == "shadow_params.0"


def test_mismatched_model_is_refused_whole(tmp_path: Path) -> None:
    _needs("ema-pytorch")
    path = tmp_path / "e.pt"
    peers.write_ema_pytorch(path)
    other = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 3))
    with pytest.raises(emakit.StateDictError, match=r"does not fit this model.*missing|unexpec"):
        emakit.EMA.from_checkpoint(other, path, decay=0.9)
    wrong_shape = peers.net()
    wrong_shape.head = torch.nn.Linear(6, 4)
    with pytest.raises(emakit.StateDictError, match=r"e.pt.*head.weight: shape"):
        emakit.EMA.from_checkpoint(wrong_shape, path, decay=0.9)


def test_unknown_file_names_the_layouts(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"x.pt.*holds no EMA layout.*'epoch'.*Known layouts: "
                                         r"emakit, emakit-lightning, timm"):
        read_checkpoint(tmp_path / "x.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a checkpoint at all")
    with pytest.raises(ValueError, match=r"junk.pt.*not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "log.csv").write_text("step,loss\n1,0.5\n")
    with pytest.raises(ValueError, match=r"log.csv' is not a checkpoint emakit can read: it is "
                                         r"a text file \(it starts with 'step,loss'\)"):
        read_checkpoint(tmp_path / "log.csv")


def test_plain_weights_and_nested_emakit_state(tmp_path: Path) -> None:
    model = peers.net()
    ema = emakit.EMA(model, decay=0.9, every=2)
    peers.train(model, ema.update)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "step": 5},
               tmp_path / "train.pt")
    found = read_checkpoint(tmp_path / "train.pt")
    assert (found.layout, found.where, found.step) == ("emakit", "['ema']", peers.STEPS)
    again = emakit.EMA.from_checkpoint(peers.net(seed=3), tmp_path / "train.pt")
    assert again.every == 2 and again.num_updates == ema.num_updates
    for name, value in ema.averaged().items():
        assert torch.equal(again.averaged()[name], value)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert read_checkpoint(tmp_path / "plain.pt").layout == "plain"


def test_reading_does_not_import_the_library(tmp_path: Path) -> None:
    """Detection reads files only: a fresh interpreter imports none of the peers."""
    _needs("ema-pytorch")
    path = tmp_path / "e.pt"
    peers.write_ema_pytorch(path)
    code = ("import sys; from emakit.io.layouts import read_checkpoint; "
            f"print(read_checkpoint({str(path)!r}).layout); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ema_pytorch', 'timm', 'diffusers', 'torch_ema', 'lightning')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:2] == ["ema-pytorch", "[]"]


def test_weight_files_of_the_old_pt_layout_are_plain(tmp_path: Path) -> None:
    """emakit 0.1.0 wrote .pt weight files as {"tensors", "metadata"}; they still read."""
    torch.save({"tensors": {"w": torch.ones(2)}, "metadata": {"emakit.step": "3"}},
               tmp_path / "old.pt")
    found = read_checkpoint(tmp_path / "old.pt")
    assert (found.layout, list(found.weights), found.step) == ("plain", ["w"], 3)


class _Wrapper(torch.nn.Module):
    """What DDP (``module.``) and torch.compile (``_orig_mod.``) do to the names."""

    def __init__(self, inner: torch.nn.Module, attribute: str) -> None:
        super().__init__()
        self.add_module(attribute, inner)


def _trained_ema(source: Any) -> emakit.EMA:
    ema = emakit.EMA(source, decay=0.5)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    ema.update()
    return ema


@pytest.mark.parametrize("wrap", ["module.", "_orig_mod."])
@pytest.mark.parametrize("save", ["emakit.save", "torch.save"])
def test_emakit_file_of_a_wrapped_model(tmp_path: Path, wrap: str, save: str) -> None:
    """A file from a DDP / torch.compile model starts the plain model's EMA with its averages."""
    inner = peers.net()
    wrapped = _Wrapper(inner, wrap.rstrip("."))
    ema = _trained_ema(wrapped)
    assert ema.names[0].startswith(wrap)
    path = tmp_path / ("ema.safetensors" if save == "emakit.save" else "ema.pt")
    if save == "emakit.save":
        emakit.save(ema, path)
    else:
        torch.save({"ema": ema.state_dict()}, path)
    want = {n.removeprefix(wrap): v for n, v in ema.averaged().items()}
    for strict in (True, False):
        again = emakit.EMA.from_checkpoint(peers.net(seed=5), path, strict=strict)
        assert again.step == ema.step and again.num_updates == 1
        for name, value in again.averaged().items():
            assert torch.equal(value, want[name]), name


def test_emakit_file_of_another_model_never_falls_back(tmp_path: Path) -> None:
    """strict=False with no name in common raises; with some in common, warns naming the rest."""
    other = torch.nn.Sequential(collections.OrderedDict(enc=torch.nn.Linear(4, 6),
                                                        dec=torch.nn.Linear(6, 3)))
    emakit.save(_trained_ema(other), tmp_path / "other.safetensors")
    with pytest.raises(emakit.StateDictError,
                       match=r"other\.safetensors': none of the 4 names in the emakit checkpoint "
                             r"is tracked by this EMA.*never starts from the model's own"):
        emakit.EMA.from_checkpoint(peers.net(), tmp_path / "other.safetensors", strict=False)
    part = peers.net()
    ema = emakit.EMA(part, decay=0.5, policy=emakit.Policy(exclude=["head.*"]))
    emakit.save(ema, tmp_path / "part.safetensors")
    with pytest.warns(emakit.EMAWarning, match=r"started 7 of 9 tracked tensors from the "
                                                r"checkpoint.*missing \['head.weight', "
                                                r"'head.bias'\]"):
        emakit.EMA.from_checkpoint(peers.net(), tmp_path / "part.safetensors", strict=False,
                                   policy=emakit.Policy())  # track all: the file has 7
    again = emakit.EMA.from_checkpoint(peers.net(), tmp_path / "part.safetensors")
    assert again.names == ema.names  # by default the file's policy comes along
    with pytest.raises(emakit.StateDictError, match=r"none of the 4 names in the plain"):
        emakit.EMA.from_checkpoint(peers.net(), _plain(tmp_path, other), strict=False, decay=0.9)


def _plain(tmp_path: Path, model: torch.nn.Module) -> Path:
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    return tmp_path / "plain.pt"


def test_a_new_layout_is_one_module_in_the_registry(tmp_path: Path, monkeypatch) -> None:
    """A library's layout is a module with NAME and detect(); the reader tries FOREIGN in order."""
    import types

    from emakit.io import layouts
    from emakit.io.ema_checkpoint import EMACheckpoint

    def detect(path, where, obj, names):
        if "my_average" not in obj:
            return None
        return EMACheckpoint("mylib", path, where + "['my_average']", dict(obj["my_average"]),
                             step=7)

    mylib = types.SimpleNamespace(NAME="mylib", detect=detect)
    monkeypatch.setattr(layouts, "FOREIGN", (*layouts.FOREIGN, mylib))
    path = tmp_path / "mylib.pt"
    torch.save({"my_average": {"w": torch.ones(2)}, "other": 1}, path)
    found = read_checkpoint(path)
    assert (found.layout, found.where, found.step) == ("mylib", "['my_average']", 7)
    assert {m.NAME for m in layouts.FOREIGN[:-1]} == set(layouts.LAYOUTS) - {"emakit", "plain"}


def test_emakits_state_inside_a_lightning_checkpoint_and_a_checkpoint_folder(tmp_path: Path) -> None:
    """The Lightning callback's entry is read with every counter; a folder means its
    ema.safetensors (Hugging Face's checkpoint-N/ with emakit's callback)."""
    model = peers.net()
    ema = emakit.EMA(model, decay=emakit.schedules.TFWarmup(0.99), every=2)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1)
        ema.update()
    ckpt = {"state_dict": ema.model_state_dict(), "current_model_state": model.state_dict(),
            "global_step": 4, "callbacks": {"emakit.EMA": {
                "emakit": "lightning-callback/1", "ema": ema.state_dict(), "eval_on": "ema"}}}
    torch.save(ckpt, tmp_path / "last.ckpt")
    found = read_checkpoint(tmp_path / "last.ckpt")
    assert (found.layout, found.step, found.num_updates) == ("emakit", 4, 2)  # emakit's state
    assert found.where == "['callbacks']['emakit.EMA']['ema']"
    again = emakit.EMA.from_checkpoint(peers.net(), tmp_path / "last.ckpt")
    assert again.schedule == ema.schedule and again.every == 2
    for name, value in ema.state_dict()["shadows"].items():
        assert torch.equal(again.state_dict()["shadows"][name], value), name
    ckpt["callbacks"]["emakit.EMA[slow]"] = ckpt["callbacks"]["emakit.EMA"]
    torch.save(ckpt, tmp_path / "two.ckpt")
    with pytest.raises(emakit.StateDictError, match=r"2 emakit EMA states"):
        read_checkpoint(tmp_path / "two.ckpt")
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    emakit.save(ema, folder / "ema.safetensors")
    assert read_checkpoint(folder).step == 4
    with pytest.raises(FileNotFoundError, match=r"a folder without an ema.safetensors"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(("content", "kind"), [(b'{"a": 1}\n', "a text file"), (b"", "empty")])
def test_a_file_named_safetensors_that_is_not_one_says_what_it_is(tmp_path, content, kind):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"is not a checkpoint emakit can read: it is {kind}"):
        emakit.EMA.from_checkpoint({"w": np.zeros(2)}, path)
