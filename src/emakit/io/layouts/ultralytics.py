"""Ultralytics' checkpoints: ``ema``, a pickled fp16 ``nn.Module`` (read inert), and ``updates``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit.io import inert_pickle
from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts.recorded import as_int

__all__ = ["NAME", "detect"]

NAME = "ultralytics"


def detect(path: str, where: str, obj: Mapping[str, Any], names: list[str] | None
           ) -> EMACheckpoint | None:
    """Ultralytics' layout in ``obj``, or None."""
    if not ("ema" in obj and "updates" in obj):
        return None
    ema = obj["ema"]
    if inert_pickle.looks_like_module(ema):
        weights = inert_pickle.module_tensors(ema)
    elif isinstance(ema, Mapping):
        weights = dict(ema)
    else:
        return None
    updates = as_int(obj.get("updates"))
    return EMACheckpoint(NAME, path, where + "['ema']", weights, step=updates,
                         num_updates=updates, notes=(
                             "Ultralytics does not record the decay; its trainer's default is "
                             "ExponentialRamp(decay=0.9999, tau=2000)",
                             "Ultralytics stores the average in float16"))
