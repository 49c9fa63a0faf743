"""``emakit posthoc``: choose the EMA's width after training, from a snapshot folder.

A folder written by emakit.posthoc.Snapshots during training holds power-function EMAs of a few
widths (sigma_rel), snapshotted every N steps. ``info`` lists them and the sigma_rel range they
support; ``synthesize`` writes the average of any supported sigma_rel at any snapshot step as a
plain model state dict; ``sweep`` evaluates a range of widths with your function and writes the
best, a table and a plot. Files are read tensor by tensor (memory about one model) and checked
against the manifest and their checksums first.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emakit.cli.errors import CLIError

__all__ = ["add_parser", "load_function", "parse_sigma_rels", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("posthoc", help="post-hoc EMA: synthesise any sigma_rel from snapshots",
                       description=__doc__.splitlines()[0])
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    info = actions.add_parser("info", help="the snapshots and the sigma_rel range they support")
    info.add_argument("dir", type=Path, help="the snapshot folder")
    _common(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")

    syn = actions.add_parser("synthesize", help="write the average of one sigma_rel")
    syn.add_argument("dir", type=Path, help="the snapshot folder")
    syn.add_argument("--sigma-rel", type=float, required=True, help="the width, e.g. 0.07")
    syn.add_argument("--out", type=Path, required=True,
                     help="the file to write: .safetensors (recommended), .pt or .npz")
    _common(syn)

    sw = actions.add_parser("sweep", help="evaluate several sigma_rel, write the best")
    sw.add_argument("dir", type=Path, help="the snapshot folder")
    sw.add_argument("--evaluate", required=True, metavar="FILE.py:FUNC",
                    help="your function evaluate(state_dict) -> float, as FILE.py:NAME or "
                         "module.path:NAME")
    sw.add_argument("--sigma-rels", type=parse_sigma_rels, metavar="LIST|LO:HI:N",
                    help="the widths: 0.03,0.05,0.1 or LO:HI:N (N spread in log scale); "
                         "default 12 over the supported range")
    sw.add_argument("--mode", choices=("min", "max"), default="min",
                    help="min (a loss, default) or max (an accuracy) is best")
    sw.add_argument("--out", type=Path, help="write the best average here")
    sw.add_argument("--plot", type=Path, help="write a PNG of metric against sigma_rel here")
    sw.add_argument("--json", type=Path, help="write the table as JSON here")
    _common(sw)
    p.set_defaults(run=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step", type=int,
                   help="the step the average ends at (default: the last snapshot's)")
    p.add_argument("--max-profile-error", type=float, default=None, metavar="E",
                   help="refuse widths whose synthesised profile is further than E from the "
                        "target (relative L2; default 0.02)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the checksums (faster for huge snapshots)")


def parse_sigma_rels(text: str) -> list[float]:
    """``"0.03,0.05"`` or ``"0.02:0.2:10"`` (10 widths spread in log scale).

    Example:
        >>> parse_sigma_rels("0.05, 0.1")
        [0.05, 0.1]
        >>> parse_sigma_rels("0.01:0.1:3")
        [0.01, 0.03162, 0.1]
    """
    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            a, b, count = float(lo), float(hi), int(n)
            if not (0 < a < b and count >= 2 and math.isfinite(b)):
                raise ValueError
            return [float(f"{a * (b / a) ** (k / (count - 1)):.4g}") for k in range(count)]
        values = [float(v) for v in text.split(",") if v.strip()]
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError
        return values
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of widths: give 0.03,0.05,0.1 or LO:HI:N with "
            "0 < LO < HI and N >= 2, e.g. 0.02:0.2:10") from None


def load_function(spec: str) -> Callable[..., Any]:
    """The function ``FILE.py:NAME`` or ``module.path:NAME`` names (the file is run as a module).

    Raises:
        CLIError: a malformed spec, a file or module that does not load, a missing name.
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise CLIError(f"--evaluate {spec!r}: give FILE.py:NAME or module.path:NAME, e.g. "
                       "--evaluate my_eval.py:evaluate")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise CLIError(f"--evaluate {spec!r}: no such file {where!r}.")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            if module_spec is None or module_spec.loader is None:
                raise CLIError(f"--evaluate {spec!r}: cannot load {where!r} as Python.")
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as exc:
        raise CLIError(f"--evaluate {spec!r}: cannot import {where!r} ({exc}).") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CLIError(f"--evaluate {spec!r}: {where!r} has no function {name!r}.")
    return fn  # type: ignore[no-any-return]


def _limit(args: argparse.Namespace) -> float:
    from emakit.posthoc import MAX_PROFILE_ERROR

    limit = args.max_profile_error
    if limit is None:
        return MAX_PROFILE_ERROR
    if not limit > 0:
        raise CLIError(f"--max-profile-error must be > 0, got {limit}.")
    return float(limit)


