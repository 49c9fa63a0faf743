"""Reading the values other libraries record in their checkpoints, as untrusted input.

A counter that is not an integer is "not recorded" (None); a decay that is not a finite number is
a :class:`~emakit.StateDictError` naming the file and the key; nothing is ever printed whole.

Example:
    >>> as_int("12"), as_int(1.5), as_int(True)
    (12, None, None)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from emakit.backends import backend_for
from emakit.errors import StateDictError

__all__ = ["as_flag", "as_float", "as_int", "is_tensor", "names_note", "shadow_list", "short_repr"]


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


def shadow_list(path: str, where: str, layout: str, params: Any,
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


def names_note(names: list[str] | None) -> str:
    """The note for a layout that stores a bare list of tensors: where the names came from."""
    return ("names from the model's parameter order" if names else
            "no parameter names given: tensors are numbered (pass the model to map them)")
