"""Find the EMA weights in a checkpoint written by emakit or by another library.

Each library stores its average differently; :func:`read_checkpoint` opens the file, detects the
layout and returns the EMA weights by the model's names, with the step count and the decay where
the layout records them:

==============  ===========================================================  =====================
layout          what the file holds                                          step / decay recorded
==============  ===========================================================  =====================
emakit          ``emakit.save`` (safetensors + JSON header), or a            everything
                ``state_dict()`` inside ``torch.save`` (possibly nested)
timm            ``state_dict_ema`` (``CheckpointSaver``)                     neither
lightning       ``state_dict`` (the average) + ``current_model_state``       global_step / no
                (``WeightAveraging`` / ``EMAWeightAveraging``)
ema-pytorch     ``ema_model.*`` + ``initted`` + ``step``                     step / no
diffusers       ``shadow_params`` list + ``optimization_step``, decay        both
                settings (``EMAModel.state_dict``); names from the model
torch-ema       ``shadow_params`` list + ``num_updates`` + ``decay``         both
                (``ExponentialMovingAverage.state_dict``); names likewise
ultralytics     ``ema``: a pickled fp16 ``nn.Module`` + ``updates``          updates / no
averaged-model  ``module.*`` + ``n_averaged`` (``torch.optim.swa_utils``)    n_averaged / no
plain           a flat ``name -> tensor`` dict or safetensors file           neither
==============  ===========================================================  =====================

Torch files are read with ``torch.load(weights_only=True)``; a file that pickles whole objects
(Ultralytics) falls back to :mod:`emakit.io.inert_pickle`, which imports and runs nothing from
the file. A training checkpoint that holds an EMA state under some key (``{"ema": ...}``) is
searched one level down.

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> from emakit.io import write_weights
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
    >>> write_weights({"w": np.ones(3, dtype=np.float32)}, path)
    >>> found = read_checkpoint(path)
    >>> found.layout, list(found.weights), found.step
    ('plain', ['w'], None)
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from emakit import schedules
from emakit.backends import backend_for
from emakit.io import inert_pickle

__all__ = ["LAYOUTS", "EMACheckpoint", "read_checkpoint"]

LAYOUTS = ("emakit", "timm", "lightning", "ema-pytorch", "diffusers", "torch-ema",
           "ultralytics", "averaged-model", "plain")


@dataclasses.dataclass(frozen=True)
class EMACheckpoint:
    """The EMA found in a checkpoint file.

    Attributes:
        layout: one of :data:`LAYOUTS`.
        path: the file.
        where: where in the file the EMA was (e.g. ``"['ema']"``; empty at the top level).
        weights: name -> averaged tensor, by the names the file uses (model names, possibly
            with a wrapper prefix), in the file's order.
        step: the optimizer step the average belongs to, when the layout records it.
        num_updates: how many updates made the average, when recorded.
        decay: the decay as an :mod:`emakit.schedules` dict, when the layout records it
            exactly; else None.
        scope: ``"state"`` (parameters and buffers) or ``"parameters"`` (parameters only: the
            layout does not average buffers).
        state: for ``layout == "emakit"``, the full :meth:`EMA.state_dict`.
        notes: facts worth telling the user (what is not recorded, how names were found).
        model_dtypes: name -> dtype name of the model's tensors, when recorded (emakit files),
            so an export can be cast back to the model's dtypes.
    """

    layout: str
    path: str
    where: str
    weights: dict[str, Any]
    step: int | None = None
    num_updates: int | None = None
    decay: dict[str, Any] | None = None
    scope: Literal["state", "parameters"] = "state"
    state: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    model_dtypes: dict[str, str] | None = None


def _is_tensor(x: object) -> bool:
    return backend_for(x) is not None


def _int(x: object) -> int | None:
    if x is None:
        return None
    try:
        return int(x)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return None


def _torch_load(src: Path) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"reading {str(src)!r} needs torch: pip install -c constraints.txt "
                          "'emakit[torch]'") from exc
    try:
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # pickles objects that weights_only refuses: read them inert below
    except Exception as exc:
        raise ValueError(f"{str(src)!r} is not a readable torch checkpoint: {exc}") from exc
    try:
        return torch.load(src, map_location="cpu", weights_only=False,
                          pickle_module=inert_pickle)
    except Exception as exc:
        raise ValueError(f"{str(src)!r} is not a readable torch checkpoint: {exc}") from exc


def _open(src: Path, framework: str | None) -> tuple[Any, dict[str, str]]:
    """The file's top-level object and (safetensors) metadata."""
    from emakit.io.weights import _read_safetensors, read_weights

    with open(src, "rb") as f:
        head = f.read(9)
    if src.suffix.lower() == ".safetensors" or head[8:9] == b"{":
        return _read_safetensors(src, framework)
    if src.suffix.lower() == ".npz":
        return read_weights(src)
    return _torch_load(src), {}


