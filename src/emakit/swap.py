"""One swap mechanism: put values into a model's tensors and take them back out, bitwise.

Behind :meth:`emakit.EMA.swapped`, ``apply_shadow()`` / ``restore()`` and ``store()`` /
``restore()``. Where a target tensor has the value's dtype, device and strides it is re-pointed at
the value's memory (no copy; the target's own memory is kept aside); elsewhere the target is
backed up and the value copied in. :func:`undo` reverses either, in reverse order, and a failure
half-way through :func:`swap_in` undoes what was done before it re-raises.

Example:
    >>> import numpy as np
    >>> from emakit.backends import backend_for
    >>> w = np.array([1.0, 2.0])
    >>> b = backend_for(w)
    >>> record = swap_in(b, [w], [np.array([5.0, 6.0])])
    >>> w
    array([5., 6.])
    >>> undo(b, record)
    >>> w
    array([1., 2.])
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

from emakit.backends import Backend
from emakit.errors import EMAWarning, SwapError, user_stacklevel

__all__ = ["Swapper", "UndoRecord", "back_up", "swap_in", "undo", "written"]


class UndoRecord(NamedTuple):
    """What to put back: ``(target, what it held, re-pointed?)`` per tensor, and why; for a
    re-pointed target, the backend's count of in-place writes through it when it was."""

    kind: Literal["swap", "store"]
    entries: list[tuple[Any, Any, bool]]
    writes: tuple[int | None, ...] = ()


def swap_in(backend: Backend, targets: Sequence[Any], values: Sequence[Any],
            keep_with: Sequence[Any] | None = None,
            repointable: Sequence[bool] | None = None,
            watched: Sequence[bool] | None = None) -> UndoRecord:
    """Make each target hold its value; the record brings the targets back.

    Args:
        backend: the array backend.
        targets: the model's tensors.
        values: what they should hold (same shapes).
        keep_with: per target, a tensor on whose device the backup of a target that is copied
            into is kept (its shadow, to spare accelerator memory); None: the target's own.
        repointable: per target, False where it must be copied into even if a pointer swap
            would fit (a view of memory someone else owns, e.g. an FSDP shard).
        watched: per target, True where the value is memory to protect (a shadow itself, not
            a temporary): in-place writes through such a re-pointed target are counted
            (:func:`written`); None: all.

    Returns:
        An :class:`UndoRecord` of kind ``"swap"``.
    """
    done: list[tuple[Any, Any, bool]] = []
    try:
        copy_targets, copy_values = [], []
        for i, (target, value) in enumerate(zip(targets, values)):
            if (repointable is None or repointable[i]) and backend.can_alias(target, value):
                done.append((target, backend.repoint(target, value), True))
            else:
                device = None if keep_with is None else backend.info(keep_with[i]).device
                done.append((target, backend.clone(target, device), False))
                copy_targets.append(target)
                copy_values.append(value)
        backend.copy_(copy_targets, copy_values)
        writes = tuple(backend.writes(t) if ptr and (watched is None or watched[i]) else None
                       for i, (t, _, ptr) in enumerate(done))
    except BaseException:
        undo(backend, UndoRecord("swap", done))
        raise
    return UndoRecord("swap", done, writes)


def written(backend: Backend, record: UndoRecord) -> list[int]:
    """Positions of re-pointed targets written in place since the swap (the value's memory,
    i.e. a shadow, was changed through them)."""
    return [i for i, ((t, _, ptr), before) in enumerate(zip(record.entries, record.writes))
            if ptr and before is not None and backend.writes(t) != before]


def back_up(backend: Backend, targets: Sequence[Any]) -> UndoRecord:
    """A copy of each target, for :func:`undo` (torch-ema's ``store()``)."""
    return UndoRecord("store", [(t, backend.clone(t), False) for t in targets])


def undo(backend: Backend, record: UndoRecord) -> None:
    """Put back what each target held before the record was made."""
    copies = [(t, old) for t, old, ptr in record.entries if not ptr]
    backend.copy_([t for t, _ in copies], [old for _, old in copies])
    for target, old, ptr in reversed(record.entries):
        if ptr:
            backend.repoint(target, old)


