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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emakit.backends import backend_for
from emakit.errors import StateDictError

__all__ = ["EXPANSION", "SLACK", "check_weights", "check_zip", "limit"]

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


def check_weights(where: str, weights: Mapping[str, Any], file_bytes: int) -> None:
    """Every weight is a dense tensor within its storage, all of them within :func:`limit`.

    Args:
        where: the file (and the place in it), for messages.
        weights: name -> tensor, as read.
        file_bytes: the size of the file they were read from.

    Raises:
        StateDictError: naming the entry, or the sizes, and why.
    """
    total = 0
    for name, value in weights.items():
        if not _dense(value):
            raise StateDictError(f"{where}: entry {name!r} is not a dense tensor, got "
                                 f"{type(value).__name__}",
                                 fix="The file is corrupt or not an EMA checkpoint.")
        if type(value).__module__.startswith("torch"):
            size = value.element_size()
            storage = value.untyped_storage().nbytes() // max(size, 1)
            if value.numel() > storage:
                raise StateDictError(
                    f"{where}: tensor {name!r} has {value.numel():,} elements but its storage "
                    f"holds {storage:,} (expanded or overlapping strides)",
                    fix="emakit refuses such tensors: they can make a tiny file expand to any "
                        "size. Save the tensor with .contiguous() (a real copy) instead.")
            total += value.numel() * size
        else:
            total += int(value.nbytes)
    if total > limit(file_bytes):
        raise StateDictError(
            f"{where}: the tensors take {total:,} bytes under their {len(weights):,} "
            f"names, more than {EXPANSION}x the file's {file_bytes:,} bytes (one "
            "storage under many names or views)",
            fix="emakit refuses to expand a file that much; save each tensor once.")


def _dense(value: Any) -> bool:
    """A numpy array, or a strided torch tensor with data (not sparse, not on "meta")."""
    if backend_for(value) is None:
        return False
    if not type(value).__module__.startswith("torch"):
        return True
    return str(value.layout) == "torch.strided" and value.device.type != "meta"
