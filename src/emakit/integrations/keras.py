"""``EMACallback`` for Keras 3: an emakit average of a model's weights, with best-EMA keeping.

Two lines::

    from emakit.integrations.keras import EMACallback
    model.fit(x, y, validation_data=(vx, vy), callbacks=[EMACallback(decay=0.999)])

What it does at each event (``docs/integrations/keras.md``):

- ``on_train_begin``: builds an :class:`emakit.EMA` of ``model.weights``, named by their paths
  (``"dense/kernel"``); non-trainable weights -- BatchNormalization's moving mean and
  variance -- are copied, not averaged (``non_trainable=``), and integer ones always copied;
- ``on_train_batch_end``: ``ema.update(step=optimizer.iterations)``: once per optimizer step
  (``gradient_accumulation_steps`` respected; where one call covers several steps --
  ``steps_per_execution`` off the torch backend -- the decay of every step is applied);
- ``on_test_begin`` / ``on_predict_begin``: the EMA weights go into the model for evaluation
  (the validation at the end of each epoch of ``fit``, and ``evaluate`` / ``predict`` given
  ``callbacks=[callback]``); ``on_test_end`` / ``on_predict_end`` put the training weights back
  bitwise, so the model never keeps EMA weights after ``fit``, ``evaluate`` or ``predict``;
- ``on_epoch_end``: with ``save_best``, when the monitored metric (``val_loss`` by default,
  measured on the EMA weights) improves, the EMA weights are written with
  ``model.save_weights`` (atomically) to a ``.weights.h5`` file that ``model.load_weights``
  reads; with ``checkpoint``, the EMA state is saved (:func:`emakit.save`) for resuming, and
  ``on_train_begin`` resumes it when its step is the optimizer's (with Keras'
  ``BackupAndRestore`` restoring the model and the optimizer first).

On the torch backend the average reads the variables' torch tensors in place (no copies) and
swaps by re-pointing them; on the other backends (JAX, TensorFlow) the variables are read into
numpy arrays after each step and written back with ``assign`` for evaluation (:class:`Copied`).
If an evaluation stops with an exception, the training weights come back at the callback's next
event (or call ``callback.restore()``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

import keras
import numpy as np

from emakit.best import KeepBest
from emakit.ema import EMA
from emakit.errors import EMAWarning
from emakit.integrations.options import EVAL_ON
from emakit.policy import ACTIONS, Policy

__all__ = ["Copied", "EMACallback", "InPlace", "variables_of"]

_GLOB = re.compile(r"([*?\[])")
_MAXIMIZED = ("acc", "auc", "precision", "recall", "f1", "iou")


def _exact(name: str) -> str:
    """A glob pattern that matches exactly ``name``."""
    return _GLOB.sub(r"[\1]", name)


class InPlace:
    """The model's variables as the backend's own tensors (torch backend): no copies.

    Args:
        variables: the Keras variables, by unique name.

    Attributes:
        source: ``name -> torch tensor`` (each variable's ``value``), the EMA's source.
    """

    def __init__(self, variables: Mapping[str, Any]) -> None:
        self.source = {name: v.value for name, v in variables.items()}

    def refresh(self) -> None:
        """Nothing to do: the tensors are the variables' own."""

    def apply(self, ema: EMA) -> None:
        """Put the EMA weights in (re-pointing the tensors)."""
        ema.apply_shadow()

    def restore(self, ema: EMA) -> None:
        """Put the training weights back."""
        ema.restore()

    def applied(self, ema: EMA) -> bool:
        """Whether the EMA weights are in the model."""
        return ema.is_swapped


class Copied:
    """The model's variables as numpy copies (JAX / TensorFlow backends, or by choice).

    Args:
        variables: the Keras variables, by unique name.

    Attributes:
        source: ``name -> numpy array``, refreshed from the variables before each update.
    """

    def __init__(self, variables: Mapping[str, Any]) -> None:
        self.variables = dict(variables)
        self.source: dict[str, Any] = {}
        self.saved: dict[str, Any] | None = None
        self.refresh()

    def refresh(self) -> None:
        """Read every variable into its numpy array."""
        for name, v in self.variables.items():
            self.source[name] = keras.ops.convert_to_numpy(v.value)

    def apply(self, ema: EMA) -> None:
        """Assign the EMA weights, keeping the training weights aside."""
        self.refresh()
        self.saved = {name: array.copy() for name, array in self.source.items()}
        for name, value in ema.model_state_dict().items():
            self.variables[name].assign(value)

    def restore(self, ema: EMA) -> None:
        """Assign the training weights back."""
        saved, self.saved = self.saved, None
        for name, value in (saved or {}).items():
            self.variables[name].assign(value)

    def applied(self, ema: EMA) -> bool:
        """Whether the EMA weights are in the model."""
        return self.saved is not None


def variables_of(model: Any, *, copies: bool | None = None) -> tuple[InPlace | Copied,
                                                                       list[str]]:
    """The model's weights for an EMA, and the names of the non-trainable ones.

    Args:
        model: a built Keras model.
        copies: read the variables into numpy copies; None: only off the torch backend.

    Returns:
        The view (its ``source`` is what the EMA averages) and the non-trainable names.

    Raises:
        ValueError: the model has no weights yet (not built), or two weights share a path.
    """
    weights = list(model.weights)
    if not weights:
        raise ValueError("the model has no weights yet: build it (call it on data, or give "
                         "it an Input) before training with EMACallback.")
    variables: dict[str, Any] = {}
    for v in weights:
        if v.path in variables:
            raise ValueError(f"two of the model's weights share the path {v.path!r}; give the "
                             "layers unique names (name=...) so the EMA can tell them apart.")
        variables[v.path] = v
    frozen = [v.path for v in weights if not v.trainable]
    if copies is None:
        copies = keras.backend.backend() != "torch"
    return (Copied(variables) if copies else InPlace(variables)), frozen


def _numbered(path: str) -> tuple[str, tuple[int, ...]]:
    """A weight's path without the numbers Keras appends to names it chooses, and the numbers
    (``sequential_1/dense_2/kernel`` -> ``("sequential/dense/kernel", (1, 2, 0))``)."""
    parts = [re.fullmatch(r"(.*?)(?:_(\d+))?", p) for p in path.split("/")]
    return ("/".join(m.group(1) for m in parts if m),
            tuple(int(m.group(2) or 0) for m in parts if m))


def _structure(paths: list[str]) -> dict[str, tuple[str, int]]:
    """Path -> (path without Keras' numbers, rank among the paths that share it by number)."""
    groups: dict[str, list[tuple[tuple[int, ...], str]]] = {}
    for p in paths:
        bare, numbers = _numbered(p)
        groups.setdefault(bare, []).append((numbers, p))
    return {p: (bare, k) for bare, members in groups.items()
            for k, (_, p) in enumerate(sorted(members))}


def _by_position(state: dict[str, Any], ema: EMA) -> dict[str, Any]:
    """``state`` renamed into the EMA's names when they differ only by the numbers Keras gives
    the layers it names itself (``sequential_1/dense_2/...`` in one process is
    ``sequential_3/dense_5/...`` in one that built another model first): matched by the bare
    path and the order of those numbers (Keras numbers layers as they are made), with the same
    shapes and dtypes -- as Keras' own checkpoints match weights by the model's structure.
    Otherwise as it is (``load_state_dict`` then names what does not fit)."""
    from emakit.names import renamed_state

    theirs, mine = state.get("shadows", {}), ema.state_dict()["shadows"]
    if set(theirs) == set(mine):
        return state
    saved, own = _structure(list(theirs)), _structure(list(mine))
    by_key = {key: name for name, key in own.items()}
    if sorted(saved.values()) != sorted(by_key):
        return state
    rename = {name: by_key[key] for name, key in saved.items()}
    if any(tuple(theirs[a].shape) != tuple(mine[b].shape) or theirs[a].dtype != mine[b].dtype
           for a, b in rename.items()):
        return state
    return renamed_state(state, rename)


def _iterations(model: Any) -> int:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError("EMACallback needs a compiled model (model.compile(optimizer=...)).")
    return int(optimizer.iterations.value if hasattr(optimizer.iterations, "value")
               else optimizer.iterations)


class EMACallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Keep an emakit EMA of a Keras model; evaluate on it; keep the best EMA weights.

    Args:
        decay: a float or a schedule from :mod:`emakit.schedules` (default 0.999).
        half_life: instead of ``decay``: optimizer steps after which a weight's share halves.
        every: update on every ``every``-th optimizer step (the window in steps is the same).
        non_trainable: what to do with non-trainable weights (BatchNormalization's moving
            statistics): ``"copy"`` (default), ``"average"`` or ``"skip"``.
        policy: an :class:`emakit.Policy` for finer rules (``non_trainable`` is added to it).
        eval_on: ``"ema"`` (default): evaluation and prediction see the EMA weights;
            ``"training"``: the training weights.
        save_best: a ``.weights.h5`` file for the best EMA weights by ``monitor``, or None.
        monitor: the epoch-end log to rank by (default ``"val_loss"``).
        mode: ``"min"``, ``"max"`` or ``"auto"`` (max for accuracy-like names, else min).
        min_delta: how much better than the best a metric must be to count.
        checkpoint: a ``.safetensors`` file for the EMA state, written at every epoch end and
            read at ``on_train_begin`` when its step is the optimizer's (a resumed run); None:
            the EMA lives only in memory.

    Attributes:
        ema: the :class:`emakit.EMA` (None before training begins).
        keep_best: the :class:`emakit.KeepBest` behind ``save_best`` (None without it).

    Raises:
        TypeError, ValueError: a bad argument, naming it.
    """

    def __init__(self, decay: Any = None, *, half_life: float | None = None, every: int = 1,
                 non_trainable: str = "copy", policy: Policy | None = None,
                 eval_on: str = "ema", save_best: str | Path | None = None,
                 monitor: str = "val_loss", mode: str = "auto", min_delta: float = 0.0,
                 checkpoint: str | Path | None = None) -> None:
        super().__init__()
        if non_trainable not in ACTIONS:
            raise ValueError(f"non_trainable must be one of {list(ACTIONS)}, got "
                             f"{non_trainable!r}.")
        if eval_on not in EVAL_ON:
            raise ValueError(f"eval_on must be 'ema' or 'training', got {eval_on!r}.")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be an emakit.Policy, got {type(policy).__name__}.")
        if mode not in ("min", "max", "auto"):
            raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}.")
        if save_best is not None and not str(save_best).endswith(".weights.h5"):
            raise ValueError(f"save_best must end in '.weights.h5' (the file model.load_weights "
                             f"reads), got {str(save_best)!r}.")
        if checkpoint is not None and not str(checkpoint).endswith(".safetensors"):
            raise ValueError(f"checkpoint must end in '.safetensors' (an emakit file), got "
                             f"{str(checkpoint)!r}.")
        if save_best is not None and eval_on != "ema":
            raise ValueError("save_best keeps the EMA weights by a validation metric, which "
                             "eval_on='training' measures on the training weights; use "
                             "eval_on='ema' with save_best.")
        EMA({"probe": np.zeros(1)}, decay=decay, half_life=half_life,
            every=every)  # checks decay / half_life / every now, naming them
        self._options: dict[str, Any] = {"decay": decay, "half_life": half_life,
                                         "every": every}
        self.non_trainable = non_trainable
        self.policy = policy or Policy()
        self.eval_on = eval_on
        self.save_best = None if save_best is None else Path(save_best)
        self.monitor = monitor
        if mode == "auto":
            mode = "max" if any(k in monitor.lower() for k in _MAXIMIZED) else "min"
        self.mode = mode
        self.min_delta = min_delta
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.ema: EMA | None = None
        self.keep_best: KeepBest | None = None
        self._view: InPlace | Copied | None = None
        self._owner: Any = None
        self._warned_monitor = False

    def __repr__(self) -> str:
        return (f"EMACallback(eval_on={self.eval_on!r}, non_trainable={self.non_trainable!r}, "
                f"save_best={self.save_best!r}, monitor={self.monitor!r}, ema={self.ema!r})")

    # -------------------------------------------------------------------------- training
    def _build(self, copies: bool | None = None) -> EMA:
        view, frozen = variables_of(self.model, copies=copies)
        names = tuple(_exact(n) for n in frozen)
        policy = self.policy
        if self.non_trainable == "copy":
            policy = dataclasses.replace(policy, copy=policy.copy + names)
        elif self.non_trainable == "skip":
            policy = dataclasses.replace(policy, exclude=policy.exclude + names)
        ema = EMA(view.source, policy=policy, start=_iterations(self.model), **self._options)
        self._view, self.ema, self._owner = view, ema, self.model
        if self.save_best is not None:
            keep = KeepBest(ema, self.save_best, mode=cast(Literal["max", "min"], self.mode),
                            min_delta=self.min_delta, save=self._write_best)
            if self.keep_best is not None and self.keep_best.path == keep.path:
                keep.load_state_dict(self.keep_best.state_dict())  # a later fit() goes on
            self.keep_best = keep
        return ema

    def on_train_begin(self, logs: Any = None) -> None:
        """Build the EMA (kept across ``fit`` calls while the optimizer's steps go on)."""
        self.restore()
        ema = self.ema
        step = _iterations(self.model)
        if ema is None or self._owner is not self.model or ema.step != step:
            ema = self._build()
            if self.checkpoint is not None and self.checkpoint.is_file():
                self._resume(ema, step)

    def _resume(self, ema: EMA, step: int) -> None:
        from emakit.io.checkpoint import read_state

        path = self.checkpoint
        state = read_state(path)  # type: ignore[arg-type]
        if state["step"] != step:
            if step:
                warnings.warn(f"EMACallback: {str(path)!r} holds the EMA of step "
                              f"{state['step']}, the optimizer is at step {step}; the EMA "
                              "starts again from the current weights.", EMAWarning,
                              stacklevel=3)
            return
        ema.load_state_dict(_by_position(state, ema))
        best = state["header"].get("user", {}).get("emakit.keep_best")
        if best is not None and self.keep_best is not None:
            self.keep_best.load_state_dict(json.loads(best))

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        """Training weights in (after an evaluation that stopped with an exception)."""
        self.restore()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        """Update once per optimizer step."""
        if self.ema is None or self._view is None:
            return
        self._view.refresh()
        self.ema.update(step=_iterations(self.model))

    def on_train_end(self, logs: Any = None) -> None:
        """The training weights stay in the model."""
        self.restore()

    # ------------------------------------------------------------------------ evaluation
    def _apply(self) -> None:
        if self.eval_on != "ema" or self.ema is None or self._view is None or \
                self._owner is not self.model:
            return
        if not self._view.applied(self.ema):
            self._view.apply(self.ema)

    def restore(self) -> None:
        """Put the training weights back if the EMA weights are in the model."""
        if self.ema is not None and self._view is not None and self._view.applied(self.ema):
            self._view.restore(self.ema)

    def on_test_begin(self, logs: Any = None) -> None:
        """EMA weights in for evaluation."""
        self._apply()

    def on_test_end(self, logs: Any = None) -> None:
        """Training weights back."""
        self.restore()

    def on_predict_begin(self, logs: Any = None) -> None:
        """EMA weights in for prediction."""
        self._apply()

    def on_predict_end(self, logs: Any = None) -> None:
        """Training weights back."""
        self.restore()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        """Training weights in (after an evaluation that stopped with an exception)."""
        self.restore()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        """Keep the EMA weights if the monitored metric improved; save the EMA state."""
        self.restore()
        self._observe(logs)
        if self.checkpoint is not None and self.ema is not None:
            from emakit.io.checkpoint import save

            metadata = {"emakit.integration": "keras", "emakit.epoch": str(epoch)}
            if self.keep_best is not None:
                metadata["emakit.keep_best"] = json.dumps(self.keep_best.state_dict())
            save(self.ema, self.checkpoint, metadata=metadata)

    def _observe(self, logs: Any) -> None:
        keep = self.keep_best
        if keep is None:
            return
        value = (logs or {}).get(self.monitor)
        if value is None:
            if not self._warned_monitor:
                self._warned_monitor = True
                warnings.warn(f"EMACallback(save_best=...): the epoch logs have no "
                              f"{self.monitor!r} (they have {sorted(logs or {})}); pass "
                              "validation_data to fit, or another monitor=.", EMAWarning,
                              stacklevel=2)
            return
        keep.observe(float(value))

    def _write_best(self, tensors: dict[str, Any], path: Path, metadata: dict[str, str]) -> None:
        from emakit.io.atomic import atomic_path

        ema, view = self.ema, self._view
        if ema is None or view is None:
            return
        view.apply(ema)
        try:
            with atomic_path(path) as tmp:
                self.model.save_weights(str(tmp))
        finally:
            view.restore(ema)
