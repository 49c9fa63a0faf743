"""Array backends: the arithmetic of the engine for numpy arrays and torch tensors.

The engine (:mod:`emakit.ema`) never touches array arithmetic itself; it calls one
:class:`Backend`, chosen from the type of the source's tensors. The torch backend is imported only
when the source holds torch tensors, so ``import emakit`` never imports torch.

Every backend implements the same update, ``shadow <- lerp(shadow, source, w)`` with ``w = 1 - d``,
with the rounding of ``torch.lerp`` (see ``docs/math.md``), in two ways: a grouped fast path and a
plain per-tensor loop, which must give bitwise the same numbers.
"""

from __future__ import annotations

import sys

from emakit.backends.base import Backend, GroupInfo, Plan, SharedRead, TensorInfo, bad_dtype

__all__ = ["Backend", "GroupInfo", "Plan", "SharedRead", "TensorInfo", "backend_for",
           "bad_dtype"]


def _torch_backend() -> Backend:
    from emakit.backends import torch as torch_backend

    return torch_backend.BACKEND


def _numpy_backend() -> Backend:
    from emakit.backends import numpy as numpy_backend

    return numpy_backend.BACKEND


def backend_for(x: object) -> Backend | None:
    """The backend whose array type ``x`` is, or None. Imports torch only if it is loaded."""
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None and isinstance(x, torch_mod.Tensor):
        return _torch_backend()
    numpy_backend = _numpy_backend()
    if numpy_backend.is_tensor(x):
        return numpy_backend
    return None
