"""``emakit plan``: what a decay means in optimizer steps, before you train.

Prints the half-life and the averaging window, the decay a schedule gives at chosen steps, and --
for a planned run of ``--steps`` -- how much of the final average comes from the last steps and how
much is still the initial weights, with a warning when the window is too long for the run (the
"EMA accuracy stays at zero" trap). ``--plot`` draws the weight each past step carries at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from emakit import schedules
from emakit.cli.errors import CLIError
from emakit.window import step_weights

__all__ = ["add_parser", "parse_schedule", "run"]

def _key(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def cli_name(kind: str) -> str:
    """``InverseGamma`` -> ``inverse-gamma``, ``TFWarmup`` -> ``tf-warmup``."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "-", kind).lower()


def _names() -> dict[str, type[schedules.Schedule]]:
    """Every registered schedule by its CLI spellings (kind, kebab-case, aliases)."""
    out = {}
    for kind, cls in schedules.REGISTRY.items():
        for name in (kind, *cls.aliases):
            out[_key(name)] = cls
    return out
TRAP_SHARE = 0.05  # initial weights still holding more than this at the end: warn


def parse_schedule(spec: str) -> schedules.Schedule:
    """``NAME[:key=value,...]``, e.g. ``inverse-gamma:power=0.75,max_decay=0.9999``.

    ``power-function`` (or ``power``) takes ``gamma`` (``>= 0``) or ``sigma_rel`` (in
    ``(0, 0.2887)``); each schedule's own checks give the errors, prefixed with the option.

    Example:
        >>> parse_schedule("tf-warmup:decay=0.99")
        TFWarmup(decay=0.99)
        >>> round(parse_schedule("power:sigma_rel=0.05").gamma, 2)
        16.97
    """
    name, _, rest = spec.partition(":")
    cls = _names().get(_key(name))
    if cls is None:
        known = ", ".join(cli_name(k) for k in schedules.REGISTRY)
        raise CLIError(f"--schedule {spec!r}: unknown schedule {name!r}; known: {known}. Example: "
                       "--schedule inverse-gamma:power=0.75,max_decay=0.9999")
    fields: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise CLIError(f"--schedule {spec!r}: {item!r} is not key=value.")
        try:
            number = float(value)
        except ValueError:
            raise CLIError(f"--schedule {spec!r}: {key}={value!r} is not a number.") from None
        if key.strip() == "update_after_step":
            if not number.is_integer():
                raise CLIError(f"--schedule {spec!r}: update_after_step={value!r} is not a whole "
                               "number of steps.")
            fields[key.strip()] = int(number)
        else:
            fields[key.strip()] = number
    try:
        schedule: schedules.Schedule = cls(**fields)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--schedule {spec!r}: {exc}") from exc
    return schedule


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="what a decay or schedule means in optimizer steps",
                       description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--decay", type=float, help="constant per-step decay, e.g. 0.9999")
    g.add_argument("--half-life", type=float, help="half-life in optimizer steps")
    g.add_argument("--schedule", help="NAME[:key=value,...], e.g. inverse-gamma:power=0.75")
    p.add_argument("--every", type=int, default=1, help="update every k optimizer steps")
    p.add_argument("--steps", type=int, help="planned run length in optimizer steps")
    p.add_argument("--last", type=int, help="also report the share of the last N steps")
    p.add_argument("--at", help="comma-separated steps at which to print the decay")
    p.add_argument("--plot", type=Path, help="PNG of each past step's weight at the end")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run)


def _schedule(args: argparse.Namespace) -> schedules.Schedule:
    if args.schedule is not None:
        return parse_schedule(args.schedule)
    if args.half_life is not None:
        if not (math.isfinite(args.half_life) and args.half_life > 0):
            raise CLIError(f"--half-life must be a finite number of steps > 0, got "
                           f"{args.half_life} (an infinite half-life never moves: --decay 1).")
        return schedules.Constant.from_half_life(args.half_life)
    if not 0.0 <= args.decay <= 1.0:
        raise CLIError(f"--decay must be in [0, 1], got {args.decay}.")
    return schedules.Constant(args.decay)


def _steps_to_show(args: argparse.Namespace) -> list[int]:
    if args.at:
        try:
            at = sorted({int(s) for s in args.at.split(",") if s.strip()})
        except ValueError:
            raise CLIError(f"--at {args.at!r}: give whole step numbers, e.g. 1,100,1000"
                           ) from None
        if not at or at[0] < 1:
            raise CLIError(f"--at {args.at!r}: steps start at 1.")
        return at
    end = args.steps or 10**6
    out = [10**e for e in range(7) if 10**e <= end]
    return out + ([end] if end not in out else [])


