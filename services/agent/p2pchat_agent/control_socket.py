"""The Unix socket the control API is served on (by default DATA_DIR/control.sock).

Before binding, `claim` checks the path: short enough for a socket address, not taken by an agent
still serving on it (gRPC would silently unlink and take over the file), and a stale socket left
by a crashed agent is removed. Once bound the socket is made 0600; `release` removes it on
shutdown, if it is still the one this agent made. All of it blocks (call it from a thread).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from pathlib import Path

from p2pchat_agent.config import MAX_SOCKET_PATH
from p2pchat_common.errors import StartupError
from p2pchat_common.files import PRIVATE_FILE_MODE

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 2.0


class ControlSocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._inode: int | None = None

    def claim(self) -> None:
        """Makes the path free for this agent's socket; StartupError when it cannot be used."""
        path = self.path
        size = len(os.fsencode(path))
        if size > MAX_SOCKET_PATH:
            raise StartupError(
                f"the control socket path {path} is {size} bytes, longer than the "
                f"{MAX_SOCKET_PATH} a Unix socket allows: use a shorter --data-dir, or "
                "--control-listen unix:PATH with a shorter path"
            )
        if not path.parent.is_dir():
            raise StartupError(f"cannot make the control socket {path}: no folder {path.parent}")
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise StartupError(
                f"cannot make the control socket {path}: a file that is not a socket is there"
            )
        if self._answers():
            raise StartupError(f"another agent is already serving {path}")
        log.warning("removing the stale control socket %s (nothing answers on it)", path)
        path.unlink(missing_ok=True)

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(PROBE_TIMEOUT)
            try:
                probe.connect(os.fspath(self.path))
            except (ConnectionRefusedError, FileNotFoundError):
                return False
            except TimeoutError:  # a listener whose backlog is full: it is alive
                return True
            except OSError as exc:
                raise StartupError(f"cannot use the control socket {self.path}: {exc}") from None
            return True

    def bound(self) -> None:
        """After the server bound the path: only this user may connect (the data dir is 0700
        too; connecting to a Unix socket needs write permission on it)."""
        os.chmod(self.path, PRIVATE_FILE_MODE)
        self._inode = self.path.lstat().st_ino

    def release(self) -> None:
        """Removes the socket file on shutdown, unless another one has replaced it."""
        if self._inode is None:
            return
        try:
            if self.path.lstat().st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:  # gRPC removes it itself when the server stops
            pass
        self._inode = None
