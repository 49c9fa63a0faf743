"""The ``EMA`` callback for Lightning 2.x: an emakit average of the LightningModule's weights.

Two lines::

    from emakit.integrations.lightning import EMA
    trainer = lightning.Trainer(..., callbacks=[EMA(decay=0.999)])

What it does at each event (``docs/integrations/lightning.md``):

- ``on_train_start``: builds an :class:`emakit.EMA` of the module (parameters and persistent
  buffers by name; integer buffers such as ``num_batches_tracked`` copied, never averaged), or
  resumes the one found in the checkpoint;
- ``on_train_batch_end``: ``ema.update(step=trainer.global_step)``: one update per optimizer
  step (with gradient accumulation the batches between steps repeat the step: no update);
- validation, test and predict run on the EMA weights (``eval_on="ema"``): swapped in at
  ``on_{validation,test,predict}_start``, the training weights back bitwise at ``..._end`` and
  on an exception;
- checkpoints: the EMA state sits in ``checkpoint["callbacks"][state_key]`` (exact resume), and
  ``checkpoint["state_dict"]`` holds the EMA weights -- what validation measured, so a
  ``ModelCheckpoint`` monitoring a validation metric saves the weights that scored it, and
  ``LitModule.load_from_checkpoint(path)`` gives the EMA model -- while the training weights sit
  under ``checkpoint["current_model_state"]`` (the key Lightning's ``EMAWeightAveraging`` uses)
  and come back on resume. With ``eval_on="training"`` the checkpoint keeps the training weights
  in ``state_dict``.

The callback state, for readers of ``.ckpt`` files (:data:`LAYOUT`)::

    checkpoint["callbacks"]["emakit.EMA"] = {"emakit": "lightning-callback/1",
                                             "ema": <emakit.EMA.state_dict()>,
                                             "eval_on": "ema"}

The module's weights after ``fit`` are the training weights; ``callback.ema.copy_to()`` writes
the average into the module (Lightning's ``EMAWeightAveraging`` does that at the end of fit).
A checkpoint of ``EMAWeightAveraging`` resumes here too: its average becomes the EMA's start.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from emakit import ema as emakit_ema
from emakit.distributed.gather import gathered, has_shards
from emakit.distributed.shards import is_dtensor
from emakit.errors import EMAWarning, StateDictError
from emakit.integrations.options import EVAL_ON, check_options
from emakit.policy import Policy

__all__ = ["EMA", "LAYOUT"]

LAYOUT = "lightning-callback/1"
"""The value of ``"emakit"`` in the callback's state: marks emakit's state in a ``.ckpt``."""


def _full_on_rank0(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``tensors`` with every DTensor gathered into a full tensor (a collective: every rank
    calls it; rank 0 gets the full tensors, one at a time, the others an empty dict), or as
    they are when none is sharded."""
    if not has_shards(tensors):
        return dict(tensors)
    out: dict[str, Any] = {}
    gathered(tensors, out.update)  # out is filled on rank 0 only
    return out


def _replace_shadows(ema: emakit_ema.EMA, values: Mapping[str, Any]) -> dict[str, Any]:
    """``ema``'s own state with the shadows taken from ``values`` (cast to the shadows' dtype)."""
    state = ema.state_dict()
    missing = [n for n in state["shadows"] if n not in values]
    if missing:
        raise StateDictError("the checkpoint's averaged weights lack tensors the EMA tracks",
                             missing=missing, fix="Resume with the model it was saved from.")
    state["shadows"] = {n: torch.as_tensor(values[n]).to(device=s.device, dtype=s.dtype)
                        for n, s in state["shadows"].items()}
    return state


