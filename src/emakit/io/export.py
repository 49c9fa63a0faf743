"""Write the EMA weights of any supported checkpoint as a plain model state dict.

The output loads with ``model.load_state_dict(safetensors.torch.load_file(path))`` (or
``torch.load`` for ``.pt``) -- no emakit needed. Averaged tensors are bias-corrected
(``init="zeros"``; an EMA saved before its first update has no average and is refused) and, for
emakit checkpoints, cast back to the model's dtypes by default (a bf16 model gets bf16 weights
rounded from its fp32 shadows); a ``torch.save``-d state from before emakit recorded the model's
dtypes is written as stored, and the summary's ``notes`` say so. Copied tensors (integer
buffers) keep their dtype; the second name of a tied weight carries the average too.

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> import emakit
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> w = {"w": np.array([1.0, 3.0], dtype=np.float32)}
    >>> ema = emakit.EMA(w, decay=0.5)
    >>> w["w"] += 2.0
    >>> _ = ema.update()
    >>> emakit.save(ema, folder / "ema.safetensors")
    >>> summary = export_weights(folder / "ema.safetensors", folder / "model.safetensors")
    >>> summary.tensors, summary.layout
    (1, 'emakit')
    >>> emakit.io.read_weights(folder / "model.safetensors", framework="numpy")[0]["w"]
    array([2., 4.], dtype=float32)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from emakit.io.layouts import read_checkpoint
from emakit.io.weights import write_weights

__all__ = ["DTYPES", "ExportSummary", "export_weights", "read_names", "tensor_bytes"]

DTYPES = ("model", "keep", "float32", "bfloat16", "float16", "float64")
"""``model``: the model's dtypes where the file records them (emakit), else as stored;
``keep``: as stored (the shadow dtype); or one floating dtype for every floating tensor."""


class ExportSummary(NamedTuple):
    """What :func:`export_weights` wrote.

    Attributes:
        layout: the checkpoint's layout.
        tensors: how many tensors were written.
        bytes: their bytes.
        path: the file written.
        notes: what the user should know about the result (e.g. that the model's dtypes were
            not recorded, so the stored dtypes were written).
    """

    layout: str
    tensors: int
    bytes: int
    path: str
    notes: tuple[str, ...] = ()


def _cast(x: Any, dtype: str, name: str) -> Any:
    """``x`` cast to the floating dtype ``dtype`` (non-floating tensors stay as they are)."""
    if type(x).__module__.startswith("torch"):
        import torch

        target = getattr(torch, dtype, None) if dtype.isidentifier() else None
        if not isinstance(target, torch.dtype):
            raise ValueError(f"{name!r}: unknown dtype {dtype!r} to cast to.")
        return x.to(target) if x.is_floating_point() else x
    import numpy as np

    if not np.issubdtype(x.dtype, np.floating):
        return x
    if dtype == "bfloat16":
        raise ValueError("--dtype bfloat16 needs torch tensors; this checkpoint holds numpy "
                         "arrays. Use float16 or float32.")
    try:
        return x.astype(np.dtype(dtype))
    except TypeError:
        raise ValueError(f"{name!r}: unknown dtype {dtype!r} to cast to.") from None


def tensor_bytes(x: Any) -> int:
    """Bytes held by a torch tensor or numpy array."""
    if hasattr(x, "element_size"):
        return int(x.numel() * x.element_size())
    return int(x.nbytes)


def read_names(path: str | os.PathLike[str]) -> list[str]:
    """Parameter names from a text file, one per line (blank lines ignored)."""
    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"no such names file: {str(src)!r}")
    return [line.strip() for line in src.read_text().splitlines() if line.strip()]


def export_weights(path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                   dtype: str = "model", names: Any = None,
                   strip_prefix: str | None = None, verify: bool = True) -> ExportSummary:
    """Read the EMA weights from ``path`` (any layout) and write them to ``out``.

    Args:
        path: a checkpoint file (see :mod:`emakit.io.layouts`).
        out: ``.safetensors`` (default choice), ``.pt`` or ``.npz``; written atomically.
        dtype: one of :data:`DTYPES`.
        names: parameter names (or the model) for layouts that store bare lists of tensors.
        strip_prefix: remove this prefix from every name that has it (e.g. ``"module."``).
        verify: check the checksums of an emakit file (False: skip, for huge files).

    Returns:
        An :class:`ExportSummary`; its ``notes`` say what was chosen where the file left it
        open (e.g. no recorded model dtypes: the stored dtypes were written).

    Raises:
        ValueError: unknown ``dtype``, an unreadable checkpoint, a layout that needs names, an
            EMA with no average yet (``init="zeros"`` saved before its first update),
            bfloat16 weights for ``.npz``, or a ``strip_prefix`` that no name has or that
            makes two names one.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    found = read_checkpoint(path, names=names, verify=verify)
    if found.layout in ("diffusers", "torch-ema") and next(iter(found.weights), "").startswith(
            "shadow_params."):
        raise ValueError(f"{str(path)!r}: the {found.layout} layout stores its averages as a bare "
                         "list; give the parameter names (one per line, in the model's "
                         "named_parameters() order) with --names FILE.")
    if found.empty:
        raise ValueError(f"{str(path)!r} holds no average yet: the EMA (start='zeros') was saved "
                         "before its first update, so its shadows are zeros, not weights. "
                         "Export a checkpoint saved after at least one update.")
    notes = []
    if dtype == "model" and found.layout == "emakit" and found.model_dtypes is None:
        stored = sorted({str(getattr(t, "dtype", "?")).removeprefix("torch.")
                         for t in found.weights.values()})
        notes.append(f"the file does not record the model's dtypes (saved before emakit "
                     f"recorded them): wrote the stored dtypes ({', '.join(stored)}); pass "
                     "--dtype (e.g. bfloat16) to choose")
    weights: dict[str, Any] = {}
    for name, tensor in found.weights.items():
        if dtype == "model":
            target = (found.model_dtypes or {}).get(name)
            value = _cast(tensor, target, name) if target else tensor
        elif dtype == "keep":
            value = tensor
        else:
            value = _cast(tensor, dtype, name)
        if strip_prefix and name.startswith(strip_prefix):
            name = name[len(strip_prefix):]
        if name in weights:
            raise ValueError(f"strip_prefix={strip_prefix!r} makes two names {name!r}; nothing "
                             "was written. Strip a longer prefix, or none.")
        weights[name] = value
    if strip_prefix and not any(n.startswith(strip_prefix) for n in found.weights):
        first = next(iter(found.weights), "")
        raise ValueError(f"strip_prefix={strip_prefix!r}: no name in {str(path)!r} starts with "
                         f"it (they start like {first!r}); nothing was written. Leave it out, "
                         "or give the prefix the names have.")
    if Path(out).suffix.lower() == ".npz":
        bf16 = [n for n, t in weights.items() if str(getattr(t, "dtype", "")) == "torch.bfloat16"]
        if bf16:
            raise ValueError(
                f"cannot write {str(out)!r}: .npz (numpy) has no bfloat16, and {len(bf16)} "
                f"tensor(s) are bfloat16 (e.g. {bf16[0]!r}). Export with --dtype float32 "
                "(dtype='float32'), or write .safetensors or .pt.")
    meta = {"emakit.kind": "ema-export", "emakit.layout": found.layout,
            "emakit.source": Path(path).name}
    if found.step is not None:
        meta["emakit.step"] = str(found.step)
    if found.num_updates is not None:
        meta["emakit.num_updates"] = str(found.num_updates)
    write_weights(weights, out, metadata=meta)
    return ExportSummary(found.layout, len(weights), sum(map(tensor_bytes, weights.values())),
                         str(out), tuple(notes))
