"""Plain weight files (``name -> tensor``), chosen by suffix, written atomically.

- ``.safetensors``: torch tensors or numpy arrays, with ``metadata`` (str -> str) in the header;
  loads anywhere without emakit (``safetensors.torch.load_file``) and never unpickles.
- ``.npz``: numpy arrays (``numpy.load``); torch tensors are converted (bfloat16 is refused:
  numpy has no bfloat16). Metadata is stored as the ``__metadata__`` JSON entry.
- ``.pt`` / ``.pth``: ``torch.save`` of a plain ``OrderedDict`` of tensors, so
  ``model.load_state_dict(torch.load(path, weights_only=True))`` works; the metadata rides along
  as the dict's attribute ``emakit_metadata`` (as torch keeps its own ``_metadata``), which
  ``load_state_dict`` ignores. Files in the older ``{"tensors", "metadata"}`` layout still read.

Every write is atomic and goes through an open descriptor (:func:`emakit.io.atomic.atomic_write`).

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "w.npz"
    >>> write_weights({"w": np.arange(3.0)}, path, metadata={"step": "7"})
    >>> tensors, meta = read_weights(path)
    >>> tensors["w"], meta
    (array([0., 1., 2.]), {'step': '7'})
"""

from __future__ import annotations

import collections
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from emakit.io.atomic import atomic_write

__all__ = ["SUFFIXES", "pt_weights", "read_npz", "read_weights", "write_weights"]

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

    Everything is checked and converted before the file is opened, so bad input leaves the
    previous file as it was.

    For a sharded model's state (DTensors) this is a collective: call it on every rank; rank 0
    writes the full tensors (``.safetensors``: gathered one at a time).

    Args:
        tensors: torch tensors or numpy arrays, by name.
        path: ends in ``.safetensors``, ``.npz``, ``.pt`` or ``.pth``.
        metadata: short strings stored with the tensors (for ``.pt``: as the attribute
            ``emakit_metadata`` of the saved ``OrderedDict``).

    Raises:
        ValueError: for an unknown suffix, a dtype the format cannot hold (bfloat16 in
            ``.npz``), or a tensor named ``"__metadata__"``.
        OSError: the file cannot be written (the message names ``path``).
    """
    dest = Path(path)
    suffix = _suffix(dest)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if _META_KEY in tensors:
        raise ValueError(f"{str(dest)!r}: a tensor may not be named {_META_KEY!r} (it holds "
                         "the metadata); rename it.")
    from emakit.distributed.gather import gathered, has_shards, write_gathered

    if has_shards(tensors):  # a sharded model's state: a collective, rank 0 writes
        if suffix == ".safetensors":
            write_gathered(dest, tensors, lambda sums: meta)
        else:
            from emakit.distributed.gather import checked_by_rank0

            checked_by_rank0(dest)
            gathered(tensors, lambda full: write_weights(full, dest, metadata=meta))
        return
    if suffix == ".safetensors":
        from emakit.io.safetensors_stream import raw_bytes, write_safetensors

        raws = {str(k): raw_bytes(v, str(k)) for k, v in tensors.items()}
        with atomic_write(dest) as f:
            write_safetensors(f, raws, meta)
    elif suffix == ".npz":
        arrays = {str(k): _as_numpy(v, str(k), dest) for k, v in tensors.items()}
        with atomic_write(dest) as f:
            _write_npz(f, arrays, meta)
    else:
        torch = _torch()
        state = collections.OrderedDict(
            (str(k), v if isinstance(v, torch.Tensor) else torch.from_numpy(_contiguous(v)))
            for k, v in tensors.items())
        if meta:
            state.emakit_metadata = meta  # type: ignore[attr-defined]
        with atomic_write(dest) as f:
            torch.save(state, f)


def _contiguous(x: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(x)


def _as_numpy(x: Any, name: str, dest: Path) -> Any:
    """A numpy array of ``x`` for ``.npz`` (torch tensors are copied to the CPU)."""
    if type(x).__module__.startswith("torch"):
        if str(x.dtype) == "torch.bfloat16":
            raise ValueError(
                f"cannot write {str(dest)!r}: {name!r} is bfloat16, which numpy (.npz) cannot "
                "hold. Convert it to float32 first (emakit export --dtype float32), or write "
                ".safetensors or .pt.")
        return x.detach().to("cpu").resolve_conj().resolve_neg().numpy()
    return x


def _write_npz(f: IO[bytes], arrays: Mapping[str, Any], meta: Mapping[str, str]) -> None:
    """What ``numpy.savez`` writes (a zip of ``.npy`` files), into an open file."""
    import zipfile

    import numpy as np

    entries: dict[str, Any] = dict(arrays)
    if meta:
        entries[_META_KEY] = np.array(json.dumps(dict(meta)))
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in entries.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


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
            return read_npz(src)
        torch = _torch()
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        raise ValueError(f"{str(src)!r} is not a readable {suffix} weight file: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{str(src)!r} holds a {type(obj).__name__}, not a dict of tensors.")
    return pt_weights(obj)


def read_npz(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(arrays, metadata)`` of an ``.npz`` archive (whatever its suffix), without unpickling.

    Raises:
        ValueError: not a readable ``.npz`` archive (naming the file and why), or one that
            decompresses to more than :func:`emakit.io.limits.limit` of its size.
    """
    import numpy as np

    from emakit.io.limits import check_zip

    src = Path(path)
    check_zip(src)
    try:
        with np.load(src, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta_arr = arrays.pop(_META_KEY, None)
        meta = json.loads(str(meta_arr)) if meta_arr is not None else {}
    except (OSError, ValueError, RecursionError, KeyError) as exc:
        raise ValueError(f"{str(src)!r} is not a readable .npz archive: {exc}") from None
    return arrays, _str_dict(meta)


def pt_weights(obj: dict[Any, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a dict read from a ``.pt`` file :func:`write_weights` wrote.

    The metadata is the ``emakit_metadata`` attribute of the dict; files written by emakit
    0.1.0 hold ``{"tensors": {...}, "metadata": {...}}`` instead, which is unwrapped.
    """
    if set(obj) == {"tensors", "metadata"} and isinstance(obj["tensors"], dict):
        old = obj["metadata"]
        return dict(obj["tensors"]), _str_dict(old)
    return dict(obj), _str_dict(getattr(obj, "emakit_metadata", None))


def _str_dict(meta: object) -> dict[str, str]:
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)}


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
