"""``EMACallback`` for Hugging Face ``transformers.Trainer`` (and the trainers that subclass it).

Two lines::

    from emakit.integrations.transformers import EMACallback
    trainer = Trainer(model, args, ..., callbacks=[EMACallback(decay=0.999)])

What it does at each event (``docs/integrations/transformers.md``):

- ``on_init_end``: finds the ``Trainer`` it was given to (the nearest calling frame whose
  ``self`` is a ``transformers.Trainer``; :meth:`EMACallback.bind` does it by hand) and wraps
  that trainer's ``evaluate`` and ``predict`` (they run on the EMA weights, also when called
  directly) and ``train`` (to learn the ``resume_from_checkpoint`` it was given, which callbacks
  are not told);
- ``on_train_begin``: builds an :class:`emakit.EMA` of the model, or resumes it from
  ``<checkpoint>/ema.safetensors`` of the checkpoint training resumed from (any path);
- ``on_step_end``: ``ema.update(step=state.global_step)``: once per optimizer step, so gradient
  accumulation is respected;
- ``on_save``: writes ``ema.safetensors`` (:func:`emakit.save`) into ``checkpoint-N/`` next to
  the training weights, which stay the training weights;
- ``on_evaluate``: with ``save_best``, keeps the best EMA model by
  ``args.metric_for_best_model`` in a ``save_pretrained`` folder;
- ``on_train_end``: with ``load_best_model_at_end``, the model gets the EMA weights of the best
  checkpoint (the one the EMA metric chose); with ``save_final``, the final EMA model is written
  in ``save_pretrained`` layout (``model.safetensors`` + ``config.json``, and the tokenizer or
  processor), so ``from_pretrained`` loads it.

Under DDP every process keeps the same EMA of its replica (the weights are equal after each
step); only the main process writes files. Under FSDP2 (DTensor parameters) each process keeps
the EMA of its shards, and every write is a collective that all processes join: the tensors are
gathered one at a time and the main process writes them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import secrets
import shutil
import sys
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from emakit.best import KeepBest
from emakit.distributed.agree import from_rank0
from emakit.distributed.gather import has_shards
from emakit.ema import EMA
from emakit.errors import EMAWarning
from emakit.integrations.options import EVAL_ON, check_options
from emakit.io.checkpoint import read_state, save
from emakit.policy import Policy

__all__ = ["FILE_NAME", "EMACallback"]

FILE_NAME = "ema.safetensors"
"""The emakit file written into each ``checkpoint-N/`` folder."""
_WRAPPED = "__emakit_ema_callback__"


def find_trainer(depth: int = 2) -> Trainer | None:
    """The ``transformers.Trainer`` that is calling, found by walking up the call stack.

    Trainer events carry the model and the optimizer but not the trainer; the trainer is the
    ``self`` of the frame that fires ``on_init_end`` (``Trainer.__init__``) or ``on_train_begin``.

    Args:
        depth: frames to skip (this function's caller's caller by default).

    Returns:
        The nearest calling frame's ``self`` that is a ``Trainer``, or None.
    """
    frame: FrameType | None = sys._getframe(depth)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _save_pretrained(model: Any, processing: Any, tensors: dict[str, Any] | None,
                     dest: Path) -> None:
    """Write ``model`` (with ``tensors`` as its state dict, if given) and its processor to the
    folder ``dest`` in ``save_pretrained`` layout; the old folder is replaced only once the new
    one is complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    new = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
    new.mkdir()  # the umask's mode, like the folders the Trainer writes
    try:
        model.save_pretrained(new, state_dict=tensors)
        if processing is not None and callable(getattr(processing, "save_pretrained", None)):
            processing.save_pretrained(new)
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def _write_model(model: Any, processing: Any, tensors: dict[str, Any], dest: Path,
                 should_save: bool) -> None:
    """:func:`_save_pretrained` by the process that saves; for a sharded model's state (DTensors)
    a collective: every process gathers, one tensor at a time, and the saving one writes."""
    if not has_shards(tensors):
        if should_save:
            _save_pretrained(model, processing, tensors, dest)
        return
    from emakit.distributed.gather import gathered

    def write(full: dict[str, Any]) -> None:
        if should_save:
            _save_pretrained(model, processing, full, dest)

    gathered(tensors, write)


