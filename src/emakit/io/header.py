"""The JSON header of emakit's checkpoint file: parse it, check its integrity and every type.

A file can be damaged (flipped bits, truncation) or hand-edited; the header is checked before
any of it is used, with exact type checks (``type(v) is int``: ``True`` and ``1.0`` are not the
format version ``1``), bounded nesting, and its CRC-32 when the file records one. Every problem
is a :class:`~emakit.StateDictError` naming the file and the key. The same field checks apply to
an ``EMA.state_dict()`` found inside a ``torch.save`` file (:func:`check_fields`).

Example:
    >>> from pathlib import Path
    >>> try:
    ...     parse_header(Path("x.safetensors"),
    ...                  {"emakit": '{"kind": "ema-state", "format_version": true}'})
    ... except StateDictError as exc:
    ...     print(exc.problem)
    'x.safetensors': header key 'format_version' must be the int 1, got True
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emakit.errors import StateDictError
from emakit.state import READABLE_VERSIONS, SETTINGS

__all__ = ["DTYPES", "HEADER_CRC_KEY", "HEADER_KEY", "KIND", "MAX_DEPTH", "READABLE_VERSIONS",
           "check_fields", "parse_header"]

HEADER_KEY = "emakit"
"""The safetensors metadata key that holds the JSON header."""
HEADER_CRC_KEY = "emakit.header_crc32"
"""The safetensors metadata key that holds the CRC-32 of the header's JSON text (8 hex digits)."""
KIND = "ema-state"
MAX_DEPTH = 16
"""The deepest nesting of JSON objects and arrays a header may have (emakit writes 3)."""
REQUIRED = SETTINGS
"""The state keys every header and every ``state_dict()`` holds (:data:`emakit.state.SETTINGS`)."""
_MAX_INT = 2 ** 63 - 1
_HEX8 = re.compile(r"[0-9a-f]{8}")
DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                    "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128",
                    "float128", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                    "float8_e5m2fnuz"})
"""The dtype names a header may record (torch's and numpy's names for the same types)."""
_CORRUPT = "The file is corrupt or was edited."


