"""Private files and folders: what the services keep on disk (databases with password and token
hashes, keys, sessions) is for the user the service runs as, and nobody else.

SQLite gives a database's -wal and -shm files the mode of the database file itself, so making the
file 0600 before SQLite first opens it is enough for all three.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from p2pchat_common.errors import DiskFull

log = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
# Set once at process start (serving.run_service): whatever a library creates without saying a
# mode is private too. Files meant to be public (the directory's ca.pem) chmod themselves.
PRIVATE_UMASK = 0o077


def _tighten(path: Path, mode: int) -> None:
    """chmod `path` to `mode` when it is ours and not already so; a folder or file owned by
    someone else (a mount, a shared folder) is left as it is, with a warning."""
    st = path.stat()
    if stat.S_IMODE(st.st_mode) == mode:
        return
    if st.st_uid != os.geteuid():
        log.warning("%s has mode %o and is not ours to make %o", path, st.st_mode & 0o777, mode)
        return
    os.chmod(path, mode)


def private_dir(path: Path) -> Path:
    """Makes `path` a folder of mode 0700, and the parents it has to make too (`mkdir -p` would
    leave those to the umask); an existing folder of ours is tightened to 0700, its existing
    parents are left alone. Returns `path`."""
    missing: list[Path] = []
    folder = path
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:  # made meanwhile by someone else: tightened only if ours
            pass
        _tighten(folder, PRIVATE_DIR_MODE)  # the umask may have taken bits from mkdir's mode
    _tighten(path, PRIVATE_DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Makes `path` a file of mode 0600: created empty when missing (0600 from the start), an
    existing file of ours tightened to 0600. Returns `path`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    _tighten(path, PRIVATE_FILE_MODE)
    return path


def write_file(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Writes `path` atomically (a temporary file, fsync, rename) with `mode` from the start; a
    full disk is DiskFull and leaves the old file as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have taken bits from a public mode
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"disk full ({path.parent}): {path.name} was not written") from exc
        raise


def write_private(path: Path, data: bytes) -> None:
    """A secret, written atomically with mode 0600."""
    write_file(path, data, PRIVATE_FILE_MODE)


def write_public(path: Path, data: bytes) -> None:
    """A file meant for others (a CA certificate), written atomically with mode 0644."""
    write_file(path, data, 0o644)
