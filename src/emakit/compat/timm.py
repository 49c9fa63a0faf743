"""timm's ``ModelEmaV3`` and ``ModelEmaV2``, running on emakit's engine.

Replace ``from timm.utils import ModelEmaV3`` by ``from emakit.compat.timm import ModelEmaV3``;
the rest stays: the same constructor arguments, ``update(model, step=None)``, ``set(model)``,
``get_decay(step)``, ``forward`` (the EMA model), and ``.module``, the averaged copy of the
model that timm's scripts evaluate and save (``model_ema.module.state_dict()``, the
``state_dict_ema`` of timm checkpoints) and load into (``load_checkpoint(model_ema.module, ...,
use_ema=True)``). Where they have the shadows' dtype, the tensors of ``.module`` *are* the
engine's shadows (no second copy); a 16-bit model's keep its dtype (the shadows are float32) and
get the average, rounded, after every update. Either way what is loaded into ``.module`` becomes
the average, and every update shows in ``.module`` at once.

Tensors are matched by name (timm zips the two state dicts by position); a model wrapped in
``DistributedDataParallel``/``DataParallel`` (``.module``) or ``torch.compile`` (``._orig_mod``)
is unwrapped first. Floating tensors of the state dict are averaged, integer ones copied;
``exclude_buffers=True`` copies the buffers.

The decay is timm's ``get_decay(step)``: the constant ``decay`` for ``update(model)``; for
``update(model, step=s)``, 0 (a copy) up to ``update_after_step + 1``, then ``decay`` or, with
``use_warmup``, ``1 - (1 + e / warmup_gamma) ** -warmup_power`` clamped to
``[min_decay, decay]`` (:class:`emakit.schedules.InverseGamma`). Use one form throughout a run:
the first call decides.

Where the numbers differ from timm's (``docs/migration.md``):

- ``ModelEmaV3``: the update is the same ``lerp``, bitwise, for float32 models updated at
  consecutive steps. With a step gap (``update(model, step=s)`` after ``s - k``) emakit applies
  the decay of all ``k`` steps (the averaging window in steps stays the same), timm the decay of
  one; a repeated step is a no-op here, a second update in timm.
- 16-bit models: the shadows are float32 unless ``dtype`` says otherwise, and ``.module`` keeps
  the model's dtype (so it runs on the same inputs as the model), holding the float32 average
  rounded once after each update. timm keeps bfloat16 shadows with stochastic rounding by
  default: random, and not reproducible across seeds; ``stochastic_rounding`` and ``foreach``
  are accepted and unused.
- ``ModelEmaV2`` computes ``decay * e + (1 - decay) * m`` (three roundings against ``lerp``'s
  one): a few ulp apart (measured: at most 2.9 ulp of a tensor's largest magnitude after 12
  updates); timm averages integer buffers in float and truncates them back, emakit copies them.

Example:
    >>> import torch
    >>> from emakit.compat.timm import ModelEmaV3
    >>> model = torch.nn.Linear(2, 1)
    >>> model_ema = ModelEmaV3(model, decay=0.9)
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> model_ema.update(model, step=1)      # step 1: decay 0, the average copies the weights
    >>> bool(torch.equal(model_ema.module.weight, model.weight))
    True
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from emakit.ema import EMA
from emakit.policy import Policy
from emakit.schedules import Constant, InverseGamma, Schedule

__all__ = ["ModelEmaV2", "ModelEmaV3"]

_GLOB = re.compile(r"([*?\[])")


def _exact(name: str) -> str:
    """A glob pattern that matches exactly ``name`` (``*``, ``?`` and ``[`` escaped)."""
    return _GLOB.sub(r"[\1]", name)


def _unwrap(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    module: nn.Module = model
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    for _ in range(8):
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            module = inner
        elif isinstance(module, wrappers) and isinstance(module.module, nn.Module):
            module = module.module
        else:
            break
    return module


def _named(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict entries by name: the tensors themselves, not detached copies."""
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if isinstance(v, torch.Tensor)}