def read_checkpoint(path: str | os.PathLike[str], *, names: Any = None,
                    framework: str | None = None) -> EMACheckpoint:
    """Open ``path``, detect its EMA layout and return the EMA weights it holds.

    Args:
        path: a checkpoint file (``.safetensors``, ``.npz`` or a torch file of any suffix).
        names: for layouts that store a bare list of tensors (diffusers, torch-ema): the
            parameter names in order, or the model (its ``named_parameters()`` order, which
            is the order ``model.parameters()`` gave those libraries).
        framework: ``"torch"`` or ``"numpy"`` for safetensors files (default torch when
            installed).

    Returns:
        An :class:`EMACheckpoint`.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file cannot be read or holds no EMA this function knows, naming
            the file, what it found and the known layouts.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"no such checkpoint: {str(src)!r}")
    obj, meta = _open(src, framework)
    from emakit.io.checkpoint import HEADER_KEY

    if HEADER_KEY in meta:  # an emakit.save file: check it with the tensors already read
        from emakit.io.checkpoint import parse_header, state_from

        state = state_from(src, parse_header(src, meta), obj)
        header = state.pop("header")
        own = _emakit(str(src), "", state, header=header)
        return dataclasses.replace(own, notes=(
            f"written by emakit {header.get('emakit_version', '?')}, format_version "
            f"{header['format_version']}", *own.notes))
    param_names = _param_names(names)
    found = _detect(str(src), "", obj, param_names)
    if found is None and isinstance(obj, Mapping):
        keys = sorted((k for k in obj if isinstance(k, str)), key=lambda k: "ema" not in k.lower())
        for key in keys:
            found = _detect(str(src), f"[{key!r}]", obj[key], param_names)
            if found is not None:
                break
    if found is None and isinstance(obj, Mapping) and obj and all(
            isinstance(k, str) and _is_tensor(v) for k, v in obj.items()):
        kind = meta.get("emakit.kind")
        note = (f"model weights written by emakit ({kind}); decay not recorded" if kind else
                "a plain name -> tensor file: no EMA metadata (step and decay unknown)")
        found = EMACheckpoint("plain", str(src), "", dict(obj), notes=(note,),
                              step=_int(meta.get("emakit.step")),
                              num_updates=_int(meta.get("emakit.num_updates")))
    if found is None:
        what = (f"a dict with keys {sorted(map(str, obj))[:12]}" if isinstance(obj, Mapping)
                else f"a {type(obj).__name__}")
        raise ValueError(f"{str(src)!r} holds no EMA layout emakit knows: it is {what}. Known "
                         f"layouts: {', '.join(LAYOUTS)}.")
    return found


def _param_names(names: Any) -> list[str] | None:
    if names is None:
        return None
    named = getattr(names, "named_parameters", None)
    if callable(named):
        return [n for n, _ in named()]
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a model or a list of parameter names, got "
                        f"{type(names).__name__}.")
    return [str(n) for n in names]


def _emakit(path: str, where: str, state: dict[str, Any],
            header: Mapping[str, Any] | None = None) -> EMACheckpoint:
    weights = dict(state["shadows"])
    notes = []
    if state.get("init") == "zeros" and state.get("decay_product", 1.0) != 0.0:
        divisor = 1.0 - float(state["decay_product"])
        actions = state.get("actions") or {}
        if divisor > 0:
            weights = {n: (t / divisor if actions.get(n) == "average" else t)
                       for n, t in weights.items()}
            notes.append("init='zeros': weights are bias-corrected")
    model_dtypes = dict(header["source_dtypes"]) if header and "source_dtypes" in header else None
    return EMACheckpoint("emakit", path, where, weights, step=_int(state.get("step")),
                         num_updates=_int(state.get("num_updates")), decay=state.get("decay"),
                         state=state, notes=tuple(notes), model_dtypes=model_dtypes)


def _shadow_list(path: str, where: str, layout: str, params: Any,
                 names: list[str] | None) -> dict[str, Any]:
    if not isinstance(params, (list, tuple)) or not all(_is_tensor(p) for p in params):
        raise ValueError(f"{path!r}{where}: {layout} 'shadow_params' should be a list of "
                         "tensors; the file is corrupt.")
    if names is None:
        return {f"shadow_params.{i}": p for i, p in enumerate(params)}
    if len(names) != len(params):
        raise ValueError(
            f"{path!r}{where}: the {layout} state holds {len(params)} shadow tensors but "
            f"{len(names)} parameter names were given. Pass the model the EMA was made from "
            "(its parameters, in order, as given to the library).")
    return dict(zip(names, params))


def _detect(path: str, where: str, obj: Any, names: list[str] | None) -> EMACheckpoint | None:
    if not isinstance(obj, Mapping):
        return None
    if "format_version" in obj and "shadows" in obj:
        return _emakit(path, where, dict(obj))
    if isinstance(obj.get("state_dict_ema"), Mapping):
        return EMACheckpoint("timm", path, where + "['state_dict_ema']",
                             dict(obj["state_dict_ema"]), notes=(
                                 "timm records neither the step nor the decay (epoch: "
                                 f"{obj.get('epoch', '?')})",))
    if isinstance(obj.get("current_model_state"), Mapping) and isinstance(
            obj.get("state_dict"), Mapping):
        averaging = obj.get("averaging_state") or {}
        return EMACheckpoint("lightning", path, where + "['state_dict']",
                             dict(obj["state_dict"]), step=_int(obj.get("global_step")),
                             num_updates=_int(averaging.get("n_averaged")),
                             notes=("Lightning records the step but not the decay",))
    if "shadow_params" in obj:
        return _shadow_layout(path, where, obj, names)
    ema_keys = [k for k in obj if isinstance(k, str) and k.startswith("ema_model.")]
    if ema_keys and ("initted" in obj or "step" in obj):
        weights = {k[len("ema_model."):]: obj[k] for k in ema_keys}
        notes = ["ema-pytorch records its update count (step) but not the decay"]
        if "initted" in obj and not bool(obj["initted"]):
            notes.append("initted is False: the average was never updated")
        return EMACheckpoint("ema-pytorch", path, where, weights, step=_int(obj.get("step")),
                             notes=tuple(notes))
    if "ema" in obj and "updates" in obj:
        ema = obj["ema"]
        if inert_pickle.looks_like_module(ema):
            weights = inert_pickle.module_tensors(ema)
        elif isinstance(ema, Mapping):
            weights = dict(ema)
        else:
            return None
        updates = _int(obj.get("updates"))
        return EMACheckpoint("ultralytics", path, where + "['ema']", weights, step=updates,
                             num_updates=updates, notes=(
                                 "Ultralytics does not record the decay; its trainer's default "
                                 "is ExponentialRamp(decay=0.9999, tau=2000)",
                                 "Ultralytics stores the average in float16"))
    if "n_averaged" in obj:
        weights = {k[len("module."):]: v for k, v in obj.items()
                   if isinstance(k, str) and k.startswith("module.")}
        if weights:
            return EMACheckpoint("averaged-model", path, where, weights,
                                 num_updates=_int(obj["n_averaged"]), notes=(
                                     "AveragedModel records the update count, not the decay",))
    return None


def _shadow_layout(path: str, where: str, obj: Mapping[str, Any],
                   names: list[str] | None) -> EMACheckpoint | None:
    notes = ["names from the model's parameter order" if names else
             "no parameter names given: tensors are numbered (pass the model to map them)"]
    if "optimization_step" in obj:
        weights = _shadow_list(path, where, "diffusers", obj["shadow_params"], names)
        step = _int(obj["optimization_step"])
        decay = None
        if obj.get("use_ema_warmup"):
            decay = schedules.InverseGamma(
                inv_gamma=float(obj.get("inv_gamma", 1.0)), power=float(obj.get("power", 2 / 3)),
                min_decay=float(obj.get("min_decay", 0.0)),
                max_decay=float(obj.get("decay", 0.9999)),
                update_after_step=int(obj.get("update_after_step", 0))).to_dict()
        else:
            notes.append("diffusers without use_ema_warmup uses (1+s)/(10+s) with an offset, "
                         "which no emakit schedule matches exactly: pass decay=")
        return EMACheckpoint("diffusers", path, where + "['shadow_params']", weights,
                             step=step, num_updates=step, decay=decay, scope="parameters",
                             notes=tuple(notes))
    if "decay" in obj and "num_updates" in obj:
        weights = _shadow_list(path, where, "torch-ema", obj["shadow_params"], names)
        updates = _int(obj["num_updates"])
        d = float(obj["decay"])
        decay = (schedules.Constant(d) if updates is None else schedules.TFWarmup(d)).to_dict()
        return EMACheckpoint("torch-ema", path, where + "['shadow_params']", weights,
                             step=updates, num_updates=updates, decay=decay, scope="parameters",
                             notes=tuple(notes))
    return None
