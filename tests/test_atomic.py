"""The atomic writer: no symlink can redirect a write or a chmod; errors name the target."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

import pytest

import emakit
from emakit.io import atomic, atomic_path, write_weights
from emakit.io.atomic import TEMP_PATTERN, atomic_write

torch = pytest.importorskip("torch")


def _victim(tmp_path: Path) -> Path:
    """A 0600 file outside the folder being written (what an attacker wants overwritten)."""
    victim = tmp_path / "secret"
    victim.write_bytes(b"root's data")
    victim.chmod(0o600)
    return victim


def _unchanged(victim: Path) -> None:
    assert victim.read_bytes() == b"root's data"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_a_writer_never_gets_a_path_to_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            suffix: str) -> None:
    """An attacker who swaps whatever path the serializer opens for a symlink gains nothing.

    The temporary file used to be created, deleted and reopened by name by ``torch.save`` /
    ``np.savez`` / ``save_file``; here each serializer call plants a link first.
    """
    victim = _victim(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    real_save = torch.save

    def racing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, (str, os.PathLike)):  # a path: the attacker links it to the victim
            Path(f).unlink(missing_ok=True)
            Path(f).symlink_to(victim)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", racing_save)
    write_weights({"w": torch.ones(4)}, shared / f"best{suffix}")
    _unchanged(victim)
    back, _ = emakit.io.read_weights(shared / f"best{suffix}")
    assert torch.equal(torch.as_tensor(back["w"]), torch.ones(4))
    assert not (shared / f"best{suffix}").is_symlink()


def test_a_planted_temporary_name_is_skipped(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A link already sitting at the next temporary name is neither followed nor removed."""
    victim = _victim(tmp_path)
    names = iter(["planted00000000", "fresh000000000a"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    planted = tmp_path / ".w.safetensors.planted00000000.tmp"
    planted.symlink_to(victim)
    write_weights({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    _unchanged(victim)
    assert planted.is_symlink()  # untouched: O_EXCL refused it, the next name was used
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".w.safetensors.planted00000000.tmp", "secret", "w.safetensors"]


def test_atomic_path_folder_is_private_and_chmod_follows_no_link(tmp_path: Path) -> None:
    """atomic_path's path lives in a 0700 folder; a link swapped in there is refused."""
    victim = _victim(tmp_path)
    dest = tmp_path / "out.png"

    def attacked() -> None:
        with atomic_path(dest) as tmp:
            folder = tmp.parent
            assert folder.parent == tmp_path and tmp.name == "out.png"
            assert folder.name.startswith(".out.png.") and folder.name.endswith(".tmp")
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert folder.stat().st_uid == os.getuid()
            tmp.symlink_to(victim)  # only our own uid can do this in a 0700 folder

    with pytest.raises(OSError, match=r"cannot write '.*out\.png'") as info:
        attacked()
    assert info.value.errno == errno.ELOOP
    _unchanged(victim)
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_saving_onto_a_symlink_replaces_the_link(tmp_path: Path) -> None:
    """Documented: the link is replaced by the new file; its target stays as it was."""
    victim = _victim(tmp_path)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(victim)
    write_weights({"w": torch.ones(2)}, link)
    _unchanged(victim)
    assert not link.is_symlink() and link.is_file()
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(link.stat().st_mode) == 0o666 & ~mask  # not the target's 0600


def test_replacing_keeps_the_files_permissions(tmp_path: Path) -> None:
    dest = tmp_path / "w.pt"
    write_weights({"w": torch.ones(2)}, dest)
    dest.chmod(0o640)
    write_weights({"w": torch.zeros(2)}, dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640


def test_unwritable_folder_names_the_target(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The error names the file asked for and why, not a hidden temporary name."""
    real_open, real_mkdir = os.open, os.mkdir

    def deny(path: Any) -> None:
        if Path(path).parent == tmp_path:  # what the kernel says for a read-only folder
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            deny(path)
        return real_open(path, flags, *args, **kwargs)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        deny(path)
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)
    ema = emakit.EMA({"w": torch.zeros(2)}, decay=0.5)
    for write in (lambda: emakit.save(ema, tmp_path / "model.safetensors"),
                  lambda: atomic_path(tmp_path / "model.safetensors").__enter__()):
        with pytest.raises(PermissionError) as info:
            write()
        text = str(info.value)
        assert text.startswith(f"cannot write {str(tmp_path / 'model.safetensors')!r}: "
                               "Permission denied")
        assert f"in the folder {str(tmp_path)!r} and renamed over the target: the folder " \
            "must be writable" in text
        assert ".tmp" not in text and info.value.errno == errno.EACCES


def test_every_temporary_name_follows_the_pattern(tmp_path: Path) -> None:
    seen = []
    with atomic_write(tmp_path / "a.pt") as f:
        seen += list(tmp_path.iterdir())
        f.write(b"x")
    with atomic_path(tmp_path / "b.txt") as tmp:
        seen += [p for p in tmp_path.iterdir() if p.name != "a.pt"]
        tmp.write_text("y")
    assert [p.match(TEMP_PATTERN.format(name=n)) for p, n in zip(seen, ["a.pt", "b.txt"])] == \
        [True, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.txt"]


def test_a_folder_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot write '.*d': it is a folder"), \
            atomic_write(tmp_path / "d"):
        pass
