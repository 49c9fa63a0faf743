"""Plain weight files (``name -> tensor``), chosen by suffix, written atomically.

- ``.safetensors``: torch tensors or numpy arrays, with ``metadata`` (str -> str) in the header;
  loads anywhere without emakit (``safetensors.torch.load_file``) and never unpickles.
- ``.npz``: numpy arrays (``numpy.load``); metadata is stored as the ``__metadata__`` JSON entry.
- ``.pt`` / ``.pth``: ``torch.save`` of a dict of tensors (read back with ``weights_only=True``).

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.npz"
    >>> write_weights({"w": np.arange(3.0)}, path, metadata={"step": "7"})
    >>> tensors, meta = read_weights(path)
    >>> tensors["w"], meta
    (array([0., 1., 2.]), {'step': '7'})
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emakit.io.atomic import atomic_path

__all__ = ["SUFFIXES", "read_weights", "write_weights"]

SUFFIXES = (".safetensors", ".npz", ".pt", ".pth")
_META_KEY = "__metadata__"


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"cannot tell the file format of {str(path)!r} from its suffix "
                         f"{suffix!r}; use one of {', '.join(SUFFIXES)}.")
    return suffix


def _is_torch(tensors: Mapping[str, Any]) -> bool:
    return any(type(t).__module__.startswith("torch") for t in tensors.values())


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError("the .pt / .pth format needs torch: pip install -c constraints.txt "
                          "'emakit[torch]'") from exc
    return torch


def write_weights(tensors: Mapping[str, Any], path: str | os.PathLike[str], *,
                  metadata: Mapping[str, str] | None = None) -> None:
    """Write ``name -> tensor`` to ``path`` atomically, in the format its suffix names.

    Args:
        tensors: torch tensors or numpy arrays (one kind per file), by name.
        path: ends in ``.safetensors``, ``.npz``, ``.pt`` or ``.pth``.
        metadata: short strings stored with the tensors.

    Raises:
        ValueError: for an unknown suffix, or torch tensors into ``.npz``.
    """
    dest = Path(path)
    suffix = _suffix(dest)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    torch_like = _is_torch(tensors)
    with atomic_path(dest) as tmp:
        if suffix == ".safetensors":
            if torch_like:
                import safetensors.torch

                data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
                safetensors.torch.save_file(_unshare(data), str(tmp), metadata=meta)
            else:
                import numpy as np
                import safetensors.numpy

                arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
                safetensors.numpy.save_file(arrays, str(tmp), metadata=meta)
        elif suffix == ".npz":
            if torch_like:
                raise ValueError(f"{str(dest)!r}: .npz holds numpy arrays; save torch tensors as "
                                 ".safetensors or .pt.")
            import numpy as np

            entries: dict[str, Any] = dict(tensors)
            if meta:
                entries[_META_KEY] = np.array(json.dumps(meta))
            with open(tmp, "wb") as f:
                np.savez(f, **entries)
        else:
            torch = _torch()
            torch.save({"tensors": dict(tensors), "metadata": meta}, tmp)


def _unshare(data: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in data.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def read_weights(path: str | os.PathLike[str], *,
                 framework: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a file written by :func:`write_weights` (or any plain safetensors/npz/pt file).

    Args:
        path: the file.
        framework: ``"torch"`` or ``"numpy"`` for the tensor type of a ``.safetensors`` file
            (default: torch when it is installed).

    Returns:
        ``(tensors, metadata)``.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not a readable weight file (naming the file and why).
    """
    src = Path(path)
    suffix = _suffix(src)
    if not src.is_file():
        raise FileNotFoundError(f"no such weight file: {str(src)!r}")
    try:
        if suffix == ".safetensors":
            return _read_safetensors(src, framework)
        if suffix == ".npz":
            import numpy as np

            with np.load(src, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta_arr = arrays.pop(_META_KEY, None)
            meta = json.loads(str(meta_arr)) if meta_arr is not None else {}
            return arrays, meta
        torch = _torch()
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{str(src)!r} is not a readable {suffix} weight file: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("tensors"), dict):
        return dict(obj["tensors"]), dict(obj.get("metadata") or {})
    if isinstance(obj, dict):
        return dict(obj), {}
    raise ValueError(f"{str(src)!r} holds a {type(obj).__name__}, not a dict of tensors.")


def _read_safetensors(src: Path, framework: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    import safetensors
    if framework is None:
        import importlib.util

        framework = "torch" if importlib.util.find_spec("torch") else "numpy"
    if framework not in ("torch", "numpy"):
        raise ValueError(f"framework must be 'torch' or 'numpy', got {framework!r}.")
    try:
        with safetensors.safe_open(str(src), framework="pt" if framework == "torch"
                                   else "np") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise ValueError(f"{str(src)!r} is not a readable .safetensors file: {exc}") from exc
