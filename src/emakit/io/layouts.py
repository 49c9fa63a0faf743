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
import math
import numbers
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from emakit import schedules
from emakit.backends import backend_for
from emakit.errors import StateDictError
from emakit.io import inert_pickle
from emakit.io.limits import EXPANSION, check_zip, limit

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
        empty: True when there is no average yet (``init="zeros"`` saved before its first
            update): the weights are zeros, not an average.
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
    empty: bool = False


def _is_tensor(x: object) -> bool:
    return backend_for(x) is not None


def _scalar(x: object) -> object:
    """The Python value of a 0-d tensor or array; anything else as it is."""
    if _is_tensor(x) and getattr(x, "ndim", None) == 0:
        return x.item()  # type: ignore[attr-defined]
    return x


def _int(x: object) -> int | None:
    """``x`` as an int where it is one (a 0-d integer tensor too), else None (not recorded)."""
    if isinstance(x, str):  # metadata of a weight file: decimal digits
        return int(x) if x.isdecimal() and len(x) <= 19 else None
    x = _scalar(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        return None
    return int(x)


def _float(x: object, path: str, where: str, key: str) -> float:
    """``x`` as a finite float (a 0-d tensor too); otherwise a StateDictError naming ``key``."""
    x = _scalar(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise StateDictError(f"{path!r}{where}: {key!r} must be a finite number, got "
                             f"{_short(x)}", fix="The file is corrupt or was edited.")
    return float(x)


def _flag(x: object) -> bool | None:
    """A recorded boolean (a bool, or a one-element tensor); None when it is neither."""
    if isinstance(x, bool):
        return x
    if _is_tensor(x):
        flat = x.reshape(-1)  # type: ignore[attr-defined]
        if len(flat) == 1:
            return bool(flat[0])
    return None


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a file may hold anything)."""
    if _is_tensor(value):
        return f"a {type(value).__name__}"
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _torch_load(src: Path) -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"reading {str(src)!r} needs torch: pip install -c constraints.txt "
                          "'emakit[torch]'") from exc
    check_zip(src)
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
    """The file's top-level object and its metadata (safetensors, or emakit's ``.pt``)."""
    from emakit.io.sniff import file_kind
    from emakit.io.weights import _read_safetensors, pt_weights, read_npz

    kind = file_kind(src)
    if kind == "a safetensors file" or src.suffix.lower() == ".safetensors":
        return _read_safetensors(src, framework)
    if kind == "a numpy .npz archive":
        return read_npz(src)
    if not (kind.startswith(("a torch.save", "a Python pickle", "a zip archive"))):
        raise ValueError(f"{str(src)!r} is not a checkpoint emakit can read: it is {kind}. "
                         "emakit reads safetensors files, torch.save checkpoints and .npz "
                         "archives.")
    obj = _torch_load(src)
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return pt_weights(obj)  # emakit's own .pt (metadata as an attribute) or any dict
    return obj, {}


def read_checkpoint(path: str | os.PathLike[str], *, names: Any = None,
                    framework: str | None = None, verify: bool = True) -> EMACheckpoint:
    """Open ``path``, detect its EMA layout and return the EMA weights it holds.

    The work is bounded by the file's size: a tensor with more elements than its storage
    (expanded or overlapping strides) is refused, and so is a file whose tensors, counted under
    all their names, would hold more than :data:`~emakit.io.limits.EXPANSION` times the file's
    bytes (:mod:`emakit.io.limits`).

    Args:
        path: a checkpoint file (``.safetensors``, ``.npz`` or a torch file of any suffix).
        names: for layouts that store a bare list of tensors (diffusers, torch-ema): the
            parameter names in order, or the model (its ``named_parameters()`` order, which
            is the order ``model.parameters()`` gave those libraries).
        framework: ``"torch"`` or ``"numpy"`` for safetensors files (default torch when
            installed).
        verify: for emakit files, check the CRC-32 of the header and of every tensor.

    Returns:
        An :class:`EMACheckpoint`.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file cannot be read or holds no EMA this function knows, naming
            the file, what it found and the known layouts; a malformed or damaged file is a
            :class:`~emakit.StateDictError` naming the file and the key.
    """
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"no such checkpoint: {str(src)!r}")
    obj, meta = _open(src, framework)
    found = _find(src, obj, meta, names, verify)
    _check_weights(src, found)
    return found


def _find(src: Path, obj: Any, meta: Mapping[str, str], names: Any,
          verify: bool) -> EMACheckpoint:
    from emakit.io.header import HEADER_KEY

    if HEADER_KEY in meta:  # an emakit.save file: check it with the tensors already read
        from emakit.io.checkpoint import state_from
        from emakit.io.header import parse_header

        state = state_from(src, parse_header(src, meta, verify=verify), obj, verify=verify)
        header = state.pop("header")
        own = _emakit(str(src), "", state, checked=True)
        sums = ("checksums: crc32 of the header and every tensor, " +
                ("verified" if verify else "not verified (verify=False)")
                if "checksums" in header else
                "no checksums (written before emakit recorded them)")
        return dataclasses.replace(own, notes=(
            f"written by emakit {header.get('emakit_version', '?')}, format_version "
            f"{header['format_version']}", sums, *own.notes))
    param_names = _param_names(names)
    found = _detect_safely(str(src), "", obj, param_names)
    if found is None and isinstance(obj, Mapping):
        keys = sorted((k for k in obj if isinstance(k, str)), key=lambda k: "ema" not in k.lower())
        for key in keys:
            found = _detect_safely(str(src), f"[{key!r}]", obj[key], param_names)
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
        keys = sorted(k if isinstance(k, str) else _short(k, 40) for k in obj) \
            if isinstance(obj, Mapping) else []
        what = f"a dict with keys {keys[:12]}" if isinstance(obj, Mapping) else \
            f"a {type(obj).__name__}"
        raise ValueError(f"{str(src)!r} holds no EMA layout emakit knows: it is {what}. Known "
                         f"layouts: {', '.join(LAYOUTS)}.")
    return found


def _check_weights(src: Path, found: EMACheckpoint) -> None:
    """Every weight is a dense tensor within its storage; all of them within the file's size."""
    where = f"{str(src)!r}{found.where}"
    total = 0
    for name, value in found.weights.items():
        if not _dense(value):
            raise StateDictError(f"{where}: entry {name!r} is not a dense tensor, got "
                                 f"{_short(value)} ({type(value).__name__})",
                                 fix="The file is corrupt or not an EMA checkpoint.")
        if type(value).__module__.startswith("torch"):
            size = value.element_size()
            storage = value.untyped_storage().nbytes() // max(size, 1)
            if value.numel() > storage:
                raise StateDictError(
                    f"{where}: tensor {name!r} has {value.numel():,} elements but its storage "
                    f"holds {storage:,} (expanded or overlapping strides)",
                    fix="emakit refuses such tensors: they can make a tiny file expand to any "
                        "size. Save the tensor with .contiguous() (a real copy) instead.")
            total += value.numel() * size
        else:
            total += int(value.nbytes)
    if total > limit(src.stat().st_size):
        raise StateDictError(
            f"{where}: the tensors take {total:,} bytes under their {len(found.weights):,} "
            f"names, more than {EXPANSION}x the file's {src.stat().st_size:,} bytes (one "
            "storage under many names or views)",
            fix="emakit refuses to expand a file that much; save each tensor once.")


