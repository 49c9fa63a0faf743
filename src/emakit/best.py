"""Keep the best EMA weights by a validation metric (as a Keras ``on_epoch_end`` callback would).

:class:`KeepBest` evaluates under the EMA weights, writes them to a file when the metric improves,
and puts the training weights back before training goes on. What it writes is always built from the
EMA's shadows (:meth:`emakit.EMA.model_state_dict`), never read from the model, so the training
weights cannot end up in the file whatever the swap state; and the file is a plain state dict that
loads into a plain model with ``model.load_state_dict`` (no emakit needed).

Improvement, for ``mode="max"``: ``metric > best + min_delta``; for ``mode="min"``:
``metric < best - min_delta``. The first finite metric always improves; NaN never does.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from emakit.conversions import real_in_range
from emakit.ema import EMA
from emakit.errors import EMAWarning, user_stacklevel
from emakit.io.weights import SUFFIXES, write_weights

__all__ = ["KeepBest"]

Saver = Callable[[dict[str, Any], Path, dict[str, str]], None]


def _as_float(metric: object) -> float:
    """A Python float from a number, a numpy scalar or a one-element tensor."""
    if isinstance(metric, bool):
        raise TypeError(f"metric must be a number, got {metric!r}.")
    if isinstance(metric, numbers.Real):
        return float(metric)
    item = getattr(metric, "item", None)
    size = getattr(metric, "numel", getattr(metric, "size", None))
    size = size() if callable(size) else size
    if item is not None and size == 1:
        value: object = item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise TypeError(f"metric must be a number (or a one-element tensor/array), got {metric!r} "
                    f"of type {type(metric).__name__}.")


def _rank0s(value: float, ema: EMA) -> float:
    """``value``, or for a sharded EMA rank 0's (every rank saves, or none does: the save is
    a collective, so the ranks must agree even when their metrics differ)."""
    if not ema.parts.tracked.specs:  # no sharded tensor (readable while swapped in, too)
        return value
    from emakit.distributed.agree import from_rank0

    return from_rank0(lambda: value, collective=True)


def _check_format(path: Path, ema: EMA) -> None:
    """Refuse a file format that could not hold this EMA's weights."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        bf16 = [n for n, d in ema.source_dtypes().items() if d == "bfloat16"]
        if bf16:
            raise ValueError(f"path {str(path)!r}: .npz (numpy) has no bfloat16, and the model "
                             f"has {len(bf16)} bfloat16 tensor(s) (e.g. {bf16[0]!r}). Use "
                             ".safetensors or .pt.")
    if suffix in (".pt", ".pth"):
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise ValueError(f"path {str(path)!r}: writing .pt needs torch, which is not "
                             "installed. Use .safetensors or .npz.")


