"""torch-ema's ``ExponentialMovingAverage``, running on emakit's engine.

Replace ``from torch_ema import ExponentialMovingAverage`` by
``from emakit.compat.torch_ema import ExponentialMovingAverage``; the rest of the code stays:
the same constructor, the same verbs (``update``, ``copy_to``, ``store``, ``restore``,
``average_parameters``, ``to``), each taking an optional ``parameters`` iterable, and the same
``state_dict()`` layout (``decay``, ``num_updates``, ``shadow_params``, ``collected_params``), so
checkpoints move both ways.

torch-ema matches parameters by position (its API hands over tensors without names); this class
names them ``"0"``, ``"1"``, ... in that order, and the averaging runs on :class:`emakit.EMA`
(grouped kernels, exact resume). The decay is torch-ema's: ``min(decay, (1 + n) / (10 + n))`` at
the ``n``-th update with ``use_num_updates=True`` (:class:`emakit.schedules.TFWarmup`), else the
constant ``decay``.

Where the numbers differ from torch-ema's (``docs/migration.md``):

- one update is ``lerp(shadow, w, 1 - d)``, rounded once, where torch-ema rounds
  ``shadow - (1 - d) * (shadow - w)`` twice: the two agree within a few ulp, not bitwise
  (measured: at most 2.4 ulp of a tensor's largest magnitude over 200 updates; each update's
  difference is damped by ``d`` afterwards, so they stay bounded);
- for float16 / bfloat16 parameters the shadows are float32 (torch-ema keeps them in the
  parameter's dtype, where updates smaller than its resolution are rounded away); integer
  tensors are copied, never averaged;
- the parameters are held by strong references (torch-ema holds weak ones).

Example:
    >>> import torch
    >>> from emakit.compat.torch_ema import ExponentialMovingAverage
    >>> model = torch.nn.Linear(2, 1)
    >>> ema = ExponentialMovingAverage(model.parameters(), decay=0.9, use_num_updates=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(1.0)
    >>> ema.update()
    >>> with ema.average_parameters():
    ...     inside = model.weight.clone()
    >>> bool(torch.allclose(inside, model.weight - 0.9))
    True
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from emakit.ema import EMA
from emakit.errors import StateDictError, SwapError
from emakit.schedules import Constant, Schedule, TFWarmup

__all__ = ["ExponentialMovingAverage"]


def _tensors(parameters: Iterable[Any], what: str) -> list[torch.Tensor]:
    if isinstance(parameters, (torch.Tensor, str, bytes, Mapping)) or \
            not isinstance(parameters, Iterable):
        raise TypeError(
            f"{what} must be an iterable of tensors (e.g. model.parameters()), got "
            f"{type(parameters).__name__}.")
    out = list(parameters)
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(p).__name__}, not a torch.Tensor; pass "
                            "model.parameters() or a list of tensors.")
    return out


def _schedule(decay: object, use_num_updates: bool) -> Schedule:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a number in [0, 1], got {decay!r}.")
    return TFWarmup(float(decay)) if use_num_updates else Constant(float(decay))


class ExponentialMovingAverage:
    """Exponential moving average of a set of parameters (torch-ema's class and verbs).

    Args:
        parameters: an iterable of tensors, typically ``model.parameters()``; every one is
            averaged, whether it requires grad or not (torch-ema's rule), matched by position.
        decay: the decay, in [0, 1].
        use_num_updates: use torch-ema's warmup ``min(decay, (1 + n) / (10 + n))``.

    Attributes:
        collected_params: the tensors saved by :meth:`store` (None before).

    Raises:
        TypeError, ValueError: ``parameters`` is not an iterable of tensors, ``decay`` is not in
            [0, 1].
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float,
                 use_num_updates: bool = True) -> None:
        params = _tensors(parameters, "parameters")
        if not params:
            raise ValueError("parameters is empty: there is nothing to average. Pass "
                             "model.parameters() (a generator can be consumed only once).")
        schedule = _schedule(decay, bool(use_num_updates))
        self._names = [str(i) for i in range(len(params))]
        self._tensors: dict[str, torch.Tensor] = dict(zip(self._names, params))
        self._decay, self._warmup = float(decay), bool(use_num_updates)
        self.collected_params: list[torch.Tensor] | None = None
        self._ema = EMA(self._tensors, decay=schedule)
        self._aliases: dict[str, str] = self._ema.state_dict()["aliases"]
        self._device: Any = None
        self._dtype: Any = None

    # ------------------------------------------------------------------------- properties
    @property
    def ema(self) -> EMA:
        """The :class:`emakit.EMA` doing the work (its parameters are named ``"0"``, ``"1"``,
        ...): e.g. ``emakit.save(ema.ema, "ema.safetensors")``."""
        return self._ema

    @property
    def decay(self) -> float:
        """The decay (settable, as in torch-ema: later updates use the new value)."""
        return float(self._decay)

    @decay.setter
    def decay(self, value: float) -> None:
        self._rebuild(_schedule(value, self._warmup), self._ema.step, self._device,
                      self._dtype, self.shadow_params)
        self._decay = float(value)

    @property
    def num_updates(self) -> int | None:
        """How many updates were made (None with ``use_num_updates=False``, as in torch-ema)."""
        return self._ema.step if self._warmup else None

    @property
    def shadow_params(self) -> list[torch.Tensor]:
        """The averages, in the order of the parameters (the tensors themselves, no copy)."""
        averaged = self._ema.averaged()
        return [averaged[self._aliases.get(n, n)] for n in self._names]

    def __repr__(self) -> str:
        return (f"ExponentialMovingAverage(parameters={len(self._names)}, decay={self.decay}, "
                f"num_updates={self.num_updates})")

    # ------------------------------------------------------------------------------ verbs
    def _params(self, parameters: Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
        if parameters is None:
            return [self._tensors[n] for n in self._names]
        params = _tensors(parameters, "parameters")
        if len(params) != len(self._names):
            raise ValueError(
                f"parameters holds {len(params)} tensors, this ExponentialMovingAverage "
                f"averages {len(self._names)}: pass the same parameters it was created with.")
        return params

    def update(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Fold the current parameters into the average (call after ``optimizer.step()``).

        Args:
            parameters: the tensors to fold in, in the order of the ones given at creation;
                None for those.
        """
        if parameters is None:
            self._ema.update()
            return
        given = self._params(parameters)
        kept = dict(self._tensors)
        self._tensors.update(zip(self._names, given))
        try:
            self._ema.update()
        finally:
            self._tensors.update(kept)

    def copy_to(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Copy the averages into ``parameters`` (None: the ones given at creation).

        Raises:
            ValueError: an average holds NaN/Inf (nothing is copied), or a count mismatch.
        """
        targets = self._params(parameters)
        self._ema.copy_to(dict(zip(self._names, targets)))

    def store(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Save a copy of ``parameters`` (None: the ones given at creation) for :meth:`restore`."""
        self.collected_params = [p.detach().clone() for p in self._params(parameters)]

    def restore(self, parameters: Iterable[torch.Tensor] | None = None) -> None:
        """Copy the tensors saved by :meth:`store` back into ``parameters``.

        Raises:
            SwapError: (a ``RuntimeError``, as torch-ema raises) nothing was stored.
        """
        if self.collected_params is None:
            raise SwapError("restore() called before store(): this ExponentialMovingAverage "
                            "has no stored parameters to restore. Call store() first (or use "
                            "the average_parameters() context manager).")
        targets = self._params(parameters)
        with torch.no_grad():
            for saved, param in zip(self.collected_params, targets):
                param.copy_(saved)

    @contextlib.contextmanager
    def average_parameters(self, parameters: Iterable[torch.Tensor] | None = None
                           ) -> Iterator[None]:
        """Context manager: the averages in ``parameters`` inside, the parameters back after.

        ``store()``, ``copy_to()``, then ``restore()`` on exit, also on an exception.
        """
        params = self._params(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    def to(self, device: Any = None, dtype: Any = None) -> None:
        """Move the averages (and stored parameters) to ``device``; floating ones to ``dtype``."""
        if self.collected_params is not None:
            self.collected_params = [
                p.to(device=device, dtype=dtype) if p.is_floating_point() and dtype is not None
                else p.to(device=device) for p in self.collected_params]
        self._rebuild(self._ema.schedule, self._ema.step, device, dtype, self.shadow_params)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch-ema's state: ``decay``, ``num_updates``, ``shadow_params``, ``collected_params``
        (references to the tensors, as ``nn.Module.state_dict`` gives)."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow_params": self.shadow_params, "collected_params": self.collected_params}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state of torch-ema's layout (from this class or from torch-ema itself).

        Everything is checked before anything changes. The averages are cast to this EMA's
        shadow dtype and device (as torch-ema casts to the parameters'); the saved ``decay`` and
        ``num_updates`` are applied (``num_updates=None`` turns the warmup off), as in torch-ema.

        Raises:
            StateDictError: a missing key, a wrong count, type or shape, naming the entry.
        """
        if not isinstance(state_dict, Mapping):
            raise StateDictError(f"state_dict must be a dict from state_dict(), got "
                                 f"{type(state_dict).__name__}")
        missing = [k for k in ("decay", "num_updates", "shadow_params") if k not in state_dict]
        if missing:
            raise StateDictError(f"the torch-ema state lacks {missing}",
                                 fix="Pass what ExponentialMovingAverage.state_dict() returned.")
        decay, updates = state_dict["decay"], state_dict["num_updates"]
        try:
            schedule = _schedule(decay, updates is not None)
        except (TypeError, ValueError) as exc:
            raise StateDictError(f"state_dict['decay']: {exc}") from None
        if updates is not None and (isinstance(updates, bool) or
                                    not isinstance(updates, numbers.Integral) or updates < 0):
            raise StateDictError(f"state_dict['num_updates'] must be None or an int >= 0, got "
                                 f"{updates!r}")
        current = self.shadow_params
        shadows = self._checked_list(state_dict, "shadow_params", current)
        collected = None
        if state_dict.get("collected_params") is not None:
            collected = self._checked_list(state_dict, "collected_params", self._params(None))
        step = int(updates) if updates is not None else self._ema.step
        self._rebuild(schedule, step, self._device, self._dtype, shadows)
        self._decay, self._warmup = float(decay), updates is not None
        self.collected_params = None if collected is None else [c.clone() for c in collected]

    def _checked_list(self, state: Mapping[str, Any], key: str,
                      like: list[torch.Tensor]) -> list[torch.Tensor]:
        value = state[key]
        if not isinstance(value, (list, tuple)):
            raise StateDictError(f"state_dict[{key!r}] must be a list of tensors, got "
                                 f"{type(value).__name__}")
        if len(value) != len(like):
            raise StateDictError(
                f"state_dict[{key!r}] holds {len(value)} tensors, this ExponentialMovingAverage "
                f"averages {len(like)} parameters",
                fix="Load a state saved for the same parameters.")
        out = []
        for i, (saved, mine) in enumerate(zip(value, like)):
            if not isinstance(saved, torch.Tensor):
                raise StateDictError(f"state_dict[{key!r}][{i}] is a {type(saved).__name__}, "
                                     "not a tensor")
            if saved.shape != mine.shape:
                raise StateDictError(f"state_dict[{key!r}][{i}] has shape {tuple(saved.shape)}, "
                                     f"the parameter {tuple(mine.shape)}")
            dtype = mine.dtype if saved.is_floating_point() == mine.is_floating_point() else None
            out.append(saved.to(device=mine.device, dtype=dtype))
        return out

    def _rebuild(self, schedule: Schedule, step: int, device: Any, dtype: Any,
                 shadows: list[torch.Tensor]) -> None:
        """A new engine EMA (another schedule, device or dtype) holding ``shadows``."""
        ema = EMA(self._tensors, decay=schedule, device=device, dtype=dtype, start=step)
        state = ema.state_dict()
        mine = ema.averaged()
        aliases = state["aliases"]
        values = {}
        for name, value in zip(self._names, shadows):
            target = mine[aliases.get(name, name)]
            values[aliases.get(name, name)] = value.to(device=target.device, dtype=target.dtype)
        ema.load_state_dict({**state, "shadows": values})
        self._ema, self._aliases, self._device, self._dtype = ema, aliases, device, dtype
