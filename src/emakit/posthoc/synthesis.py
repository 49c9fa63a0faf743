"""Streaming synthesis: the average of any ``sigma_rel`` from a snapshot folder.

:func:`synthesize` reads the snapshots a :class:`~emakit.posthoc.Snapshots` recording wrote,
solves for the mix (:func:`emakit.posthoc.coefficients`) and builds the average

    theta(sigma_rel, T) = sum_i c_i * snapshot_i        (over the snapshots at or before T)

tensor by tensor and, within a tensor, in chunks of rows of at most :data:`CHUNK_ELEMENTS`
values: each chunk is read from every snapshot file in turn (``safetensors.safe_open``, the file
opened for that chunk and closed after it, so no file stays mapped) and accumulated in
**float64**. Peak memory is the result (one model, in the model's dtypes) plus a few chunks,
whatever the number of snapshots. float64 rather than fp32: the coefficients have mixed signs
and can sum to several times 1 in absolute value, so fp32 accumulation would add rounding of
the order of ``sum|c_i| * 6e-8`` to the method's own error; a float64 chunk costs 8 MiB.

Everything is checked before any weight is read: the manifest, and for every snapshot file its
size and header CRC-32 against the manifest, its emakit header (run id, ``gamma``, step, names,
dtypes, shapes) against the others; while reading, the CRC-32 of every tensor against its header
(``verify=True``). A damaged or foreign file is a :class:`~emakit.StateDictError` naming the file
and the key; work is bounded by the files' sizes.

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> import emakit
    >>> from emakit.posthoc import Snapshots, synthesize
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> w = {"w": np.zeros(3)}
    >>> rec = Snapshots(w, folder, snapshot_every=100)            # sigma_rel 0.05 and 0.10
    >>> direct = emakit.EMA(w, decay=emakit.schedules.PowerFunction(sigma_rel=0.07))
    >>> rng = np.random.default_rng(0)
    >>> for step in range(1, 2001):
    ...     w["w"] += 0.01 + rng.normal(size=3)                    # drift and noise
    ...     _ = rec.update(), direct.update()
    >>> sd = synthesize(folder, sigma_rel=0.07)                    # at step 2000, the last
    >>> err = np.linalg.norm(sd["w"] - direct.averaged()["w"]) / np.linalg.norm(sd["w"])
    >>> sd["w"].dtype, bool(err < 1e-3)
    (dtype('float64'), True)
"""

from __future__ import annotations

import importlib.util
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from emakit.errors import StateDictError
from emakit.posthoc.least_squares import MAX_PROFILE_ERROR, Solution, checked
from emakit.posthoc.manifest import Entry, Manifest, read_manifest
from emakit.posthoc.profiles import gammas_of

__all__ = ["CHUNK_ELEMENTS", "Layout", "Record", "Selection", "open_record", "select", "synthesize"]

CHUNK_ELEMENTS = 2**20
"""The most values of a tensor read from one snapshot at a time (4 MiB of fp32)."""
_AVERAGED = ("float32", "float64")


class Layout(NamedTuple):
    """The tensors every snapshot of a recording holds."""

    backend: str
    actions: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    shadow_dtypes: dict[str, str]
    source_dtypes: dict[str, str]
    aliases: dict[str, str]


class Record(NamedTuple):
    """A checked snapshot folder (:func:`open_record`)."""

    dir: Path
    manifest: Manifest
    entries: tuple[Entry, ...]  # by step, then by the order of the manifest's gammas
    layout: Layout

    @property
    def steps(self) -> list[int]:
        """The distinct snapshot steps, increasing."""
        return sorted({e.step for e in self.entries})


def _where(path: Path) -> str:
    return repr(str(path))