def _dense(value: Any) -> bool:
    """A numpy array, or a strided torch tensor with data (not sparse, not on "meta")."""
    if backend_for(value) is None:
        return False
    if not type(value).__module__.startswith("torch"):
        return True
    return str(value.layout) == "torch.strided" and value.device.type != "meta"


def _detect_safely(path: str, where: str, obj: Any,
                   names: list[str] | None) -> EMACheckpoint | None:
    """:func:`_detect`, with a malformed entry reported as a StateDictError (file and key)."""
    try:
        return _detect(path, where, obj, names)
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError, RuntimeError,
            RecursionError) as exc:
        raise StateDictError(
            f"{path!r}{where}: a malformed entry ({type(exc).__name__}: "
            f"{_short(str(exc), 120)})", fix="The file is corrupt or not an EMA checkpoint."
        ) from None


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


def _emakit(path: str, where: str, state: dict[str, Any], *,
            checked: bool = False) -> EMACheckpoint:
    """The EMA in an emakit state (``checked``: its fields were checked with the header)."""
    if not checked:
        from emakit.io.header import READABLE_VERSIONS, check_fields

        version = state["format_version"]
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise StateDictError(f"{path!r}{where}: state key 'format_version' must be the int "
                                 f"{' or '.join(map(str, READABLE_VERSIONS))}, got "
                                 f"{_short(version)}",
                                 fix="Upgrade emakit if a newer one wrote it." if
                                 type(version) is int else "The file is corrupt or was edited.")
        check_fields(f"{path!r}{where}", state)
        shadows = state.get("shadows")
        if not isinstance(shadows, Mapping) or not all(isinstance(k, str) for k in shadows):
            raise StateDictError(f"{path!r}{where}: state key 'shadows' must map names to "
                                 f"tensors, got {type(shadows).__name__}",
                                 fix="The file is corrupt or was edited.")
    weights = dict(state["shadows"])
    actions = state["actions"]
    notes = []
    empty = False
    if state["init"] == "zeros":
        products = state.get("decay_products") or {}
        divisors = {n: 1.0 - float(products.get(n, state["decay_product"]))
                    for n in weights if actions.get(n) == "average"}
        if any(d <= 0.0 for d in divisors.values()):
            empty = True
            notes.append("init='zeros' and no update yet: there is no average (the shadows "
                         "are zeros)")
        elif any(d != 1.0 for d in divisors.values()):
            weights = {n: (t / divisors[n] if n in divisors and divisors[n] != 1.0 else t)
                       for n, t in weights.items()}
            notes.append("init='zeros': weights are bias-corrected")
    for alias, name in (state.get("aliases") or {}).items():
        if name in weights and alias not in weights:
            weights[alias] = weights[name]  # a tied weight's second name carries the average
    recorded = state.get("source_dtypes")
    model_dtypes = dict(recorded) if recorded else None
    if model_dtypes is None:
        notes.append("the model's dtypes are not recorded (a state saved before emakit "
                     "recorded them): an export writes the stored (shadow) dtypes")
    elif state.get("aliases"):
        for alias, name in state["aliases"].items():
            if name in model_dtypes:
                model_dtypes.setdefault(alias, model_dtypes[name])
    return EMACheckpoint("emakit", path, where, weights, step=state["step"],
                         num_updates=state["num_updates"], decay=state["decay"],
                         state=state, notes=tuple(notes), model_dtypes=model_dtypes,
                         empty=empty)


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
                                 f"{_short(obj.get('epoch', '?'))})",))
    if isinstance(obj.get("current_model_state"), Mapping) and isinstance(
            obj.get("state_dict"), Mapping):
        averaging = obj.get("averaging_state")
        averaging = averaging if isinstance(averaging, Mapping) else {}
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
        if "initted" in obj and _flag(obj["initted"]) is False:
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
            def number(key: str, default: float) -> float:
                return _float(obj.get(key, default), path, where, key)

            after = _int(obj.get("update_after_step", 0))
            if after is None or after < 0:
                raise StateDictError(f"{path!r}{where}: 'update_after_step' must be an int "
                                     f">= 0, got {_short(obj.get('update_after_step'))}",
                                     fix="The file is corrupt or was edited.")
            try:
                decay = schedules.InverseGamma(
                    inv_gamma=number("inv_gamma", 1.0), power=number("power", 2 / 3),
                    min_decay=number("min_decay", 0.0), max_decay=number("decay", 0.9999),
                    update_after_step=after).to_dict()
            except ValueError as exc:
                raise StateDictError(f"{path!r}{where}: the diffusers decay settings are not "
                                     f"valid ({exc})", fix="The file is corrupt or was edited."
                                     ) from None
        else:
            notes.append("diffusers without use_ema_warmup uses (1+s)/(10+s) with an offset, "
                         "which no emakit schedule matches exactly: pass decay=")
        return EMACheckpoint("diffusers", path, where + "['shadow_params']", weights,
                             step=step, num_updates=step, decay=decay, scope="parameters",
                             notes=tuple(notes))
    if "decay" in obj and "num_updates" in obj:
        weights = _shadow_list(path, where, "torch-ema", obj["shadow_params"], names)
        updates = _int(obj["num_updates"])
        d = _float(obj["decay"], path, where, "decay")
        try:
            decay = (schedules.Constant(d) if updates is None else
                     schedules.TFWarmup(d)).to_dict()
        except ValueError as exc:
            raise StateDictError(f"{path!r}{where}: 'decay' is not a valid decay ({exc})",
                                 fix="The file is corrupt or was edited.") from None
        return EMACheckpoint("torch-ema", path, where + "['shadow_params']", weights,
                             step=updates, num_updates=updates, decay=decay, scope="parameters",
                             notes=tuple(notes))
    return None
