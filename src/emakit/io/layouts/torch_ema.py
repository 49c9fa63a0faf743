"""torch-ema's ``ExponentialMovingAverage.state_dict()``: a bare ``shadow_params`` list (names
from the model) with ``decay`` and ``num_updates`` (TF-style warmup when it counts updates)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit import schedules
from emakit.errors import StateDictError
from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts.recorded import as_float, as_int, names_note, shadow_list

__all__ = ["NAME", "detect"]

NAME = "torch-ema"


def detect(path: str, where: str, obj: Mapping[str, Any], names: list[str] | None
           ) -> EMACheckpoint | None:
    """torch-ema's layout in ``obj``, or None."""
    if not ("shadow_params" in obj and "decay" in obj and "num_updates" in obj):
        return None
    notes = [names_note(names)]
    weights = shadow_list(path, where, NAME, obj["shadow_params"], names)
    updates = as_int(obj["num_updates"])
    d = as_float(obj["decay"], path, where, "decay")
    try:
        decay = (schedules.Constant(d) if updates is None else
                 schedules.TFWarmup(d)).to_dict()
    except ValueError as exc:
        raise StateDictError(f"{path!r}{where}: 'decay' is not a valid decay ({exc})",
                             fix="The file is corrupt or was edited.") from None
    return EMACheckpoint(NAME, path, where + "['shadow_params']", weights,
                         step=updates, num_updates=updates, decay=decay, scope="parameters",
                         notes=tuple(notes))
