"""The control API is private to its user: by default the agent serves it on DATA_DIR/control.sock
(0600, in the 0700 data dir), the CLI finds it there, a second agent cannot take it over, a stale
socket of a crashed agent does not stop a restart, and loopback TCP stays an explicit option."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.agent import AgentClient, AgentProcess
from tests.support.cli import run_cli
from tests.support.directory import InProcessDirectory

PW = "socket password 1\n"
START_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children inherit os.environ: a P2PCHAT_* variable of the developer's shell must not leak."""
    for name in [n for n in os.environ if n.startswith("P2PCHAT_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path (a socket path has at most 107 bytes; tmp_path can be long)."""
    path = Path(tempfile.mkdtemp(prefix="p2p-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


AgentArgs = Callable[..., list[str]]


@pytest.fixture
def agent_args(agent_directory: InProcessDirectory) -> AgentArgs:
    """The flags of an agent on `agent_directory` with `data_dir`, and no --control-listen."""

    def args(data_dir: Path, *extra: str) -> list[str]:
        return [
            "--directory",
            f"localhost:{agent_directory.port}",
            "--directory-ca",
            str(agent_directory.settings.data_dir / "ca.pem"),
            "--data-dir",
            str(data_dir),
            "--peer-listen",
            "127.0.0.1:0",
            "--grace-period",
            "1",
            *extra,
        ]

    return args


@pytest.fixture
def start_agent() -> Iterator[Callable[[list[str]], AgentProcess]]:
    started: list[AgentProcess] = []

    def start(args: list[str]) -> AgentProcess:
        proc = AgentProcess(args)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def run_agent(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`p2pchat-agent ARGS` that is expected to exit at startup."""
    return subprocess.run(
        [sys.executable, "-m", "p2pchat_agent", *args],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


def test_by_default_the_agent_serves_a_0600_socket_in_its_0700_data_dir(
    start_agent: Callable[[list[str]], AgentProcess], agent_args: AgentArgs, short_dir: Path
) -> None:
    data = short_dir / "data"
    agent = start_agent(agent_args(data))
    sock = data / "control.sock"
    assert agent.control_socket == sock and agent.control_port == 0
    assert agent.control == f"unix:{sock}"
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    assert (mode(data), mode(sock)) == (0o700, 0o600)
    assert any(
        f"agent serving: control socket {sock}, peer port {agent.peer_port}, reachable at" in line
        for line in agent.log
    )
    client = AgentClient(agent.control)
    try:
        assert client.status().logged_in is False
    finally:
        client.close()

    assert agent.terminate() == 0
    assert not os.path.lexists(sock)  # removed on a clean shutdown


def test_the_cli_reaches_the_socket_by_unix_path_by_plain_path_and_by_default(
    start_agent: Callable[[list[str]], AgentProcess],
    agent_args: AgentArgs,
    short_dir: Path,
    tmp_path: Path,
) -> None:
    data = short_dir / "data"
    start_agent(agent_args(data))
    sock = data / "control.sock"

    def ok(
        agent: str | None, *args: str, stdin: str = "", env: dict[str, str] | None = None
    ) -> str:
        result = run_cli(agent, tmp_path, *args, stdin=stdin, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert ok(f"unix:{sock}", "register", "sam", "--password-stdin", stdin=PW) == "registered sam\n"
    assert ok(str(sock), "login", "sam", "--password-stdin", stdin=PW).startswith(
        "logged in as sam"
    )
    # No --agent: P2PCHAT_DATA_DIR names the agent's data dir, as in the image.
    status = json.loads(ok(None, "status", "--json", env={"P2PCHAT_DATA_DIR": str(data)}))
    assert status["logged_in"] is True and status["username"] == "sam"
    assert f"agent:     unix:{sock}" in ok(f"unix:{sock}", "status")

    # An agent that is not there: the message shows both forms of --agent.
    missing = run_cli(f"unix:{short_dir / 'nobody.sock'}", tmp_path, "status")
    assert missing.returncode == 3, missing.stderr
    assert "cannot reach the agent at unix:" in missing.stderr
    assert "--agent unix:PATH" in missing.stderr and "--agent HOST:PORT" in missing.stderr


def test_a_second_agent_on_the_same_data_dir_fails_and_leaves_the_first_serving(
    start_agent: Callable[[list[str]], AgentProcess], agent_args: AgentArgs, short_dir: Path
) -> None:
    data = short_dir / "data"
    first = start_agent(agent_args(data))
    second = run_agent(agent_args(data))
    assert second.returncode == 1, second.stderr
    assert f"another agent is already serving {data / 'control.sock'}" in second.stderr
    assert "Traceback" not in second.stderr
    client = AgentClient(first.control)
    try:
        assert client.status().logged_in is False  # its socket was not taken over
    finally:
        client.close()


def test_a_stale_socket_of_a_crashed_agent_is_replaced_on_restart(
    start_agent: Callable[[list[str]], AgentProcess], agent_args: AgentArgs, short_dir: Path
) -> None:
    data = short_dir / "data"
    crashed = start_agent(agent_args(data))
    crashed.proc.send_signal(signal.SIGKILL)
    crashed.proc.wait(10)
    sock = data / "control.sock"
    assert stat.S_ISSOCK(sock.lstat().st_mode)  # left behind, nothing answers on it

    restarted = start_agent(agent_args(data))
    assert restarted.control_socket == sock and mode(sock) == 0o600
    assert any("removing the stale control socket" in line for line in restarted.log)
    client = AgentClient(restarted.control)
    try:
        assert client.status().logged_in is False
    finally:
        client.close()


def test_a_socket_left_by_another_program_is_replaced_too(
    start_agent: Callable[[list[str]], AgentProcess], agent_args: AgentArgs, short_dir: Path
) -> None:
    data = short_dir / "data"
    data.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
        leftover.bind(str(data / "control.sock"))  # bound, never listening, never unlinked
    agent = start_agent(agent_args(data))
    assert agent.control_socket == data / "control.sock"


def test_startup_fails_clearly_when_the_socket_path_is_too_long_or_not_a_socket(
    agent_args: AgentArgs, short_dir: Path
) -> None:
    deep = short_dir / ("d" * 100)
    result = run_agent(agent_args(deep))
    assert result.returncode == 1, result.stderr
    assert "longer than the 107 a Unix socket allows" in result.stderr
    assert "Traceback" not in result.stderr

    data = short_dir / "data"
    data.mkdir(mode=0o700)
    (data / "control.sock").write_text("not a socket")
    result = run_agent(agent_args(data))
    assert result.returncode == 1, result.stderr
    assert "a file that is not a socket is there" in result.stderr
    assert (data / "control.sock").read_text() == "not a socket"  # left alone


def test_a_relative_socket_path_and_an_explicit_unix_address_work(
    start_agent: Callable[[list[str]], AgentProcess],
    agent_args: AgentArgs,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(short_dir)  # the child starts here: relative paths are relative to it
    agent = start_agent(agent_args(Path("data"), "--control-listen", "unix:ctl.sock"))
    assert agent.control_socket == Path("ctl.sock")
    assert mode(short_dir / "ctl.sock") == 0o600
    assert not (short_dir / "data" / "control.sock").exists()
    client = AgentClient(agent.control)
    try:
        assert client.status().logged_in is False
    finally:
        client.close()


def test_control_listen_on_loopback_tcp_still_serves_tcp(
    start_agent: Callable[[list[str]], AgentProcess], agent_args: AgentArgs, short_dir: Path
) -> None:
    data = short_dir / "data"
    agent = start_agent(agent_args(data, "--control-listen", "127.0.0.1:0"))
    assert agent.control_socket is None and agent.control_port > 0
    assert any(
        f"agent serving: control port {agent.control_port}, peer port {agent.peer_port}, "
        "reachable at" in line
        for line in agent.log
    )
    assert not (data / "control.sock").exists()
    client = AgentClient(agent.control_port)
    try:
        assert client.status().logged_in is False
    finally:
        client.close()