class KeepBest:
    """Save the EMA weights whenever a validation metric improves.

    Args:
        ema: the :class:`emakit.EMA` whose weights are evaluated and saved.
        path: the file to keep the best weights in (``.safetensors``, ``.npz`` for numpy,
            ``.pt``); written atomically, so an interrupted save leaves the previous best intact.
        mode: ``"max"`` (accuracy) or ``"min"`` (loss).
        min_delta: how much better than the best a metric must be to count, >= 0.
        save: optional ``save(tensors, path, metadata)`` to write the file yourself.

    Example:
        >>> import numpy as np, pathlib, tempfile
        >>> import emakit
        >>> w = {"w": np.zeros(2)}
        >>> ema = emakit.EMA(w, decay=0.5)
        >>> keep = emakit.KeepBest(ema, pathlib.Path(tempfile.mkdtemp()) / "best.npz")
        >>> for target in (1.0, 2.0, 3.0):
        ...     w["w"][:] = target
        ...     _ = ema.update()
        ...     score = keep.evaluate(lambda: -abs(w["w"][0] - 1.0))   # sees the EMA weights
        >>> keep.best, keep.best_step, w["w"]                            # training weights back
        (-0.25, 2, array([3., 3.]))
        >>> np.load(keep.path)["w"]
        array([1.25, 1.25])
    """

    def __init__(
        self,
        ema: EMA,
        path: str | os.PathLike[str],
        *,
        mode: Literal["max", "min"] = "max",
        min_delta: float = 0.0,
        save: Saver | None = None,
    ) -> None:
        if not isinstance(ema, EMA):
            raise TypeError(f"ema must be an emakit.EMA, got {type(ema).__name__}.")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' (higher is better) or 'min' (lower is better), "
                             f"got {mode!r}.")
        delta = real_in_range("min_delta", min_delta, low=0.0, high=math.inf, high_open=True)
        self.path = Path(path)
        if save is None and self.path.suffix.lower() not in SUFFIXES:
            raise ValueError(f"path {str(path)!r} must end in one of {', '.join(SUFFIXES)} (or "
                             "pass save= to write the file yourself).")
        if save is not None and not callable(save):
            raise TypeError(f"save must be callable as save(tensors, path, metadata), got "
                            f"{type(save).__name__}.")
        if save is None:
            _check_format(self.path, ema)  # now, not at the first improvement mid-training
        self.ema = ema
        self.mode = mode
        self.min_delta = delta
        self._save = save
        self.best: float | None = None
        self.best_step: int | None = None
        self.saves = 0

    def __repr__(self) -> str:
        return (f"KeepBest(path={str(self.path)!r}, mode={self.mode!r}, "
                f"min_delta={self.min_delta}, best={self.best}, best_step={self.best_step})")

    def improves(self, metric: float) -> bool:
        """True if ``metric`` beats the best so far by more than ``min_delta``."""
        value = _as_float(metric)
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def observe(self, metric: Any, *, sanity_check: bool = False) -> bool:
        """Record a metric measured on the EMA weights; save them if it improves.

        Use this when you evaluated under ``ema.swapped()`` yourself (:meth:`evaluate` does both).

        Args:
            metric: the validation metric of the EMA weights (number or one-element tensor).
            sanity_check: True for a framework's sanity-check pass (e.g. Lightning's): ignored.

        Returns:
            True if the metric improved and the weights were saved.
        """
        if sanity_check:
            return False
        value = _as_float(metric)
        value = _rank0s(value, self.ema)
        if math.isnan(value):
            warnings.warn(f"KeepBest: the metric is NaN at step {self.ema.step}; the best "
                          f"weights ({self.path}) are kept as they are.", EMAWarning,
                          stacklevel=user_stacklevel())
            return False
        if not self.improves(value):
            return False
        tensors = self.ema.model_state_dict(device="cpu")
        metadata = {"emakit.kind": "best_ema", "emakit.metric": repr(value),
                    "emakit.mode": self.mode, "emakit.step": str(self.ema.step),
                    "emakit.num_updates": str(self.ema.num_updates)}
        if self._save is not None:
            self._save(tensors, self.path, metadata)
        else:
            write_weights(tensors, self.path, metadata=metadata)
        self.best, self.best_step = value, self.ema.step
        self.saves += 1
        return True

    def evaluate(self, fn: Callable[[], Any], *, sanity_check: bool = False) -> float:
        """Run ``fn()`` with the EMA weights swapped in; keep them if its metric improves.

        The training weights are back (bitwise) when this returns or raises.

        Args:
            fn: evaluates the model (which now holds the EMA weights) and returns the metric.
            sanity_check: True for a sanity-check pass: evaluated, never saved.

        Returns:
            The metric, as a float.
        """
        with self.ema.swapped():
            metric = _as_float(fn())
        self.observe(metric, sanity_check=sanity_check)
        return metric

    def state_dict(self) -> dict[str, Any]:
        """The best metric and its step, so a resumed run does not overwrite a better file."""
        return {"best": self.best, "best_step": self.best_step, "mode": self.mode,
                "min_delta": self.min_delta, "saves": self.saves}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the mode must match (a 'min' best is no 'max' best)."""
        if not isinstance(state, Mapping) or "best" not in state:
            raise ValueError(f"not a KeepBest state: {state!r}.")
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"the saved KeepBest state has mode={state['mode']!r}, this one "
                             f"mode={self.mode!r}; they rank metrics oppositely.")
        best = state["best"]
        self.best = None if best is None else _as_float(best)
        step = state.get("best_step")
        self.best_step = None if step is None else int(step)
        self.saves = int(state.get("saves", 0))
