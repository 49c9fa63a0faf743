"""The error a command raises for input the user can fix (printed as one line, exit status 2)."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(Exception):
    """A problem with the command's input that the user can fix; printed without a traceback."""
