"""emakit's own state inside a Lightning ``.ckpt``: the ``emakit.integrations.lightning.EMA``
callback's entry ``ckpt["callbacks"]["emakit.EMA"]`` (or ``"emakit.EMA[name]"``), which holds
``{"emakit": "lightning-callback/1", "ema": EMA.state_dict(), ...}``.

Tried before Lightning's own ``WeightAveraging`` layout: the callback also writes the EMA weights
as the checkpoint's ``state_dict`` (so ``ModelCheckpoint`` saves what it measured), but only the
callback's entry records the counters, decay and shadow dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emakit.errors import StateDictError
from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts import own

__all__ = ["MARK", "NAME", "detect"]

NAME = "emakit-lightning"
MARK = "lightning-callback/1"
"""The value of ``entry["emakit"]`` the callback writes."""


def detect(path: str, where: str, obj: Mapping[str, Any], names: list[str] | None
           ) -> EMACheckpoint | None:
    """The EMA state a Lightning callback of emakit's left in ``obj``, or None.

    Raises:
        StateDictError: several emakit callbacks' states (name the one to read), or a malformed
            entry.
    """
    callbacks = obj.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    keys = [k for k, v in callbacks.items()
            if isinstance(k, str) and isinstance(v, Mapping) and v.get("emakit") == MARK]
    if not keys:
        return None
    if len(keys) > 1:
        raise StateDictError(
            f"{path!r}{where}: the checkpoint holds {len(keys)} emakit EMA states "
            f"({', '.join(repr(k) for k in sorted(keys))})",
            fix="Export or inspect one of them: load the .ckpt with torch.load and pass "
                "ckpt['callbacks'][KEY]['ema'] to EMA.load_state_dict.")
    key = keys[0]
    state = callbacks[key].get("ema")
    spot = f"{where}['callbacks'][{key!r}]['ema']"
    if not own.is_state(state):
        raise StateDictError(f"{path!r}{spot}: not an EMA state_dict()",
                             fix="The checkpoint is corrupt or was edited.")
    return own.detect_state(path, spot, dict(state))
