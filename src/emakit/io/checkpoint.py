"""emakit's checkpoint file: the EMA state as safetensors, its settings as JSON in the header.

The tensors are the shadows by their model names, in the shadows' own dtype (fp32 for a bf16
model), so ``safetensors.torch.load_file`` reads them without emakit. The header's metadata holds
one key, ``"emakit"``, whose value is a JSON object (``docs/state-format.md``)::

    {"kind": "ema-state", "format_version": 1, "emakit_version": "0.1.0", "backend": "torch",
     "step": 1200, "last_update_step": 1200, "num_updates": 400, "decay_product": 0.0,
     "init": "copy", "every": 3, "decay": {"kind": "Constant", "decay": 0.999},
     "half_life": 692.8, "policy": {...}, "actions": {"w": "average", ...},
     "shadow_dtypes": {"w": "float32", ...}, "source_dtypes": {"w": "bfloat16", ...},
     "user": {...}, "checksums": {"algorithm": "crc32", "tensors": {"w": "1c291ca3", ...}}}

A second metadata key, ``"emakit.header_crc32"``, holds the CRC-32 of that JSON text, so a
flipped bit in a tensor or in the header is caught on reading (``verify=False`` skips the check,
for huge files; files written before checksums were recorded load unchecked).

Writes are atomic (:func:`emakit.io.atomic.atomic_write`): a crash leaves the previous file
whole. Reading never unpickles, checks every entry before anything is loaded, and names the file
and the key in its errors.

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
    >>> emakit.load(fresh, path)
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

from emakit.ema import EMA
from emakit.errors import StateDictError
from emakit.io.header import HEADER_CRC_KEY, HEADER_KEY, KIND, READABLE_VERSIONS, parse_header
from emakit.io.weights import read_weights
from emakit.state import FORMAT_VERSION, LoadResult

EXTRA_SEP = "::"
"""Separates a strategy's group from a tensor name in a file (``"bema_origin::fc.weight"``)."""

__all__ = ["EXTRA_SEP", "HEADER_CRC_KEY", "HEADER_KEY", "KIND", "READABLE_VERSIONS", "load",
           "parse_header", "read_header", "read_state", "save", "state_from"]

_FILE_ONLY = ("kind", "format_version", "emakit_version", "half_life", "shadow_dtypes", "user",
              "checksums")
"""Header keys that describe the file, not the EMA state (the rest is the state)."""


def _half_life(decay: Mapping[str, Any]) -> float | None:
    if decay.get("kind") != "Constant":
        return None
    d = float(decay["decay"])
    return None if d in (0.0, 1.0) else math.log(0.5) / math.log(d)


def _is_path(x: object) -> bool:
    return isinstance(x, (str, os.PathLike))


def _wrong_ema(verb: str, first: object, second: object) -> TypeError:
    """The TypeError for ``emakit.save`` / ``emakit.load`` called without an EMA in its place."""
    usage = f"emakit.{verb}(ema, path)"
    got, other = first, second
    if isinstance(other, EMA) and _is_path(got):
        return TypeError(f"emakit.{verb} got its arguments swapped: call {usage} (the path "
                         f"{str(got)!r} came where the EMA belongs; the EMA comes first for "
                         "both save and load).")
    hint = (f" For a MultiEMA, save or load each average: emakit.{verb}(emas[k], path)."
            if type(got).__name__ == "MultiEMA" else "")
    return TypeError(f"ema must be an emakit.EMA, got {type(got).__name__}. Usage: {usage}."
                     + hint)


