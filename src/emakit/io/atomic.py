"""Atomic file replacement: a crash or an exception mid-write leaves the previous file intact.

The data goes to a temporary file in the destination's folder (same file system, so the final
rename is atomic), is flushed and ``fsync``-ed, then renamed over the destination with
``os.replace``; the folder is ``fsync``-ed too so the rename itself survives a power cut.

Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "a.txt") as tmp:
    ...     _ = tmp.write_text("new")
    >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
    ('new', ['a.txt'])
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "fsync_path"]


def fsync_path(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """``fsync`` a file (or a folder, where the platform allows it)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # e.g. Windows cannot open folders; the rename is still atomic there
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the portable way (and put it back)
    os.umask(mask)
    return mask


def _mode_for(dest: Path) -> int:
    """The replaced file's permissions, or what a new file gets (some writers use 0600)."""
    try:
        return dest.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    Args:
        path: the destination. Its folder must exist.

    Yields:
        A fresh path in the same folder (the file does not exist yet). Write it completely;
        it is fsync-ed and renamed over ``path`` when the block ends without an exception, and
        removed otherwise.

    Raises:
        FileNotFoundError: if the destination's folder does not exist.
    """
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(dest)!r}: the folder {str(folder)!r} does "
                                "not exist. Create it first.")
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        yield tmp
        fsync_path(tmp)
        os.chmod(tmp, _mode_for(dest))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(folder, directory=True)
