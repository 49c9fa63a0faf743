"""One answer for every rank: rank 0 computes it (or fails), the others receive the outcome.

Work that must happen once for a whole job (choosing a recording's id, reading and checking a
folder's manifest, writing it) runs on rank 0; :func:`from_rank0` then sends rank 0's result to
every rank with ``torch.distributed.broadcast_object_list``, or rank 0's error, which every rank
raises (a ``ValueError`` or ``OSError`` as the same type, anything else as a ``RuntimeError``),
so no rank goes on alone into the next collective. Without a process group, or when
``collective`` is False, it is a plain call.

Example (no process group: a plain call):
    >>> from_rank0(lambda: 42, collective=True)
    42
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["from_rank0", "in_process_group"]

T = TypeVar("T")
_KINDS: dict[str, type[Exception]] = {"ValueError": ValueError, "OSError": OSError}


def in_process_group() -> bool:
    """True inside an initialised ``torch.distributed`` process group (torch not imported)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def from_rank0(fn: Callable[[], T], *, collective: bool) -> T:
    """``fn()`` run on rank 0 only, its result (or error) given to every rank.

    Args:
        fn: what to compute; its result must pickle.
        collective: whether every rank calls this (False: a plain local call).

    Returns:
        Rank 0's result, on every rank.

    Raises:
        ValueError, OSError: rank 0's error of that type, on every rank.
        RuntimeError: rank 0 failed with another error.
    """
    if not collective or not in_process_group():
        return fn()
    import torch.distributed as dist

    payload: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", fn())
        except BaseException as exc:  # sent to the other ranks, then raised here too
            failure = exc
            kind = next((k for k, c in _KINDS.items() if isinstance(exc, c)), "RuntimeError")
            payload[0] = (kind, f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(payload, src=0)
    if failure is not None:
        raise failure
    kind, value = payload[0]
    if kind != "ok":
        raise _KINDS.get(kind, RuntimeError)(f"on rank 0: {value}")
    result: T = value
    return result