class Swapper:
    """An EMA's one undo slot: the EMA weights swapped in, or a backup of the training weights.

    Args:
        tracked: the EMA's tracked tensors (whose source is swapped).
    """

    def __init__(self, tracked: Any) -> None:
        self.tracked = tracked
        self.record: UndoRecord | None = None

    @property
    def swapped(self) -> bool:
        """True while the EMA weights are in the model."""
        return self.record is not None and self.record.kind == "swap"

    def refuse(self, what: str, *, stored_too: bool = False) -> None:
        """Raise :class:`~emakit.SwapError` if ``what`` is wrong now (swapped in; with
        ``stored_too``, also while a backup waits)."""
        if self.swapped or (stored_too and self.record is not None):
            held = "swapped in" if self.swapped else "backed up by store()"
            raise SwapError(f"{what} while the EMA weights are {held}; call restore() (or "
                            "leave the swapped() block) first.")

    def refuse_step(self, lock: Any) -> None:
        """Raise :class:`~emakit.SwapError` before an optimizer step that would write into the
        swapped-in shadows (after another thread's ``swapped()`` block, holding ``lock``)."""
        with lock:
            swapped = self.swapped
        if swapped:
            raise SwapError(
                "optimizer.step() called while the EMA weights are swapped in: the step would "
                "write into the average itself (the model's tensors use the shadows' memory). "
                "Nothing was stepped. Leave the swapped() block (or call restore()) first; "
                "evaluate inside it, train outside.")

    @contextlib.contextmanager
    def restoring(self, restore: Callable[[], None]) -> Iterator[None]:
        """Run the block, then ``restore()``; when the block raised, its error is the one to
        see: a :class:`~emakit.SwapError` of the restore becomes an :class:`~emakit.EMAWarning`."""
        try:
            yield
        except BaseException:
            try:
                restore()
            except SwapError as exc:
                warnings.warn(str(exc), EMAWarning, stacklevel=user_stacklevel())
            raise
        restore()

    def swap_in(self, values: Sequence[Any]) -> None:
        """Put ``values`` (the averages, tracked order) into the source."""
        self.refuse("apply_shadow() called", stored_too=True)
        t = self.tracked
        shadows = t.shadows  # (fetch() reshards a module an eval forward left unsharded)
        self.record = swap_in(t.backend, t.fetch(), values, shadows, t.repointable(),
                              [v is s for v, s in zip(values, shadows)])
        t.held = {name: old for name, (_, old, _) in zip(t.names, self.record.entries)}

    def back_up(self, parameters: Any = None) -> None:
        """Keep a copy of the source's weights (``parameters``: torch-ema's argument, checked to
        be tracked tensors)."""
        self.refuse("store() called", stored_too=True)
        self.tracked.check_given(parameters, "store")
        t = self.tracked
        self.record = back_up(t.backend, t.fetch())
        t.held = {name: old for name, (_, old, _) in zip(t.names, self.record.entries)}

    def restore(self, parameters: Any = None) -> None:
        """Put back what :meth:`swap_in` or :meth:`back_up` replaced."""
        self.tracked.check_given(parameters, "restore")
        if self.record is None:
            raise SwapError("restore() called with nothing to restore: call apply_shadow() or "
                            "store() first (or use the swapped() context manager).")
        record, self.record = self.record, None
        self.tracked.held = None
        self.tracked.reshard()  # an eval forward inside left a copy of the EMA weights unsharded
        changed = written(self.tracked.backend, record)
        undo(self.tracked.backend, record)
        if changed:
            names = [self.tracked.names[i] for i in changed]
            shown = ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
            raise SwapError(
                f"{len(names)} tensors were written in place while the EMA weights were swapped "
                f"in ({shown}): the model computed with the shadows themselves, so the average "
                "of those tensors now holds what was written (an optimizer step?). The training "
                "weights are back. Reload the EMA from a checkpoint, and do not train inside "
                "swapped() / apply_shadow(): evaluate there, step the optimizer outside.")

