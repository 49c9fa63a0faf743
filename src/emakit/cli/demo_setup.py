"""The demo's data and network, shared by ``emakit demo`` and ``emakit demo --posthoc``.

The digits data (or ``--data FILE.npz``), split 60 / 20 / 20 into train, validation and test;
a fifth of the training labels corrupted; the network (a small CNN for images, an MLP for
features) and its evaluation. The same seed gives the same data and the same initial network.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from emakit.cli.errors import CLIError

__all__ = ["LABEL_NOISE", "DemoData", "build_model", "evaluate_model", "load_data",
           "prepare_data", "split_indices"]

LABEL_NOISE = 0.2


# ----------------------------------------------------------------------------------- data
def load_data(path: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Features (float32, samples first) and labels 0..K-1, from ``path`` or sklearn's digits."""
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
        return x, digits.target.astype(np.int64), "scikit-learn digits (1797 8x8 images)"
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r}: no such file.")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            missing = {"X", "y"} - files
            if missing:
                raise CLIError(f"--data {str(path)!r} lacks the array(s) {sorted(missing)}; it has "
                               f"{sorted(files)}. Save it with np.savez(path, X=features, "
                               "y=labels).")
            x, y = z["X"], z["y"]
    except (OSError, ValueError) as exc:
        raise CLIError(f"--data {str(path)!r} is not a readable .npz file ({exc}).") from exc
    if x.dtype.kind not in "biuf" or x.ndim not in (2, 3, 4):
        raise CLIError(f"--data: X must be numbers shaped (N, features), (N, H, W) or "
                       f"(N, C, H, W); got dtype {x.dtype} shape {x.shape}.")
    if y.ndim != 1 or len(y) != len(x):
        raise CLIError(f"--data: y must be 1-D with one label per row of X ({len(x)}), got "
                       f"shape {y.shape}.")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise CLIError("--data: y must hold integer class labels, got non-integer values.")
    if y.dtype.kind not in "biuf":
        raise CLIError(f"--data: y must hold integer class labels, got dtype {y.dtype}.")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise CLIError("--data: X holds NaN or infinite values; clean them first.")
    classes, labels = np.unique(y, return_inverse=True)
    if len(classes) < 2 or len(x) < 20:
        raise CLIError(f"--data: need at least 20 samples and 2 classes, got {len(x)} samples "
                       f"and {len(classes)} class(es).")
    if x.ndim == 3:
        x = x[:, None]
    scale = np.abs(x).max()
    if scale > 0:
        x = x / scale
    return x, labels.astype(np.int64), f"{path.name} ({len(x)} samples, {len(classes)} classes)"


def split_indices(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test indices: 60 / 20 / 20 % of a permutation."""
    order = rng.permutation(n)
    a, b = int(0.6 * n), int(0.8 * n)
    return order[:a], order[a:b], order[b:]


class DemoData(NamedTuple):
    """The demo's data: every array, the split and the torch tensors of each part."""

    x_all: np.ndarray
    source: str
    classes: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    tensors: tuple[Any, Any, Any, Any, Any, Any]  # x_train, y_train (noisy), x_val, y_val, ...


def prepare_data(args: argparse.Namespace, torch: Any) -> DemoData:
    """Load the data, seed torch and numpy with ``--seed``, split it, corrupt a fifth of the
    training labels; the same seed gives the same data and the same initial model."""
    x_all, y_all, source = load_data(args.data)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tr, va, te = split_indices(len(x_all), rng)
    classes = int(y_all.max()) + 1
    y_train = y_all[tr].copy()
    flip = rng.random(len(tr)) < LABEL_NOISE
    y_train[flip] = rng.integers(0, classes, int(flip.sum()))
    tensors = (torch.from_numpy(x_all[tr]), torch.from_numpy(y_train),
               torch.from_numpy(x_all[va]), torch.from_numpy(y_all[va]),
               torch.from_numpy(x_all[te]), torch.from_numpy(y_all[te]))
    return DemoData(x_all, source, classes, tr, va, te, tensors)


# ---------------------------------------------------------------------------------- model
def build_model(x_shape: tuple[int, ...], classes: int) -> Any:
    """The demo's network for inputs of ``x_shape``: an MLP for features, a small CNN for images."""
    from torch import nn

    if len(x_shape) == 2:
        return nn.Sequential(nn.Linear(x_shape[1], 128), nn.BatchNorm1d(128), nn.ReLU(),
                             nn.Linear(128, classes))
    channels = x_shape[1]
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, classes))


def evaluate_model(model: Any, x: Any, y: Any) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)``, in eval mode."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(1) == y).float().mean().item()
    model.train()
    return acc, loss
