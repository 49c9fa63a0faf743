"""What :func:`emakit.io.layouts.read_checkpoint` returns: the EMA found in a checkpoint file.

Example:
    >>> found = EMACheckpoint("plain", "w.pt", "", {"w": None})
    >>> found.layout, found.step, found.empty
    ('plain', None, False)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["EMACheckpoint"]


@dataclasses.dataclass(frozen=True)
class EMACheckpoint:
    """The EMA found in a checkpoint file.

    Attributes:
        layout: one of :data:`emakit.io.layouts.LAYOUTS`.
        path: the file.
        where: where in the file the EMA was (e.g. ``"['ema']"``; empty at the top level).
        weights: name -> averaged tensor, by the names the file uses (model names, possibly
            with a wrapper prefix), in the file's order.
        step: the optimizer step the average belongs to, when the layout records it.
        num_updates: how many updates made the average, when recorded.
        decay: the decay as an :mod:`emakit.schedules` dict, when the layout records it
            exactly; else None.
        scope: ``"state"`` (parameters and buffers) or ``"parameters"`` (parameters only: the
            layout does not average buffers).
        state: for ``layout == "emakit"``, the full :meth:`EMA.state_dict`.
        notes: facts worth telling the user (what is not recorded, how names were found).
        model_dtypes: name -> dtype name of the model's tensors, when recorded (emakit files),
            so an export can be cast back to the model's dtypes.
        empty: True when there is no average yet (``init="zeros"`` saved before its first
            update): the weights are zeros, not an average.
    """

    layout: str
    path: str
    where: str
    weights: dict[str, Any]
    step: int | None = None
    num_updates: int | None = None
    decay: dict[str, Any] | None = None
    scope: Literal["state", "parameters"] = "state"
    state: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    model_dtypes: dict[str, str] | None = None
    empty: bool = False
