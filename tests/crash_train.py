"""A training loop with an EMA that checkpoints and resumes; the crash tests SIGKILL it.

    python tests/crash_train.py DIR --steps 60 --save-every 5 --mode emakit|torch
    python tests/crash_train.py DIR --mode overwrite --steps 200

It resumes from the last complete checkpoint in DIR when there is one, prints ``step N``,
``save-begin N`` and ``save-end N`` (flushed) so the test can pick its moment, and writes
``final.pt`` (model, optimizer and EMA state) at the end.

- The model is bf16 (Linear + BatchNorm + Linear) with fp32 shadows, SGD with momentum.
- The EMA has a warmup schedule and ``every=3``; ``update()`` is called without a step, so the
  step counter itself must survive the resume.
- The batch of step ``t`` is drawn from a generator seeded with ``t``: no RNG state to carry.
- ``--mode emakit``: each checkpoint is a folder written as ``ckpt-N.tmp`` (``emakit.save`` for the
  EMA, ``torch.save`` for model and optimizer) and renamed to ``ckpt-N`` when complete.
- ``--mode torch``: one file, ``train.pt``, holding ``ema.state_dict()`` beside the model,
  replaced atomically through :func:`emakit.io.atomic_path`.
- ``--mode overwrite``: rewrites one large ``emakit.save`` file over and over (shadows all equal
  to the iteration number), to be killed mid-write.
- ``--pause-at N``: in save ``N`` (step or iteration), the first atomic replace prints
  ``mid-write N`` and waits instead of renaming: the temporary is written and the old file is
  still in place, so a kill there lands inside a write whatever the machine's load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

import emakit
from emakit.io import atomic_path


def pause_in_writes(at: int) -> list[int]:
    """Make the first ``os.replace`` of save ``at`` stop before renaming; returns the save counter.

    The caller sets ``counter[0]`` to the number of the save in progress.
    """
    counter = [0]
    replace = os.replace

    def paused(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if counter[0] == at:
            print(f"mid-write {at}", flush=True)
            time.sleep(600)  # the test kills us here
        replace(src, dst)

    os.replace = paused  # type: ignore[assignment]
    return counter


def build() -> tuple[nn.Module, torch.optim.Optimizer, emakit.EMA]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Linear(16, 4)).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = emakit.EMA(model, decay=emakit.schedules.InverseGamma(power=0.75, max_decay=0.995),
                     every=3)
    return model, opt, ema


def train_step(model: nn.Module, opt: torch.optim.Optimizer, t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(32, 8, generator=gen).to(torch.bfloat16)
    y = torch.randint(0, 4, (32,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(mode: str, folder: Path, t: int, model: nn.Module, opt: torch.optim.Optimizer,
         ema: emakit.EMA) -> None:
    train_state = {"step": t, "model": model.state_dict(), "optimizer": opt.state_dict()}
    if mode == "torch":
        train_state["ema"] = ema.state_dict()
        with atomic_path(folder / "train.pt") as tmp:
            torch.save(train_state, tmp)
        return
    tmp_dir = folder / f"ckpt-{t:06d}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    emakit.save(ema, tmp_dir / "ema.safetensors")
    with atomic_path(tmp_dir / "train.pt") as tmp:
        torch.save(train_state, tmp)
    os.rename(tmp_dir, folder / f"ckpt-{t:06d}")
    _fsync_dir(folder)
    for old in folder.glob("ckpt-*"):
        if old.name != f"ckpt-{t:06d}" and not old.name.endswith(".tmp"):
            shutil.rmtree(old)


def resume(mode: str, folder: Path, model: nn.Module, opt: torch.optim.Optimizer,
           ema: emakit.EMA) -> int:
    if mode == "torch":
        path = folder / "train.pt"
        if not path.exists():
            return 0
        state = torch.load(path, weights_only=True)
        ema.load_state_dict(state["ema"])
    else:
        done = sorted(p for p in folder.glob("ckpt-*") if not p.name.endswith(".tmp"))
        if not done:
            return 0
        state = torch.load(done[-1] / "train.pt", weights_only=True)
        emakit.load(ema, done[-1] / "ema.safetensors")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if ema.step != state["step"]:
        raise RuntimeError(f"EMA step {ema.step} != checkpoint step {state['step']}")
    return int(state["step"])


def overwrite(folder: Path, steps: int, counter: list[int]) -> None:
    weights = {"w": torch.zeros(2_000_000)}
    ema = emakit.EMA(weights, decay=0.0)
    for i in range(1, steps + 1):
        weights["w"].fill_(float(i))
        ema.update()
        counter[0] = i
        print(f"save-begin {i}", flush=True)
        emakit.save(ema, folder / "big.safetensors")
        print(f"save-end {i}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--mode", choices=("emakit", "torch", "overwrite"), default="emakit")
    parser.add_argument("--pause-at", type=int, default=-1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    counter = pause_in_writes(args.pause_at)
    if args.mode == "overwrite":
        overwrite(args.folder, args.steps, counter)
        return
    model, opt, ema = build()
    start = resume(args.mode, args.folder, model, opt, ema)
    print(f"resumed {start}", flush=True)
    for t in range(start + 1, args.steps + 1):
        train_step(model, opt, t)
        ema.update()
        print(f"step {t}", flush=True)
        if t % args.save_every == 0:
            counter[0] = t
            print(f"save-begin {t}", flush=True)
            save(args.mode, args.folder, t, model, opt, ema)
            print(f"save-end {t}", flush=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "ema": ema.state_dict()}, args.folder / "final.pt")
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