def save(ema: EMA, path: str | os.PathLike[str], *,
         metadata: Mapping[str, str] | None = None) -> None:
    """Write ``ema``'s state to a ``.safetensors`` file, atomically.

    Everything :meth:`EMA.state_dict` holds goes in: the shadows (in their dtype) as tensors,
    the counters and settings as JSON in the header, with a CRC-32 of every tensor and of the
    header. A crash during the write leaves the previous file at ``path`` intact. The EMA's
    lock is held until the file is written, so a thread updating the same EMA waits and the
    file holds one consistent state. For an EMA of a sharded model (DTensor parameters) this
    is a collective: call it on every rank; the shadows are gathered one tensor at a time and
    rank 0 writes one full, plain file (:mod:`emakit.distributed.gather`).

    Args:
        ema: the EMA.
        path: the file; must end in ``.safetensors``. Its folder must exist.
        metadata: extra ``str -> str`` entries kept in the header under ``"user"`` (e.g. the
            run name); :func:`read_header` returns them.

    Raises:
        TypeError: ``ema`` is not an :class:`~emakit.EMA` (e.g. the arguments are swapped).
        SwapError: while the EMA weights are swapped into the model.
        ValueError: for another suffix, or metadata that is not ``str -> str``.
        OSError: the file cannot be written (the message names ``path`` and the reason).
    """
    if not isinstance(ema, EMA):
        raise _wrong_ema("save", ema, path)
    if not _is_path(path):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}. "
                        "Usage: emakit.save(ema, path).")
    dest = Path(path)
    if dest.suffix.lower() != ".safetensors":
        raise ValueError(f"emakit.save writes safetensors; path must end in '.safetensors', got "
                         f"{str(dest)!r}. For torch.save use ema.state_dict() instead.")
    user = dict(metadata or {})
    bad = [k for k, v in user.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"metadata must map str to str; {bad[0]!r} -> {user[bad[0]]!r} does not. "
                         "Convert values with str() or json.dumps().")
    from emakit.io import safetensors_stream as stream
    from emakit.io.atomic import atomic_write
    from emakit.version import __version__

    with ema.lock:  # one consistent state: another thread's update waits for the file
        state = ema.state_dict()  # raises SwapError inside swapped()
        shadows = dict(state.pop("shadows"))
        extras = state.pop("extras", None) or {}
        if extras:  # a strategy's tensors (BEMA's origin): stored as "GROUP::NAME"
            state["extras"] = {g: {n: _dtype(t) for n, t in ts.items()}
                               for g, ts in extras.items()}
            shadows.update({f"{g}{EXTRA_SEP}{n}": t for g, ts in extras.items()
                            for n, t in ts.items()})
        header: dict[str, Any] = {"kind": KIND, "format_version": FORMAT_VERSION,
                                  "emakit_version": __version__}
        header.update(state)
        header["half_life"] = _half_life(state["decay"])
        header["shadow_dtypes"] = {n: _dtype(t) for n, t in shadows.items()}
        header.setdefault("source_dtypes", ema.source_dtypes())
        header["user"] = user

        def file_metadata(sums: Mapping[str, str]) -> dict[str, str]:
            header["checksums"] = {"algorithm": "crc32", "tensors": dict(sums)}
            text = json.dumps(header)
            return {HEADER_KEY: text, HEADER_CRC_KEY: stream.crc32(memoryview(text.encode()))}

        from emakit.distributed.gather import has_shards

        if has_shards(shadows):  # a sharded EMA: gathered tensor by tensor, rank 0 writes
            from emakit.distributed.gather import write_gathered

            write_gathered(dest, shadows, file_metadata)
            return
        raws = {n: stream.raw_bytes(t, n) for n, t in shadows.items()}
        meta = file_metadata({n: stream.crc32(r.data) for n, r in raws.items()})
        with atomic_write(dest) as f:
            stream.write_safetensors(f, raws, meta)


def _dtype(x: Any) -> str:
    from emakit.backends import backend_for

    backend = backend_for(x)
    return backend.info(x).dtype if backend else type(x).__name__


def _where(path: Path) -> str:
    return repr(str(path))


