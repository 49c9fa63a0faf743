"""Tell what kind of file a path holds from its first bytes, for error messages.

When a file is not what a reader expects, saying what it *is* ("a torch.save checkpoint", "a
text file") tells the user which function to use instead. Reads at most a few kilobytes.

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "log.csv"
    >>> _ = path.write_text("step,loss\\n1,0.5\\n")
    >>> file_kind(path)
    "a text file (it starts with 'step,loss')"
"""

from __future__ import annotations

import codecs
import os
import zipfile
from pathlib import Path

__all__ = ["file_kind"]

_TORCH = "a torch.save checkpoint"
_NPZ = "a numpy .npz archive"


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()[:10_000]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "a zip archive that is truncated or damaged"
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return _TORCH
    if names and all(n.endswith(".npy") for n in names):
        return _NPZ
    return "a zip archive"


def file_kind(path: str | os.PathLike[str]) -> str:
    """A short description of what ``path`` holds ("a torch.save checkpoint", "empty", ...).

    Args:
        path: an existing file.

    Returns:
        One of: ``"empty"``, ``"a safetensors file"``, ``"a torch.save checkpoint"`` (zip or
        legacy pickle), ``"a numpy .npz archive"``, ``"a Python pickle"``, ``"a zip archive"``,
        ``"a text file (it starts with ...)"`` or ``"not a format emakit knows (...)"``.
    """
    src = Path(path)
    with open(src, "rb") as f:
        head = f.read(4096)
    if not head:
        return "empty"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 10**9:
        return "a safetensors file"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_kind(src)
    if head.startswith(b"\x80\x02\x8a\x0a"):  # torch's legacy format: a pickled magic number
        return _TORCH + " (legacy format)"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "a Python pickle"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array"
    try:  # incremental: a character cut at the end of the 4 KB is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text[:256]):
        first = text.splitlines()[0][:40] if text.splitlines() else ""
        return f"a text file (it starts with {first!r})"
    return f"not a format emakit knows (it starts with {head[:8]!r})"
