"""Checkpoints written by other EMA libraries, for the import tests.

Each ``write_*`` function trains a small model (Linear + BatchNorm + Linear) for a few SGD steps
with the library's own EMA class, saves the checkpoint the way that library (or its usual
trainer) does, and returns the library's EMA weights by model name, as float64 numpy arrays, for
comparison. Real library code runs wherever the library installs here without a CUDA torch
(the ``peers`` extra). The exceptions, built to match the library's source:

- timm: the real ``ModelEmaV3`` (loaded from its file: ``timm.utils`` imports torchvision, whose
  PyPI wheel does not work with the CPU torch), saved as ``CheckpointSaver._save`` does.
- Ultralytics: needs torchvision too; the checkpoint is built as ``BaseTrainer.save_model`` writes
  it, with the EMA pickled as an fp16 module whose class lives in a module named
  ``ultralytics.nn.tasks`` that exists only in the writing subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emakit.bench.contenders import timm_model_ema

STEPS = 5


class Net(nn.Module):
    """The model every peer averages."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def train(model: nn.Module, after_step: Any, steps: int = STEPS) -> None:
    """SGD on fixed random data, calling ``after_step()`` after each optimizer step."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        after_step()


def as_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


def write_timm(path: Path) -> dict[str, np.ndarray]:
    model = net()
    ema = timm_model_ema().ModelEmaV3(model, decay=0.9)
    counter = [0]

    def after() -> None:
        counter[0] += 1
        ema.update(model, step=counter[0])

    train(model, after)
    torch.save({"epoch": 0, "arch": "net", "state_dict": model.state_dict(), "version": 2,
                "state_dict_ema": ema.module.state_dict(), "metric": 0.5}, path)
    return as_numpy(ema.module.state_dict())


def write_ema_pytorch(path: Path) -> dict[str, np.ndarray]:
    from ema_pytorch import EMA

    model = net()
    ema = EMA(model, beta=0.9, update_after_step=0, update_every=1)
    train(model, ema.update)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, path)
    return as_numpy(ema.ema_model.state_dict())


def write_torch_ema(path: Path) -> dict[str, np.ndarray]:
    from torch_ema import ExponentialMovingAverage

    model = net()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    train(model, ema.update)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, path)
    names = [n for n, _ in model.named_parameters()]
    return as_numpy(dict(zip(names, ema.shadow_params)))


def write_diffusers(path: Path, *, warmup: bool = True) -> dict[str, np.ndarray]:
    from diffusers.training_utils import EMAModel

    model = net()
    ema = EMAModel(model.parameters(), decay=0.95, use_ema_warmup=warmup, power=0.75)
    train(model, lambda: ema.step(model.parameters()))
    torch.save(ema.state_dict(), path)
    names = [n for n, _ in model.named_parameters()]
    return as_numpy(dict(zip(names, ema.shadow_params)))


def write_averaged_model(path: Path) -> dict[str, np.ndarray]:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = net()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    train(model, lambda: ema.update_parameters(model))
    torch.save(ema.state_dict(), path)
    return as_numpy(ema.module.state_dict())


LIGHTNING_SCRIPT = """
import sys, warnings, torch
import lightning.pytorch as pl
from lightning.pytorch.callbacks import EMAWeightAveraging
sys.path.insert(0, {tests!r})
from peers import net
warnings.filterwarnings("ignore")

class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net()
    def training_step(self, batch, i):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)

gen = torch.Generator().manual_seed(1)
data = torch.utils.data.TensorDataset(torch.randn(80, 4, generator=gen),
                                      torch.randint(0, 3, (80,), generator=gen))
callback = EMAWeightAveraging(decay=0.9)
trainer = pl.Trainer(max_epochs=1, callbacks=[callback], logger=False, accelerator="cpu",
                     enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, default_root_dir={root!r})
trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
trainer.save_checkpoint({path!r})
torch.save(callback._average_model.module.state_dict(), {expected!r})
"""


def write_lightning(path: Path) -> dict[str, np.ndarray]:
    """A real Lightning Trainer run with ``EMAWeightAveraging`` (in a subprocess)."""
    expected = path.with_suffix(".expected.pt")
    script = LIGHTNING_SCRIPT.format(tests=str(Path(__file__).parent), root=str(path.parent),
                                     path=str(path), expected=str(expected))
    _run(script)
    state = torch.load(expected, weights_only=True)
    return as_numpy({k.removeprefix("net."): v for k, v in state.items()})


ULTRALYTICS_MODULE = """
import torch
from torch import nn

class DetectionModel(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.body = inner.body
        self.head = inner.head
        self.yaml = {"nc": 3}
        self.names = {0: "a", 1: "b", 2: "c"}
        self.args = {"imgsz": 64}

    def forward(self, x):
        return self.head(self.body(x))
"""

ULTRALYTICS_SCRIPT = """
import copy, math, sys, datetime, torch
sys.path.insert(0, {pkg!r})
sys.path.insert(0, {tests!r})
from ultralytics.nn.tasks import DetectionModel
from peers import net, train

model = DetectionModel(net())
ema = copy.deepcopy(model).eval()          # ModelEMA.__init__
for p in ema.parameters():
    p.requires_grad_(False)
updates = 0
def after():
    global updates
    updates += 1                            # ModelEMA.update, decay(x) = d * (1 - exp(-x / tau))
    d = 0.9 * (1 - math.exp(-updates / 3.0))
    msd = model.state_dict()
    with torch.no_grad():
        for k, v in ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.lerp_(msd[k].detach(), 1 - d)
train(model, after)
torch.save(ema.state_dict(), {expected!r})
torch.save({{"epoch": 0, "best_fitness": 0.5,
            "stopper": {{"best_fitness": 0.5, "best_epoch": 0}},
            "model": None, "ema": copy.deepcopy(ema).half(), "updates": updates,
            "modelopt": None, "optimizer": None, "scaler": {{}},
            "train_args": {{"model": "yolo11n.yaml", "epochs": 1}},
            "train_metrics": {{"fitness": 0.5}}, "train_results": {{}},
            "date": datetime.datetime(2026, 1, 1).isoformat(), "version": "8.4.190",
            "git": {{"root": None}}, "license": "AGPL-3.0 (https://ultralytics.com/license)",
            "docs": "https://docs.ultralytics.com"}}, {path!r})
"""


def write_ultralytics(path: Path) -> dict[str, np.ndarray]:
    """An Ultralytics-layout checkpoint whose module class cannot be imported by the reader."""
    pkg = path.parent / "fake_site"
    tasks = pkg / "ultralytics" / "nn"
    tasks.mkdir(parents=True, exist_ok=True)
    (pkg / "ultralytics" / "__init__.py").write_text("")
    (tasks / "__init__.py").write_text("")
    (tasks / "tasks.py").write_text(textwrap.dedent(ULTRALYTICS_MODULE))
    expected = path.with_suffix(".expected.pt")
    _run(ULTRALYTICS_SCRIPT.format(pkg=str(pkg), tests=str(Path(__file__).parent),
                                   expected=str(expected), path=str(path)))
    state = torch.load(expected, weights_only=True)
    return as_numpy({k: v.half() if v.is_floating_point() else v for k, v in state.items()})


def _run(script: str) -> None:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        raise RuntimeError(f"peer script failed:\n{proc.stdout}\n{proc.stderr}")
