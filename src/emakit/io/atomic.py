"""Atomic file replacement: a crash or an exception mid-write leaves the previous file intact.

The data goes to a temporary entry in the destination's folder (same file system, so the final
rename is atomic), is flushed and ``fsync``-ed, then renamed over the destination with
``os.replace``; the folder is ``fsync``-ed too so the rename itself survives a power cut.

Every temporary entry is named ``.<name>.<random>.tmp`` (``TEMP_PATTERN``; ``<name>`` is the
destination's file name, cut to 200 characters). A process killed mid-write can leave one
behind; ``rm -rf -- .<name>.*.tmp`` removes it. Two writers:

- :func:`atomic_write` yields a binary file object on a file it created itself
  (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600) and never reopens by name; the permissions are
  set on the open descriptor. A symbolic link planted at the temporary name cannot redirect
  the write, and no file but the new one changes mode.
- :func:`atomic_path` is for writers that need a path (``fig.savefig``, ``Path.write_text``):
  it creates a private folder ``.<name>.<random>.tmp/`` (mode 0700, so no other user can add
  or swap entries in it) and yields ``that folder / <name>``; the file is moved out over the
  destination, then the folder is removed.

The destination itself is replaced, never written through: saving onto a symbolic link replaces
the link with the new file, and the file it pointed to is left as it was. The new file gets the
permissions of the regular file it replaces, or what a new file gets under the umask.

Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_write(d / "a.bin") as f:
    ...     _ = f.write(b"new")
    >>> with atomic_path(d / "b.txt") as tmp:
    ...     _ = tmp.write_text("text")
    >>> (d / "a.bin").read_bytes(), sorted(p.name for p in d.iterdir())
    (b'new', ['a.bin', 'b.txt'])
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["TEMP_PATTERN", "atomic_path", "atomic_write", "fsync_path"]

TEMP_PATTERN = ".{name}.*.tmp"
"""The glob of the temporary entries a write of ``name`` creates (and a kill can leave)."""
_NAME_LIMIT = 200  # ".<name>.<16 hex>.tmp" stays under the usual 255-byte limit
_CREATE = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
           | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def fsync_path(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """``fsync`` a file (or a folder, where the platform allows it)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | (
        getattr(os, "O_DIRECTORY", 0) if directory else 0)
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
    """The replaced regular file's permissions, or what a new file gets (umask applied).

    ``lstat``: a symbolic link at ``dest`` is replaced, not followed, so its target's mode is
    not copied either.
    """
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return 0o666 & ~_umask()
    return st.st_mode & 0o777 if stat.S_ISREG(st.st_mode) else 0o666 & ~_umask()


def _target(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    dest = Path(path)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {str(dest)!r}: the folder {str(folder)!r} does "
                                "not exist. Create it first.")
    if dest.is_dir() and not dest.is_symlink():
        raise IsADirectoryError(f"cannot write {str(dest)!r}: it is a folder. Give a file name.")
    return dest, folder


def check_target(path: str | os.PathLike[str]) -> None:
    """Raise now what writing ``path`` would raise for its place: a missing folder, a folder
    as the target, a folder that is not writable (before a collective write starts, so that
    every rank learns of it, not only the one that writes)."""
    dest, folder = _target(path)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write {str(dest)!r}: the folder {str(folder)!r} is not "
                              "writable (the file is written as a temporary file there and "
                              "renamed over the target).")


def _failed(dest: Path, folder: Path, exc: OSError) -> OSError:
    """``exc`` retold about the destination (not the hidden temporary entry), same type."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += (f" (the file is written as a temporary file in the folder {str(folder)!r} "
                   "and renamed over the target: the folder must be writable)")
    err = type(exc)(f"cannot write {str(dest)!r}: {reason}.")
    err.errno = exc.errno
    return err


def _create(folder: Path, dest: Path, make: Callable[[Path], int]) -> tuple[Path, int]:
    """A fresh ``.<name>.<random>.tmp`` made by ``make`` (which must fail if it exists)."""
    for _ in range(100):
        tmp = folder / f".{dest.name[:_NAME_LIMIT]}.{secrets.token_hex(8)}.tmp"
        try:
            return tmp, make(tmp)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _failed(dest, folder, exc) from None
    raise FileExistsError(f"cannot write {str(dest)!r}: no free temporary name in "
                          f"{str(folder)!r} after 100 tries; remove the stray "
                          f"{TEMP_PATTERN.format(name=dest.name)!r} entries.")


def _finish(dest: Path, folder: Path, tmp: Path, fd: int) -> None:
    """fsync and chmod through the descriptor, then rename ``tmp`` over ``dest``."""
    try:
        os.fsync(fd)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _mode_for(dest))
        else:  # pragma: no cover (Windows before 3.13: no fchmod, and no symlink race either)
            os.chmod(tmp, _mode_for(dest))
        os.replace(tmp, dest)
    except OSError as exc:
        raise _failed(dest, folder, exc) from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on success it replaces ``path`` atomically.

    Args:
        path: the destination. Its folder must exist.

    Yields:
        A file object open for writing (seekable) on a new temporary file in the same folder.
        When the block ends without an exception the file is flushed, fsync-ed, given its
        permissions and renamed over ``path``; otherwise it is removed.

    Raises:
        FileNotFoundError: if the destination's folder does not exist.
        IsADirectoryError: if ``path`` is a folder.
        OSError: the folder is not writable, the disk is full, ...: the message names ``path``
            and the reason (not the temporary file).
    """
    dest, folder = _target(path)
    tmp, fd = _create(folder, dest, lambda p: os.open(p, _CREATE, 0o600))
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
        _finish(dest, folder, tmp, f.fileno())
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    f.close()
    fsync_path(folder, directory=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` atomically.

    For writers that need a path; prefer :func:`atomic_write` where a file object will do.

    Args:
        path: the destination. Its folder must exist.

    Yields:
        A path (the file does not exist yet) with the destination's name, inside a new private
        folder (mode 0700) next to the destination. Write it completely; it is fsync-ed and
        renamed over ``path`` when the block ends without an exception, and removed otherwise;
        the private folder is removed in both cases.

    Raises:
        FileNotFoundError: if the destination's folder does not exist.
        IsADirectoryError: if ``path`` is a folder.
        OSError: the folder is not writable, ...: the message names ``path`` and the reason.
    """
    dest, folder = _target(path)

    def mkdir(p: Path) -> int:
        os.mkdir(p, 0o700)
        return 0

    private, _ = _create(folder, dest, mkdir)
    tmp = private / dest.name
    try:
        yield tmp
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise FileNotFoundError(f"cannot write {str(dest)!r}: the writer created no file at "
                                    "the path atomic_path gave it.") from None
        except OSError as exc:
            raise _failed(dest, folder, exc) from None
        try:
            _finish(dest, folder, tmp, fd)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    fsync_path(folder, directory=True)
