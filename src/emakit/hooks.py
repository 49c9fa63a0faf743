"""Optimizer hooks: update the EMA after every ``optimizer.step()`` (``EMA.attach``).

The post-step hook runs the update; with ``overlap=True`` a pre-step hook also makes the next
step wait, on the GPU, for the copy of the weights that the last update left on a side stream
(the offload fence: :meth:`emakit.backends.Plan.fence`). Wrappers of an optimizer
(accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) are unwrapped, so the
hooks sit on the optimizer whose ``step()`` runs only on real steps.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> steps = []
    >>> attachment = Attachment(opt, on_step=lambda: steps.append(1), fence=None,
    ...                         on_remove=lambda a: None)
    >>> opt.step(); opt.step()
    >>> len(steps)
    2
    >>> attachment.remove(); opt.step()
    >>> len(steps)
    2
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emakit.tracked import Tracked

__all__ = ["Attachment", "Hooks", "check_attach", "hookable"]


def hookable(optimizer: Any) -> Any:
    """The torch optimizer that takes step hooks: ``optimizer`` or the one it wraps.

    Wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) inherit
    or forward ``register_step_post_hook`` but keep the hooks of the optimizer they wrap, whose
    ``step()`` runs only on real optimizer steps (after gradient accumulation, not on a step
    that the AMP grad scaler skipped). The wrapped one is found under ``.optimizer`` or
    ``._optimizer``.

    Raises:
        TypeError: if neither ``optimizer`` nor anything it wraps takes step hooks.
    """
    current = optimizer
    for _ in range(8):
        if callable(getattr(current, "register_step_post_hook", None)) and \
                callable(getattr(current, "register_step_pre_hook", None)) and \
                hasattr(current, "_optimizer_step_post_hooks"):
            return current
        inner = getattr(current, "optimizer", None) or getattr(current, "_optimizer", None)
        if inner is None or inner is current:
            break
        current = inner
    raise TypeError(
        f"attach() needs a torch.optim.Optimizer (with step pre and post hooks), or a wrapper "
        f"of one, got {type(optimizer).__name__}. Otherwise call ema.update() after each step."
    )


def check_attach(current: Attachment | None, optimizer: Any, overlap: bool,
                 tracked: Iterable[tuple[str, Any, bool, bool]]) -> None:
    """Refuse an attachment that would update twice per step, or overlap unsafely.

    Args:
        current: the EMA's active attachment, if any.
        optimizer: the (unwrapped) torch optimizer to attach to.
        overlap: whether the copy of the weights would overlap the next forward/backward pass.
        tracked: ``(name, tensor, is_buffer, requires_grad)`` of every tracked tensor.

    Raises:
        ValueError: already attached (to this or another optimizer), or ``overlap`` with
            buffers (the forward pass changes BatchNorm statistics) or trainable tensors this
            optimizer does not step, naming them.
    """
    if current is not None:
        raise ValueError(
            ("attach() called twice on the same optimizer: each step would update the EMA "
             "twice. Keep the first attachment" if current.optimizer is optimizer else
             "attach() called while the EMA is attached to another optimizer: a step of both "
             "would update the EMA twice. For several optimizers that step together, call "
             "ema.update() once after all of them") + " (or remove it first: "
            "attachment.remove()).")
    if not overlap:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    bad = [name for name, tensor, buffer, grad in tracked
           if buffer or (grad and id(tensor) not in stepped)]
    if bad:
        shown = ", ".join(repr(n) for n in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(
            f"attach(overlap=True) reads the weights alongside the next forward and backward "
            f"pass, so every tracked tensor must be written only by this optimizer's step; "
            f"{len(bad)} may change otherwise: {shown} (buffers change in the forward pass, "
            "trainable tensors outside this optimizer elsewhere). Leave them out with "
            "emakit.Policy(buffers='skip') or exclude=..., or attach without overlap.")


class Attachment:
    """The hooks of :meth:`emakit.EMA.attach`; :meth:`remove` detaches the EMA.

    Args:
        optimizer: the torch optimizer (already unwrapped, see :func:`hookable`).
        on_step: called after every ``optimizer.step()``.
        fence: called before every ``optimizer.step()`` (the offload fence), or None.
        on_remove: called once with this attachment by :meth:`remove`.
        before_step: called before every ``optimizer.step()``, before ``fence`` (e.g. to
            refuse a step that would write into the EMA's shadows), or None.

    Attributes:
        optimizer: the optimizer whose steps update the EMA.
        overlap: whether a pre-step fence is installed (``attach(overlap=True)``).
    """

    def __init__(self, optimizer: Any, *, on_step: Callable[[], object],
                 fence: Callable[[], object] | None,
                 on_remove: Callable[[Attachment], object],
                 before_step: Callable[[], object] | None = None) -> None:
        self.optimizer = optimizer
        self.overlap = fence is not None
        self._on_remove: Callable[[Attachment], object] | None = on_remove
        self._handles = [optimizer.register_step_post_hook(lambda opt, a, kw: on_step())]
        first = [f for f in (before_step, fence) if f is not None]

        def before(opt: Any, args: Any, kwargs: Any) -> None:
            for f in first:
                f()

        if first:
            self._handles.append(optimizer.register_step_pre_hook(before))

    @property
    def active(self) -> bool:
        """True until :meth:`remove`."""
        return self._on_remove is not None

    def remove(self) -> None:
        """Stop updating after each step (a second call does nothing)."""
        on_remove, self._on_remove = self._on_remove, None
        if on_remove is None:
            return
        for handle in self._handles:
            handle.remove()
        on_remove(self)


class Hooks:
    """An EMA's attachment slot: at most one optimizer updates it (one update per step).

    Args:
        tracked: the EMA's tracked tensors (re-planned when the overlap mode changes).
        on_step: the EMA's update after an optimizer step.
        before_step: the EMA's check before an optimizer step (None: none).
    """

    def __init__(self, tracked: Tracked, on_step: Callable[[], object],
                 before_step: Callable[[], object] | None = None) -> None:
        self.tracked = tracked
        self.on_step = on_step
        self.before_step = before_step
        self.attachment: Attachment | None = None

    @property
    def overlap(self) -> bool:
        """True while attached with ``overlap=True``."""
        return self.attachment is not None and self.attachment.overlap

    def attach(self, optimizer: Any, overlap: bool) -> Attachment:
        """Attach to ``optimizer`` (or what it wraps), after the checks of :func:`check_attach`."""
        target = hookable(optimizer)
        current = [e for e in self.tracked.source.entries() if e.name in self.tracked.actions]
        check_attach(self.attachment, target, overlap,
                     ((e.name, e.tensor, e.buffer, e.requires_grad) for e in current))
        self.attachment = Attachment(target, on_step=self.on_step,
                                     fence=self.tracked.fence if overlap else None,
                                     on_remove=self._detach, before_step=self.before_step)
        if overlap:
            self.tracked.replan()  # the next update plans the side-stream copy
        return self.attachment

    def _detach(self, attachment: Attachment) -> None:
        if self.attachment is attachment:
            self.attachment = None
            if attachment.overlap:
                self.tracked.replan()
