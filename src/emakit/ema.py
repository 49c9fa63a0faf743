"""The EMA engine: an exponential moving average of named tensors.

After each optimizer step ``t`` the engine folds the weights ``w_t`` into the shadow,

    ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t = lerp(ema_{t-1}, w_t, 1 - d_t),

and when it last updated at step ``s < t`` (``every=k``, gradient accumulation) it applies the
decay over the whole interval, ``D = prod_{u=s+1}^{t} d_u`` (``d ** k`` for a constant decay), so
the averaging window in optimizer steps does not change. With ``init="zeros"`` the shadow starts
at zero and every read divides by ``1 - prod(all d)`` (bias correction, as in Adam). Equations
and sources: ``docs/math.md``.

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
import math
import numbers
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeVar

from emakit import schedules
from emakit.backends import Backend, Plan, backend_for
from emakit.errors import EMAWarning, StateDictError, SwapError
from emakit.policy import Action, Policy
from emakit.sources import Entry, Source, as_source

__all__ = ["EMA", "FORMAT_VERSION", "Attachment", "LoadResult"]

FORMAT_VERSION = 1
"""Version of the layout of :meth:`EMA.state_dict`; bumped on any incompatible change."""

_STATE_KEYS = ("format_version", "backend", "step", "last_update_step", "num_updates",
               "decay_product", "init", "every", "decay", "policy", "actions", "shadows")
_UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
_STALL_GAP = 0.01  # warn when a shadow ignores weights this close to it, relatively (math.md (8))
_Method = TypeVar("_Method", bound=Callable[..., Any])


def _locked(method: _Method) -> _Method:
    """Run ``method`` holding the EMA's lock: threads sharing one EMA take turns."""

    @functools.wraps(method)
    def run(self: EMA, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


class LoadResult(NamedTuple):
    """What :meth:`EMA.load_state_dict` found.

    Attributes:
        missing: names this EMA tracks that the state did not hold (kept as they were).
        unexpected: names in the state that this EMA does not track (ignored).
        changed: setting -> ``(saved, current)`` for settings that differ; the current ones stay
            in force (saved hyperparameters are reported, never silently applied).
    """

    missing: list[str]
    unexpected: list[str]
    changed: dict[str, tuple[Any, Any]]


def _resolve_schedule(decay: object, half_life: object) -> schedules.Schedule:
    if half_life is not None:
        if decay is not None:
            raise ValueError(
                f"give either decay or half_life, not both (got decay={decay!r}, "
                f"half_life={half_life!r}). Example: EMA(model, half_life=2000)."
            )
        return schedules.Constant.from_half_life(half_life)  # type: ignore[arg-type]
    if decay is None:
        return schedules.Constant(0.999)
    if isinstance(decay, schedules.Schedule):
        return decay
    if isinstance(decay, numbers.Real):  # Constant rejects bool with a clear message
        return schedules.Constant(decay)  # type: ignore[arg-type]
    raise TypeError(
        f"decay must be a float in [0, 1] or a schedule from emakit.schedules, got {decay!r} of "
        f"type {type(decay).__name__}. Examples: decay=0.999, half_life=2000, "
        "decay=emakit.schedules.InverseGamma(max_decay=0.9999)."
    )


def _int_option(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
    return int(value)


class Attachment:
    """What :meth:`EMA.attach` returns: the optimizer hooks; :meth:`remove` detaches the EMA.

    Attributes:
        optimizer: the optimizer whose steps update the EMA (the torch optimizer inside a
            wrapper such as accelerate's ``AcceleratedOptimizer``).
        overlap: whether the copy to host shadows runs alongside the next step.
    """

    def __init__(self, ema: EMA, optimizer: Any, handles: list[Any], overlap: bool) -> None:
        self._ema: EMA | None = ema
        self.optimizer = optimizer
        self._handles = handles
        self.overlap = overlap

    @property
    def active(self) -> bool:
        """True until :meth:`remove`."""
        return self._ema is not None

    def remove(self) -> None:
        """Stop updating after each step (a second call does nothing)."""
        ema, self._ema = self._ema, None
        if ema is None:
            return
        for handle in self._handles:
            handle.remove()
        ema._detach(self)


def _hookable(optimizer: Any) -> Any:
    """The torch optimizer that takes step hooks: ``optimizer`` or the one it wraps.

    Wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) inherit
    or forward ``register_step_post_hook`` but keep the hooks of the optimizer they wrap, whose
    ``step()`` runs only on real optimizer steps (after gradient accumulation, not on a step
    that the AMP grad scaler skipped). The wrapped one is found under ``.optimizer`` or
    ``._optimizer``.
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


class EMA:
    """An exponential moving average ("shadow weights") of a model's weights.

    Args:
        source: an ``nn.Module`` (its parameters and persistent buffers, by name), a mapping
            ``name -> tensor`` (torch or numpy), or an iterable of ``(name, tensor)`` pairs.
        decay: a float in [0, 1] or a :mod:`emakit.schedules` schedule (default 0.999).
        half_life: instead of ``decay``: the number of optimizer steps after which a past
            weight's share of the average halves.
        every: update only on every ``every``-th optimizer step, applying the decay of all the
            steps in between (the window in steps is unchanged).
        init: ``"copy"`` (the shadow starts as the current weights) or ``"zeros"`` (starts at
            zero; reads are bias-corrected).
        dtype: shadow dtype of floating tensors; default float32 for 16-bit sources, else the
            source's own (float64 stays float64). Integer and bool tensors are always copied.
        device: where the shadows live (e.g. ``"cpu"`` to spare accelerator memory). For a
            CUDA model with host shadows, ``update()`` enqueues a non-blocking copy into a
            pinned mirror and returns; a background thread folds it in, and every read of the
            shadows waits for that first.
        policy: a :class:`~emakit.Policy`: which tensors are averaged, copied or skipped.
        skip_nonfinite: guard the average against NaN/Inf: a source tensor that is not all
            finite leaves its shadow unchanged for that update, and the skip is counted
            (:meth:`nonfinite_skips`). Costs one ``isfinite`` pass and a temporary per tensor.
        foreach: use the grouped fast path (default); ``False`` runs the plain per-tensor loop,
            which gives bitwise the same numbers.
        step: the optimizer step the current weights belong to (for an EMA started mid-run).

    Raises:
        TypeError, ValueError: for a bad argument, naming it and the valid values.
    """

    def __init__(
        self,
        source: Any,
        decay: float | schedules.Schedule | None = None,
        *,
        half_life: float | None = None,
        every: int = 1,
        init: Literal["copy", "zeros"] = "copy",
        dtype: Any = None,
        device: Any = None,
        policy: Policy | None = None,
        skip_nonfinite: bool = False,
        foreach: bool = True,
        step: int = 0,
    ) -> None:
        self._schedule = _resolve_schedule(decay, half_life)
        self._every = _int_option("every", every, 1)
        if init not in ("copy", "zeros"):
            raise ValueError(f"init must be 'copy' or 'zeros', got {init!r}.")
        if init == "zeros" and isinstance(self._schedule, schedules.Constant) and \
                self._schedule.decay == 1.0:
            raise ValueError(
                "init='zeros' with decay=1 never averages anything: the shadow stays zero and "
                "its bias correction divides by 1 - 1**t = 0. Use init='copy' to freeze the "
                "initial weights, or a decay below 1."
            )
        self._init: str = init
        if policy is None:
            policy = Policy()
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an emakit.Policy, got {type(policy).__name__}.")
        self._policy = policy
        self._guard = bool(skip_nonfinite)
        self._foreach = bool(foreach)
        self._source: Source = as_source(source)
        entries = self._source.entries()
        self._backend = self._pick_backend(entries)
        override = None if dtype is None else self._backend.resolve_dtype(dtype)
        self._device = device
        self._actions: dict[str, Action] = {}
        avg: list[Entry] = []
        cpy: list[Entry] = []
        for e in entries:
            info = self._backend.info(e.tensor)
            action = policy.action(e.name, floating=info.floating, buffer=e.buffer,
                                   requires_grad=e.requires_grad)
            if action != "skip":
                self._actions[e.name] = action
                (avg if action == "average" else cpy).append(e)
        if not self._actions:
            raise ValueError(
                f"the EMA tracks no tensor: the source has {len(entries)} tensors and the policy "
                f"{policy!r} skips all of them. Loosen include/exclude."
            )
        self._aliases = {a: n for a, n in self._source.aliases().items() if n in self._actions}
        self._avg_names = [e.name for e in avg]
        self._copy_names = [e.name for e in cpy]
        self._names = self._avg_names + self._copy_names
        self._avg_dtypes = [self._backend.shadow_dtype(e.tensor, override) for e in avg]
        self._warn_if_stalling(override)
        self._start = _int_option("step", step, 0)
        self._avg_shadows: list[Any] = []
        self._copy_shadows: list[Any] = []
        self._allocate(avg, cpy)
        self._reset_counters(self._start)
        self._counters = self._backend.new_counters(self._avg_shadows + self._copy_shadows)
        self._products = self._new_products()
        self._plan: Plan | None = None
        self._attachment: Attachment | None = None
        self._lock: threading.RLock = threading.RLock()
        self._swap: list[tuple[Any, Any, bool]] | None = None
        self._stored: list[Any] | None = None

    # ----------------------------------------------------------------------------------- setup
    @staticmethod
    def _pick_backend(entries: list[Entry]) -> Backend:
        if not entries:
            raise ValueError("the source holds no tensors; give a model or a non-empty mapping.")
        backend = backend_for(entries[0].tensor)
        for e in entries:
            b = backend_for(e.tensor)
            if b is None:
                raise TypeError(
                    f"source entry {e.name!r} is a {type(e.tensor).__name__}, not a torch tensor "
                    "or numpy array."
                )
            if b is not backend:
                raise TypeError(
                    f"source mixes array types: {entries[0].name!r} is "
                    f"{type(entries[0].tensor).__name__} but {e.name!r} is "
                    f"{type(e.tensor).__name__}. Use one array library per EMA."
                )
        assert backend is not None  # the loop above raised otherwise
        return backend

    def _allocate(self, avg: list[Entry], cpy: list[Entry]) -> None:
        b = self._backend
        zeros = self._init == "zeros"
        self._avg_shadows = b.allocate([e.tensor for e in avg], self._avg_dtypes, self._device,
                                       zeros)
        self._copy_shadows = b.allocate([e.tensor for e in cpy],
                                        [e.tensor.dtype for e in cpy], self._device, False)

    def _new_products(self) -> Any:
        """Per-tensor decay products for bias correction, where tensors may skip updates.

        With ``init="zeros"`` the average divides by ``1 - P``, ``P`` the product of the
        decays of the updates that went into it; a tensor skipped by the non-finite guard
        misses some, so it needs a ``P`` of its own. None where the global one serves.
        """
        if self._guard and self._init == "zeros":
            return self._backend.new_counters(self._avg_shadows, product=True)
        return None

    def _reset_counters(self, step: int) -> None:
        self._step = step
        self._last_update_step = step
        self._num_updates = 0
        self._decay_product = 1.0
        self._last_decay: float | None = None

    def _warn_if_stalling(self, override: Any) -> None:
        """Warn when a half-precision shadow would round its updates away (docs/math.md (8)).

        An update moves the shadow by ``(1 - d) |w - ema|``, which is lost below half an ulp,
        ``u |ema|`` (unit roundoff ``u``): the shadow ignores weights within ``u / (1 - d)`` of
        it, relatively. Warn when that exceeds 1% at the schedule's late decay.
        """
        if override is None:
            return
        u = _UNIT_ROUNDOFF.get(str(override).removeprefix("torch."))
        late = self._schedule(1_000_000)
        if u is None or late <= 0.0:
            return
        ignored = u / (1.0 - late) if late < 1.0 else math.inf
        if ignored > _STALL_GAP:
            warnings.warn(
                f"a {override} shadow with decay {late:g} stalls: an update moves it by "
                f"(1 - decay) = {1 - late:.2g} of the gap to the weights, and a change below the "
                f"dtype's resolution ({u:.2g} relative) is rounded away, so the shadow ignores "
                f"weights that differ from it by less than {ignored:.0%}. Leave dtype unset "
                "(fp32 shadow) or use a smaller decay.",
                EMAWarning,
                stacklevel=3,
            )

    # ---------------------------------------------------------------------------- read-only
    @property
    def schedule(self) -> schedules.Schedule:
        """The decay schedule (a :class:`~emakit.schedules.Constant` for a float decay)."""
        return self._schedule

    @property
    def step(self) -> int:
        """The last optimizer step seen by :meth:`update`."""
        return self._step

    @property
    def num_updates(self) -> int:
        """How many times the shadows were updated."""
        return self._num_updates

    @property
    def last_decay(self) -> float | None:
        """The decay applied by the last update (over its whole interval), None before any."""
        return self._last_decay

    @property
    def every(self) -> int:
        """Update on every ``every``-th optimizer step."""
        return self._every

    @property
    def actions(self) -> Mapping[str, Action]:
        """Tracked name -> ``"average"`` or ``"copy"`` (skipped names are absent)."""
        return MappingProxyType(self._actions)

    @property
    @_locked
    def shadows(self) -> Mapping[str, Any]:
        """Tracked name -> raw shadow tensor (before bias correction for ``init="zeros"``)."""
        self._settle()
        return MappingProxyType(dict(zip(self._names, self._avg_shadows + self._copy_shadows)))

    @property
    def names(self) -> list[str]:
        """The tracked names, averaged ones first, in the order of the state and the files."""
        return list(self._names)

    @_locked
    def source_dtypes(self) -> dict[str, str]:
        """Tracked name -> dtype name of the source's tensor (e.g. ``"bfloat16"``)."""
        b = self._backend
        return {n: b.info(t).dtype for n, t in zip(self._names, self._source.fetch(self._names))}

    def decay_at(self, step: int) -> float:
        """The per-step decay the schedule gives at optimizer step ``step``."""
        return self._schedule(step)

    def __repr__(self) -> str:
        n_avg, n_copy = len(self._avg_names), len(self._copy_names)
        return (
            f"EMA({self._backend.name}, tensors={n_avg + n_copy} ({n_avg} averaged, {n_copy} "
            f"copied), decay={self._schedule!r}, every={self._every}, init={self._init!r}, "
            f"step={self._step}, updates={self._num_updates})"
        )

    # ------------------------------------------------------------------------------- update
    def _next_step(self, step: object) -> int | None:
        if step is None:
            return self._step + 1
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(
                f"step must be an int (the optimizer step count), got {step!r} of type "
                f"{type(step).__name__}."
            )
        t = int(step)
        if t == self._step:
            return None  # same optimizer step again (gradient accumulation): nothing to do
        if t < self._step:
            raise ValueError(
                f"step={t} is behind the EMA's step {self._step}: steps must increase. After "
                "restarting from a checkpoint, load the EMA's saved state with "
                "ema.load_state_dict(...) so its step matches."
            )
        return t

    def _prepare(self, sources: list[Any] | None = None) -> tuple[list[Any], Plan]:
        """The current source tensors (averaged, then copied) and a plan that fits them."""
        if sources is None:
            sources = self._source.fetch(self._names)
        plan = self._plan
        if plan is None or not plan.fits(sources):
            if plan is not None:
                plan.settle()  # the old plan's work must reach the shadows before the new one's
            self._validate(sources)
            plan = self._plan = self._backend.plan(self._avg_shadows, self._copy_shadows,
                                                   sources, fast=self._foreach,
                                                   overlap=self._attachment is not None
                                                   and self._attachment.overlap)
        return sources, plan

    def _validate(self, tensors: list[Any]) -> None:
        b = self._backend
        for name, tensor, shadow in zip(self._names, tensors,
                                        self._avg_shadows + self._copy_shadows):
            if tensor is None:
                raise ValueError(
                    f"the source no longer has a tensor named {name!r} (it is None now), which "
                    "the EMA tracks. If the model changed, create a new EMA."
                )
            if not b.is_tensor(tensor):
                raise TypeError(
                    f"source tensor {name!r} is now a {type(tensor).__name__}; the EMA was made "
                    f"for {b.name} tensors. Keep the source's entries as {b.name} tensors."
                )
            have, want = b.info(tensor).shape, b.info(shadow).shape
            if have != want:
                raise ValueError(
                    f"source tensor {name!r} has shape {have} but its shadow has shape {want}. "
                    "If the model was resized, create a new EMA for it."
                )

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
        if step is None and self._attachment is not None:
            raise ValueError(
                "update() called on an EMA attached to an optimizer: the EMA already updates "
                "after every optimizer.step(), so this call would count the step twice. Remove "
                "the ema.update() call, or call attachment.remove() to update by hand (or pass "
                "step=global_step: a step already averaged is then a no-op)."
            )
        return self._update(step)

    def _update(self, step: int | None) -> bool:
        begun = self._begin(step)
        if begun is None:
            return False
        t, decay = begun
        sources, plan = self._prepare()
        if self._guard:
            self._guarded(sources, decay)
        else:
            plan.lerp_(sources, 1.0 - decay)
            if self._copy_shadows:
                plan.copy_(sources)
        self._finish(t, decay)
        return True

    def _begin(self, step: object) -> tuple[int, float] | None:
        """Advance the step; ``(t, decay over the interval)`` if this step updates, else None."""
        if self._swap is not None:
            raise SwapError(
                "update() called while the EMA weights are swapped into the model: it would "
                "average the EMA with itself. Leave the swapped() block (or call restore()) "
                "before the next training step."
            )
        t = self._next_step(step)
        if t is None:
            return None
        if t % self._every:
            self._step = t
            return None
        decay = self._schedule.interval(self._last_update_step, t)
        gap = t - self._last_update_step
        if self._num_updates == 0 and gap > self._every and decay < 1e-3 and self._schedule(1):
            warnings.warn(
                f"the first update at step {t} applies the decay of {gap} steps since the EMA "
                f"was created at step {self._last_update_step} (total decay {decay:.2g}), which "
                f"discards the initial weights. If the EMA starts mid-run, create it with "
                f"EMA(..., step={t - 1}).",
                EMAWarning,
                stacklevel=3,
            )
        return t, decay

    def _guarded(self, sources: list[Any], decay: float) -> None:
        self._settle()
        n = len(self._avg_shadows)
        self._backend.guarded_update_(self._avg_shadows, sources[:n], decay, self._counters[:n],
                                      self._products)
        self._backend.guarded_update_(self._copy_shadows, sources[n:], None, self._counters[n:])

    def _finish(self, t: int, decay: float) -> None:
        self._step = t
        self._last_update_step = t
        self._num_updates += 1
        self._decay_product *= decay
        self._last_decay = decay

    def attach(self, optimizer: Any, *, overlap: bool = False) -> Attachment:
        """Update after every ``optimizer.step()`` via the optimizer's post-step hook.

        Args:
            optimizer: a ``torch.optim.Optimizer``.
            overlap: for a CUDA model with shadows in host memory (``device="cpu"``): copy the
                weights to the host on a side stream, alongside the next forward and backward
                pass, instead of before them; a pre-step hook makes the next
                ``optimizer.step()`` wait for that copy on the GPU (the host never waits). Only
                right when nothing but this optimizer's step writes the tracked tensors
                between steps: buffers (changed by the forward pass) and trainable tensors that
                this optimizer does not step are refused. Elsewhere it changes nothing.

        Returns:
            An :class:`Attachment`; ``.remove()`` detaches the EMA.

        Raises:
            TypeError: if ``optimizer`` has no step hooks.
            ValueError: for ``overlap=True`` when a tracked tensor may be written by something
                other than this optimizer's step.
        """
        target = _hookable(optimizer)
        with self._lock:
            current = self._attachment
            if current is not None:
                again = current.optimizer is target
                raise ValueError(
                    ("attach() called twice on the same optimizer: each step would update the "
                     "EMA twice. Keep the first attachment" if again else
                     "attach() called while the EMA is attached to another optimizer: a "
                     "training step that steps both would update the EMA twice. For several "
                     "optimizers that step together, call ema.update() once after all of them")
                    + " (or remove it first: attachment.remove())."
                )
            if overlap:
                self._check_overlap(target)

            def after_step(opt: Any, args: Any, kwargs: Any) -> None:
                with self._lock:
                    self._update(None)

            handles = [target.register_step_post_hook(after_step)]
            if overlap:
                handles.append(target.register_step_pre_hook(
                    lambda opt, args, kwargs: self._fence()))
            attachment = self._attachment = Attachment(self, target, handles, overlap)
            if overlap:
                self._replan()
            return attachment

    def _check_overlap(self, optimizer: Any) -> None:
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        bad = [e.name for e in self._source.entries() if e.name in self._actions
               and (e.buffer or (e.requires_grad and id(e.tensor) not in stepped))]
        if bad:
            shown = ", ".join(repr(n) for n in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise ValueError(
                f"attach(overlap=True) reads the weights alongside the next forward and backward "
                f"pass, so every tracked tensor must be written only by this optimizer's step; "
                f"{len(bad)} may change otherwise: {shown} (buffers change in the forward pass, "
                "trainable tensors outside this optimizer elsewhere). Leave them out with "
                "emakit.Policy(buffers='skip') or exclude=..., or attach without overlap."
            )

    @property
    def lock(self) -> threading.RLock:
        """The lock every method holds, so threads sharing this EMA take turns.

        Hold it to make several calls one step for other threads, e.g. to copy a consistent
        state while another thread trains: ``with ema.lock: sd = copy.deepcopy(ema.state_dict())``
        (``state_dict()`` returns the live shadows, which the next update changes).
        """
        return self._lock

    @property
    def attachment(self) -> Attachment | None:
        """The active :meth:`attach` (None when the EMA is updated by hand)."""
        return self._attachment

    def _detach(self, attachment: Attachment) -> None:
        with self._lock:
            if self._attachment is attachment:
                self._attachment = None
                if attachment.overlap:
                    self._replan()

    def _replan(self) -> None:
        self._settle()  # a settled update has read its sources: nothing is left to fence
        self._plan = None  # the next update plans with the new mode

    def _fence(self) -> None:
        if self._plan is not None:
            self._plan.fence()

    @_locked
    def nonfinite_skips(self) -> dict[str, int]:
        """Name -> how many updates skipped that tensor because it held NaN/Inf (guard only)."""
        self._settle()
        return dict(zip(self._names, self._backend.counts(self._counters)))

    # ---------------------------------------------------------------------- using the average
    def _divisors(self) -> float | list[float] | None:
        """What the averaged shadows are divided by on reading (bias correction), or None."""
        if self._init != "zeros":
            return None
        if self._num_updates == 0:
            raise SwapError(
                "an EMA with init='zeros' has no average before its first update (it would be "
                "all zeros). Call update() first."
            )
        if self._products is None:
            if self._decay_product == 0.0:
                return None
            if self._decay_product >= 1.0:
                raise SwapError(
                    "an EMA with init='zeros' has no average yet: every update so far applied "
                    "decay 1, which folds nothing in (the correction would divide by zero)."
                )
            return 1.0 - self._decay_product
        products = self._backend.counts(self._products)
        empty = [n for n, p in zip(self._avg_names, products) if p >= 1.0]
        if empty:
            shown = ", ".join(repr(n) for n in empty[:5]) + (", ..." if len(empty) > 5 else "")
            raise SwapError(
                f"an EMA with init='zeros' has no average yet for {len(empty)} tensor(s): "
                f"{shown}. Every update so far skipped them (non-finite values, "
                "skip_nonfinite=True) or applied decay 1. Update with finite weights first."
            )
        if not any(products):
            return None
        return [1.0 - p for p in products]

    def _settle(self) -> None:
        """Wait until every update so far has reached the shadows (offloaded ones finish on a
        worker thread); called before anything reads or writes them."""
        if self._plan is not None:
            self._plan.settle()

    def _values(self) -> list[Any]:
        self._settle()
        divisors = self._divisors()
        avg = self._avg_shadows
        if divisors is not None:
            avg = self._backend.scaled(avg, divisors)
        return avg + self._copy_shadows

    @_locked
    def averaged(self) -> dict[str, Any]:
        """Name -> the averaged weights (bias-corrected for ``init="zeros"``).

        The tensors are the shadows themselves unless bias correction makes new ones: clone them
        if you keep them while training goes on.
        """
        return dict(zip(self._names, self._values()))

    @_locked
    def model_state_dict(self, *, device: Any = None) -> dict[str, Any]:
        """The source's whole state dict with the averaged weights in place of the tracked ones.

        What a plain model needs to *be* the EMA model: every tracked tensor is the
        (bias-corrected) average, cast to the dtype of the source's tensor; every untracked one
        (skipped by the policy, e.g. non-float extras) is a copy of the source's current value.
        All tensors are new, so they stay valid while training goes on; the source is not
        touched, so this is right whether or not the EMA is swapped in.

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
        b = self._backend
        state = self._source.state()
        averaged = dict(zip(self._names, self._values()))
        for alias, name in self._aliases.items():
            averaged[alias] = averaged[name]  # a tied weight carries the average under every name
        for name, value in state.items():
            avg = averaged.get(name)
            if avg is not None:
                state[name] = b.converted(avg, value, device)
            elif b.is_tensor(value):
                state[name] = b.clone(value, device)  # else: extra state, kept as it is
        return state

    @property
    def is_swapped(self) -> bool:
        """True between :meth:`apply_shadow` and :meth:`restore` (inside :meth:`swapped`)."""
        return self._swap is not None

    def _check_not_swapped(self, what: str) -> None:
        if self._swap is not None:
            raise SwapError(
                f"{what} while the EMA weights are swapped in; leave the swapped() block (or "
                "call restore()) first."
            )

    @_locked
    def apply_shadow(self) -> None:
        """Put the EMA weights into the source; :meth:`restore` brings the training weights back.

        Where a source tensor has the shadow's dtype, device and layout it is re-pointed at the
        shadow (no copy); otherwise the training weights are backed up (on the shadow's device)
        and the average is copied in. Prefer the exception-safe :meth:`swapped`.
        """
        self._check_not_swapped("apply_shadow() called")
        if self._stored is not None:
            raise SwapError("apply_shadow() called while store() holds a backup; call restore() "
                            "first.")
        b = self._backend
        values = self._values()
        targets = self._source.fetch(self._names)
        shadows = self._avg_shadows + self._copy_shadows
        done: list[tuple[Any, Any, bool]] = []
        try:
            copy_targets, copy_values = [], []
            for target, value, shadow in zip(targets, values, shadows):
                if b.can_alias(target, value):
                    done.append((target, b.repoint(target, value), True))
                else:
                    done.append((target, b.clone(target, b.info(shadow).device), False))
                    copy_targets.append(target)
                    copy_values.append(value)
            b.copy_(copy_targets, copy_values)
        except BaseException:
            self._undo(done)
            raise
        self._swap = done

    def _undo(self, done: list[tuple[Any, Any, bool]]) -> None:
        b = self._backend
        copies = [(t, old) for t, old, ptr in done if not ptr]
        b.copy_([t for t, _ in copies], [old for _, old in copies])
        for target, old, ptr in reversed(done):
            if ptr:
                b.repoint(target, old)

    @_locked
    def restore(self) -> None:
        """Bring back the training weights after :meth:`apply_shadow` or :meth:`store`."""
        if self._swap is not None:
            done, self._swap = self._swap, None
            self._undo(done)
            return
        if self._stored is not None:
            stored, self._stored = self._stored, None
            self._backend.copy_(self._source.fetch(self._names), stored)
            return
        raise SwapError("restore() called with nothing to restore: call apply_shadow() or "
                        "store() first (or use the swapped() context manager).")

    @contextlib.contextmanager
    def swapped(self) -> Iterator[EMA]:
        """Context manager: the EMA weights inside, the training weights bitwise back on exit.

        Exception-safe. Do not train inside the block: with a pointer swap the model computes
        with (and would write into) the shadows themselves.

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
        self.apply_shadow()
        try:
            yield self
        finally:
            self.restore()

    @_locked
    def store(self) -> None:
        """Back up the current source weights (torch-ema's verb); :meth:`restore` puts them back."""
        self._check_not_swapped("store() called")
        b = self._backend
        self._stored = [b.clone(t) for t in self._source.fetch(self._names)]

    @_locked
    def copy_to(self, target: Any = None, *, strict: bool = True) -> list[str]:
        """Write the averaged weights into ``target`` (default: the source), matched by name.

        For deployment, or for the "write the EMA back as the new training weights" strategy
        (periodic write-back / Switch-EMA): ``ema.copy_to()`` then keep training; the optimizer
        state is left as it is.

        Args:
            target: a module, mapping or pairs with the same names, or None for the source.
            strict: raise if ``target`` lacks a tracked name; otherwise skip it.

        Returns:
            The tracked names that ``target`` lacked (empty when strict).
        """
        self._check_not_swapped("copy_to() called")
        values = dict(zip(self._names, self._values()))
        names = self._names
        missing: list[str] = []
        dst = self._source
        if target is not None:
            dst = as_source(target)
            available = {e.name for e in dst.entries()}
            missing = [n for n in names if n not in available]
            if missing and strict:
                raise StateDictError(
                    "copy_to(): the target lacks names the EMA tracks", missing=missing,
                    fix="Pass strict=False to copy the names it has.")
            names = [n for n in names if n in available]
        tensors = dst.fetch(names)
        b = self._backend
        for name, t in zip(names, tensors):
            if not b.is_tensor(t) or b.info(t).shape != b.info(values[name]).shape:
                shape = b.info(t).shape if b.is_tensor(t) else type(t).__name__
                raise ValueError(
                    f"copy_to(): target tensor {name!r} is {shape}, the average is "
                    f"{b.info(values[name]).shape}; nothing was copied."
                )
        chosen = [values[n] for n in names]
        bad = [n for n, ok in zip(names, b.finite(chosen)) if not ok]
        if bad:
            shown = ", ".join(repr(n) for n in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise ValueError(
                f"copy_to(): the average of {len(bad)} tensor(s) holds NaN or Inf ({shown}); "
                "nothing was copied, so the target keeps its weights. A non-finite weight got "
                "into the average: use skip_nonfinite=True to keep such steps out of it."
            )
        b.copy_(tensors, chosen)
        return missing

    @_locked
    def register(self) -> None:
        """Restart the average from the current weights (the classic snippet's first verb).

        Shadows become copies of the current weights (zeros for ``init="zeros"``) and the update
        count restarts; the step count is kept.
        """
        self._check_not_swapped("register() called")
        self._settle()
        zeros = self._init == "zeros"
        avg = self._source.fetch(self._avg_names)
        cpy = self._source.fetch(self._copy_names)
        self._validate(avg + cpy)
        b = self._backend
        if zeros:
            fresh = b.allocate(avg, self._avg_dtypes, self._device, True)
            b.copy_(self._avg_shadows, fresh)
        else:
            b.copy_(self._avg_shadows, avg)
        b.copy_(self._copy_shadows, cpy)
        self._reset_counters(self._step)
        self._counters = b.new_counters(self._avg_shadows + self._copy_shadows)
        self._products = self._new_products()

    # -------------------------------------------------------------------------------- state
    @classmethod
    def from_checkpoint(cls, source: Any, path: Any, *, names: Any = None, strict: bool = True,
                        **options: Any) -> EMA:
        """A new EMA of ``source`` that starts from the average in a checkpoint file.

        The file may come from emakit (:func:`emakit.save`, or ``state_dict()`` inside a
        ``torch.save``) or from timm, Lightning, ema-pytorch, diffusers, torch-ema,
        Ultralytics or ``AveragedModel`` (see :mod:`emakit.io.layouts`), so training can
        switch libraries without losing the average. Names are matched to the source's,
        allowing for one wrapper prefix (``module.``, ``_orig_mod.``, a LightningModule's
        attribute). For emakit files every counter is restored; for the others the step is
        the one the file records (``step=`` overrides it) and the decay must be given unless
        the file records it exactly (diffusers, torch-ema). Foreign weights are cast to the
        shadow dtype (fp32 by default, also for Ultralytics' fp16 average).

        Args:
            source: the model (as for :class:`EMA`).
            path: the checkpoint file.
            names: parameter names (or the model) for layouts that store a bare list of tensors;
                default: ``source`` when it is a module.
            strict: raise if the file lacks a tracked tensor (buffers excepted for layouts that
                average parameters only) or holds names the model does not have.
            **options: the keyword arguments of :class:`EMA` (``decay``, ``half_life``,
                ``every``, ``dtype``, ``device``, ``policy``, ``step``, ...).

        Returns:
            The EMA, holding the file's average.

        Raises:
            ValueError: no known layout, no decay given where the file records none, or a
                name or shape mismatch (:class:`~emakit.StateDictError`); nothing is half-done.

        Example:
            >>> import numpy as np, pathlib, tempfile
            >>> import emakit
            >>> w = {"w": np.array([1.0, 2.0])}
            >>> ema = emakit.EMA(w, decay=0.9)
            >>> w["w"] += 1.0
            >>> _ = ema.update()
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "ema.safetensors"
            >>> emakit.save(ema, path)
            >>> again = emakit.EMA.from_checkpoint(w, path)
            >>> again.averaged()["w"], again.step, again.schedule
            (array([1.1, 2.1]), 1, Constant(decay=0.9))
        """
        from emakit.io.adopt import ema_from_checkpoint

        return ema_from_checkpoint(cls, source, path, names=names, strict=strict,
                                   options=options)

    @_locked
    def _adopt(self, weights: Mapping[str, Any], num_updates: int) -> None:
        """Copy averaged ``weights`` (by tracked name, cast to the shadows' dtype) in."""
        self._settle()
        b = self._backend
        mine = dict(zip(self._names, self._avg_shadows + self._copy_shadows))
        try:
            native = {n: b.as_native(w, repr(n)) for n, w in weights.items()}
        except TypeError as exc:
            raise StateDictError(str(exc)) from None
        bad = [f"{n}: shape {b.info(w).shape} != {b.info(mine[n]).shape}"
               for n, w in native.items() if b.info(w).shape != b.info(mine[n]).shape]
        if bad:
            raise StateDictError("the checkpoint's tensors do not fit this model",
                                 mismatched=bad, fix="Use the model the checkpoint was made for.")
        b.copy_([mine[n] for n in native], list(native.values()))
        self._num_updates = num_updates

    @_locked
    def state_dict(self) -> dict[str, Any]:
        """Everything that shapes future updates, with a ``format_version``.

        The tensors are the shadows themselves (no copy), as with ``nn.Module.state_dict``;
        the rest is plain Python, so ``torch.save`` / ``torch.load(weights_only=True)`` and JSON
        (for the non-tensor part) work. Besides the counters, settings and shadows it records
        the source's dtypes (``source_dtypes``, so an export can cast back to the model's
        dtypes) and the second names of tied weights (``aliases``).

        Raises:
            SwapError: while the EMA weights are swapped into the model. A training checkpoint
                taken there would store the EMA weights as the model's training weights
                (``model.state_dict()`` returns what the model holds); save after the
                ``swapped()`` block. To save the EMA *model* weights, use
                :meth:`model_state_dict`, which is right anywhere.
        """
        if self._swap is not None:
            raise SwapError(
                "state_dict() called while the EMA weights are swapped into the model: a "
                "checkpoint written now would hold the EMA weights where the model's training "
                "weights belong (model.state_dict() returns what the model holds). Save the "
                "checkpoint after the swapped() block; for the EMA model weights use "
                "ema.model_state_dict(), which is right anywhere."
            )
        self._settle()
        state: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "backend": self._backend.name,
            "step": self._step,
            "last_update_step": self._last_update_step,
            "num_updates": self._num_updates,
            "decay_product": self._decay_product,
            "init": self._init,
            "every": self._every,
            "decay": self._schedule.to_dict(),
            "policy": self._policy.to_dict(),
            "actions": dict(self._actions),
            "shadows": dict(zip(self._names, self._avg_shadows + self._copy_shadows)),
            "source_dtypes": self.source_dtypes(),
            "aliases": dict(self._aliases),
        }
        if self._guard:
            state["nonfinite_skips"] = self.nonfinite_skips()
        if self._products is not None:
            state["decay_products"] = dict(zip(self._avg_names,
                                               self._backend.counts(self._products)))
        return state

    @_locked
    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True) -> LoadResult:
        """Load a :meth:`state_dict`; validate everything first, change nothing on error.

        Shadows are matched by name and copied into the existing ones (their dtype and device
        stay). Counters and ``init`` are state and are loaded; decay, ``every`` and policy are
        settings of this EMA: where the saved ones differ they are reported (in the result and
        an :class:`~emakit.errors.EMAWarning`) and the current ones stay.

        Args:
            state: a dict from :meth:`state_dict` (possibly through ``torch.save``/``load``).
            strict: raise if names are missing or unexpected; otherwise load the common names.

        Returns:
            A :class:`LoadResult`.

        Raises:
            StateDictError: wrong format, a malformed entry, missing/unexpected names (strict),
                shape or dtype mismatches (always). Nothing is loaded.
        """
        self._check_not_swapped("load_state_dict() called")
        return self._apply_state(self._checked_state(state, strict))

    def _checked_state(self, state: Mapping[str, Any], strict: bool) -> _CheckedState:
        """Everything :meth:`load_state_dict` checks and converts, without changing anything."""
        checked = self._check_state(state)
        shadows = checked.shadows
        missing = [n for n in self._names if n not in shadows]
        unexpected = [n for n in shadows if n not in self._actions]
        mismatched = []
        b = self._backend
        mine = dict(zip(self._names, self._avg_shadows + self._copy_shadows))
        for name in self._names:
            if name in shadows:
                have, want = b.info(shadows[name]), b.info(mine[name])
                if have.shape != want.shape:
                    mismatched.append(f"{name}: shape {have.shape} != {want.shape}")
                elif have.dtype != want.dtype:
                    mismatched.append(f"{name}: dtype {have.dtype} != {want.dtype}")
        if mismatched or (strict and (missing or unexpected)):
            raise StateDictError(
                "the state does not fit this EMA", missing=missing if strict else (),
                unexpected=unexpected if strict else (), mismatched=mismatched,
                fix="Build the EMA over the same model and dtype, or pass strict=False to load "
                    "the common names (shape/dtype mismatches always fail).")
        products = checked.products
        if products is not None and not (self._guard and checked.init == "zeros") and any(
                products.get(n, checked.decay_product) != checked.decay_product
                for n in self._avg_names):
            raise StateDictError(
                "the state holds per-tensor bias corrections (decay_products) of an EMA whose "
                "guard skipped some tensors",
                fix="Create the EMA with skip_nonfinite=True to load it.")
        return checked._replace(missing=tuple(missing), unexpected=tuple(unexpected),
                                changed=self._changed_settings(state))

    def _apply_state(self, checked: _CheckedState) -> LoadResult:
        """Load what :meth:`_checked_state` accepted (nothing here can fail on the input)."""
        self._settle()
        b = self._backend
        mine = dict(zip(self._names, self._avg_shadows + self._copy_shadows))
        names = [n for n in self._names if n in checked.shadows]
        b.copy_([mine[n] for n in names], [checked.shadows[n] for n in names])
        self._step, self._last_update_step = checked.step, checked.last_update_step
        self._num_updates, self._decay_product = checked.num_updates, checked.decay_product
        self._init = checked.init
        self._last_decay = None
        self._counters = b.new_counters(self._avg_shadows + self._copy_shadows)
        for i, name in enumerate(self._names):
            if checked.skips.get(name):
                self._counters[i] += checked.skips[name]
        self._products = self._new_products()
        if self._products is not None:
            saved = checked.products or {}
            for i, name in enumerate(self._avg_names):
                self._products[i] *= saved.get(name, checked.decay_product)
        changed = dict(checked.changed)
        if changed:
            details = "; ".join(f"{k}: saved {v[0]!r}, current {v[1]!r}"
                                for k, v in changed.items())
            warnings.warn(
                f"the loaded EMA state was saved with other settings ({details}); the current "
                "settings stay in force. Pass the saved ones to EMA(...) to keep them.",
                EMAWarning,
                stacklevel=3,
            )
        return LoadResult(list(checked.missing), list(checked.unexpected), changed)

    def _check_state(self, state: object) -> _CheckedState:
        if not isinstance(state, Mapping):
            raise StateDictError(f"state must be a dict from EMA.state_dict(), got "
                                 f"{type(state).__name__}")
        version = state.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            newer = type(version) is int and version > FORMAT_VERSION
            raise StateDictError(
                f"unknown format_version {_short(version)}; this emakit reads format_version "
                f"{FORMAT_VERSION}",
                fix="Upgrade emakit to read it." if newer else
                    "Is this an emakit EMA state_dict()?")
        absent = [k for k in _STATE_KEYS if k not in state]
        if absent:
            raise StateDictError(f"the state lacks the keys {absent}",
                                 fix="Is this an emakit EMA state_dict()?")
        step, last, updates = (_state_int(state, k) for k in
                               ("step", "last_update_step", "num_updates"))
        every = _state_int(state, "every")
        if every < 1:
            raise StateDictError(f"state['every'] must be an int >= 1, got {every}")
        if last > step:
            raise StateDictError(f"state['last_update_step']={last} is after state['step']="
                                 f"{step}")
        product = _state_fraction(state["decay_product"], "state['decay_product']")
        init = state["init"]
        if init not in ("copy", "zeros"):
            raise StateDictError(f"state['init'] must be 'copy' or 'zeros', got {_short(init)}")
        for key in ("decay", "policy", "actions"):
            if not isinstance(state[key], Mapping):
                raise StateDictError(f"state[{key!r}] must be a dict, got "
                                     f"{type(state[key]).__name__}")
        bad_actions = [n for n, a in state["actions"].items() if a not in ("average", "copy")]
        if bad_actions:
            raise StateDictError(f"state['actions'] must map names to 'average' or 'copy'; "
                                 f"{_short(bad_actions[0])} -> "
                                 f"{_short(state['actions'][bad_actions[0]])}")
        raw = _state_mapping(state, "shadows")
        shadows = {}
        for name, tensor in raw.items():
            try:
                shadows[name] = self._backend.as_native(tensor, f"state['shadows'][{name!r}]")
            except (TypeError, RuntimeError, NotImplementedError) as exc:
                raise StateDictError(str(exc)) from None
        skips = {name: _state_int(raw_skips, name, "state['nonfinite_skips']")
                 for raw_skips in [_state_mapping(state, "nonfinite_skips", optional=True)]
                 for name in raw_skips}
        raw_products = _state_mapping(state, "decay_products", optional=True)
        products = {name: _state_fraction(v, f"state['decay_products'][{name!r}]")
                    for name, v in raw_products.items()} if "decay_products" in state else None
        for key in ("source_dtypes", "aliases"):  # informational; checked for shape only
            for name, value in _state_mapping(state, key, optional=True).items():
                if not isinstance(value, str):
                    raise StateDictError(f"state[{key!r}][{name!r}] must be a str, got "
                                         f"{_short(value)}")
        return _CheckedState(step, last, updates, product, str(init), shadows, skips, products)

    def _changed_settings(self, state: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        changed: dict[str, tuple[Any, Any]] = {}
        if dict(state["decay"]) != self._schedule.to_dict():
            changed["decay"] = (dict(state["decay"]), self._schedule.to_dict())
        if state["every"] != self._every:
            changed["every"] = (state["every"], self._every)
        diff = {n: a for n, a in state["actions"].items()
                if n in self._actions and self._actions[n] != a}
        if diff:
            changed["actions"] = (diff, {n: self._actions[n] for n in diff})
        return changed


class _CheckedState(NamedTuple):
    """A state that passed every check of :meth:`EMA.load_state_dict`, in native tensors."""

    step: int
    last_update_step: int
    num_updates: int
    decay_product: float
    init: str
    shadows: dict[str, Any]
    skips: dict[str, int]
    products: dict[str, float] | None
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    changed: Mapping[str, tuple[Any, Any]] = MappingProxyType({})


_MAX_COUNT = 2 ** 63 - 1  # counters are int64 on the device


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a state may hold anything)."""
    text = repr(value) if not hasattr(value, "shape") else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _state_int(state: Mapping[str, Any], key: str, where: str = "state") -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or \
            not 0 <= int(value) <= _MAX_COUNT:
        raise StateDictError(f"{where}[{key!r}] must be an int in [0, 2**63), got "
                             f"{_short(value)}")
    return int(value)


def _state_fraction(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not 0.0 <= float(value) <= 1.0:
        raise StateDictError(f"{where} must be a number in [0, 1], got {_short(value)}")
    return float(value)


def _state_mapping(state: Mapping[str, Any], key: str, *, optional: bool = False
                   ) -> Mapping[str, Any]:
    value = state.get(key)
    if value is None and optional:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise StateDictError(f"state[{key!r}] must map names (str) to values, got "
                             f"{type(value).__name__}")
    return value
