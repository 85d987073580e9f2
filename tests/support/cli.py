"""Running the `p2pchat` CLI from tests: in a real pseudo-terminal (pexpect) or as a plain
subprocess for the scripted subcommands."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from pexpect.fdpexpect import fdspawn

CLI = [sys.executable, "-m", "p2pchat_agent.cli.app"]


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "XDG_STATE_HOME": str(tmp_path / "cli-state"),
        "TERM": "xterm",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }


class Terminal(fdspawn):  # type: ignore[misc]
    """The CLI on a pseudo-terminal, driven with pexpect's expect/sendline.

    Started with subprocess (fork+exec in C) rather than pexpect.spawn, whose fork runs the
    at-fork hooks of this process: gRPC's, with the test's channels open, can break the child
    before it execs."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
        self.process = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        super().__init__(master, timeout=15, encoding="utf-8")
        self._master: int | None = master
        self.exitstatus: int | None = None

    def sendcontrol(self, char: str) -> int:
        """Types Ctrl-<char> (e.g. "c", "d")."""
        return int(self.send(chr(ord(char.lower()) - ord("a") + 1)))

    def close(self, force: bool = False) -> None:
        if force and self.process.poll() is None:
            self.process.kill()
        self.exitstatus = self.process.wait(timeout=30)
        if self._master is not None:
            os.close(self._master)
            self._master = None
        self.closed = True


def agent_flag(agent: int | str | None) -> list[str]:
    """`--agent 127.0.0.1:PORT` for a port, `--agent ADDRESS` for an address, none for None."""
    if agent is None:
        return []
    return ["--agent", f"127.0.0.1:{agent}" if isinstance(agent, int) else agent]


def spawn_menu(agent_port: int, tmp_path: Path) -> Terminal:
    """`p2pchat --agent 127.0.0.1:PORT` (the menu) on a 40x140 pseudo-terminal."""
    return Terminal([*CLI, *agent_flag(agent_port)], cli_env(tmp_path))


def run_cli(
    agent: int | str | None,
    tmp_path: Path,
    *args: str,
    stdin: str = "",
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`p2pchat [--agent ...] ARGS`; `agent` as for `agent_flag`, `env` added to cli_env's."""
    return subprocess.run(
        [*CLI, *agent_flag(agent), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**cli_env(tmp_path), **(env or {})},
        timeout=timeout,
    )
