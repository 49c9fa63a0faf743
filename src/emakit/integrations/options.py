"""What the integrations share: the ``eval_on`` choices and the early check of EMA options.

Example:
    >>> check_options({"decay": 0.999, "every": 2})
    >>> check_options({"decay": 1.5})
    Traceback (most recent call last):
    ...
    ValueError: decay must be in [0.0, 1.0], got 1.5. Typical values are 0.99 to 0.9999.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit.ema import EMA
from emakit.policy import Policy

__all__ = ["EVAL_ON", "check_options"]

EVAL_ON = ("ema", "training")
"""``eval_on=``: evaluate on the EMA weights, or on the training weights."""


def check_options(options: Mapping[str, Any]) -> None:
    """Raise now, naming the argument, for options that :class:`emakit.EMA` would refuse later.

    A callback is made long before the model it averages exists; this builds a throwaway EMA of
    one float32 tensor with the same options, so a bad ``decay`` fails where it was written.

    Args:
        options: keyword arguments for :class:`emakit.EMA` (``decay``, ``half_life``,
            ``every``, ``dtype``, ``device``, ``policy``).

    Raises:
        TypeError, ValueError: as :class:`emakit.EMA` raises for them.
    """
    import torch

    policy = options.get("policy")
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be an emakit.Policy, got {type(policy).__name__}.")
    probe = {k: v for k, v in options.items() if k != "policy"}
    EMA({"probe": torch.zeros(1)}, **probe)