class _ModelEma(nn.Module):
    """The shared machinery: ``.module`` is a copy of the model whose tensors are the shadows."""

    def __init__(self, model: nn.Module, *, decay: float, device: Any, dtype: Any,
                 exclude_buffers: bool) -> None:
        super().__init__()
        source = _unwrap(model)
        self.decay = decay
        self.device = device
        self.dtype = dtype
        self._tensors = _named(source)
        buffers = {n for n, _ in source.named_buffers()} if exclude_buffers else set()
        self._policy = Policy(copy=tuple(_exact(n) for n in self._tensors if n in buffers))
        self.module = copy.deepcopy(source)
        self.module.eval()
        self._mode: str | None = None
        self._mirrors: list[tuple[str, torch.Tensor, int]] = []
        self._ema = self._engine(Constant(float(decay)), 0, shadows=None)

    @property
    def ema(self) -> EMA:
        """The :class:`emakit.EMA` doing the work (e.g. ``emakit.save(model_ema.ema, path)``)."""
        self._pull()  # a checkpoint loaded into .module is the average from now on
        return self._ema

    def _engine(self, schedule: Schedule, step: int, shadows: dict[str, torch.Tensor] | None
                ) -> EMA:
        """An engine EMA over the model's tensors whose shadows are ``.module``'s tensors.

        The shadows start as ``shadows`` (by name; None: ``.module``'s current values, which
        are the model's at creation), then ``.module``'s tensors are re-pointed at them.
        """
        ema = EMA(self._tensors, decay=schedule, device=self.device, dtype=self.dtype,
                  policy=self._policy, start=step)
        mine = _named(self.module)
        state = ema.state_dict()
        values = shadows if shadows is not None else {n: mine[n] for n in state["shadows"]}
        ema.load_state_dict({**state, "shadows": {
            n: values[n].detach().to(device=s.device, dtype=s.dtype)
            for n, s in state["shadows"].items()}})
        self._mirrors = []
        with torch.no_grad():
            for name, shadow in ema.averaged().items():
                if mine[name].dtype == shadow.dtype or self.dtype is not None:
                    mine[name].data = shadow  # a dtype= given: .module takes it, as in timm
                else:  # a 16-bit model's tensor: keeps its dtype, gets the rounded average
                    if mine[name].device != shadow.device:  # device=: .module goes there too
                        mine[name].data = torch.empty_like(mine[name], device=shadow.device)
                    self._mirrors.append((name, mine[name], -1))
            for alias, name in state["aliases"].items():
                mine[alias].data = mine[name].data
        self._ema = ema
        self._push()
        return ema

    @torch.no_grad()
    def _push(self) -> None:
        """The average, rounded, into ``.module``'s tensors of another dtype than the shadows
        (read through ``averaged()``, which waits for an offloaded fold)."""
        if not self._mirrors:
            return
        average = self._ema.averaged()
        for i, (name, tensor, _) in enumerate(self._mirrors):
            tensor.copy_(average[name])
            self._mirrors[i] = (name, tensor, tensor._version)

    @torch.no_grad()
    def _pull(self) -> None:
        """What was written into those tensors since (a checkpoint loaded into ``.module``, or
        :meth:`set`) into the shadows: ``.module`` holds the average."""
        stale = [(i, name, tensor) for i, (name, tensor, seen) in enumerate(self._mirrors)
                 if tensor._version != seen]
        if not stale:
            return
        shadows = self._ema.state_dict()["shadows"]  # the live shadows, by name
        for i, name, tensor in stale:
            shadows[name].copy_(tensor)
            self._mirrors[i] = (name, tensor, tensor._version)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        if getattr(self, "_ema", None) is not None:
            raise TypeError(
                f"{type(self).__name__}.to()/cuda()/half() would move .module's tensors away "
                "from the average they share memory with. Pass device= (and dtype=) to the "
                "constructor instead.")
        result: nn.Module = super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        return result

    def _refresh(self, model: nn.Module) -> None:
        """Point the engine's source at ``model``'s tensors (matched by name)."""
        named = _named(_unwrap(model))
        absent = [n for n in self._tensors if n not in named]
        if absent:
            shown = ", ".join(repr(n) for n in absent[:5])
            raise ValueError(f"update(model): the model lacks {len(absent)} tensor(s) that the "
                             f"EMA averages ({shown}); pass the model the EMA was made for.")
        for name in self._tensors:
            self._tensors[name] = named[name]

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Make the average a copy of ``model``'s current weights."""
        named = _named(_unwrap(model))
        for name, tensor in _named(self.module).items():
            if name in named:
                tensor.copy_(named[name].detach())
        self._pull()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the EMA model (``.module``)."""
        return self.module(*args, **kwargs)


class ModelEmaV3(_ModelEma):
    """timm's ``ModelEmaV3``: an EMA of everything in the model's state dict.

    Args:
        model: the model to average (a copy becomes :attr:`module`).
        decay: the decay (after warmup).
        min_decay: lower clamp of the warmup decay.
        update_after_step: with ``update(model, step=...)``: steps during which the average
            copies the weights.
        use_warmup: with ``step=``: timm's inverse-gamma warmup.
        warmup_gamma: the warmup's step scale.
        warmup_power: the warmup's exponent.
        device: where the average lives (default: with the model).
        dtype: dtype of the averaged tensors (default: the model's; float32 for 16-bit ones).
        stochastic_rounding: accepted for compatibility; emakit keeps 16-bit models' averages
            in float32 instead.
        stochastic_rounding_seed: accepted for compatibility.
        foreach: accepted for compatibility (emakit groups its kernels itself).
        exclude_buffers: copy the buffers instead of averaging them.

    Attributes:
        module: the averaged copy of the model, in eval mode; its tensors are the average.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0,
                 update_after_step: int = 0, use_warmup: bool = False,
                 warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                 device: Any = None, dtype: Any = None, stochastic_rounding: bool = True,
                 stochastic_rounding_seed: int = 0, foreach: bool = True,
                 exclude_buffers: bool = False) -> None:
        self.min_decay = min_decay
        self.update_after_step = update_after_step
        self.use_warmup = use_warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.stochastic_rounding = stochastic_rounding
        self.stochastic_rounding_seed = stochastic_rounding_seed
        self.foreach = foreach
        self.exclude_buffers = exclude_buffers
        self._stepped = self._step_schedule(decay)  # checks the warmup arguments now
        super().__init__(model, decay=decay, device=device, dtype=dtype,
                         exclude_buffers=exclude_buffers)

    def _step_schedule(self, decay: float) -> InverseGamma:
        if self.use_warmup and self.min_decay < decay:
            return InverseGamma(inv_gamma=self.warmup_gamma, power=self.warmup_power,
                                min_decay=self.min_decay, max_decay=decay,
                                update_after_step=self.update_after_step)
        # 0 up to update_after_step + 1, then a constant: timm clamps the warmup to
        # max(min(warmup, decay), min_decay), which is min_decay when that is the larger
        top = max(decay, self.min_decay) if self.use_warmup else decay
        return InverseGamma(min_decay=top, max_decay=top,
                            update_after_step=self.update_after_step)

    def get_decay(self, step: int | None = None) -> float:
        """The decay an update at ``step`` applies (timm's formula)."""
        if step is None:
            return float(self.decay)
        if step <= self.update_after_step + 1:
            return 0.0
        return self._stepped(step)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Fold ``model``'s current weights into the average (after ``optimizer.step()``).

        Args:
            model: the model being trained (or its DDP / compiled wrapper).
            step: the optimizer step count after this step (1 after the first), for the
                warmup and ``update_after_step``; None for the constant ``decay``. Give it on
                every call or on none.

        Raises:
            ValueError: ``step`` given on some calls and not on others, or going backwards.
        """
        mode = "constant" if step is None else "step"
        if self._mode is None:
            if mode == "step":  # re-made with the step schedule, starting just before step
                self._ema = self._engine(self._stepped, max(int(step) - 1, 0),  # type: ignore[arg-type]
                                         shadows=None)
            self._mode = mode
        elif mode != self._mode:
            raise ValueError(
                f"update(model, step={step!r}): this EMA was updated "
                f"{'with' if self._mode == 'step' else 'without'} step= so far; pass step= on "
                "every call (the warmup schedule) or on none (the constant decay).")
        self._refresh(model)
        self._pull()
        self._ema.update(step=step)
        self._push()


class ModelEmaV2(_ModelEma):
    """timm's ``ModelEmaV2``: an EMA of everything in the model's state dict, constant decay.

    Args:
        model: the model to average (a copy becomes :attr:`module`).
        decay: the decay.
        device: where the average lives (default: with the model).

    Attributes:
        module: the averaged copy of the model, in eval mode; its tensors are the average.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, device: Any = None) -> None:
        super().__init__(model, decay=decay, device=device, dtype=None, exclude_buffers=False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (after ``optimizer.step()``)."""
        self._refresh(model)
        self._pull()
        self._ema.update()
        self._push()