class EMACallback(TrainerCallback):
    """Keep an emakit EMA of a ``Trainer``'s model; evaluate, checkpoint and save it.

    Args:
        decay: a float or a schedule from :mod:`emakit.schedules` (default 0.999).
        half_life: instead of ``decay``: optimizer steps after which a weight's share halves.
        every: update on every ``every``-th optimizer step (the window in steps is the same).
        dtype: shadow dtype (default float32 for 16-bit models).
        device: where the shadows live (e.g. ``"cpu"``).
        policy: an :class:`emakit.Policy`.
        eval_on: ``"ema"``: ``evaluate()`` and ``predict()`` (during training and called
            directly) run on the EMA weights, so ``metric_for_best_model`` ranks EMA weights;
            ``"training"``: they run on the training weights.
        save_best: a folder (relative: under ``args.output_dir``) in which to keep the best EMA
            model by ``args.metric_for_best_model`` (default ``"loss"``) and
            ``args.greater_is_better``, in ``save_pretrained`` layout; None: do not.
        save_final: a folder (relative: under ``args.output_dir``) for the EMA model at the end
            of training, in ``save_pretrained`` layout; None: do not.

    Attributes:
        ema: the :class:`emakit.EMA` (None before training begins).
        keep_best: the :class:`emakit.KeepBest` behind ``save_best`` (None without it).

    Raises:
        TypeError, ValueError: a bad argument, naming it.
    """

    def __init__(self, decay: Any = None, *, half_life: float | None = None, every: int = 1,
                 dtype: Any = None, device: Any = None, policy: Policy | None = None,
                 eval_on: str = "ema", save_best: str | os.PathLike[str] | None = None,
                 save_final: str | os.PathLike[str] | None = "ema") -> None:
        if eval_on not in EVAL_ON:
            raise ValueError(f"eval_on must be 'ema' or 'training', got {eval_on!r}.")
        for name, value in (("save_best", save_best), ("save_final", save_final)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a folder (str or path) or None, got "
                                f"{type(value).__name__}.")
        self._options: dict[str, Any] = {"decay": decay, "half_life": half_life,
                                         "every": every, "dtype": dtype, "device": device,
                                         "policy": policy}
        check_options(self._options)
        if save_best is not None and eval_on != "ema":
            raise ValueError("save_best keeps the EMA model by the evaluation metric, which "
                             "eval_on='training' measures on the training weights; use "
                             "eval_on='ema' (the default) with save_best.")
        self.eval_on = eval_on
        self.save_best = save_best
        self.save_final = save_final
        self.ema: EMA | None = None
        self.keep_best: KeepBest | None = None
        self._trainer: weakref.ref[Trainer] | None = None
        self._resume: str | bool | None = None
        self._metric = "eval_loss"
        self._sharded = False  # FSDP2 / DTensor model: every write is a collective

    def __repr__(self) -> str:
        return (f"EMACallback(eval_on={self.eval_on!r}, save_best={self.save_best!r}, "
                f"save_final={self.save_final!r}, ema={self.ema!r})")

    # --------------------------------------------------------------------------- binding
    @property
    def trainer(self) -> Trainer | None:
        """The trainer this callback is bound to (None before :meth:`bind`)."""
        return None if self._trainer is None else self._trainer()

    def bind(self, trainer: Trainer) -> None:
        """Wrap ``trainer.evaluate``, ``predict`` and ``train`` for this callback.

        Done at ``on_init_end`` when the callback is passed as ``Trainer(callbacks=[...])``;
        call it yourself after ``trainer.add_callback(callback)``.

        Raises:
            TypeError: ``trainer`` is not a ``transformers.Trainer``.
            ValueError: the trainer is already bound to another ``EMACallback``.
        """
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got "
                            f"{type(trainer).__name__}.")
        owner = getattr(trainer.evaluate, _WRAPPED, None)
        if owner is self:
            return
        if owner is not None:
            raise ValueError("this trainer already has an EMACallback bound to it; one EMA "
                             "evaluates (give the others eval_on='training' and do not bind "
                             "them).")
        for verb in ("evaluate", "predict"):
            setattr(trainer, verb, self._on_ema(getattr(trainer, verb)))
        trainer.train = self._recording(trainer.train)  # type: ignore[method-assign]
        self._trainer = weakref.ref(trainer)

    def _on_ema(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self._swapped():
                return method(*args, **kwargs)

        setattr(run, _WRAPPED, self)
        return run

    def _recording(self, train: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(train)

        @functools.wraps(train)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind_partial(*args, **kwargs)
            except TypeError:
                bound = None  # train() itself will say what is wrong
            self._resume = None if bound is None else \
                bound.arguments.get("resume_from_checkpoint")
            return train(*args, **kwargs)

        setattr(run, _WRAPPED, self)
        return run

    def _swapped(self) -> contextlib.AbstractContextManager[Any]:
        ema = self.ema
        if self.eval_on != "ema" or ema is None or ema.is_swapped:
            return contextlib.nullcontext()
        return ema.swapped()

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Bind to the trainer being built."""
        trainer = find_trainer()
        if trainer is not None:
            self.bind(trainer)

    # -------------------------------------------------------------------------- training
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Build the EMA of ``model``, or resume it from the checkpoint training resumed from."""
        if self.trainer is None:
            trainer = find_trainer()
            if trainer is not None:
                self.bind(trainer)
        if model is None:
            raise ValueError("EMACallback.on_train_begin got no model; the Trainer passes it.")
        ema = EMA(model, start=state.global_step, **self._options)
        self._sharded = bool(ema.parts.tracked.specs)
        self.keep_best = self._keep_best(args, ema)
        resume, self._resume = self._resume, None
        if state.global_step > 0:
            self._resume_from(ema, args, state, resume)
        self.ema = ema

    def _keep_best(self, args: Any, ema: EMA) -> KeepBest | None:
        if self.save_best is None:
            return None
        metric = args.metric_for_best_model or "loss"
        greater = args.greater_is_better
        if greater is None:
            greater = not metric.endswith("loss")
        self._metric = metric if metric.startswith("eval_") else f"eval_{metric}"
        return KeepBest(ema, self._folder(args, self.save_best), mode="max" if greater else "min",
                        save=functools.partial(self._write_best, args.should_save))

    def _resume_from(self, ema: EMA, args: Any, state: Any, resume: str | bool | None) -> None:
        if resume is True:  # as Trainer.train resolves it
            resume = get_last_checkpoint(args.output_dir)  # type: ignore[no-untyped-call]
        if not resume:  # not bound to the trainer: the usual places
            resume = args.resume_from_checkpoint or os.path.join(
                args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = Path(str(resume)) / FILE_NAME
        loaded = read_state(path) if path.is_file() else None
        if loaded is None or loaded["step"] != state.global_step:
            found = "holds no " + FILE_NAME if loaded is None else \
                f"holds an EMA of step {loaded['step']}"
            warnings.warn(
                f"training resumed at step {state.global_step}, and {str(resume)!r} {found}: "
                "the EMA starts again from the resumed weights. (Was the checkpoint written "
                "without EMACallback, or the callback added after Trainer(...) without "
                "callback.bind(trainer)?)", EMAWarning, stacklevel=3)
            return
        ema.load_state_dict(loaded)
        user = loaded["header"].get("user", {})
        if self.keep_best is not None and "emakit.keep_best" in user:
            self.keep_best.load_state_dict(json.loads(user["emakit.keep_best"]))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Update once per optimizer step."""
        if self.ema is not None:
            self.ema.update(step=state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the EMA into the checkpoint folder just saved."""
        if self.ema is None or not (args.should_save or self._sharded):
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not from_rank0(folder.is_dir, collective=self._sharded):
            warnings.warn(f"EMACallback: the checkpoint folder {str(folder)!r} does not exist "
                          "(a hyperparameter-search run?); the EMA was not saved with it.",
                          EMAWarning, stacklevel=2)
            return
        metadata = {"emakit.integration": "transformers",
                    "emakit.global_step": str(state.global_step)}
        if self.keep_best is not None:
            metadata["emakit.keep_best"] = json.dumps(self.keep_best.state_dict())
        save(self.ema, folder / FILE_NAME, metadata=metadata)  # sharded: every rank joins

    # ------------------------------------------------------------------------ evaluation
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None,
                    **kwargs: Any) -> None:
        """With ``save_best``: keep the EMA model if the metric improved."""
        keep = self.keep_best
        if keep is None or self.eval_on != "ema" or not metrics:
            return
        value = metrics.get(self._metric)
        if value is not None:
            keep.observe(value)

    def _write_best(self, should_save: bool, tensors: dict[str, Any], path: Path,
                    metadata: dict[str, str]) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        _write_model(trainer.model, trainer.processing_class, tensors, path, should_save)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     processing_class: Any = None, **kwargs: Any) -> None:
        """Load the best checkpoint's EMA weights; write the final EMA model."""
        if self.ema is None or model is None:
            return
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None and self.eval_on == "ema":
            path = Path(best) / FILE_NAME
            if path.is_file():
                average = EMA(model, **self._options)
                average.load_state_dict(read_state(path))
                average.copy_to()
            else:
                warnings.warn(f"load_best_model_at_end: the best checkpoint {best!r} holds no "
                              f"{FILE_NAME}; the model keeps its training weights.",
                              EMAWarning, stacklevel=2)
        if self.save_final is not None and (args.should_save or self._sharded):
            _write_model(model, processing_class, self.ema.model_state_dict(device="cpu"),
                         self._folder(args, self.save_final), args.should_save)

    @staticmethod
    def _folder(args: Any, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder)
        return path if path.is_absolute() else Path(args.output_dir) / path

