"""The snapshot folder's manifest: which snapshot files make up a post-hoc EMA record.

``DIR/manifest.json`` lists every snapshot (its step, ``sigma_rel`` and ``gamma``, file name,
size in bytes and the CRC-32 of the file's emakit header, which itself holds the CRC-32 of every
tensor), and the recording's settings. It is written atomically after the snapshot files, so a
crash leaves either the old list or the new one, never a list naming a half-written file; files
it does not list are ignored. The ``run`` id binds the files to the recording that wrote them.

The manifest is read as untrusted input: bounded in size (:data:`MAX_BYTES`), every key
type-checked, file names confined to the folder; errors are :class:`~emakit.StateDictError`
naming the file and the key.

Example:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> m = Manifest(run="0" * 32, sigma_rels=(0.05, 0.1), gammas=(16.97, 6.94),
    ...              snapshot_every=1000, every=1, entries=())
    >>> write_manifest(folder, m)
    >>> read_manifest(folder) == m
    True
    >>> file_name(2000, 1)
    's0000002000-ema1.safetensors'
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from emakit.errors import StateDictError

__all__ = ["FORMAT_VERSION", "KIND", "MANIFEST", "MAX_BYTES", "Entry", "Manifest", "file_name",
           "read_manifest", "write_manifest"]

MANIFEST = "manifest.json"
KIND = "emakit-posthoc-snapshots"
FORMAT_VERSION = 1
MAX_BYTES = 64 * 2**20
"""The largest manifest read (about 300 000 snapshots)."""
_MAX_INT = 2**63 - 1
_FILE = re.compile(r"s\d{10,19}-ema\d{1,4}\.safetensors")
_RUN = re.compile(r"[0-9a-f]{32}")
_CORRUPT = "The manifest is corrupt or was edited; restore it from a copy."


class Entry(NamedTuple):
    """One snapshot file: the average of one ``sigma_rel`` after the update at ``step``."""

    step: int
    sigma_rel: float
    gamma: float
    file: str
    bytes: int
    header_crc32: str


class Manifest(NamedTuple):
    """The manifest: the recording's settings and its snapshots, in the order written."""

    run: str
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    snapshot_every: int
    every: int
    entries: tuple[Entry, ...]


