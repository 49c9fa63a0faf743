"""The ``emakit`` command line: ``emakit demo|smooth|plan|inspect|export|bench|posthoc``.

Each command lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Errors a user can fix (bad options, missing or malformed files, numbers beyond float64, input
nested too deeply, a full disk) print one line to stderr and exit with status 2; nothing is
half-written. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from emakit.cli.errors import CLIError
from emakit.version import __version__

__all__ = ["CLIError", "main", "plain_text"]


_ROLE = re.compile(r":[a-z]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`")  # :func:`x`, :mod:`~a.b`, :ref:`t <x>`


def plain_text(doc: str) -> str:
    """A module docstring as plain text for ``--help``: no reStructuredText markup.

    ``literal`` becomes literal, and a cross-reference such as :func:`emakit.smoothing.ewm`
    becomes its target (after ``~``, the last dotted part), so the help shows what a terminal
    user would type or look up.

    Example:
        >>> plain_text("Uses :func:`~emakit.smoothing.ewm` and ``emakit demo``.")
        'Uses ewm and emakit demo.'
    """

    def role(match: re.Match[str]) -> str:
        target = match.group(1)
        tilde = match.group(0).split("`", 1)[1].startswith("~")
        return target.rsplit(".", 1)[-1] if tilde else target

    return _ROLE.sub(role, doc).replace("``", "").strip()


def _parser() -> argparse.ArgumentParser:
    from emakit.cli import bench, demo, export, inspection, plan, posthoc, smooth

    parser = argparse.ArgumentParser(
        prog="emakit", description="Exponential moving averages of model weights.")
    parser.add_argument("--version", action="version", version=f"emakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (demo, smooth, plan, inspection, export, bench, posthoc):
        before = set(sub.choices)
        module.add_parser(sub)
        for name in set(sub.choices) - before:  # the module's docstring, as plain text
            command = sub.choices[name]
            command.description = plain_text(module.__doc__ or "")
            command.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _io_error(exc: Exception) -> bool:
    """Whether ``exc`` is an I/O failure reported outside ``OSError`` (safetensors' writer
    raises ``SafetensorError("... I/O error: No space left on device ...")`` on a full disk)."""
    return type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``emakit`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except BrokenPipeError:  # the reader stopped early (`emakit inspect f | head`): no message
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit's flush of stdout fails silently too
        return 1
    except (CLIError, ValueError, OSError, ImportError) as exc:
        print(f"emakit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RecursionError as exc:  # e.g. a deeply nested JSON line or header
        print(f"emakit {args.command}: error: the input is nested too deeply to read ({exc}).",
              file=sys.stderr)
        return 2
    except ArithmeticError as exc:  # an option or value beyond what float64 can compute with
        print(f"emakit {args.command}: error: a number given is out of the computable range "
              f"({type(exc).__name__}: {exc}); use a smaller value.", file=sys.stderr)
        return 2
    except Exception as exc:
        if not _io_error(exc):
            raise  # a bug: the traceback is what a report needs
        print(f"emakit {args.command}: error: could not write a file: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"emakit {args.command}: interrupted", file=sys.stderr)
        return 130
