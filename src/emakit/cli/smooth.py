"""``emakit smooth``: smooth a column of a training log (CSV or JSON lines) with an EMA.

Uses :func:`emakit.smoothing.ewm` (pandas' ``ewm().mean()`` semantics). Missing values: empty
cells, ``nan``, ``na``, ``null`` and ``none`` (any case), JSON ``null``, and ``inf`` / ``-inf``
(as in pandas, whose ``ewm`` treats infinities as missing; numbers too large for a float, such as
``1e999``, read as infinite). A missing value keeps the last average. JSON lines without the
column (other kinds of records) are skipped. The file is read as a stream, keeping only the two
columns used. Writes CSV ``x,<column>,<column>_smoothed`` to ``--out`` (default: standard output;
never the input file) and, with ``--plot``, a PNG of the raw and smoothed curves.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import stat
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from emakit.cli.errors import CLIError

__all__ = ["MISSING", "add_parser", "read_column", "run"]

MISSING = ("", "nan", "na", "null", "none")  # read as NaN (any case, surrounding spaces ignored)
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_ROWS_PER_WRITE = 65_536


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
    p.add_argument("--out", type=Path,
                   help="CSV to write (default: standard output); not the input file")
    p.add_argument("--plot", type=Path, help="PNG of the raw and smoothed curves")
    p.set_defaults(run=run)


def _number(value: object, where: str, column: str) -> float:
    """A cell or JSON value as a float; the missing-value spellings (:data:`MISSING`) as NaN."""
    if value is None or (isinstance(value, str) and value.strip().lower() in MISSING):
        return math.nan
    if isinstance(value, bool):
        raise CLIError(f"{where}: {column!r} is {value!r}, not a number.")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):  # OverflowError: a huge JSON integer
        raise CLIError(f"{where}: {column!r} is {value!r}, not a number.") from None


def _csv_columns(path: Path, f: IO[str], column: str, x: str | None
                 ) -> tuple[array[float], array[float] | None, str]:
    reader = csv.reader(f)
    names = next(reader, None)
    if names is None:
        raise CLIError(f"{str(path)!r} is empty.")
    if column not in names:
        raise CLIError(f"{str(path)!r} has no column {column!r}; its columns are "
                       f"{', '.join(names)}.")
    if x is not None and x not in names:
        raise CLIError(f"{str(path)!r} has no column {x!r} for --x.")
    xname = x or ("step" if "step" in names else "row")
    vi = names.index(column)
    xi = names.index(xname) if xname != "row" else None
    values: array[float] = array("d")
    xs: array[float] | None = None if xi is None else array("d")
    width = len(names)
    for row in reader:
        if not row:  # a blank line (csv.DictReader skips them too)
            continue
        if len(row) < width:  # a short row (csv.DictReader semantics: the rest is missing)
            row = row + [""] * (width - len(row))
        cell = row[vi]
        try:
            values.append(float(cell))
        except ValueError:
            values.append(_number(cell, f"{path}:{reader.line_num}", column))
        if xs is not None:
            cell = row[xi]  # type: ignore[index]
            try:
                xs.append(float(cell))
            except ValueError:
                xs.append(_number(cell, f"{path}:{reader.line_num}", xname))
    if not values:
        raise CLIError(f"{str(path)!r} has a header but no rows.")
    return values, xs, xname


def _json_columns(path: Path, f: IO[str], column: str, x: str | None
                  ) -> tuple[array[float], array[float] | None, str]:
    values: array[float] = array("d")
    xs: array[float] = array("d")
    xname = x
    has_x = False
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{where}: not valid JSON ({exc.msg}).") from None
        except RecursionError:
            raise CLIError(f"{where}: JSON nested too deeply to read.") from None
        if not isinstance(obj, dict):
            raise CLIError(f"{where}: expected a JSON object per line.")
        if column not in obj:
            continue
        if xname is None:  # decided by the first record with the column, as before
            xname = "step" if "step" in obj else "row"
        values.append(_number(obj[column], where, column))
        if xname != "row":
            has_x = has_x or xname in obj
            xs.append(_number(obj.get(xname), where, xname))
    if not values:
        raise CLIError(f"{str(path)!r}: no line has the key {column!r}.")
    if x is not None and not has_x:
        raise CLIError(f"{str(path)!r} has no column {x!r} for --x.")
    xname = cast(str, xname)  # set with the first value
    return values, None if xname == "row" else xs, xname


def read_column(path: Path, column: str, x: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x values, column values, x name)`` from a CSV or JSON-lines file, read as a stream.

    Only the two columns used are kept (8 bytes per row each). Missing values (see the module
    docstring) read as NaN; the x column defaults to ``step`` when there is one, else the row
    number (x name ``"row"``).

    Raises:
        CLIError: the file is empty, not text, lacks the column, or holds a value that is not a
            number; the message names the file and line.
        FileNotFoundError: there is no such file.
    """
    if path.is_dir():
        raise CLIError(f"{str(path)!r} is a folder; give the log file (CSV or JSONL) itself.")
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r}: no such file.")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            head = f.read(65536)
            if not head.strip() and len(head) < 65536:
                raise CLIError(f"{str(path)!r} is empty.")
            f.seek(0)
            if path.suffix.lower() in _JSON_SUFFIXES or head.lstrip().startswith("{"):
                values, xs, xname = _json_columns(path, f, column, x)
            else:
                values, xs, xname = _csv_columns(path, f, column, x)
    except UnicodeDecodeError as exc:
        raise CLIError(f"{str(path)!r} is not a text file ({exc}).") from exc
    except csv.Error as exc:
        raise CLIError(f"{str(path)!r} is not a readable CSV file ({exc}).") from exc
    ys = np.frombuffer(values, dtype=np.float64)
    xv = (np.arange(len(ys), dtype=np.float64) if xs is None
          else np.frombuffer(xs, dtype=np.float64))
    return xv, ys, xname


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _lines(xs: np.ndarray, values: np.ndarray, smoothed: np.ndarray) -> Iterator[str]:
    """The CSV body in blocks of rows: NaN as an empty cell, ``inf`` / ``-inf`` as they are, x
    as a whole number when it is one (every digit of a step), else as Python writes it (the
    shortest text that reads back as the same float: a wall-clock x keeps its fraction, and
    two rows never share an x they did not share in the log); the values to 10 digits."""
    for start in range(0, len(values), _ROWS_PER_WRITE):
        x = xs[start:start + _ROWS_PER_WRITE]
        n = len(x)
        if np.all(np.isfinite(x) & (x == np.trunc(x)) & (np.abs(x) < 2.0**53)):
            cells: list[object] = [None] * (3 * n)
            cells[0::3] = x.astype(np.int64).tolist()
            line = "%d,%.10g,%.10g\n"
        else:
            cells = [None] * (3 * n)
            cells[0::3] = x.tolist()
            line = "%r,%.10g,%.10g\n"
        cells[1::3] = values[start:start + n].tolist()
        cells[2::3] = smoothed[start:start + n].tolist()
        yield (line * n % tuple(cells)).replace("nan", "")  # one C-level format per block


