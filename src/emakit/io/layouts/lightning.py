"""Lightning's ``WeightAveraging`` / ``EMAWeightAveraging``: the average is the checkpoint's
``state_dict``, the training weights ``current_model_state``; the step is recorded, not the
decay."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts.recorded import as_int

__all__ = ["NAME", "detect"]

NAME = "lightning"


def detect(path: str, where: str, obj: Mapping[str, Any], names: list[str] | None
           ) -> EMACheckpoint | None:
    """Lightning's weight-averaging layout in ``obj``, or None."""
    if not (isinstance(obj.get("current_model_state"), Mapping) and
            isinstance(obj.get("state_dict"), Mapping)):
        return None
    averaging = obj.get("averaging_state")
    averaging = averaging if isinstance(averaging, Mapping) else {}
    return EMACheckpoint(NAME, path, where + "['state_dict']", dict(obj["state_dict"]),
                         step=as_int(obj.get("global_step")),
                         num_updates=as_int(averaging.get("n_averaged")),
                         notes=("Lightning records the step but not the decay",))