def file_name(step: int, index: int) -> str:
    """The file of the snapshot of average ``index`` at ``step``."""
    return f"s{step:010d}-ema{index}.safetensors"


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write ``folder/manifest.json`` atomically (a crash keeps the previous one)."""
    from emakit.io.atomic import atomic_write
    from emakit.version import __version__

    data = {"kind": KIND, "format_version": FORMAT_VERSION, "emakit_version": __version__,
            "run": manifest.run, "sigma_rels": list(manifest.sigma_rels),
            "gammas": list(manifest.gammas), "snapshot_every": manifest.snapshot_every,
            "every": manifest.every, "snapshots": [e._asdict() for e in manifest.entries]}
    with atomic_write(Path(folder) / MANIFEST) as f:
        f.write((json.dumps(data, indent=1) + "\n").encode("utf-8"))


def _bad(where: str, key: str, what: str, value: object) -> StateDictError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:60] + "..."
    return StateDictError(f"{where}: key {key!r} must be {what}, got {shown}", fix=_CORRUPT)


def _int(where: str, key: str, value: object, low: int) -> int:
    if type(value) is not int or not low <= value <= _MAX_INT:
        raise _bad(where, key, f"an int >= {low}", value)
    return value


def _real(where: str, key: str, value: object, low: float, high: float) -> float:
    if type(value) not in (int, float) or not (math.isfinite(value) and  # type: ignore[arg-type]
                                                  low < value < high):  # type: ignore[operator]
        raise _bad(where, key, f"a number in ({low:g}, {high:g})", value)
    return float(value)  # type: ignore[arg-type]


def _entry(where: str, i: int, item: object, gammas: tuple[float, ...]) -> Entry:
    key = f"snapshots[{i}]"
    if not isinstance(item, dict) or set(item) != set(Entry._fields):
        raise _bad(where, key, f"an object with the keys {list(Entry._fields)}", item)
    step = _int(where, f"{key}.step", item["step"], 1)
    sigma = _real(where, f"{key}.sigma_rel", item["sigma_rel"], 0.0, 1.0)
    gamma = item["gamma"]
    if type(gamma) is not float or gamma not in gammas:
        raise _bad(where, f"{key}.gamma", f"one of the recording's gammas {list(gammas)}", gamma)
    name = item["file"]
    if not isinstance(name, str) or not _FILE.fullmatch(name):
        raise _bad(where, f"{key}.file", "a snapshot file name in the folder "
                   "(like 's0000001000-ema0.safetensors')", name)
    size = _int(where, f"{key}.bytes", item["bytes"], 8)
    crc = item["header_crc32"]
    if not isinstance(crc, str) or not re.fullmatch(r"[0-9a-f]{8}", crc):
        raise _bad(where, f"{key}.header_crc32", "8 hex digits", crc)
    return Entry(step, sigma, gamma, name, size, crc)


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and check ``folder/manifest.json``.

    Raises:
        FileNotFoundError: no manifest in ``folder`` (not a snapshot folder).
        StateDictError: not a manifest, a newer version, too large, or a malformed key (named).
    """
    path = Path(folder) / MANIFEST
    where = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"no post-hoc EMA manifest {where}: is {str(folder)!r} a folder "
                                "that emakit.posthoc.Snapshots wrote?")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise StateDictError(f"{where} is {size} bytes, more than the {MAX_BYTES} a manifest "
                             "may have", fix=_CORRUPT)
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        raise StateDictError(f"{where} is nested too deeply", fix=_CORRUPT) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge ints
        raise StateDictError(f"{where} is not valid JSON ({str(exc)[:120]})",
                             fix=_CORRUPT) from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise StateDictError(f"{where} is not a post-hoc EMA manifest (kind {KIND!r})",
                             fix="Give the folder emakit.posthoc.Snapshots wrote.")
    version = data.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        newer = type(version) is int and version > FORMAT_VERSION
        raise StateDictError(f"{where}: unknown format_version {version!r}; this emakit reads "
                             f"{FORMAT_VERSION}",
                             fix="Upgrade emakit to read it." if newer else _CORRUPT)
    return _checked(where, data)


def _checked(where: str, data: dict[str, Any]) -> Manifest:
    for key in ("run", "sigma_rels", "gammas", "snapshot_every", "every", "snapshots"):
        if key not in data:
            raise StateDictError(f"{where} lacks the key {key!r}", fix=_CORRUPT)
    run = data["run"]
    if not isinstance(run, str) or not _RUN.fullmatch(run):
        raise _bad(where, "run", "32 hex digits", run)
    sigmas, gammas = data["sigma_rels"], data["gammas"]
    if not isinstance(sigmas, list) or not isinstance(gammas, list) or \
            not 1 <= len(sigmas) == len(gammas) <= 64:
        raise _bad(where, "sigma_rels", "a list as long as 'gammas' (1 to 64)", sigmas)
    sig = tuple(_real(where, f"sigma_rels[{i}]", s, 0.0, 1.0) for i, s in enumerate(sigmas))
    gam = tuple(_real(where, f"gammas[{i}]", g, -1e-300, math.inf) for i, g in enumerate(gammas))
    if any(type(g) is not float for g in gammas):
        raise _bad(where, "gammas", "a list of floats", gammas)
    every = _int(where, "every", data["every"], 1)
    snapshot_every = _int(where, "snapshot_every", data["snapshot_every"], 1)
    items = data["snapshots"]
    if not isinstance(items, list):
        raise _bad(where, "snapshots", "a list", items)
    entries = tuple(_entry(where, i, item, gam) for i, item in enumerate(items))
    seen: set[tuple[int, float]] = set()
    for e in entries:
        if (e.step, e.gamma) in seen:
            raise StateDictError(f"{where} lists the snapshot at step {e.step} of gamma "
                                 f"{e.gamma} twice", fix=_CORRUPT)
        seen.add((e.step, e.gamma))
    return Manifest(run, sig, gam, snapshot_every, every, entries)