def checkpoint_file(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file at ``path``: the file itself, or a trainer's checkpoint folder's
    ``ema.safetensors`` (what emakit's callbacks write into Hugging Face's ``checkpoint-N/``).

    Raises:
        FileNotFoundError: no such file, or a folder without an ``ema.safetensors``.
    """
    src = Path(path)
    if src.is_dir():
        inside = src / "ema.safetensors"
        if not inside.is_file():
            raise FileNotFoundError(f"{_where(src)} is a folder without an ema.safetensors (the "
                                    "file emakit's trainer callbacks write into a checkpoint "
                                    "folder); give the checkpoint file itself.")
        return inside
    if not src.is_file():
        raise FileNotFoundError(f"no such checkpoint: {_where(src)}")
    return src


def _not_safetensors(src: Path, exc: Exception) -> StateDictError:
    """The error for a file safetensors cannot open, saying what the file is instead."""
    from emakit.io.sniff import file_kind

    kind = file_kind(src)
    if kind.startswith("a torch.save"):
        return StateDictError(
            f"{_where(src)} is {kind}, not an emakit.save file",
            fix="For an ema.state_dict() saved inside it use "
                "ema.load_state_dict(torch.load(path, weights_only=True)[key]); to start an EMA "
                "from it use EMA.from_checkpoint(model, path); `emakit inspect FILE` shows what "
                "it holds.")
    if kind == "empty":
        return StateDictError(f"{_where(src)} is empty (0 bytes), not a readable .safetensors "
                              "file", fix="Was its write cut short by something other than "
                              "emakit.save (which never leaves a partial file)?")
    if kind == "a safetensors file" or kind.startswith("not a format"):
        return StateDictError(f"{_where(src)} is not a readable .safetensors file ({exc})",
                              fix="Is the file truncated or corrupt?")
    return StateDictError(f"{_where(src)} is {kind}, not an emakit.save (.safetensors) file",
                          fix="emakit.load reads the files emakit.save writes; `emakit inspect "
                              "FILE` shows what other checkpoints hold.")


def read_header(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Any]:
    """The JSON header of an emakit checkpoint, without reading the tensors.

    Args:
        path: a file written by :func:`save`.
        verify: check the header's CRC-32 where the file records one.

    Raises:
        FileNotFoundError: if the file does not exist.
        StateDictError: if it is not an emakit checkpoint of a version this emakit reads, or
            its header is damaged or malformed (naming the key).
    """
    import safetensors

    src = checkpoint_file(path)
    try:
        with safetensors.safe_open(str(src), framework="np") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise _not_safetensors(src, exc) from None
    return parse_header(src, meta, verify=verify)


def read_state(path: str | os.PathLike[str], *, framework: str | None = None,
               verify: bool = True) -> dict[str, Any]:
    """Read an emakit checkpoint into a dict in the layout of :meth:`EMA.state_dict`.

    Args:
        path: a file written by :func:`save`.
        framework: ``"torch"`` or ``"numpy"`` tensors (default: the backend that wrote it,
            numpy where torch is not installed).
        verify: check the CRC-32 of the header and of every tensor where the file records
            them (about 0.15 s per GB); False skips it, for huge files.

    Returns:
        The state, for :meth:`EMA.load_state_dict` (and the header under ``"header"``).

    Raises:
        FileNotFoundError: if the file does not exist.
        StateDictError: if it is not a complete emakit checkpoint of a known version, or is
            damaged (a checksum differs), naming the file and the key or tensor.
    """
    src = checkpoint_file(path)
    header = read_header(src, verify=verify)
    if framework is None:
        import importlib.util

        torch_ok = importlib.util.find_spec("torch") is not None
        framework = "torch" if header["backend"] == "torch" and torch_ok else "numpy"
    try:
        tensors, _ = read_weights(src, framework=framework)
    except ValueError as exc:
        raise StateDictError(str(exc), fix="Is the file truncated or corrupt?") from None
    return state_from(src, header, tensors, verify=verify)


def _verify(src: Path, header: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
    from emakit.io.safetensors_stream import crc32, raw_bytes

    stored = header["checksums"]["tensors"]
    for name in header["actions"]:
        if name not in stored:
            raise StateDictError(f"{_where(src)}: the header records no checksum for tensor "
                                 f"{name!r}", fix="The file is corrupt or was edited.")
        got = crc32(raw_bytes(tensors[name], name).data)
        if got != stored[name]:
            raise StateDictError(
                f"{_where(src)}: tensor {name!r} does not match its checksum (crc32 stored "
                f"{stored[name]}, computed {got})",
                fix="The file is damaged: restore it from a copy (verify=False reads it anyway).")


def state_from(src: Path, header: Mapping[str, Any], tensors: Mapping[str, Any], *,
               verify: bool = True) -> dict[str, Any]:
    """The state (as :func:`read_state` returns it) from a file's header and tensors, checked.

    Args:
        src: the file (for messages).
        header: its header, from :func:`parse_header`.
        tensors: its tensors by name.
        verify: compare every tensor with its CRC-32 where the header records them.

    Raises:
        StateDictError: the tensors do not match the header (names, dtypes, checksums), naming
            the keys.
    """
    dtypes = dict(header["shadow_dtypes"])
    names = list(header["actions"])
    extras = header.get("extras") or {}
    extra_names = {f"{g}{EXTRA_SEP}{n}": (g, n) for g, ts in extras.items() for n in ts}
    dtypes.update({f"{g}{EXTRA_SEP}{n}": d for g, ts in extras.items() for n, d in ts.items()})
    names_all = names + list(extra_names)
    missing = [n for n in names_all if n not in tensors]
    unexpected = [n for n in tensors if n not in header["actions"] and n not in extra_names]
    mismatched = []
    from emakit.backends import backend_for

    for name in names_all:
        if name in tensors:
            backend = backend_for(tensors[name])
            have = backend.info(tensors[name]).dtype if backend else type(tensors[name]).__name__
            if have != dtypes.get(name):
                mismatched.append(f"{name}: dtype {have} but the header says {dtypes.get(name)}")
    if missing or unexpected or mismatched:
        raise StateDictError(f"{_where(src)}: the tensors do not match the header",
                             missing=missing, unexpected=unexpected, mismatched=mismatched,
                             fix="The file is corrupt or was edited.")
    if verify and "checksums" in header:
        _verify(src, header, tensors)
    state: dict[str, Any] = {k: v for k, v in header.items() if k not in _FILE_ONLY}
    state["format_version"] = FORMAT_VERSION
    state["shadows"] = {n: tensors[n] for n in names}
    if extra_names:
        state["extras"] = {g: {} for g in extras}
        for key, (g, n) in extra_names.items():
            state["extras"][g][n] = tensors[key]
    state["header"] = dict(header)
    return state


def load(ema: EMA, path: str | os.PathLike[str], *, strict: bool = True,
         verify: bool = True) -> LoadResult:
    """Load an emakit checkpoint into ``ema``; check everything first, change nothing on error.

    The same rules as :meth:`EMA.load_state_dict`: shadows matched by name and copied into
    ``ema``'s (which keep their dtype and device), counters loaded, differing settings reported.

    Args:
        ema: the EMA to load into.
        path: a file written by :func:`save`.
        strict: raise on missing or unexpected names; otherwise load the common ones.
        verify: check the CRC-32 of the header and of every tensor where the file records
            them; False skips it (for huge files you trust).

    Returns:
        A :class:`~emakit.LoadResult`.

    Raises:
        FileNotFoundError: if the file does not exist.
        TypeError: ``ema`` is not an :class:`~emakit.EMA` (e.g. the arguments are swapped).
        StateDictError: the file is not a complete emakit checkpoint of a known version, is
            damaged, or does not fit ``ema`` (names, shapes, dtypes); the message names the
            file and keys.
    """
    if not isinstance(ema, EMA):
        raise _wrong_ema("load", ema, path)
    state = read_state(path, verify=verify)
    state.pop("header")
    try:
        return ema.load_state_dict(state, strict=strict)
    except StateDictError as exc:
        raise exc.located(_where(Path(path))) from None
