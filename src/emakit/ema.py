"""The EMA engine: an exponential moving average of named tensors.

After each optimizer step ``t`` the engine folds the weights ``w_t`` into the shadow,

    ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t = lerp(ema_{t-1}, w_t, 1 - d_t),

with the decay over the whole interval since its last update (:mod:`emakit.clock`). :class:`EMA`
is the facade over its parts (:mod:`emakit.engine`); the equations are in ``docs/math.md``, the
layout of the package in ``docs/architecture.md``.

Example:
    >>> import numpy as np
    >>> import emakit
    >>> params = {"w": np.array([1.0, 2.0, 3.0])}
    >>> ema = emakit.EMA(params, decay=0.9)
    >>> params["w"] -= 1.0          # an optimizer step
    >>> ema.update()
    True
    >>> ema.averaged()["w"]          # 0.9 * [1, 2, 3] + 0.1 * [0, 1, 2]
    array([0.9, 1.9, 2.9])
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeVar

from emakit import engine, schedules
from emakit.backends import GroupInfo
from emakit.clock import DecayClock, Start, resolve_schedule
from emakit.errors import SwapError
from emakit.folding import Folding, for_policy
from emakit.hooks import Attachment, Hooks
from emakit.policy import Action, Policy
from emakit.state import FORMAT_VERSION, LoadResult
from emakit.swap import Swapper
from emakit.tracked import Tracked

__all__ = ["EMA", "set_checkpoint_reader"]

_MOVED = {"skip_nonfinite": "policy=emakit.Policy(nonfinite='skip')",
          "init": "start='zeros' (or start=emakit.Start(step=..., zeros=True))",
          "step": "start=STEP (or start=emakit.Start(step=STEP))"}
_Method = TypeVar("_Method", bound=Callable[..., Any])
_checkpoint_reader: Callable[..., Any] | None = None


def _locked(method: _Method) -> _Method:
    """Run ``method`` holding the EMA's lock: threads sharing one EMA take turns."""

    @functools.wraps(method)
    def run(self: EMA, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class EMA:
    """An exponential moving average ("shadow weights") of a model's weights.

    Args:
        source: an ``nn.Module`` (its parameters and persistent buffers, by name; a tied weight
            once, under its first name), a mapping ``name -> tensor`` (torch or numpy), or an
            iterable of ``(name, tensor)`` pairs.
        decay: a float in [0, 1] or a :mod:`emakit.schedules` schedule (default 0.999).
        half_life: instead of ``decay``: optimizer steps after which a past weight's share of
            the average halves.
        every: update only on every ``every``-th optimizer step, applying the decay of all the
            steps in between (the window in steps is unchanged).
        dtype: shadow dtype of floating tensors; default float32 for 16-bit sources, else the
            source's own. Integer and bool tensors are always copied.
        device: where the shadows live (e.g. ``"cpu"``). For a CUDA model with host shadows,
            ``update()`` enqueues a non-blocking copy into a pinned mirror and returns; a
            background thread folds it in, and every read of the shadows waits for that first.
        policy: an :class:`~emakit.Policy`: which tensors are averaged, copied or skipped, and
            what happens to non-finite values (``Policy(nonfinite="skip")``).
        start: where the average starts (:class:`~emakit.Start`): an int is the optimizer step
            of the current weights (an EMA begun mid-run); ``"zeros"`` starts at zero with
            bias-corrected reads.
        foreach: for tests: ``False`` runs the plain per-tensor loop (bitwise the same numbers).

    Raises:
        TypeError, ValueError: for a bad argument, naming it and the valid values.
    """

    def __init__(self, source: Any, decay: float | schedules.Schedule | None = None, *,
                 half_life: float | None = None, every: int = 1, dtype: Any = None,
                 device: Any = None, policy: Policy | None = None, start: Any = None,
                 foreach: bool = True, **moved: Any) -> None:
        for name in moved:
            hint = _MOVED.get(name)
            raise TypeError(f"EMA() got an unexpected keyword argument {name!r}"
                            + (f"; it moved: use {hint}." if hint else "."))
        schedule = resolve_schedule(decay, half_life)
        begin = Start.of(start, schedule)
        clock = DecayClock(schedule, every=every, step=begin.step, zeros=begin.zeros)
        tracked = Tracked(source, Policy() if policy is None else policy, dtype=dtype,
                          device=device, zeros=begin.zeros, fast=bool(foreach))
        tracked.warn_if_stalling(schedule(1_000_000))
        folding = self._folding(tracked, clock, "zeros" if begin.zeros else "copy")
        self._parts = engine.Parts(tracked, clock, folding)
        self._swap = Swapper(tracked)
        self._hooks = Hooks(tracked, self._after_step, lambda: self._swap.refuse_step(self._lock))
        self._lock: threading.RLock = threading.RLock()

    def _folding(self, tracked: Tracked, clock: DecayClock, init: str) -> Folding:
        """The folding strategy (a subclass may wrap it, as :class:`~emakit.bema.BEMA` does)."""
        return for_policy(tracked, init)

    # ----------------------------------------------------------------------------- read-only
    @property
    def parts(self) -> engine.Parts:
        """The engine's components (package-internal; see :mod:`emakit.engine`)."""
        return self._parts

    @property
    def schedule(self) -> schedules.Schedule:
        """The decay schedule (a :class:`~emakit.schedules.Constant` for a float decay)."""
        return self.parts.clock.schedule

    @property
    def step(self) -> int:
        """The last optimizer step seen by :meth:`update`."""
        return self.parts.clock.step

    @property
    def num_updates(self) -> int:
        """How many times the shadows were updated."""
        return self.parts.clock.num_updates

    @property
    def last_decay(self) -> float | None:
        """The decay applied by the last update (over its whole interval), None before any."""
        return self.parts.clock.last_decay

    @property
    def every(self) -> int:
        """Update on every ``every``-th optimizer step."""
        return self.parts.clock.every

    @property
    def actions(self) -> Mapping[str, Action]:
        """Tracked name -> ``"average"`` or ``"copy"`` (skipped names are absent)."""
        return MappingProxyType(self.parts.tracked.actions)

    @property
    def names(self) -> list[str]:
        """The tracked names, averaged ones first, in the order of the state and the files."""
        return list(self.parts.tracked.names)

    @property
    def lock(self) -> threading.RLock:
        """The lock every method holds (threads sharing this EMA take turns). Hold it to make
        several calls one: ``with ema.lock: sd = copy.deepcopy(ema.state_dict())``."""
        return self._lock

    @property
    def attachment(self) -> Attachment | None:
        """The active :meth:`attach` (None when the EMA is updated by hand)."""
        return self._hooks.attachment

    @property
    def is_swapped(self) -> bool:
        """True between :meth:`apply_shadow` and :meth:`restore` (inside :meth:`swapped`)."""
        return self._swap.swapped

    @_locked
    def source_dtypes(self) -> dict[str, str]:
        """Tracked name -> dtype name of the source's tensor (e.g. ``"bfloat16"``)."""
        return self.parts.tracked.source_dtypes()

    @_locked
    def update_plan(self) -> tuple[GroupInfo, ...]:
        """How an update runs over the current weights: its groups, kinds and kernels."""
        return self.parts.tracked.describe(overlap=self.overlap)

    def __repr__(self) -> str:
        t, c = self.parts.tracked, self.parts.clock
        return (f"EMA({t.backend.name}, tensors={len(t.names)} ({len(t.avg_names)} averaged, "
                f"{len(t.copy_names)} copied), decay={c.schedule!r}, every={c.every}, "
                f"init={self.parts.folding.init!r}, step={c.step}, updates={c.num_updates})")

    # -------------------------------------------------------------------------------- update
    @_locked
    def update(self, step: int | None = None) -> bool:
        """Fold the current weights into the average (call after ``optimizer.step()``).

        Args:
            step: the optimizer step count after this step (1 after the first). When given, the
                decay of every step since the last update is applied (exact for skipped steps)
                and a repeated step is a no-op; when omitted, each call counts as one step.

        Returns:
            True if the shadows changed, False if this step was skipped (``every``) or repeated.

        Raises:
            SwapError: while the EMA weights are swapped into the model.
            ValueError: if ``step`` goes backwards or a source tensor changed shape; for a call
                without ``step`` while the EMA is attached to an optimizer (the hook already
                updates once per step: a second update would count the step twice).
        """
        if step is None and self._hooks.attachment is not None:
            raise ValueError(
                "update() called on an EMA attached to an optimizer: the EMA already updates "
                "after every optimizer.step(), so this call would count the step twice. Remove "
                "the ema.update() call, or call attachment.remove() to update by hand (or pass "
                "step=global_step: a step already averaged is then a no-op).")
        return engine.update([self], step)

    @property
    def overlap(self) -> bool:
        """True while attached with ``overlap=True`` (the copy runs on a side stream)."""
        return self._hooks.overlap

    def attach(self, optimizer: Any, *, overlap: bool = False) -> Attachment:
        """Update after every ``optimizer.step()`` (the optimizer's post-step hook).

        Args:
            optimizer: a ``torch.optim.Optimizer``, or a wrapper of one (accelerate's
                ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), whose hooks are
                put on the optimizer inside, which steps only on real steps.
            overlap: for a CUDA model with host shadows (``device="cpu"``): copy the weights to
                the host on a side stream alongside the next forward and backward pass; a
                pre-step hook makes the next ``optimizer.step()`` wait for that copy on the GPU
                (the host never waits). Refused for tracked buffers and trainable tensors this
                optimizer does not step (something else writes them between steps).

        Returns:
            An :class:`~emakit.hooks.Attachment`; ``.remove()`` detaches the EMA.

        Raises:
            TypeError: if ``optimizer`` has no step hooks.
            ValueError: when already attached (each step would update twice), or for
                ``overlap=True`` when a tracked tensor may be written by something else.
        """
        with self._lock:
            return self._hooks.attach(optimizer, overlap)

    def _after_step(self) -> None:
        with self._lock:
            engine.update([self], None)

    @_locked
    def nonfinite_skips(self) -> dict[str, int]:
        """Name -> updates that left that tensor out because it held NaN/Inf (zero without the
        guard, ``Policy(nonfinite="skip")``)."""
        self.parts.tracked.settle()
        return self.parts.folding.skips()

    # ------------------------------------------------------------------------ the average
    def _values(self) -> list[Any]:
        return self.parts.folding.values(self.parts.clock)

    @_locked
    def averaged(self) -> dict[str, Any]:
        """Tracked name -> the average (bias-corrected for ``start="zeros"``).

        The tensors are the shadows themselves unless bias correction makes new ones: clone them
        if you keep them while training goes on.
        """
        return dict(zip(self.parts.tracked.names, self._values()))

    @_locked
    def model_state_dict(self, *, device: Any = None) -> dict[str, Any]:
        """The source's whole state dict with the average in place of the tracked tensors.

        What a plain model needs to *be* the EMA model: every tracked tensor is the average,
        cast to the source tensor's dtype, under each of its names (tied weights included);
        every untracked one is a copy of the source's current value. All tensors are new, and
        the source is not read for tracked names, so this is right swapped or not.

        Args:
            device: where the tensors go (e.g. ``"cpu"`` for a file); default: where they are.

        Returns:
            ``name -> tensor`` in the source's order, loadable with ``model.load_state_dict``.

        Example:
            >>> import numpy as np
            >>> import emakit
            >>> w = {"w": np.array([1.0, 2.0], dtype=np.float16)}
            >>> ema = emakit.EMA(w, decay=0.5)
            >>> w["w"][:] = 3.0
            >>> _ = ema.update()
            >>> ema.model_state_dict()
            {'w': array([2. , 2.5], dtype=float16)}
        """
        return self.parts.tracked.model_state(self._values(), device)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[EMA]:
        """Context manager: the EMA weights inside, the training weights bitwise back on exit.

        Exception-safe. Buffers are copied in, so a training-mode forward changes the model's
        buffers, not the average. Do not train inside the block: with a pointer swap the model
        computes with (and would write into) the shadows themselves; an attached optimizer's
        step is refused before it writes, and an in-place write is reported on exit
        (:class:`~emakit.SwapError`).

        Example:
            >>> import numpy as np
            >>> import emakit
            >>> w = {"w": np.array([1.0])}
            >>> ema = emakit.EMA(w, decay=0.5)
            >>> w["w"][:] = 3.0
            >>> _ = ema.update()
            >>> with ema.swapped():
            ...     print(w["w"])
            [2.]
            >>> w["w"]
            array([3.])
        """
        with self._lock:  # the whole block: another thread's save or step waits for its end
            self.apply_shadow()
            with self._swap.restoring(self.restore):
                yield self

    @_locked
    def copy_to(self, target: Any = None, *, strict: bool = True) -> list[str]:
        """Write the average into ``target`` (default: the source), matched by name.

        For deployment, or to write the EMA back as the new training weights (periodic
        write-back / Switch-EMA: ``ema.copy_to()`` then keep training; the optimizer state is
        kept). Refuses an average holding NaN/Inf, so a write-back never destroys the weights.

        Args:
            target: a module, mapping or pairs with the same names, or None for the source.
            strict: raise if ``target`` lacks a tracked name; otherwise skip it.

        Returns:
            The tracked names that ``target`` lacked (empty when strict).
        """
        self._swap.refuse("copy_to() called")
        return self.parts.tracked.copy_into(target, self._values(), strict=strict)

    # --------------------------------------------------------------------------------- state
    @classmethod
    def from_checkpoint(cls, source: Any, path: Any, **options: Any) -> EMA:
        """A new EMA of ``source`` that starts from the average in a checkpoint file.

        Implemented in :func:`emakit.io.adopt.from_checkpoint` (see there for the layouts of
        emakit and of other libraries it reads, and the options).
        """
        if _checkpoint_reader is None:
            raise ImportError("emakit.io is not loaded: import emakit (which loads it) first.")
        ema: EMA = _checkpoint_reader(source, path, ema_class=cls, **options)
        return ema

    @_locked
    def state_dict(self) -> dict[str, Any]:
        """Everything that shapes future updates, with a ``format_version`` (:mod:`emakit.state`).

        The tensors are the shadows themselves (no copy), as with ``nn.Module.state_dict``; the
        rest is plain Python, so ``torch.save`` / ``torch.load(weights_only=True)`` and JSON work.

        Raises:
            SwapError: while the EMA weights are swapped in: a training checkpoint taken there
                would store the EMA weights as the model's (``model.state_dict()`` returns what
                the model holds). Save after the ``swapped()`` block; :meth:`model_state_dict`
                gives the EMA *model* weights anywhere.
        """
        if self.is_swapped:
            raise SwapError("state_dict() called while swapped in: a checkpoint written now "
                            "would hold the EMA weights where the training weights belong. Save "
                            "after the swapped() block; ema.model_state_dict() is right anywhere.")
        t, c = self.parts.tracked, self.parts.clock
        t.settle()
        return {"format_version": FORMAT_VERSION, "backend": t.backend.name, "step": c.step,
                "last_update_step": c.last_update_step, "num_updates": c.num_updates,
                "decay_product": c.decay_product, "init": self.parts.folding.init,
                "every": c.every, "decay": c.schedule.to_dict(), "policy": t.policy.to_dict(),
                "actions": dict(t.actions), "shadows": t.state_tensors(),
                "source_dtypes": t.source_dtypes(), "aliases": dict(t.aliases),
                **self.parts.folding.state()}

    @_locked
    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> LoadResult:
        """Load a :meth:`state_dict`; check everything first, change nothing on error.

        Shadows are matched by name and copied into the existing ones (their dtype and device
        stay). Counters and ``init`` are state and are loaded; decay, ``every`` and policy are
        settings of this EMA: where the saved ones differ they are reported (in the result and
        an :class:`~emakit.EMAWarning`) and the current ones stay.

        Args:
            state: a dict from :meth:`state_dict` (possibly through ``torch.save``/``load``).
            strict: raise if names are missing or unexpected; otherwise load the common names.

        Raises:
            StateDictError: wrong format, a malformed entry, missing/unexpected names (strict),
                shape or dtype mismatches (always). Nothing is loaded.
        """
        return engine.load([self], [state], strict=strict)[0]

    # ------------------------------------------- compatibility: the classic verbs, torch-ema's
    @_locked
    def register(self) -> None:
        """Restart the average from the current weights (the classic snippet's first verb).

        Shadows become copies of the current weights (zeros for ``start="zeros"``) and the
        update count restarts; the step count is kept.
        """
        self._swap.refuse("register() called")
        self.parts.tracked.reset(zeros=self.parts.folding.init == "zeros")
        self.parts.clock.restart(self.parts.clock.step)
        self.parts.folding.reset(self.parts.folding.init)

    @_locked
    def apply_shadow(self) -> None:
        """Put the EMA weights into the source; :meth:`restore` brings the training weights back.

        Where a source tensor has the shadow's dtype, device and layout it is re-pointed at the
        shadow (no copy); otherwise it is backed up (on the shadow's device) and the average is
        copied in. Prefer the exception-safe :meth:`swapped`.
        """
        self._swap.swap_in(self._values())

    @_locked
    def store(self, parameters: Any = None) -> None:
        """Back up the current source weights (torch-ema's verb; ``store(model.parameters())``
        works too); :meth:`restore` puts them back."""
        self._swap.back_up(parameters)

    @_locked
    def restore(self, parameters: Any = None) -> None:
        """Bring back the training weights after :meth:`apply_shadow` or :meth:`store`."""
        self._swap.restore(parameters)



def share_lock(emas: Sequence[EMA]) -> None:
    """Give EMAs that are updated together one lock (package-internal, for
    :class:`~emakit.MultiEMA`): a thread in one member's ``swapped()`` block and a thread
    updating them all then take turns instead of each holding a lock the other waits for."""
    shared = threading.RLock()
    for ema in emas:
        ema._lock = shared


def set_checkpoint_reader(reader: Callable[..., Any]) -> None:
    """Install what :meth:`EMA.from_checkpoint` calls (done by :mod:`emakit.io.adopt`, so the
    engine never imports the file layer)."""
    global _checkpoint_reader
    _checkpoint_reader = reader