def _short(value: object, limit: int = 60) -> str:
    text = repr(value) if not hasattr(value, "shape") else f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _depth(value: object, limit: int) -> int:
    """The nesting depth of dicts and lists in ``value``, counted up to ``limit + 1``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def _crc(text: str) -> str:
    from emakit.io.safetensors_stream import crc32

    return crc32(memoryview(text.encode("utf-8")))


def parse_header(src: Path, meta: Mapping[str, str], *, verify: bool = True) -> dict[str, Any]:
    """The checked JSON header from a safetensors file's metadata.

    Args:
        src: the file (for messages).
        meta: the safetensors metadata (``str -> str``).
        verify: check the header's CRC-32 where the file records one.

    Returns:
        The header, every key of it type-checked.

    Raises:
        StateDictError: not an emakit checkpoint, an unknown version, a damaged or malformed
            header; the message names the file and the key.
    """
    where = repr(str(src))
    raw = meta.get(HEADER_KEY)
    if raw is None:
        raise StateDictError(
            f"{where} is not an emakit checkpoint: its header has no {HEADER_KEY!r} entry",
            fix="To start an EMA from another library's checkpoint use "
                "EMA.from_checkpoint(model, path); `emakit inspect FILE` shows what it holds.")
    stored = meta.get(HEADER_CRC_KEY)
    if verify and stored is not None and stored != _crc(raw):
        raise StateDictError(
            f"{where}: the header does not match its checksum (crc32 stored {_short(stored)}, "
            f"computed {_crc(raw)!r})", fix="The file is damaged: restore it from a copy.")
    try:
        header = json.loads(raw)
    except RecursionError:
        raise StateDictError(f"{where}: header entry {HEADER_KEY!r} is nested too deeply",
                             fix=_CORRUPT) from None
    except ValueError as exc:  # JSONDecodeError, or an int of more than 4300 digits
        raise StateDictError(f"{where}: header entry {HEADER_KEY!r} is not valid JSON "
                             f"({_short(str(exc), 120)})", fix=_CORRUPT) from None
    if not isinstance(header, dict) or header.get("kind") != KIND:
        kind = header.get("kind") if isinstance(header, dict) else type(header).__name__
        raise StateDictError(f"{where}: header entry {HEADER_KEY!r} has kind {_short(kind)}, "
                             f"not {KIND!r}", fix="Is this an emakit EMA checkpoint?")
    version = header.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        newer = type(version) is int and version > max(READABLE_VERSIONS)
        if newer or type(version) is int:
            raise StateDictError(
                f"{where}: unknown format_version {version!r}; this emakit reads "
                f"format_version {', '.join(map(str, READABLE_VERSIONS))}",
                fix=f"Upgrade emakit to read it (written by emakit "
                    f"{_short(header.get('emakit_version', '?'))})." if newer else _CORRUPT)
        raise StateDictError(f"{where}: header key 'format_version' must be the int "
                             f"{' or '.join(map(str, READABLE_VERSIONS))}, got "
                             f"{_short(version)}", fix=_CORRUPT)
    if _depth(header, MAX_DEPTH) > MAX_DEPTH:
        raise StateDictError(f"{where}: the header nests deeper than {MAX_DEPTH} levels",
                             fix=_CORRUPT)
    if verify and stored is None and "checksums" in header:
        raise StateDictError(f"{where}: the header records tensor checksums but its own "
                             f"checksum entry {HEADER_CRC_KEY!r} is missing", fix=_CORRUPT)
    absent = [k for k in (*REQUIRED, "shadow_dtypes") if k not in header]
    if absent:
        raise StateDictError(f"{where}: the header lacks the keys {absent}",
                             fix="The file is corrupt or was not written by emakit.save.")
    check_fields(where, header, label="header key")
    for key in ("emakit_version",):
        if key in header and not isinstance(header[key], str):
            _bad(where, "header key", key, "a str", header[key])
    _names_to(where, "header key", header, "shadow_dtypes", _dtype_name, "a dtype name")
    half_life = header.get("half_life")
    if half_life is not None and not _number(half_life):
        _bad(where, "header key", "half_life", "a number or null", half_life)
    _names_to(where, "header key", header, "user", lambda v: isinstance(v, str), "a str",
              optional=True)
    if "checksums" in header:
        _check_checksums(where, header["checksums"])
    return header


def _bad(where: str, label: str, key: str, what: str, value: object) -> None:
    raise StateDictError(f"{where}: {label} {key!r} must be {what}, got {_short(value)}",
                         fix=_CORRUPT)


def _number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)  # type: ignore[arg-type]


def _count(v: object) -> bool:
    return type(v) is int and 0 <= v <= _MAX_INT


def _dtype_name(v: object) -> bool:
    return isinstance(v, str) and v in DTYPES


def _names_to(where: str, label: str, state: Mapping[str, Any], key: str, ok: Any, what: str,
              *, optional: bool = False) -> None:
    """``state[key]`` must map str names to values for which ``ok(value)`` holds."""
    if key not in state and optional:
        return
    value = state[key]
    if not isinstance(value, dict):
        _bad(where, label, key, f"a dict of names to {what}", value)
    for name, item in value.items():
        if not isinstance(name, str) or not ok(item):
            raise StateDictError(f"{where}: {label} {key!r} must map names to {what}; "
                                 f"{_short(name)} -> {_short(item)}", fix=_CORRUPT)


def check_fields(where: str, state: Mapping[str, Any], *, label: str = "state key") -> None:
    """Check the types of an EMA state's counters and settings (not its tensors).

    Args:
        where: the file (and the place in it), for messages.
        state: a header, or a ``state_dict()`` read from a file.
        label: how keys are named in messages (``"header key"``, ``"state key"``).

    Raises:
        StateDictError: a key is missing or has a wrong type or value, naming it.
    """
    absent = [k for k in REQUIRED if k not in state]
    if absent:
        raise StateDictError(f"{where}: the EMA state lacks the keys {absent}", fix=_CORRUPT)
    if state["backend"] not in ("torch", "numpy"):
        _bad(where, label, "backend", "'torch' or 'numpy'", state["backend"])
    for key in ("step", "last_update_step", "num_updates"):
        if not _count(state[key]):
            _bad(where, label, key, "an int in [0, 2**63)", state[key])
    if state["last_update_step"] > state["step"]:
        raise StateDictError(f"{where}: {label} 'last_update_step' ({state['last_update_step']})"
                             f" is after 'step' ({state['step']})", fix=_CORRUPT)
    if type(state["every"]) is not int or not 1 <= state["every"] <= _MAX_INT:
        _bad(where, label, "every", "an int >= 1", state["every"])
    product = state["decay_product"]
    if not _number(product) or not 0.0 <= product <= 1.0:
        _bad(where, label, "decay_product", "a number in [0, 1]", product)
    if state["init"] not in ("copy", "zeros"):
        _bad(where, label, "init", "'copy' or 'zeros'", state["init"])
    if not isinstance(state["policy"], dict):
        _bad(where, label, "policy", "a dict", state["policy"])
    decay = state["decay"]
    if not isinstance(decay, dict):
        _bad(where, label, "decay", "a schedule dict", decay)
    from emakit import schedules

    kind = decay.get("kind")
    if isinstance(kind, str) and kind not in schedules.REGISTRY:
        raise StateDictError(f"{where}: {label} 'decay' is a schedule of kind "
                             f"{_short(kind, 60)}, which this process does not know",
                             fix="Import the module that defines that Schedule subclass (the "
                                 "class registers its kind) before reading the file.")
    try:
        schedules.from_dict(dict(decay))
    except Exception as exc:  # untrusted fields: any failure means "not a schedule"
        raise StateDictError(f"{where}: {label} 'decay' is not a schedule emakit knows "
                             f"({_short(str(exc), 120)})", fix=_CORRUPT) from None
    _names_to(where, label, state, "actions", lambda v: v in ("average", "copy"),
              "'average' or 'copy'")
    _names_to(where, label, state, "nonfinite_skips", _count, "an int >= 0", optional=True)
    _names_to(where, label, state, "decay_products",
              lambda v: _number(v) and 0.0 <= v <= 1.0, "a number in [0, 1]", optional=True)
    _names_to(where, label, state, "source_dtypes", _dtype_name, "a dtype name", optional=True)
    _names_to(where, label, state, "aliases", lambda v: isinstance(v, str), "a name",
              optional=True)
    extras = state.get("extras")
    if extras is not None and not (
            isinstance(extras, dict) and all(isinstance(g, str) and "::" not in g and
                                             isinstance(ts, dict) and
                                             all(isinstance(n, str) for n in ts)
                                             for g, ts in extras.items())):
        _bad(where, label, "extras", "a dict of groups mapping names to tensors (or dtypes)",
             extras)


def _check_checksums(where: str, value: object) -> None:
    if not isinstance(value, dict) or value.get("algorithm") != "crc32" or \
            not isinstance(value.get("tensors"), dict):
        _bad(where, "header key", "checksums", "{'algorithm': 'crc32', 'tensors': {...}}",
             value)
    for name, crc in value["tensors"].items():  # type: ignore[index]
        if not isinstance(crc, str) or _HEX8.fullmatch(crc) is None:
            raise StateDictError(f"{where}: header key 'checksums' must map names to 8 hex "
                                 f"digits; {_short(name)} -> {_short(crc)}", fix=_CORRUPT)
