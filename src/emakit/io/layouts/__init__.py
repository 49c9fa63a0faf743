"""Find the EMA weights in a checkpoint written by emakit or by another library.

Each library stores its average differently; :func:`read_checkpoint` opens the file, detects the
layout and returns the EMA weights by the model's names, with the step count and the decay where
the layout records them. Each layout is one module of this package with ``NAME`` and
``detect(path, where, obj, names)``, listed in :data:`FOREIGN` (add a library: one module and
one line here); the result is an :class:`~emakit.io.ema_checkpoint.EMACheckpoint`, and the bounds
on untrusted files are in :mod:`emakit.io.limits`:

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
from typing import Any

from emakit.errors import StateDictError
from emakit.io import inert_pickle
from emakit.io.ema_checkpoint import EMACheckpoint
from emakit.io.layouts import (
    averaged_model,
    diffusers,
    ema_pytorch,
    lightning,
    lightning_callback,
    own,
    timm,
    torch_ema,
    ultralytics,
)
from emakit.io.layouts.recorded import as_int, is_tensor, short_repr
from emakit.io.limits import check_weights, check_zip

__all__ = ["FOREIGN", "LAYOUTS", "EMACheckpoint", "read_checkpoint"]

FOREIGN = (lightning_callback, timm, lightning, diffusers, torch_ema, ema_pytorch, ultralytics,
           averaged_model)
"""Other libraries' layouts, tried in this order (each a module with ``NAME`` and ``detect``)."""
LAYOUTS = (own.NAME, *(m.NAME for m in FOREIGN), "plain")
"""Every layout :func:`read_checkpoint` knows, by name."""


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
    if kind == "a safetensors file" or (src.suffix.lower() == ".safetensors"
                                        and kind.startswith("not a format")):
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
        path: a checkpoint file (``.safetensors``, ``.npz`` or a torch file of any suffix), or
            a checkpoint folder holding an ``ema.safetensors`` (Hugging Face's
            ``checkpoint-N/`` with emakit's callback).
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
    from emakit.io.checkpoint import checkpoint_file

    src = checkpoint_file(path)  # a trainer's checkpoint folder: its ema.safetensors
    obj, meta = _open(src, framework)
    found = _find(src, obj, meta, names, verify)
    check_weights(f"{str(src)!r}{found.where}", found.weights, src.stat().st_size)
    return found


def _find(src: Path, obj: Any, meta: Mapping[str, str], names: Any,
          verify: bool) -> EMACheckpoint:
    from emakit.io.header import HEADER_KEY

    if HEADER_KEY in meta:  # an emakit.save file: check it with the tensors already read
        from emakit.io.checkpoint import state_from
        from emakit.io.header import parse_header

        state = state_from(src, parse_header(src, meta, verify=verify), obj, verify=verify)
        header = state.pop("header")
        own_found = own.detect_state(str(src), "", state, checked=True)
        sums = ("checksums: crc32 of the header and every tensor, " +
                ("verified" if verify else "not verified (verify=False)")
                if "checksums" in header else
                "no checksums (written before emakit recorded them)")
        return dataclasses.replace(own_found, notes=(
            f"written by emakit {header.get('emakit_version', '?')}, format_version "
            f"{header['format_version']}", sums, *own_found.notes))
    param_names = _param_names(names)
    found = _detect_safely(str(src), "", obj, param_names)
    if found is None and isinstance(obj, Mapping):
        keys = sorted((k for k in obj if isinstance(k, str)), key=lambda k: "ema" not in k.lower())
        for key in keys:
            found = _detect_safely(str(src), f"[{key!r}]", obj[key], param_names)
            if found is not None:
                break
    if found is None and isinstance(obj, Mapping) and obj and all(
            isinstance(k, str) and is_tensor(v) for k, v in obj.items()):
        kind = meta.get("emakit.kind")
        note = (f"model weights written by emakit ({kind}); decay not recorded" if kind else
                "a plain name -> tensor file: no EMA metadata (step and decay unknown)")
        found = EMACheckpoint("plain", str(src), "", dict(obj), notes=(note,),
                              step=as_int(meta.get("emakit.step")),
                              num_updates=as_int(meta.get("emakit.num_updates")))
    if found is None:
        keys = sorted(k if isinstance(k, str) else short_repr(k, 40) for k in obj) \
            if isinstance(obj, Mapping) else []
        what = f"a dict with keys {keys[:12]}" if isinstance(obj, Mapping) else \
            f"a {type(obj).__name__}"
        raise ValueError(f"{str(src)!r} holds no EMA layout emakit knows: it is {what}. Known "
                         f"layouts: {', '.join(LAYOUTS)}.")
    return found


def _detect_safely(path: str, where: str, obj: Any,
                   names: list[str] | None) -> EMACheckpoint | None:
    """The EMA in ``obj`` (emakit's or another library's), a malformed entry reported as a
    StateDictError naming the file and the key."""
    try:
        if own.is_state(obj):
            return own.detect_state(path, where, dict(obj))
        if not isinstance(obj, Mapping):
            return None
        for layout in FOREIGN:
            found: EMACheckpoint | None = layout.detect(path, where, obj, names)
            if found is not None:
                return found
        return None
    except (TypeError, AttributeError, KeyError, IndexError, OverflowError, RuntimeError,
            RecursionError) as exc:
        raise StateDictError(
            f"{path!r}{where}: a malformed entry ({type(exc).__name__}: "
            f"{short_repr(str(exc), 120)})", fix="The file is corrupt or not an EMA checkpoint."
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
