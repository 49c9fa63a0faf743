"""How much an untrusted checkpoint file may cost to read: work bounded by the file's size.

A few bytes must not turn into gigabytes: tensors counted under all their names, and the members
of a zip archive (``.npz``, ``torch.save``) once decompressed, may hold at most
:data:`EXPANSION` times the file's size plus :data:`SLACK` bytes.

Example:
    >>> limit(1000)
    1052576
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from emakit.errors import StateDictError

__all__ = ["EXPANSION", "SLACK", "check_zip", "limit"]

EXPANSION = 4
"""How many times its own size a file's contents may hold (tied weights count twice)."""
SLACK = 2**20
"""Bytes allowed on top, so tiny files are not refused for their fixed overheads."""


def limit(file_bytes: int) -> int:
    """The most bytes a file of ``file_bytes`` may expand to."""
    return EXPANSION * file_bytes + SLACK


def check_zip(path: str | os.PathLike[str]) -> None:
    """Refuse a zip archive whose members decompress to more than :func:`limit` bytes.

    The sizes come from the archive's directory; reading a member stops at its stated size, so a
    member that claims less cannot expand further.

    Raises:
        StateDictError: naming the file, the sizes and the limit.
    """
    src = Path(path)
    size = src.stat().st_size
    try:
        with zipfile.ZipFile(src) as z:
            total = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a readable zip: the reader says so in its own words
    if total > limit(size):
        raise StateDictError(
            f"{str(src)!r}: its zip members expand to {total:,} bytes, more than {EXPANSION}x "
            f"the file's {size:,} bytes (a compressed archive of mostly repeated bytes)",
            fix="emakit refuses to expand an untrusted file that much; store the arrays "
                "uncompressed (numpy.savez, not savez_compressed).")
