"""The benchmark models, built in plain torch (no downloads): parameter layouts of real models.

============  ===================  ==============================================
name          parameters / tensors  what it stands for
============  ===================  ==============================================
tiny-gpt      1.06M / 100           many small tensors (dispatch-bound)
resnet50      25.6M / 161 (+159     a CNN with BatchNorm buffers
              BN buffers)
gpt2-small    124M / 148            a transformer body (GPT-2 small)
linear-4x     302M / 8              a few huge tensors (bandwidth-bound)
llama-1b      1.0B / 146            GPU only: a 1B-parameter decoder
============  ===================  ==============================================

Example:
    >>> m = tiny_gpt()
    >>> sum(p.numel() for p in m.parameters()), len(list(m.parameters()))
    (1059584, 100)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["MODELS", "build"]


def tiny_gpt() -> nn.Module:
    """A tiny GPT-style stack: about 1.0M parameters in 100 tensors."""
    d = 128
    blocks: list[nn.Module] = [nn.Embedding(512, d)]
    for _ in range(8):
        blocks += [nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d),
                   nn.Linear(d, 192), nn.Linear(192, d)]
    blocks += [nn.LayerNorm(d), nn.Linear(d, 512, bias=False)]
    return nn.Sequential(*blocks)


def _bottleneck(cin: int, mid: int, stride: int) -> nn.Module:
    cout = mid * 4
    layers = nn.Sequential(
        nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid),
        nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid),
        nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
    )
    if stride != 1 or cin != cout:
        layers.append(nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)))
    return layers


def resnet50() -> nn.Module:
    """The parameter and buffer layout of ResNet-50 (25.6M parameters)."""
    blocks: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)]
    cin = 64
    for mid, n, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(n):
            blocks.append(_bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    blocks.append(nn.Linear(2048, 1000))
    return nn.Sequential(*blocks)


def _decoder(vocab: int, positions: int, d: int, layers: int, ff: int) -> nn.Module:
    blocks: list[nn.Module] = [nn.Embedding(vocab, d), nn.Embedding(positions, d)]
    for _ in range(layers):
        blocks += [nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d),
                   nn.Linear(d, ff), nn.Linear(ff, d)]
    blocks.append(nn.LayerNorm(d))
    return nn.Sequential(*blocks)


def gpt2_small() -> nn.Module:
    """The GPT-2 small body: 124M parameters in 148 tensors (tied head not repeated)."""
    return _decoder(50257, 1024, 768, 12, 3072)


def linear_4x() -> nn.Module:
    """Four large Linear layers: 302M parameters in 8 tensors."""
    return nn.Sequential(*[nn.Linear(8192, 9216) for _ in range(4)])


def llama_1b() -> nn.Module:
    """A 1.0B-parameter decoder (d=2048, 16 layers, ff=8192; GPU benchmarks)."""
    return _decoder(32000, 2048, 2048, 16, 8192)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "tiny-gpt": tiny_gpt, "resnet50": resnet50, "gpt2-small": gpt2_small,
    "linear-4x": linear_4x, "llama-1b": llama_1b,
}


def build(name: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build model ``name`` (a key of :data:`MODELS`) on ``device`` in ``dtype``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}.")
    torch.manual_seed(0)
    with torch.device(device):
        model = MODELS[name]()
    return model.to(dtype)
