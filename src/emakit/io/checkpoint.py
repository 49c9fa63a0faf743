"""emakit's checkpoint file: the EMA state as safetensors, its settings as JSON in the header.

The tensors are the shadows by their model names, in the shadows' own dtype (fp32 for a bf16
model), so ``safetensors.torch.load_file`` reads them without emakit. The header's metadata holds
one key, ``"emakit"``, whose value is a JSON object (``docs/state-format.md``)::

    {"kind": "ema-state", "format_version": 1, "emakit_version": "0.1.0", "backend": "torch",
     "step": 1200, "last_update_step": 1200, "num_updates": 400, "decay_product": 0.0,
     "init": "copy", "every": 3, "decay": {"kind": "Constant", "decay": 0.999},
     "half_life": 692.8, "policy": {...}, "actions": {"w": "average", ...},
     "shadow_dtypes": {"w": "float32", ...}, "source_dtypes": {"w": "bfloat16", ...},
     "user": {...}}

Writes are atomic (:func:`emakit.io.atomic_path`): a crash leaves the previous file whole.
Reading never unpickles, checks every entry before anything is loaded, and names the file and
the key in its errors.

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> import emakit
    >>> w = {"w": np.array([1.0, 2.0])}
    >>> ema = emakit.EMA(w, decay=0.5)
    >>> w["w"] += 2.0
    >>> _ = ema.update()
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "ema.safetensors"
    >>> emakit.save(ema, path)
    >>> fresh = emakit.EMA({"w": np.zeros(2)}, decay=0.5)
    >>> emakit.load(path, fresh)
    LoadResult(missing=[], unexpected=[], changed={})
    >>> fresh.averaged()["w"], fresh.step
    (array([2., 3.]), 1)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emakit.ema import EMA, FORMAT_VERSION, LoadResult
from emakit.errors import StateDictError
from emakit.io.weights import read_weights, write_weights

__all__ = ["HEADER_KEY", "KIND", "READABLE_VERSIONS", "load", "parse_header", "read_header",
           "read_state", "save", "state_from"]

HEADER_KEY = "emakit"
"""The safetensors metadata key that holds the JSON header."""
KIND = "ema-state"
READABLE_VERSIONS = (1,)
"""The ``format_version`` values this emakit reads (every version it ever wrote)."""
_SETTINGS = ("backend", "step", "last_update_step", "num_updates", "decay_product", "init",
             "every", "decay", "policy", "actions")


def _half_life(decay: Mapping[str, Any]) -> float | None:
    if decay.get("kind") != "Constant":
        return None
    d = float(decay["decay"])
    return None if d in (0.0, 1.0) else math.log(0.5) / math.log(d)


def save(ema: EMA, path: str | os.PathLike[str], *,
         metadata: Mapping[str, str] | None = None) -> None:
    """Write ``ema``'s state to a ``.safetensors`` file, atomically.

    Everything :meth:`EMA.state_dict` holds goes in: the shadows (in their dtype) as tensors,
    the counters and settings as JSON in the header. A crash during the write leaves the
    previous file at ``path`` intact.

    Args:
        ema: the EMA.
        path: the file; must end in ``.safetensors``. Its folder must exist.
        metadata: extra ``str -> str`` entries kept in the header under ``"user"`` (e.g. the
            run name); :func:`read_header` returns them.

    Raises:
        SwapError: while the EMA weights are swapped into the model.
        ValueError: for another suffix, or metadata that is not ``str -> str``.
    """
    dest = Path(path)
    if dest.suffix.lower() != ".safetensors":
        raise ValueError(f"emakit.save writes safetensors; path must end in '.safetensors', got "
                         f"{str(dest)!r}. For torch.save use ema.state_dict() instead.")
    user = dict(metadata or {})
    bad = [k for k, v in user.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"metadata must map str to str; {bad[0]!r} -> {user[bad[0]]!r} does not. "
                         "Convert values with str() or json.dumps().")
    from emakit import __version__

    state = ema.state_dict()  # raises SwapError inside swapped()
    shadows = state.pop("shadows")
    header: dict[str, Any] = {"kind": KIND, "format_version": FORMAT_VERSION,
                              "emakit_version": __version__}
    header.update(state)
    header["half_life"] = _half_life(state["decay"])
    header["shadow_dtypes"] = {n: ema._backend.info(t).dtype for n, t in shadows.items()}
    header["source_dtypes"] = ema.source_dtypes()
    header["user"] = user
    write_weights(shadows, dest, metadata={HEADER_KEY: json.dumps(header)})


def _where(path: Path) -> str:
    return repr(str(path))


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of an emakit checkpoint, without reading the tensors.

    Raises:
        FileNotFoundError: if the file does not exist.
        StateDictError: if it is not an emakit checkpoint of a version this emakit reads.
    """
    import safetensors

    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"no such checkpoint: {_where(src)}")
    try:
        with safetensors.safe_open(str(src), framework="np") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise StateDictError(f"{_where(src)} is not a readable .safetensors file ({exc})",
                             fix="Is the file truncated or corrupt?") from None
    return parse_header(src, meta)


