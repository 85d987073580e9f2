"""Running the `p2pchat` CLI from tests: in a real pseudo-terminal (pexpect) or as a plain
subprocess for the scripted subcommands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect

CLI = [sys.executable, "-m", "p2pchat_agent.cli.app"]


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "XDG_STATE_HOME": str(tmp_path / "cli-state"),
        "TERM": "xterm",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }


def spawn_menu(agent_port: int, tmp_path: Path) -> pexpect.spawn:
    child = pexpect.spawn(
        CLI[0],
        [*CLI[1:], "--agent", f"127.0.0.1:{agent_port}"],
        env=cli_env(tmp_path),
        encoding="utf-8",
        timeout=15,
        dimensions=(40, 140),
    )
    return child


def run_cli(
    agent_port: int, tmp_path: Path, *args: str, stdin: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--agent", f"127.0.0.1:{agent_port}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=timeout,
    )