class EMA(Callback):
    """Keep an emakit EMA of the LightningModule; validate, test and predict on it.

    Args:
        decay: a float, or a schedule from :mod:`emakit.schedules` (default 0.999).
        half_life: instead of ``decay``: optimizer steps after which a weight's share halves.
        every: update on every ``every``-th optimizer step (the decay of the skipped steps is
            applied, so the window in steps stays the same).
        dtype: shadow dtype (default float32 for 16-bit weights).
        device: where the shadows live (e.g. ``"cpu"`` to spare accelerator memory).
        policy: an :class:`emakit.Policy` (which tensors are averaged, copied or skipped).
        eval_on: ``"ema"``: validation/test/predict see the EMA weights, and checkpoints hold
            them in ``state_dict``; ``"training"``: the training weights (the EMA is only kept
            and saved).
        name: tells several EMA callbacks apart in the checkpoint (``state_key``
            ``"emakit.EMA[name]"``); only one of them should use ``eval_on="ema"``.

    Raises:
        TypeError, ValueError: a bad argument, naming it.
    """

    def __init__(self, decay: Any = None, *, half_life: float | None = None, every: int = 1,
                 dtype: Any = None, device: Any = None, policy: Policy | None = None,
                 eval_on: str = "ema", name: str | None = None) -> None:
        if eval_on not in EVAL_ON:
            raise ValueError(f"eval_on must be 'ema' or 'training', got {eval_on!r}.")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}.")
        self._options: dict[str, Any] = {"decay": decay, "half_life": half_life,
                                         "every": every, "dtype": dtype, "device": device,
                                         "policy": policy}
        check_options(self._options)
        self.eval_on = eval_on
        self.name = name
        self._ema: emakit_ema.EMA | None = None
        self._module: pl.LightningModule | None = None
        self._aliases: dict[str, str] = {}
        self._pending: tuple[str, Mapping[str, Any]] | None = None
        self._warned_weights_only = False

    @property
    def state_key(self) -> str:
        """The key of this callback's state in ``checkpoint["callbacks"]``."""
        return "emakit.EMA" if self.name is None else f"emakit.EMA[{self.name}]"

    @property
    def ema(self) -> emakit_ema.EMA | None:
        """The :class:`emakit.EMA` (None before training starts or a checkpoint is loaded)."""
        return self._ema

    def __repr__(self) -> str:
        return f"EMA(state_key={self.state_key!r}, eval_on={self.eval_on!r}, ema={self._ema!r})"

    # --------------------------------------------------------------------------- the EMA
    def _create(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> emakit_ema.EMA:
        ema = emakit_ema.EMA(pl_module, start=trainer.global_step, **self._options)
        pending, self._pending = self._pending, None
        if pending is not None:
            kind, payload = pending
            ema.load_state_dict(payload if kind == "emakit" else _replace_shadows(ema, payload))
        self._ema, self._module = ema, pl_module
        self._aliases = dict(ema.state_dict()["aliases"])
        return ema

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the EMA (or resume the checkpoint's); warn about weights-only checkpoints."""
        self._restore()
        current = self._ema
        if current is None or self._pending is not None or self._module is not pl_module or \
                current.step != trainer.global_step:
            self._create(trainer, pl_module)
        if self.eval_on == "ema" and not self._warned_weights_only:
            only = [c for c in getattr(trainer, "callbacks", ()) if isinstance(c, ModelCheckpoint)
                    and c.save_weights_only]
            if only:
                self._warned_weights_only = True
                warnings.warn(
                    "ModelCheckpoint(save_weights_only=True) writes the training weights: "
                    "Lightning does not call callbacks when it saves weights only, so the EMA "
                    "weights that validation measured cannot go in. Save full checkpoints "
                    "(the default): their state_dict holds the EMA weights.", EMAWarning,
                    stacklevel=2)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update once per optimizer step (a batch that did not step repeats the step)."""
        if self._ema is not None:
            self._ema.update(step=trainer.global_step)

    # ------------------------------------------------------------------------ evaluation
    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:
            self._create(trainer, pl_module)  # validate/test/predict from a checkpoint
        ema = self._ema
        if self.eval_on == "ema" and ema is not None and not ema.is_swapped:
            ema.apply_shadow()

    def _restore(self) -> None:
        if self._ema is not None and self._ema.is_swapped:
            self._ema.restore()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA weights in."""
        self._apply(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the training weights back (before ``ModelCheckpoint`` saves)."""
        self._restore()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA weights in."""
        self._apply(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the training weights back."""
        self._restore()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Swap the EMA weights in."""
        self._apply(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the training weights back."""
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        """Put the training weights back if an error interrupted an evaluation."""
        self._restore()

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The callback's checkpoint state: the EMA's ``state_dict()`` under ``"ema"``."""
        if self._ema is not None:
            state = self._ema.state_dict()
        elif self._pending is not None and self._pending[0] == "emakit":
            state = dict(self._pending[1])  # loaded, not used yet: pass it on
        else:
            return {}
        return {"emakit": LAYOUT, "ema": state, "eval_on": self.eval_on}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's EMA state; the EMA resumes from it when it is next used.

        Raises:
            StateDictError: the state is not this callback's (checked in full when applied).
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("emakit") != LAYOUT or \
                not isinstance(state_dict.get("ema"), Mapping):
            raise StateDictError(
                f"checkpoint['callbacks'][{self.state_key!r}] is not an emakit EMA callback "
                f"state (expected {{'emakit': {LAYOUT!r}, 'ema': ...}})",
                fix="Was the checkpoint written by another callback under the same key?")
        self._pending = ("emakit", state_dict["ema"])

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Put the EMA weights in ``state_dict`` and the training weights aside.

        With a sharded model (DTensors: ``ModelParallelStrategy``) only ``state_dict`` and the
        optimizers are saved shard by shard; the rest of the checkpoint is written by rank 0
        alone, so the training weights and the EMA's shadows put there are gathered into full
        tensors first (a collective on every rank; rank 0 holds them), and each rank takes its
        piece back on loading.
        """
        ours = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if isinstance(ours, dict) and isinstance(ours.get("ema"), Mapping):
            ema_state = dict(ours["ema"])
            ema_state["shadows"] = _full_on_rank0(ema_state["shadows"])
            ours["ema"] = ema_state
        if self.eval_on != "ema" or self._ema is None or "state_dict" not in checkpoint:
            return
        training = checkpoint["state_dict"]
        checkpoint["current_model_state"] = _full_on_rank0(training)
        checkpoint["state_dict"] = self._ema_weights(training)

    def _ema_weights(self, training: Mapping[str, Any]) -> dict[str, Any]:
        """``training`` with the average in place of every tracked tensor.

        Where a shadow has the weight's dtype and shape it goes in itself, so ``torch.save``
        writes its storage once for both the callback state and ``state_dict``.
        """
        ema = self._ema
        if ema is None:  # callers check; keeps mypy sure
            return dict(training)
        averaged = ema.averaged()
        out: dict[str, Any] = {}
        converted: dict[str, Any] | None = None
        for name, value in training.items():
            avg = averaged.get(self._aliases.get(name, name))
            if avg is None or not isinstance(value, torch.Tensor):
                out[name] = value
            elif avg.dtype == value.dtype and avg.shape == value.shape:
                out[name] = avg
            else:
                if converted is None:
                    converted = ema.model_state_dict()
                out[name] = converted[name]
        return out

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Put the training weights back in the module (``state_dict`` held the EMA's)."""
        training = checkpoint.get("current_model_state")
        if training is None:
            return
        ours = (checkpoint.get("callbacks") or {}).get(self.state_key)
        if ours is None and "averaging_state" in checkpoint:
            # Lightning's EMAWeightAveraging: its average starts this EMA
            self._pending = ("average", dict(checkpoint["state_dict"]))
        elif ours is None:
            return
        if any(is_dtensor(v) for v in pl_module.state_dict().values()):  # sharded: full tensors
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(pl_module, dict(training), options=StateDictOptions(
                full_state_dict=True, strict=pl_module.strict_loading))
            return
        pl_module.load_state_dict(training, strict=pl_module.strict_loading)
