"""Exceptions and warnings that emakit raises, so that callers can catch them by type."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

__all__ = ["EMAWarning", "StateDictError", "SwapError", "user_stacklevel"]

_INSIDE = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
           os.path.abspath(contextlib.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the calling function that points at the
    user's line: the first frame outside emakit (and ``contextlib``, which runs its ``with``
    blocks), however deep the call went inside."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _INSIDE):
        frame, level = frame.f_back, level + 1
    return level


class EMAWarning(UserWarning):
    """Something legal but probably unintended (a saved setting differs from the current one, a
    low-precision shadow that will stall). Filter with ``warnings.filterwarnings``."""


class SwapError(RuntimeError):
    """An operation that is wrong while the EMA weights are swapped into the model (or not)."""


def _listing(label: str, names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{label} ({len(names)}): {shown}{more}"


class StateDictError(ValueError):
    """A state that does not fit this EMA. Nothing was loaded.

    Attributes:
        missing: names this EMA tracks that the state lacks.
        unexpected: names in the state that this EMA does not track.
        mismatched: ``name: reason`` for entries whose shape or dtype differ.
    """

    def __init__(self, problem: str, *, missing: Sequence[str] = (),
                 unexpected: Sequence[str] = (), mismatched: Sequence[str] = (),
                 fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        parts = [problem]
        if self.missing:
            parts.append(_listing("missing", self.missing))
        if self.unexpected:
            parts.append(_listing("unexpected", self.unexpected))
        if self.mismatched:
            parts.append(_listing("mismatched", self.mismatched))
        tail = ["Nothing was loaded.", fix] if fix else ["Nothing was loaded."]
        super().__init__("; ".join(parts).rstrip(".") + ". " + " ".join(tail))

    def located(self, where: str) -> StateDictError:
        """The same error with ``where`` (e.g. the file's name) in front of the problem."""
        return StateDictError(f"{where}: {self.problem}", missing=self.missing,
                              unexpected=self.unexpected, mismatched=self.mismatched,
                              fix=self.fix)
