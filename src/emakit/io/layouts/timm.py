"""timm's ``CheckpointSaver``: the average under ``state_dict_ema``; neither step nor decay."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts.recorded import short_repr

__all__ = ["NAME", "detect"]

NAME = "timm"


def detect(path: str, where: str, obj: Mapping[str, Any], names: list[str] | None
           ) -> EMACheckpoint | None:
    """timm's layout in ``obj``, or None."""
    if not isinstance(obj.get("state_dict_ema"), Mapping):
        return None
    return EMACheckpoint(NAME, path, where + "['state_dict_ema']", dict(obj["state_dict_ema"]),
                         notes=("timm records neither the step nor the decay (epoch: "
                                f"{short_repr(obj.get('epoch', '?'))})",))
