"""Other libraries' EMA layouts inside a checkpoint: timm, Lightning, ema-pytorch, diffusers,
torch-ema, Ultralytics and torch's AveragedModel (the table in :mod:`emakit.io.layouts`).

Every value is read as untrusted: a counter that is not an integer is "not recorded", a decay
that is not a finite number is a :class:`~emakit.StateDictError` naming the file and the key.

Example:
    >>> found = detect("ckpt.pt", "", {"state_dict_ema": {"w": None}, "epoch": 3}, None)
    >>> found.layout, found.where, found.notes
    ('timm', "['state_dict_ema']", ('timm records neither the step nor the decay (epoch: 3)',))
    >>> as_int("12"), as_int(1.5), as_int(True)
    (12, None, None)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from emakit import schedules
from emakit.backends import backend_for
from emakit.errors import StateDictError
from emakit.io import inert_pickle
from emakit.io.ema_checkpoint import EMACheckpoint

__all__ = ["as_flag", "as_float", "as_int", "detect", "is_tensor", "short_repr"]


def is_tensor(x: object) -> bool:
    """A torch tensor or numpy array (any backend emakit has)."""
    return backend_for(x) is not None


def _scalar(x: object) -> object:
    """The Python value of a 0-d tensor or array; anything else as it is."""
    if is_tensor(x) and getattr(x, "ndim", None) == 0:
        return x.item()  # type: ignore[attr-defined]
    return x


def as_int(x: object) -> int | None:
    """``x`` as an int where it is one (a 0-d integer tensor too), else None (not recorded)."""
    if isinstance(x, str):  # metadata of a weight file: decimal digits
        return int(x) if x.isdecimal() and len(x) <= 19 else None
    x = _scalar(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        return None
    return int(x)


def as_float(x: object, path: str, where: str, key: str) -> float:
    """``x`` as a finite float (a 0-d tensor too); otherwise a StateDictError naming ``key``."""
    x = _scalar(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise StateDictError(f"{path!r}{where}: {key!r} must be a finite number, got "
                             f"{short_repr(x)}", fix="The file is corrupt or was edited.")
    return float(x)


def as_flag(x: object) -> bool | None:
    """A recorded boolean (a bool, or a one-element tensor); None when it is neither."""
    if isinstance(x, bool):
        return x
    if is_tensor(x):
        flat = x.reshape(-1)  # type: ignore[attr-defined]
        if len(flat) == 1:
            return bool(flat[0])
    return None


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a file may hold anything)."""
    if is_tensor(value):
        return f"a {type(value).__name__}"
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _shadow_list(path: str, where: str, layout: str, params: Any,
                 names: list[str] | None) -> dict[str, Any]:
    if not isinstance(params, (list, tuple)) or not all(is_tensor(p) for p in params):
        raise ValueError(f"{path!r}{where}: {layout} 'shadow_params' should be a list of "
                         "tensors; the file is corrupt.")
    if names is None:
        return {f"shadow_params.{i}": p for i, p in enumerate(params)}
    if len(names) != len(params):
        raise ValueError(
            f"{path!r}{where}: the {layout} state holds {len(params)} shadow tensors but "
            f"{len(names)} parameter names were given. Pass the model the EMA was made from "
            "(its parameters, in order, as given to the library).")
    return dict(zip(names, params))


def detect(path: str, where: str, obj: Any, names: list[str] | None) -> EMACheckpoint | None:
    """The EMA of another library's layout in ``obj`` (found at ``where`` in ``path``), if any.

    Raises:
        ValueError: a layout was recognised but its entries are malformed (a
            :class:`~emakit.StateDictError` naming the file and the key), or a bare list of
            tensors does not match the names given.
    """
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("state_dict_ema"), Mapping):
        return EMACheckpoint("timm", path, where + "['state_dict_ema']",
                             dict(obj["state_dict_ema"]), notes=(
                                 "timm records neither the step nor the decay (epoch: "
                                 f"{short_repr(obj.get('epoch', '?'))})",))
    if isinstance(obj.get("current_model_state"), Mapping) and isinstance(
            obj.get("state_dict"), Mapping):
        averaging = obj.get("averaging_state")
        averaging = averaging if isinstance(averaging, Mapping) else {}
        return EMACheckpoint("lightning", path, where + "['state_dict']",
                             dict(obj["state_dict"]), step=as_int(obj.get("global_step")),
                             num_updates=as_int(averaging.get("n_averaged")),
                             notes=("Lightning records the step but not the decay",))
    if "shadow_params" in obj:
        return _shadow_layout(path, where, obj, names)
    ema_keys = [k for k in obj if isinstance(k, str) and k.startswith("ema_model.")]
    if ema_keys and ("initted" in obj or "step" in obj):
        weights = {k[len("ema_model."):]: obj[k] for k in ema_keys}
        notes = ["ema-pytorch records its update count (step) but not the decay"]
        if "initted" in obj and as_flag(obj["initted"]) is False:
            notes.append("initted is False: the average was never updated")
        return EMACheckpoint("ema-pytorch", path, where, weights, step=as_int(obj.get("step")),
                             notes=tuple(notes))
    if "ema" in obj and "updates" in obj:
        ema = obj["ema"]
        if inert_pickle.looks_like_module(ema):
            weights = inert_pickle.module_tensors(ema)
        elif isinstance(ema, Mapping):
            weights = dict(ema)
        else:
            return None
        updates = as_int(obj.get("updates"))
        return EMACheckpoint("ultralytics", path, where + "['ema']", weights, step=updates,
                             num_updates=updates, notes=(
                                 "Ultralytics does not record the decay; its trainer's default "
                                 "is ExponentialRamp(decay=0.9999, tau=2000)",
                                 "Ultralytics stores the average in float16"))
    if "n_averaged" in obj:
        weights = {k[len("module."):]: v for k, v in obj.items()
                   if isinstance(k, str) and k.startswith("module.")}
        if weights:
            return EMACheckpoint("averaged-model", path, where, weights,
                                 num_updates=as_int(obj["n_averaged"]), notes=(
                                     "AveragedModel records the update count, not the decay",))
    return None


def _shadow_layout(path: str, where: str, obj: Mapping[str, Any],
                   names: list[str] | None) -> EMACheckpoint | None:
    notes = ["names from the model's parameter order" if names else
             "no parameter names given: tensors are numbered (pass the model to map them)"]
    if "optimization_step" in obj:
        weights = _shadow_list(path, where, "diffusers", obj["shadow_params"], names)
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
        return EMACheckpoint("diffusers", path, where + "['shadow_params']", weights,
                             step=step, num_updates=step, decay=decay, scope="parameters",
                             notes=tuple(notes))
    if "decay" in obj and "num_updates" in obj:
        weights = _shadow_list(path, where, "torch-ema", obj["shadow_params"], names)
        updates = as_int(obj["num_updates"])
        d = as_float(obj["decay"], path, where, "decay")
        try:
            decay = (schedules.Constant(d) if updates is None else
                     schedules.TFWarmup(d)).to_dict()
        except ValueError as exc:
            raise StateDictError(f"{path!r}{where}: 'decay' is not a valid decay ({exc})",
                                 fix="The file is corrupt or was edited.") from None
        return EMACheckpoint("torch-ema", path, where + "['shadow_params']", weights,
                             step=updates, num_updates=updates, decay=decay, scope="parameters",
                             notes=tuple(notes))
    return None
