"""``emakit inspect``: what an EMA checkpoint holds -- layout, step, decay, dtypes, sizes.

Works on emakit checkpoints and on those of the libraries :mod:`emakit.io.layouts` reads.
``--json`` prints one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "describe", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show what an EMA checkpoint holds",
                       description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path, help="an emakit or other library's checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--names", type=Path,
                   help="parameter names, one per line (diffusers / torch-ema lists)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the checksums of an emakit file (faster for huge files)")
    p.set_defaults(run=run)


def describe(path: Path, names: Any = None, *, verify: bool = True) -> dict[str, Any]:
    """The facts ``emakit inspect`` prints, as a JSON-ready dict."""
    import math

    from emakit import schedules
    from emakit.backends import backend_for
    from emakit.io.export import tensor_bytes
    from emakit.io.layouts import read_checkpoint

    found = read_checkpoint(path, names=names, verify=verify)
    weights = found.weights
    infos = [backend_for(t).info(t) for t in weights.values()]  # type: ignore[union-attr]
    info: dict[str, Any] = {
        "file": found.path,
        "file_bytes": Path(found.path).stat().st_size,
        "layout": found.layout,
        "where": found.where,
        "step": found.step,
        "num_updates": found.num_updates,
        "decay": found.decay,
        "decay_repr": None,
        "half_life": None,
        "scope": found.scope,
        "tensors": len(weights),
        "elements": sum(math.prod(i.shape) for i in infos),
        "tensor_bytes": sum(tensor_bytes(t) for t in weights.values()),
        "dtypes": dict(Counter(i.dtype for i in infos)),
        "model_dtypes": dict(Counter(found.model_dtypes.values())) if found.model_dtypes
        else None,
        "empty": found.empty,
        "notes": list(found.notes),
    }
    if found.decay is not None:
        schedule = schedules.from_dict(dict(found.decay))
        info["decay_repr"] = repr(schedule)
        if isinstance(schedule, schedules.Constant) and 0.0 < schedule.decay < 1.0:
            info["half_life"] = schedules.decay_to_half_life(schedule.decay)
    if found.state is not None:
        state = found.state
        info["every"] = state.get("every")
        info["init"] = state.get("init")
        actions = Counter((state.get("actions") or {}).values())
        info["averaged"] = actions.get("average", 0)
        info["copied"] = actions.get("copy", 0)
        info["format_version"] = state.get("format_version")
    return info


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _table(info: dict[str, Any]) -> str:
    def counts(c: dict[str, int] | None) -> str:
        return ", ".join(f"{k} ({v})" for k, v in c.items()) if c else "not recorded"

    decay = info["decay_repr"] or "not recorded"
    if info["half_life"] is not None:
        decay += f"  (half-life {info['half_life']:.1f} steps)"
    rows = [
        ("file", f"{info['file']}  ({_size(info['file_bytes'])})"),
        ("layout", info["layout"] + (f"  at {info['where']}" if info["where"] else "")),
        ("step", "not recorded" if info["step"] is None else f"{info['step']:,}"),
        ("updates", "not recorded" if info["num_updates"] is None
         else f"{info['num_updates']:,}"),
        ("decay", decay),
        ("shadow dtypes", counts(info["dtypes"])),
        ("model dtypes", counts(info["model_dtypes"])),
        ("tensors", f"{info['tensors']:,}" + ("" if info["scope"] == "state"
                                              else "  (parameters only)")),
        ("elements", f"{info['elements']:,}"),
        ("bytes", _size(info["tensor_bytes"])),
    ]
    if "every" in info:
        rows.insert(5, ("every / init", f"{info['every']} / {info['init']}"))
        rows.insert(6, ("averaged / copied", f"{info['averaged']} / {info['copied']}"))
    for note in info["notes"]:
        rows.append(("note", note))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from emakit.io.export import read_names

    info = describe(args.file, None if args.names is None else read_names(args.names),
                    verify=not args.no_verify)
    print(json.dumps(info, indent=2) if args.json else _table(info))
    return 0