def _file_info(folder: Path, entry: Entry, manifest: Manifest, *, verify: bool
               ) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """One snapshot file's checked header and tensor shapes."""
    import safetensors

    from emakit.io.checkpoint import HEADER_CRC_KEY, parse_header

    path = folder / entry.file
    where = _where(path)
    if not path.is_file():
        raise StateDictError(f"{where}: the snapshot listed in the manifest is missing",
                             fix="Restore the file, or the folder from a copy.")
    size = path.stat().st_size
    if size != entry.bytes:
        raise StateDictError(f"{where} is {size} bytes, the manifest says {entry.bytes}",
                             fix="The file was replaced or truncated; restore it from a copy.")
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            shapes = {n: tuple(int(d) for d in f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise StateDictError(f"{where} is not a readable .safetensors file ({exc})",
                             fix="Restore the file from a copy.") from None
    if verify and meta.get(HEADER_CRC_KEY) != entry.header_crc32:
        raise StateDictError(f"{where}: its header checksum {meta.get(HEADER_CRC_KEY)!r} is not "
                             f"the manifest's {entry.header_crc32!r}",
                             fix="The file is not the snapshot the manifest lists; restore it.")
    header = parse_header(path, meta, verify=verify)
    problems = []
    if header.get("user", {}).get("posthoc.run") != manifest.run:
        problems.append(f"run {header.get('user', {}).get('posthoc.run')!r}, not "
                        f"{manifest.run!r}")
    decay = header["decay"]
    if decay.get("kind") != "PowerFunction" or decay.get("gamma") != entry.gamma:
        problems.append(f"decay {decay!r}, not PowerFunction gamma {entry.gamma!r}")
    if header["last_update_step"] != entry.step or header["num_updates"] < 1:
        problems.append(f"last update at step {header['last_update_step']!r} "
                        f"({header['num_updates']!r} updates), not step {entry.step}")
    if header["init"] != "copy":
        problems.append(f"init {header['init']!r}: snapshots start from the weights")
    if set(shapes) != set(header["actions"]):
        problems.append("tensors that differ from the header's names")
    if problems:
        raise StateDictError(f"{where} does not match its manifest entry: "
                             + "; ".join(problems), fix="Restore the folder from a copy.")
    return header, shapes


def _layout(header: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Layout:
    return Layout(header["backend"], dict(header["actions"]), shapes,
                  dict(header["shadow_dtypes"]), dict(header.get("source_dtypes") or {}),
                  dict(header.get("aliases") or {}))


def open_record(dir: str | os.PathLike[str], *, verify: bool = True) -> Record:
    """Read and check a snapshot folder: its manifest and every snapshot file's header.

    Args:
        dir: the folder :class:`~emakit.posthoc.Snapshots` wrote.
        verify: compare each file's header CRC-32 with the manifest (and the header's own).

    Returns:
        A :class:`Record`.

    Raises:
        FileNotFoundError: no manifest in ``dir``.
        StateDictError: a malformed manifest, a missing, damaged or foreign snapshot file, or
            snapshots that disagree (names, shapes, dtypes), naming the file and the key.
    """
    folder = Path(dir)
    manifest = read_manifest(folder)
    if not manifest.entries:
        raise StateDictError(f"{_where(folder)} holds no snapshot yet",
                             fix="Train past the first snapshot step (or call "
                                 "Snapshots.snapshot()).")
    order = {g: k for k, g in enumerate(manifest.gammas)}
    entries = tuple(sorted(manifest.entries, key=lambda e: (e.step, order[e.gamma])))
    first: Layout | None = None
    for entry in entries:
        header, shapes = _file_info(folder, entry, manifest, verify=verify)
        layout = _layout(header, shapes)
        if first is None:
            first = layout
            bad = [n for n, a in layout.actions.items()
                   if a == "average" and layout.shadow_dtypes.get(n) not in _AVERAGED]
            if bad:
                raise StateDictError(
                    f"{_where(folder / entry.file)}: averaged tensors {bad[:5]} are stored as "
                    f"{sorted({str(layout.shadow_dtypes.get(n)) for n in bad})}, not "
                    "float32/float64",
                    fix="Record with dtype=None (float32 shadows for 16-bit models).")
        elif layout != first:
            differ = [f for f in Layout._fields if getattr(layout, f) != getattr(first, f)]
            raise StateDictError(
                f"{_where(folder / entry.file)} differs from {_where(folder / entries[0].file)} "
                f"in {differ}", fix="Every snapshot of a recording holds the same tensors.")
    assert first is not None  # entries is not empty
    return Record(folder, manifest, entries, first)


def _step(record: Record, step: int | None) -> int:
    last = max(e.step for e in record.entries)
    if step is None:
        return last
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int (an optimizer step), got {step!r}.")
    steps = record.steps
    if not steps[0] <= step <= last:
        raise ValueError(f"step={step} is outside the snapshots' steps {steps[0]}..{last} in "
                         f"{_where(record.dir)}: a synthesised average uses the snapshots at "
                         "or before its step, and none holds weights after the last.")
    if step not in steps:
        before = max(s for s in steps if s < step)
        after = min(s for s in steps if s > step)
        raise ValueError(
            f"step={step} is not a snapshot step in {_where(record.dir)} (the nearest are "
            f"{before} and {after}): the weights between {before} and {step} are in no "
            "snapshot that ends by then, so no average ending there can be synthesised. "
            "Choose a snapshot step.")
    return step


class Selection(NamedTuple):
    """The snapshots a synthesis at ``step`` uses (those at or before it) and the solve."""

    step: int
    entries: list[Entry]
    solution: Solution


def select(record: Record, sigma_rels: Sequence[float], step: int | None = None, *,
           max_profile_error: float = MAX_PROFILE_ERROR) -> Selection:
    """The snapshots used for ``step`` and their coefficients for each target.

    Raises:
        ValueError: ``step`` outside the snapshots, or a target they do not support.
    """
    out = _step(record, step)
    used = [e for e in record.entries if e.step <= out]
    found = checked([e.step for e in used], [e.gamma for e in used], out, gammas_of(sigma_rels),
                    max_profile_error=max_profile_error)
    return Selection(out, used, found)


def _framework(record: Record, framework: str | None) -> str:
    if framework is None:
        torch_ok = importlib.util.find_spec("torch") is not None
        return "torch" if record.layout.backend == "torch" and torch_ok else "numpy"
    if framework not in ("torch", "numpy"):
        raise ValueError(f"framework must be 'torch' or 'numpy', got {framework!r}.")
    return framework


def _allocate(framework: str, shape: tuple[int, ...], dtype: str, name: str) -> Any:
    if framework == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype))
    if not hasattr(np, dtype):
        raise ValueError(f"tensor {name!r} has the model dtype {dtype}, which numpy lacks: use "
                         "framework='torch'.")
    return np.empty(shape, dtype=np.dtype(dtype))


def _put(out: Any, rows: Any, values: np.ndarray, framework: str) -> None:
    if framework == "torch":
        import torch

        out[rows] = torch.from_numpy(values)  # one rounding from float64 to the model dtype
    else:
        out[rows] = values


class _Reader:
    """Chunks of one tensor from each snapshot, with each file's running CRC-32."""

    def __init__(self, record: Record, entries: list[Entry], name: str) -> None:
        self.paths = [record.dir / e.file for e in entries]
        self.name = name
        self.crcs = [0] * len(entries)

    def read(self, i: int, rows: slice | None) -> np.ndarray:
        """The tensor (``rows=None``) or rows of it, from snapshot ``i``."""
        import safetensors

        with safetensors.safe_open(str(self.paths[i]), framework="np") as f:
            x: np.ndarray = (f.get_tensor(self.name) if rows is None
                             else f.get_slice(self.name)[rows])
        if not x.flags.c_contiguous:  # (np.ascontiguousarray would make a 0-d array 1-d)
            x = x.copy(order="C")
        self.crcs[i] = zlib.crc32(x.reshape(-1).view(np.uint8).data, self.crcs[i])
        return x

    def check(self, sums: list[dict[str, str]], indices: Sequence[int]) -> None:
        """Compare the CRC-32 of what snapshots ``indices`` gave with their headers'."""
        for i in indices:
            crc = f"{self.crcs[i] & 0xFFFFFFFF:08x}"
            if sums[i].get(self.name) != crc:
                raise StateDictError(
                    f"{_where(self.paths[i])}: tensor {self.name!r} does not match its checksum "
                    f"(crc32 stored {sums[i].get(self.name)!r}, computed {crc})",
                    fix="The file is damaged: restore it from a copy (verify=False reads it "
                        "anyway).")


def _checksums(record: Record, entries: list[Entry]) -> list[dict[str, str]]:
    from emakit.io.checkpoint import read_header

    return [dict(read_header(record.dir / e.file, verify=False).get("checksums", {})
                 .get("tensors", {})) for e in entries]


def synthesize(dir: str | os.PathLike[str] | Record, sigma_rel: float, *,
               step: int | None = None, framework: str | None = None, verify: bool = True,
               max_profile_error: float = MAX_PROFILE_ERROR) -> dict[str, Any]:
    """The power-function EMA of width ``sigma_rel`` at ``step``, made from the snapshots.

    Args:
        dir: the snapshot folder (or a :class:`Record` from :func:`open_record`).
        sigma_rel: the width of the average wanted, in the range the snapshots support at
            ``step`` (see :func:`emakit.posthoc.coefficients`).
        step: the step the average ends at: a snapshot step (default: the last); the
            snapshots at or before it are used.
        framework: ``"torch"`` or ``"numpy"`` tensors (default: torch for a torch model, where
            torch is installed).
        verify: check the files' header CRC-32 against the manifest and every tensor's CRC-32
            as it is read.
        max_profile_error: the support limit (see :func:`emakit.posthoc.coefficients`).

    Returns:
        A plain state dict ``name -> tensor`` in the model's dtypes (tied weights under each of
        their names; integer buffers from the latest snapshot used), for
        ``model.load_state_dict`` (``strict=False`` if the recording's policy skipped some).

    Raises:
        FileNotFoundError: no manifest in ``dir``.
        StateDictError: a damaged, missing or foreign snapshot (naming the file and key).
        ValueError: ``step`` outside the snapshots, an unsupported ``sigma_rel``, or a model
            dtype the framework lacks.
    """
    record = dir if isinstance(dir, Record) else open_record(dir, verify=verify)
    kind = _framework(record, framework)
    chosen = select(record, [sigma_rel], step, max_profile_error=max_profile_error)
    used, weights = chosen.entries, chosen.solution.coefficients[:, 0]
    sums = _checksums(record, used) if verify else []
    layout = record.layout
    latest = max(range(len(used)), key=lambda i: used[i].step)
    result: dict[str, Any] = {}
    for name, action in layout.actions.items():
        shape = layout.shapes[name]
        dtype = layout.source_dtypes.get(name, layout.shadow_dtypes[name])
        reader = _Reader(record, used, name)
        if action != "average":  # integer buffers: copied, from the latest snapshot
            out = _allocate(kind, shape, layout.shadow_dtypes[name], name)
            _put(out, ..., reader.read(latest, None), kind)
            if verify:
                reader.check(sums, [latest])
            result[name] = out
            continue
        out = _allocate(kind, shape, dtype, name)
        if not shape:  # a 0-d tensor: one value
            total = np.zeros((), dtype=np.float64)
            for i, w in enumerate(weights):
                total += w * reader.read(i, None).astype(np.float64)
            _put(out, ..., total, kind)
        else:
            per_row = max(1, math.prod(shape[1:]))
            step_rows = max(1, CHUNK_ELEMENTS // per_row)
            for a in range(0, shape[0], step_rows):
                rows = slice(a, min(a + step_rows, shape[0]))
                acc = np.zeros((rows.stop - a, *shape[1:]), dtype=np.float64)
                tmp = np.empty_like(acc)
                for i, w in enumerate(weights):
                    np.multiply(reader.read(i, rows), w, out=tmp)
                    acc += tmp
                _put(out, rows, acc, kind)
        if verify:
            reader.check(sums, range(len(used)))
        result[name] = out
    for alias, target in layout.aliases.items():
        result[alias] = result[target]
    return result

