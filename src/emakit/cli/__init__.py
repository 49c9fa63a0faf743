"""The ``emakit`` command line: ``emakit demo | smooth | plan | inspect | export | bench``.

Each command lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Errors a user can fix (bad options, missing or malformed files) print one line to stderr and exit
with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from emakit import __version__

__all__ = ["CLIError", "main"]


class CLIError(Exception):
    """A problem with the command's input that the user can fix; printed without a traceback."""


def _parser() -> argparse.ArgumentParser:
    from emakit.cli import bench, demo, export, inspection, plan, smooth

    parser = argparse.ArgumentParser(
        prog="emakit", description="Exponential moving averages of model weights.")
    parser.add_argument("--version", action="version", version=f"emakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (demo, smooth, plan, inspection, export, bench):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``emakit`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (CLIError, ValueError, OSError, ImportError) as exc:
        print(f"emakit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"emakit {args.command}: interrupted", file=sys.stderr)
        return 130
