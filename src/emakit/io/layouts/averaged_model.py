"""torch's ``swa_utils.AveragedModel``: ``module.*`` with ``n_averaged``; no decay."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts.recorded import as_int

__all__ = ["NAME", "detect"]

NAME = "averaged-model"


def detect(path: str, where: str, obj: Mapping[str, Any], names: list[str] | None
           ) -> EMACheckpoint | None:
    """AveragedModel's layout in ``obj``, or None."""
    if "n_averaged" not in obj:
        return None
    weights = {k[len("module."):]: v for k, v in obj.items()
               if isinstance(k, str) and k.startswith("module.")}
    if not weights:
        return None
    return EMACheckpoint(NAME, path, where, weights, num_updates=as_int(obj["n_averaged"]),
                         notes=("AveragedModel records the update count, not the decay",))