def parse_header(src: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    """The checked JSON header from a safetensors file's metadata (see :func:`read_header`)."""
    raw = meta.get(HEADER_KEY)
    if raw is None:
        raise StateDictError(
            f"{_where(src)} is not an emakit checkpoint: its header has no {HEADER_KEY!r} entry",
            fix="To start an EMA from another library's checkpoint use "
                "EMA.from_checkpoint(model, path); `emakit inspect FILE` shows what it holds.")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StateDictError(f"{_where(src)}: header entry {HEADER_KEY!r} is not valid JSON "
                             f"({exc})", fix="The file is corrupt.") from None
    if not isinstance(header, dict) or header.get("kind") != KIND:
        kind = header.get("kind") if isinstance(header, dict) else type(header).__name__
        raise StateDictError(f"{_where(src)}: header entry {HEADER_KEY!r} has kind {kind!r}, "
                             f"not {KIND!r}", fix="Is this an emakit EMA checkpoint?")
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > max(READABLE_VERSIONS)
        raise StateDictError(
            f"{_where(src)}: unknown format_version {version!r}; this emakit reads "
            f"format_version {', '.join(map(str, READABLE_VERSIONS))}",
            fix=f"Upgrade emakit to read it (written by emakit "
                f"{header.get('emakit_version', '?')})." if newer else "The file is corrupt.")
    absent = [k for k in (*_SETTINGS, "shadow_dtypes") if k not in header]
    if absent:
        raise StateDictError(f"{_where(src)}: the header lacks the keys {absent}",
                             fix="The file is corrupt or was not written by emakit.save.")
    return header


def read_state(path: str | os.PathLike[str], *,
               framework: str | None = None) -> dict[str, Any]:
    """Read an emakit checkpoint into a dict in the layout of :meth:`EMA.state_dict`.

    Args:
        path: a file written by :func:`save`.
        framework: ``"torch"`` or ``"numpy"`` tensors (default: the backend that wrote it).

    Returns:
        The state, for :meth:`EMA.load_state_dict` (and the header under ``"header"``).

    Raises:
        FileNotFoundError: if the file does not exist.
        StateDictError: if it is not a complete emakit checkpoint of a known version, naming
            the file and the key.
    """
    src = Path(path)
    header = read_header(src)
    if framework is None:
        framework = "torch" if header["backend"] == "torch" else "numpy"
    try:
        tensors, _ = read_weights(src, framework=framework)
    except ValueError as exc:
        raise StateDictError(str(exc), fix="Is the file truncated or corrupt?") from None
    return state_from(src, header, tensors)


def state_from(src: Path, header: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, Any]:
    """The state (as :func:`read_state` returns it) from a file's header and tensors, checked.

    Raises:
        StateDictError: the tensors do not match the header (names, dtypes), naming the keys.
    """
    dtypes = header["shadow_dtypes"]
    names = list(header["actions"])
    missing = [n for n in names if n not in tensors]
    unexpected = [n for n in tensors if n not in header["actions"]]
    mismatched = []
    from emakit.backends import backend_for

    for name in names:
        if name in tensors:
            backend = backend_for(tensors[name])
            have = backend.info(tensors[name]).dtype if backend else type(tensors[name]).__name__
            if have != dtypes.get(name):
                mismatched.append(f"{name}: dtype {have} but the header says {dtypes.get(name)}")
    if missing or unexpected or mismatched:
        raise StateDictError(f"{_where(src)}: the tensors do not match the header",
                             missing=missing, unexpected=unexpected, mismatched=mismatched,
                             fix="The file is corrupt or was edited.")
    state: dict[str, Any] = {k: header[k] for k in _SETTINGS}
    state["format_version"] = FORMAT_VERSION
    state["shadows"] = {n: tensors[n] for n in names}
    if "nonfinite_skips" in header:
        state["nonfinite_skips"] = header["nonfinite_skips"]
    state["header"] = dict(header)
    return state


def load(path: str | os.PathLike[str], ema: EMA, *, strict: bool = True) -> LoadResult:
    """Load an emakit checkpoint into ``ema``; check everything first, change nothing on error.

    The same rules as :meth:`EMA.load_state_dict`: shadows matched by name and copied into
    ``ema``'s (which keep their dtype and device), counters loaded, differing settings reported.

    Args:
        path: a file written by :func:`save`.
        ema: the EMA to load into.
        strict: raise on missing or unexpected names; otherwise load the common ones.

    Returns:
        A :class:`~emakit.LoadResult`.

    Raises:
        FileNotFoundError: if the file does not exist.
        StateDictError: the file is not a complete emakit checkpoint of a known version, or
            does not fit ``ema`` (names, shapes, dtypes); the message names the file and keys.
    """
    if not isinstance(ema, EMA):
        raise TypeError(f"ema must be an emakit.EMA, got {type(ema).__name__}. "
                        "Usage: emakit.load(path, ema).")
    framework = "torch" if ema._backend.name == "torch" else "numpy"
    state = read_state(path, framework=framework)
    state.pop("header")
    try:
        return ema.load_state_dict(state, strict=strict)
    except StateDictError as exc:
        raise exc.located(_where(Path(path))) from None