def run(args: argparse.Namespace) -> int:
    from emakit.posthoc import open_record

    limit = _limit(args)
    if args.action == "synthesize":
        _check_out(args.out)
    record = open_record(args.dir, verify=not args.no_verify)
    if args.action == "info":
        return _info(record, args, limit)
    if args.action == "synthesize":
        return _synthesize(record, args, limit)
    return _sweep(record, args, limit)


def _check_out(out: Path) -> None:
    """Refuse an output the write would refuse, before the snapshots are read."""
    from emakit.io.weights import SUFFIXES

    if out.is_dir():
        raise CLIError(f"--out {str(out)!r} is a folder; give a file name.")
    if out.suffix.lower() not in SUFFIXES:
        raise CLIError(f"--out {str(out)!r}: cannot tell the file format from its suffix; use "
                       f"one of {', '.join(SUFFIXES)}.")
    if not out.parent.is_dir():
        raise CLIError(f"--out {str(out)!r}: its folder does not exist.")


def _info(record: Any, args: argparse.Namespace, limit: float) -> int:
    from emakit.posthoc import supported_ranges
    from emakit.posthoc.least_squares import describe_ranges

    steps = record.steps
    step = steps[-1] if args.step is None else args.step
    if not steps[0] <= step <= steps[-1]:
        raise CLIError(f"--step {step} is outside the snapshots' steps {steps[0]}..{steps[-1]}.")
    used = [e for e in record.entries if e.step <= step]
    ranges = supported_ranges([e.step for e in used], [e.gamma for e in used], step,
                              max_profile_error=limit)
    m = record.manifest
    size = sum(e.bytes for e in record.entries)
    info = {"dir": str(record.dir), "run": m.run, "snapshots": len(record.entries),
            "steps": [steps[0], steps[-1]], "snapshot_every": m.snapshot_every,
            "every": m.every, "sigma_rels": list(m.sigma_rels), "bytes": size,
            "tensors": len(record.layout.actions), "backend": record.layout.backend,
            "step": step, "supported_sigma_rels": [list(r) for r in ranges],
            "max_profile_error": limit}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{record.dir}: {len(record.entries)} snapshots ({size / 1e6:.1f} MB) of "
          f"{len(record.layout.actions)} tensors ({record.layout.backend}), steps {steps[0]}.."
          f"{steps[-1]} every {m.snapshot_every}, sigma_rels "
          f"{', '.join(f'{s:g}' for s in m.sigma_rels)}")
    print(f"at step {step}: supported sigma_rel {describe_ranges(ranges)} (profile error <= "
          f"{limit:g})")
    return 0


def _synthesize(record: Any, args: argparse.Namespace, limit: float) -> int:
    from emakit.io import write_weights
    from emakit.posthoc import synthesize
    from emakit.posthoc.synthesis import select

    chosen = select(record, [args.sigma_rel], args.step, max_profile_error=limit)
    step, used, error = chosen.step, chosen.entries, float(chosen.solution.profile_errors[0])
    state = synthesize(record, args.sigma_rel, step=step, verify=not args.no_verify,
                       max_profile_error=limit)
    write_weights(state, args.out, metadata={
        "emakit.posthoc.sigma_rel": repr(args.sigma_rel), "emakit.posthoc.step": str(step),
        "emakit.posthoc.profile_error": f"{error:.3g}", "emakit.posthoc.run": record.manifest.run})
    print(f"wrote {args.out}: the average of sigma_rel {args.sigma_rel:g} at step {step}, from "
          f"{len(used)} snapshots (profile error {error:.2g}), {len(state)} tensors")
    return 0


def _sweep(record: Any, args: argparse.Namespace, limit: float) -> int:
    from emakit.posthoc import sweep

    evaluate = load_function(args.evaluate)
    if args.json is not None and not args.json.parent.is_dir():
        raise CLIError(f"--json {str(args.json)!r}: its folder does not exist.")
    result = sweep(record, args.sigma_rels, evaluate, step=args.step, mode=args.mode,
                   out=args.out, plot=args.plot, verify=not args.no_verify,
                   max_profile_error=limit)
    print(result.table())
    print(f"\nbest: sigma_rel {result.best_sigma_rel:.4g} (metric {result.best_metric:.6g})")
    written = [str(p) for p in (args.out, args.plot, args.json) if p is not None]
    if args.json is not None:
        from emakit.io import atomic_write

        with atomic_write(args.json) as f:
            f.write((json.dumps(result.to_dict(), indent=2) + "\n").encode())
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stdout)
    return 0
