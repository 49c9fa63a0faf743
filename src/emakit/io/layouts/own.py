"""emakit's own layout: a state from ``EMA.state_dict()`` (inside a ``torch.save`` file, possibly
nested) or from an ``emakit.save`` file, as an :class:`~emakit.io.ema_checkpoint.EMACheckpoint`
with the average bias-corrected for a zero start."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit.errors import StateDictError
from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts.recorded import short_repr
from emakit.state import average_divisors

__all__ = ["NAME", "detect_state", "is_state"]

NAME = "emakit"


def is_state(obj: object) -> bool:
    """Whether ``obj`` looks like an ``EMA.state_dict()``."""
    return isinstance(obj, Mapping) and "format_version" in obj and "shadows" in obj


def detect_state(path: str, where: str, state: dict[str, Any], *,
            checked: bool = False) -> EMACheckpoint:
    """The EMA in an emakit state (``checked``: its fields were checked with the header)."""
    if not checked:
        from emakit.io.header import READABLE_VERSIONS, check_fields

        version = state["format_version"]
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise StateDictError(f"{path!r}{where}: state key 'format_version' must be the int "
                                 f"{' or '.join(map(str, READABLE_VERSIONS))}, got "
                                 f"{short_repr(version)}",
                                 fix="Upgrade emakit if a newer one wrote it." if
                                 type(version) is int else "The file is corrupt or was edited.")
        check_fields(f"{path!r}{where}", state)
        shadows = state.get("shadows")
        if not isinstance(shadows, Mapping) or not all(isinstance(k, str) for k in shadows):
            raise StateDictError(f"{path!r}{where}: state key 'shadows' must map names to "
                                 f"tensors, got {type(shadows).__name__}",
                                 fix="The file is corrupt or was edited.")
    weights = dict(state["shadows"])
    actions = state["actions"]
    notes = []
    empty = False
    divisors = average_divisors(state["init"], float(state["decay_product"]),
                                state.get("decay_products"),
                                [n for n in weights if actions.get(n) == "average"])
    if divisors is not None and any(d <= 0.0 for d in divisors.values()):
        empty = True
        notes.append("init='zeros' and no update yet: there is no average (the shadows "
                     "are zeros)")
    elif divisors is not None:
        weights = {n: (t / divisors[n] if divisors.get(n, 1.0) != 1.0 else t)
                   for n, t in weights.items()}
        notes.append("init='zeros': weights are bias-corrected")
    for alias, name in (state.get("aliases") or {}).items():
        if name in weights and alias not in weights:
            weights[alias] = weights[name]  # a tied weight's second name carries the average
    recorded = state.get("source_dtypes")
    model_dtypes = dict(recorded) if recorded else None
    if model_dtypes is None:
        notes.append("the model's dtypes are not recorded (a state saved before emakit "
                     "recorded them): an export writes the stored (shadow) dtypes")
    elif state.get("aliases"):
        for alias, name in state["aliases"].items():
            if name in model_dtypes:
                model_dtypes.setdefault(alias, model_dtypes[name])
    return EMACheckpoint("emakit", path, where, weights, step=state["step"],
                         num_updates=state["num_updates"], decay=state["decay"],
                         state=state, notes=tuple(notes), model_dtypes=model_dtypes,
                         empty=empty)


