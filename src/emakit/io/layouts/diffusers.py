"""diffusers' ``EMAModel.state_dict()``: a bare ``shadow_params`` list (names from the model) with
``optimization_step`` and the warmup settings, from which the decay is rebuilt exactly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit import schedules
from emakit.errors import StateDictError
from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts.recorded import as_float, as_int, names_note, shadow_list, short_repr

__all__ = ["NAME", "detect"]

NAME = "diffusers"


def detect(path: str, where: str, obj: Mapping[str, Any], names: list[str] | None
           ) -> EMACheckpoint | None:
    """diffusers' layout in ``obj``, or None."""
    if not ("shadow_params" in obj and "optimization_step" in obj):
        return None
    notes = [names_note(names)]
    weights = shadow_list(path, where, NAME, obj["shadow_params"], names)
    step = as_int(obj["optimization_step"])
    decay = None
    if obj.get("use_ema_warmup"):
        def number(key: str, default: float) -> float:
            return as_float(obj.get(key, default), path, where, key)

        after = as_int(obj.get("update_after_step", 0))
        if after is None or after < 0:
            raise StateDictError(f"{path!r}{where}: 'update_after_step' must be an int "
                                 f">= 0, got {short_repr(obj.get('update_after_step'))}",
                                 fix="The file is corrupt or was edited.")
        try:
            decay = schedules.InverseGamma(
                inv_gamma=number("inv_gamma", 1.0), power=number("power", 2 / 3),
                min_decay=number("min_decay", 0.0), max_decay=number("decay", 0.9999),
                update_after_step=after).to_dict()
        except ValueError as exc:
            raise StateDictError(f"{path!r}{where}: the diffusers decay settings are not "
                                 f"valid ({exc})", fix="The file is corrupt or was edited."
                                 ) from None
    else:
        notes.append("diffusers without use_ema_warmup uses (1+s)/(10+s) with an offset, "
                     "which no emakit schedule matches exactly: pass decay=")
    return EMACheckpoint(NAME, path, where + "['shadow_params']", weights,
                         step=step, num_updates=step, decay=decay, scope="parameters",
                         notes=tuple(notes))