def _write(out: IO[str], header: str, body: Iterator[str]) -> None:
    out.write(header)
    for block in body:
        out.write(block)


def run(args: argparse.Namespace) -> int:
    from emakit.smoothing import ewm

    for flag in ("out", "plot"):
        target = getattr(args, flag)
        if target is not None and _same_file(target, args.file):
            raise CLIError(f"--{flag} {str(target)!r} is the input file itself; writing it would "
                           "destroy the log. Choose another file.")
    if args.out is not None and args.plot is not None and _same_file(args.out, args.plot):
        raise CLIError(f"--out and --plot are the same file {str(args.out)!r}; give two files.")
    for flag in ("out", "plot"):  # checked before anything is written
        target = getattr(args, flag)
        folder = Path(target).parent if target is not None else None
        if folder is not None and not folder.is_dir():
            raise CLIError(f"--{flag} {str(target)!r}: the folder {str(folder)!r} does not "
                           "exist; create it first. Nothing was written.")
    if args.plot:
        from emakit.cli.figures import pyplot

        pyplot()  # matplotlib is there (else the error says how to install it)
    xs, values, xname = read_column(args.file, args.column, args.x)
    smoothed = ewm(values, alpha=args.alpha, half_life=args.half_life, span=args.span,
                   com=args.com, adjust=not args.no_adjust, ignore_na=args.ignore_na,
                   min_periods=args.min_periods)
    name = args.column
    header = f"{xname},{name},{name}_smoothed\n"
    body = _lines(xs, values, smoothed)
    if args.out is None:
        _write(sys.stdout, header, body)
        sys.stdout.flush()
    else:
        try:
            mode = os.stat(args.out).st_mode
        except OSError:
            mode = stat.S_IFREG
        if stat.S_ISREG(mode):
            from emakit.io import atomic_path

            with atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8",
                                                    newline="") as f:
                _write(f, header, body)
        else:  # a device or pipe (/dev/stdout, a FIFO): written in place, never replaced
            with open(args.out, "w", encoding="utf-8", newline="") as f:
                _write(f, header, body)
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
