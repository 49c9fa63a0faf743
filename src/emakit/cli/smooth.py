"""``emakit smooth``: smooth a column of a training log (CSV or JSON lines) with an EMA.

Uses :func:`emakit.smoothing.ewm` (pandas' ``ewm().mean()`` semantics). Empty cells, ``nan`` and
JSON ``null`` are missing values; JSON lines without the column (other kinds of records) are
skipped. Writes CSV ``x,<column>,<column>_smoothed`` to ``--out`` (default: standard output) and,
with ``--plot``, a PNG of the raw and smoothed curves.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from emakit.cli import CLIError

__all__ = ["add_parser", "read_column", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("smooth", help="smooth a column of a CSV / JSON-lines training log",
                       description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path, help="a .csv file or JSON lines (.jsonl / .ndjson / .json)")
    p.add_argument("--column", required=True, help="the column (key) to smooth, e.g. loss")
    p.add_argument("--x", help="the x column (default: 'step' if present, else the row number)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--half-life", type=float, help="half-life in rows (samples)")
    g.add_argument("--alpha", type=float, help="smoothing factor in (0, 1]")
    g.add_argument("--span", type=float, help="span, alpha = 2 / (span + 1)")
    g.add_argument("--com", type=float, help="centre of mass, alpha = 1 / (1 + com)")
    p.add_argument("--no-adjust", action="store_true",
                   help="the recurrence from the first value instead of the bias-corrected mean")
    p.add_argument("--ignore-na", action="store_true", help="weights by observation count")
    p.add_argument("--min-periods", type=int, default=0, help="NaN before this many values")
    p.add_argument("--out", type=Path, help="CSV to write (default: standard output)")
    p.add_argument("--plot", type=Path, help="PNG of the raw and smoothed curves")
    p.set_defaults(run=run)


def _number(value: object, where: str, column: str) -> float:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "nan", "na",
                                                                             "null", "none")):
        return math.nan
    if isinstance(value, bool):
        raise CLIError(f"{where}: {column!r} is {value!r}, not a number.")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CLIError(f"{where}: {column!r} is {value!r}, not a number.") from None


def read_column(path: Path, column: str, x: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x values, column values, x name)`` from a CSV or JSON-lines file."""
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"{str(path)!r} is not a text file ({exc}).") from exc
    if not text.strip():
        raise CLIError(f"{str(path)!r} is empty.")
    records: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json") or text.lstrip().startswith("{"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CLIError(f"{path}:{number}: not valid JSON ({exc.msg}).") from None
            if not isinstance(obj, dict):
                raise CLIError(f"{path}:{number}: expected a JSON object per line.")
            if column in obj:
                records.append((f"{path}:{number}", obj))
        if not records:
            raise CLIError(f"{str(path)!r}: no line has the key {column!r}.")
    else:
        reader = csv.DictReader(io.StringIO(text))
        names = reader.fieldnames or []
        if column not in names:
            raise CLIError(f"{str(path)!r} has no column {column!r}; its columns are "
                           f"{', '.join(names)}.")
        records = [(f"{path}:{i + 2}", row) for i, row in enumerate(reader)]
        if not records:
            raise CLIError(f"{str(path)!r} has a header but no rows.")
    xname = x or ("step" if "step" in records[0][1] else "row")
    if x is not None and not any(x in r for _, r in records):
        raise CLIError(f"{str(path)!r} has no column {x!r} for --x.")
    values = np.array([_number(r.get(column), w, column) for w, r in records])
    if xname == "row":
        xs = np.arange(len(records), dtype=np.float64)
    else:
        xs = np.array([_number(r.get(xname), w, xname) for w, r in records])
    return xs, values, xname


def run(args: argparse.Namespace) -> int:
    from emakit.smoothing import ewm

    xs, values, xname = read_column(args.file, args.column, args.x)
    smoothed = ewm(values, alpha=args.alpha, half_life=args.half_life, span=args.span,
                   com=args.com, adjust=not args.no_adjust, ignore_na=args.ignore_na,
                   min_periods=args.min_periods)
    name = args.column
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([xname, name, f"{name}_smoothed"])
    for xv, v, s in zip(xs, values, smoothed):
        writer.writerow([f"{xv:.10g}", f"{v:.10g}" if math.isfinite(v) else "",
                         f"{s:.10g}" if math.isfinite(s) else ""])
    if args.out is None:
        sys.stdout.write(buf.getvalue())
    else:
        from emakit.io import atomic_path

        with atomic_path(args.out) as tmp:
            tmp.write_text(buf.getvalue(), encoding="utf-8")
        print(f"wrote {args.out} ({len(values)} rows)", file=sys.stderr)
    if args.plot:
        _plot(xs, values, smoothed, xname, name, args)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _plot(xs: np.ndarray, values: np.ndarray, smoothed: np.ndarray, xname: str, name: str,
          args: argparse.Namespace) -> None:
    from emakit.cli.figures import pyplot, save_png

    plt = pyplot()
    how = next(f"{k.replace('_', '-')} {getattr(args, k):g}" for k in
               ("half_life", "alpha", "span", "com") if getattr(args, k) is not None)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(xs, values, lw=0.8, alpha=0.35, label=f"{name} (raw)")
    ax.plot(xs, smoothed, lw=1.8, label=f"{name}, EMA {how}")
    ax.set(xlabel=xname, ylabel=name, title=f"{args.file.name}: {name}")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, args.plot)
