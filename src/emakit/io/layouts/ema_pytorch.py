"""ema-pytorch's ``EMA.state_dict()``: ``ema_model.*`` with ``initted`` and ``step``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts.recorded import as_flag, as_int

__all__ = ["NAME", "detect"]

NAME = "ema-pytorch"


def detect(path: str, where: str, obj: Mapping[str, Any], names: list[str] | None
           ) -> EMACheckpoint | None:
    """ema-pytorch's layout in ``obj``, or None."""
    ema_keys = [k for k in obj if isinstance(k, str) and k.startswith("ema_model.")]
    if not (ema_keys and ("initted" in obj or "step" in obj)):
        return None
    weights = {k[len("ema_model."):]: obj[k] for k in ema_keys}
    notes = ["ema-pytorch records its update count (step) but not the decay"]
    if "initted" in obj and as_flag(obj["initted"]) is False:
        notes.append("initted is False: the average was never updated")
    return EMACheckpoint(NAME, path, where, weights, step=as_int(obj.get("step")),
                         notes=tuple(notes))
