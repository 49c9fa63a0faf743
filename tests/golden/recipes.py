"""The recipes behind the golden checkpoints in this folder (one set per format version).

``python tests/golden/recipes.py`` (re)writes the files for the current format version; the
files of released versions are committed and never rewritten: tests/test_checkpoint.py checks
that they keep loading and hold what the recipe says (against a float64 oracle).

The weights at step ``t`` are a closed form, ``base * (1 + 0.1 t)`` (integer buffers ``t``),
so the expected averages need no training to reproduce.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
TORCH_STEPS = 7  # every=2: updates at steps 2, 4, 6; step 7 is seen but skipped
NUMPY_STEPS = 4


def torch_model() -> Any:
    """bf16 Linear + BatchNorm (fp32 shadows of a bf16 model, an int64 counter)."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    torch_weights_at(model, 0)
    return model.to(torch.bfloat16)


def base(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The step-0 value of a tensor: a fixed function of its name and shape."""
    n = int(np.prod(shape)) if shape else 1
    seed = sum(map(ord, name))
    return (np.arange(n, dtype=np.float64).reshape(shape) + 1.0) * (0.25 + seed % 7 / 8.0)


def weights_at(name: str, shape: tuple[int, ...], t: int) -> np.ndarray:
    return base(name, shape) * (1.0 + 0.1 * t)


def torch_weights_at(model: Any, t: int) -> None:
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                value = weights_at(name, tuple(tensor.shape), t)
                tensor.copy_(torch.from_numpy(value))
            else:
                tensor.fill_(t)


def torch_ema(model: Any) -> Any:
    import emakit

    return emakit.EMA(model, decay=emakit.schedules.TFWarmup(0.9), every=2)


def numpy_weights(t: int) -> dict[str, np.ndarray]:
    return {"w": weights_at("w", (2, 3), t), "b": weights_at("b", (3,), t)}


def numpy_ema(weights: dict[str, np.ndarray]) -> Any:
    import emakit

    return emakit.EMA(weights, half_life=3.0, start="zeros")


def write(version: int) -> None:
    import torch

    import emakit

    folder = HERE / f"v{version}"
    folder.mkdir(exist_ok=True)
    model = torch_model()
    ema = torch_ema(model)
    for t in range(1, TORCH_STEPS + 1):
        torch_weights_at(model, t)
        ema.update()
    emakit.save(ema, folder / "torch-bf16-model.safetensors", metadata={"recipe": "torch"})
    torch.save({"ema": ema.state_dict(), "step": TORCH_STEPS}, folder / "torch-state.pt")
    weights = numpy_weights(0)
    nema = numpy_ema(weights)
    for t in range(1, NUMPY_STEPS + 1):
        for k, v in numpy_weights(t).items():
            weights[k][...] = v
        nema.update()
    emakit.save(nema, folder / "numpy-zeros.safetensors", metadata={"recipe": "numpy"})


if __name__ == "__main__":
    import emakit

    write(int(sys.argv[1]) if len(sys.argv) > 1 else emakit.FORMAT_VERSION)
