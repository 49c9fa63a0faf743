"""Train a small classifier on noisy synthetic data with an EMA of its weights, then resume.

Runs in a few seconds on a CPU and downloads nothing:

    python examples/quickstart.py
"""

from __future__ import annotations

import io

import torch
from torch import nn

import emakit


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    y = (x @ w + 1.5 * torch.randn(n, 4, generator=g)).argmax(1)  # noisy labels
    return x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def main() -> None:
    torch.manual_seed(0)
    x_train, y_train = make_data(4096, seed=1)
    x_val, y_val = make_data(2048, seed=2)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)  # deliberately noisy

    ema = emakit.EMA(model, half_life=50)  # 1. an EMA of every parameter and buffer
    ema.attach(opt)                        # 2. updated after every optimizer.step()
    print(f"{ema!r}\n")
    print("epoch  raw acc  EMA acc")
    for epoch in range(1, 9):
        for i in range(0, len(x_train), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[i:i + 64]), y_train[i:i + 64]).backward()
            opt.step()
        raw = accuracy(model, x_val, y_val)
        with ema.swapped():                # 3. evaluate with the EMA weights
            smooth = accuracy(model, x_val, y_val)
        print(f"{epoch:5d}  {raw:7.3f}  {smooth:7.3f}")

    # A checkpoint holds both; resuming continues the same average (same step, same shadows).
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = emakit.EMA(model, half_life=50)
    resumed.load_state_dict(ckpt["ema"])
    pairs = zip(resumed.averaged().values(), ema.averaged().values())
    same = all(torch.equal(a, b) for a, b in pairs)
    print(f"\nresumed at step {resumed.step}; shadows identical: {same}")


if __name__ == "__main__":
    main()
