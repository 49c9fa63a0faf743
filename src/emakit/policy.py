"""Which tensors the EMA tracks, and how: average, copy, or skip.

Rules, first match wins:

1. a name matching ``exclude`` (or not matching a non-empty ``include``) is skipped;
2. a name matching ``copy`` is copied;
3. a tensor that is not floating point (integer, bool: ``num_batches_tracked``, step counters,
   token ids) is copied -- never pushed through float math -- unless its category is ``"skip"``;
4. a buffer (BatchNorm running statistics) follows ``buffers`` (default ``"average"``);
5. a parameter with ``requires_grad=False`` follows ``frozen`` (default ``"average"``: a frozen
   parameter is a fixed point of the average, so this costs memory but never changes a number);
6. every other parameter is averaged.

Patterns are shell-style globs (:mod:`fnmatch`) on the dotted name, e.g. ``"*.running_*"``.

``nonfinite`` says what an update does with a tensor that is not all finite: ``"average"`` folds
it in like any other (the fastest update), ``"skip"`` leaves that tensor's shadow as it was for
that update and counts the skip (``EMA.nonfinite_skips()``), so one diverging step cannot put
NaN into the average.

Example:
    >>> p = Policy(buffers="copy", exclude=("head.*",))
    >>> p.action("body.bn.running_mean", floating=True, buffer=True)
    'copy'
    >>> p.action("head.weight", floating=True), p.action("body.weight", floating=True)
    ('skip', 'average')
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable
from typing import Any, Literal, cast

__all__ = ["ACTIONS", "Action", "Nonfinite", "Policy"]

Action = Literal["average", "copy", "skip"]
Nonfinite = Literal["average", "skip"]
ACTIONS: tuple[Action, ...] = ("average", "copy", "skip")


def _action(name: str, value: object) -> Action:
    for action in ACTIONS:
        if value == action:
            return action
    raise ValueError(f"{name} must be one of {list(ACTIONS)}, got {value!r}.")


def _patterns(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        items = tuple(cast("Iterable[object]", value))
    except TypeError:
        raise TypeError(
            f"{name} must be a glob pattern or a sequence of them, got {value!r}. "
            f"Example: {name}=('*.running_*',)."
        ) from None
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must hold strings (glob patterns), got {item!r} in {value!r}.")
        out.append(item)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Per-tensor rules: which tensors are averaged, copied or skipped.

    Args:
        buffers: what to do with floating buffers (``"average"``, ``"copy"``, ``"skip"``).
        frozen: what to do with parameters that do not require grad.
        include: if given, only names matching one of these globs are tracked.
        exclude: names matching one of these globs are not tracked.
        copy: names matching one of these globs are copied instead of averaged.
        nonfinite: ``"average"`` (default) or ``"skip"``: an update leaves a tensor that is not
            all finite out (its shadow keeps its value) and counts it.
    """

    buffers: Action = "average"
    frozen: Action = "average"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    copy: tuple[str, ...] = ()
    nonfinite: Nonfinite = "average"

    def __post_init__(self) -> None:
        object.__setattr__(self, "buffers", _action("buffers", self.buffers))
        object.__setattr__(self, "frozen", _action("frozen", self.frozen))
        if self.nonfinite not in ("average", "skip"):
            raise ValueError(f"nonfinite must be 'average' or 'skip', got {self.nonfinite!r}. "
                             "Example: Policy(nonfinite='skip') keeps NaN/Inf out of the average.")
        for field in ("include", "exclude", "copy"):
            object.__setattr__(self, field, _patterns(field, getattr(self, field)))

    @staticmethod
    def _matches(name: str, patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    def action(self, name: str, *, floating: bool, buffer: bool = False,
               requires_grad: bool = True) -> Action:
        """Decide what happens to the tensor called ``name`` (see the module docstring)."""
        if self._matches(name, self.exclude) or (
            self.include and not self._matches(name, self.include)
        ):
            return "skip"
        if self._matches(name, self.copy):
            return "copy"
        category: Action = "average"
        if buffer:
            category = self.buffers
        elif not requires_grad:
            category = self.frozen
        if category == "skip":
            return "skip"
        return category if floating else "copy"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``Policy(**d)`` rebuilds it."""
        return {
            "buffers": self.buffers,
            "frozen": self.frozen,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "copy": list(self.copy),
            "nonfinite": self.nonfinite,
        }
