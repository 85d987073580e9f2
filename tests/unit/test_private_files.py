"""Private files and folders (p2pchat_common.files): made 0700/0600, tightened when ours, left as
they are when someone else's; writes are atomic and a full disk leaves the old file as it was."""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

import pytest

from p2pchat_common.errors import DiskFull
from p2pchat_common.files import private_dir, private_file, write_private, write_public


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_makes_every_missing_parent_0700_and_leaves_existing_ones(
    tmp_path: Path,
) -> None:
    tmp_path.chmod(0o755)
    made = private_dir(tmp_path / "a" / "b" / "c")
    assert made == tmp_path / "a" / "b" / "c"
    assert [mode(p) for p in (made, made.parent, made.parent.parent)] == [0o700] * 3
    assert mode(tmp_path) == 0o755


def test_private_dir_tightens_an_existing_folder_of_ours(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    private_dir(folder)
    assert mode(folder) == 0o700


def test_private_file_creates_an_empty_0600_file_and_tightens_an_existing_one(
    tmp_path: Path,
) -> None:
    new = private_file(tmp_path / "new.db")
    assert (mode(new), new.read_bytes()) == (0o600, b"")
    old = tmp_path / "old.db"
    old.write_bytes(b"kept")
    old.chmod(0o644)
    private_file(old)
    assert (mode(old), old.read_bytes()) == (0o600, b"kept")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_file_of_someone_else_is_left_as_it_is_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    theirs = tmp_path / "theirs.db"
    theirs.write_bytes(b"")
    theirs.chmod(0o644)
    os.chown(theirs, 54321, 54321)
    with caplog.at_level(logging.WARNING, logger="p2pchat_common.files"):
        private_file(theirs)
    assert mode(theirs) == 0o644
    assert "is not ours to make 600" in caplog.text


def test_write_private_and_write_public_replace_a_file_with_their_mode(tmp_path: Path) -> None:
    secret, public = tmp_path / "key.pem", tmp_path / "ca.pem"
    for path in (secret, public):
        path.write_bytes(b"old")
    write_private(secret, b"new secret")
    write_public(public, b"new cert")
    assert (mode(secret), secret.read_bytes()) == (0o600, b"new secret")
    assert (mode(public), public.read_bytes()) == (0o644, b"new cert")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "key.pem"]  # no .tmp left


def test_a_write_into_a_missing_folder_fails_as_it_is_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_private(tmp_path / "missing" / "key.pem", b"x")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_disk_full_and_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "session.json"
    path.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull, match="session.json was not written"):
        write_private(path, b"new")
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]