def _fmt_steps(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:,.1f}" if x < 100 else f"{x:,.0f}"


def run(args: argparse.Namespace) -> int:
    for name in ("every", "steps", "last"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name} must be >= 1, got {value}.")
    if args.plot and not args.steps:
        raise CLIError("--plot needs --steps (the length of the run to draw).")
    sched = _schedule(args)
    report: dict[str, Any] = {"schedule": sched.to_dict(), "every": args.every}
    lines = [f"schedule: {sched!r}" + (f", update every {args.every} steps (decay^"
                                         f"{args.every} per update)" if args.every > 1 else "")]
    if isinstance(sched, schedules.Constant):
        d = sched.decay
        half = schedules.decay_to_half_life(d) if 0 < d < 1 else (math.inf if d == 1 else 0.0)
        window = math.inf if d == 1 else 1.0 / (1.0 - d)
        report.update(decay=d, half_life_steps=half, window_steps=window)
        lines += [f"decay per step: {d}",
                  f"half-life: {_fmt_steps(half)} optimizer steps (a step's weight halves after "
                  f"this many more steps)",
                  f"effective window 1/(1-d): {_fmt_steps(window)} steps (mean age of the "
                  f"average: {_fmt_steps(window - 1)} steps)"]
        if args.every > 1 and math.isfinite(half):
            lines.append(f"  = a half-life of {_fmt_steps(half / args.every)} and a window of "
                         f"{_fmt_steps(window / args.every)} updates of every {args.every} "
                         f"steps; the window in steps does not change with --every")
    at = _steps_to_show(args)
    report["decay_at"] = {str(t): sched(t) for t in at}
    lines.append("decay at step: " + ", ".join(f"{t:,}: {sched(t):.6g}" for t in at))
    warn = None
    if args.steps:
        w = step_weights(sched, args.steps, every=args.every)
        n = args.steps
        marks = sorted({m for m in (max(1, n // 100), max(1, n // 10), max(1, n // 2),
                                    args.last) if m})
        shares = {m: w.share_of_last(m) for m in marks}
        report.update(steps=n, initial_share=w.initial, mean_age_steps=w.mean_age(),
                      share_of_last={str(m): s for m, s in shares.items()})
        last = n - n % args.every
        lines.append(f"after {n:,} steps the average holds" + (
            f" (its last update was at step {last:,}: the steps count back from there):"
            if last != n else ":"))
        lines += [f"  {100 * s:6.2f}% from the last {m:,} steps" for m, s in shares.items()]
        lines.append(f"  {100 * w.initial:6.2f}% the initial weights (mean age of the average: "
                     f"{_fmt_steps(w.mean_age())} steps)")
        if w.initial > TRAP_SHARE:
            warn = (f"WARNING: the window is too long for a {n:,}-step run: "
                    f"{100 * w.initial:.1f}% of the final average is still the initial "
                    f"(random) weights, so the EMA model will evaluate near chance (the 'EMA "
                    f"accuracy stays at zero' trap). Use a half-life below about "
                    f"{_fmt_steps(n * math.log(0.5) / math.log(TRAP_SHARE))} steps, or a warmup "
                    f"schedule (--schedule inverse-gamma).")
            report["warning"] = warn
        if args.plot:
            _plot(w, sched, args.plot, args.every)
            report["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print("\n".join(lines))
        if warn:
            print(warn)
        if args.plot and args.steps:
            print(f"wrote {args.plot}")
    return 0


def _plot(w: Any, sched: schedules.Schedule, path: Path, every: int) -> None:
    from emakit.cli.figures import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(9, 4))
    per_step = w.weights / every
    ax.fill_between(w.steps, per_step, step="pre", alpha=0.35)
    ax.plot(w.steps, per_step, lw=1.2, drawstyle="steps-pre")
    end = int(w.steps[-1]) if w.steps.size else 0
    label = (f"decay {sched.decay:.6g}" if isinstance(sched, schedules.Constant)
             else type(sched).__name__)
    ax.set(xlabel="optimizer step", ylabel="share of the final average per step",
           title=f"{label}: weight of each step after {end:,} steps "
                 f"(initial weights: {100 * w.initial:.2f}%)")
    ax.set_xlim(0, end)
    ax.grid(alpha=0.3)
    save_png(fig, path)
