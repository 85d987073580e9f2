"""Real `p2pchat-directory` and `p2pchat-agent` processes for the benchmarks.

Each child logs to a file in the run's work dir (nothing to drain); its readiness and ports are
read from its log. Every wait is bounded; `World.close()` kills whatever is still running (only the
processes this module started, by pid).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import agent_pb2_grpc, directory_pb2_grpc

T = TypeVar("T")
PASSWORD = "bench horse battery staple"
START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident set size of a process (VmRSS; VmHWM: its peak), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_CHILDREN: list[Child] = []  # every child started, so that none outlives the bench


def kill_all_children() -> None:
    for child in _CHILDREN:
        child.kill()


atexit.register(kill_all_children)


class Child:
    """A child process whose stderr goes to `log_path`; ready when `ready` matches a log line."""

    def __init__(self, argv: list[str], log_path: Path, ready: re.Pattern[str]) -> None:
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._offset = log_path.stat().st_size
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log, env=env
        )
        _CHILDREN.append(self)
        self.ready_at = 0.0  # time.perf_counter() when the ready line was seen
        self.match = self._wait_ready(ready)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, ready: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                text = f.read().decode("utf-8", "replace")
            found = ready.search(text)
            if found:
                self.ready_at = time.perf_counter()
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        self.kill()
        raise RuntimeError(f"{self.argv[2]} did not start; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (graceful), SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


class Directory:
    _READY = re.compile(r"directory serving on port (\d+)")

    def __init__(self, root: Path) -> None:
        self.data_dir = root / "directory"
        self.child = Child(
            [
                sys.executable,
                "-m",
                "p2pchat_directory",
                "--data-dir",
                str(self.data_dir),
                "--listen",
                "127.0.0.1:0",
                # mailbox_relay measures relaying, not the per-depositor limiter.
                "--mailbox-deposit-rate",
                "1000000",
            ],
            root / "logs" / "directory.log",
            self._READY,
        )
        self.port = int(self.child.match.group(1))

    @property
    def ca_path(self) -> Path:
        return self.data_dir / "ca.pem"

    @property
    def ca_pem(self) -> bytes:
        """The directory root (the directory channel's trust)."""
        return self.ca_path.read_bytes()

    @property
    def users_ca_pem(self) -> bytes:
        """The users CA (the trust of peer links)."""
        return (self.data_dir / "users-ca.pem").read_bytes()

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def sync_stub(self) -> tuple[grpc.Channel, directory_pb2_grpc.DirectoryServiceStub]:
        ch = grpc.secure_channel(self.target, grpc.ssl_channel_credentials(self.ca_pem))
        return ch, directory_pb2_grpc.DirectoryServiceStub(ch)


CONTROL_SOCKET = "control.sock"  # in the agent's data dir, as the agent and the CLI default to


@dataclass
class Agent:
    """One user's agent with a fixed data dir and ports, so that it can be stopped and restarted.
    Its control API is served on loopback TCP (`control_port`), or with `unix_control` on the
    Unix socket DATA_DIR/control.sock (the agent's and the CLI's default)."""

    name: str
    root: Path
    directory: Directory
    peer_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    child: Child | None = None
    unix_control: bool = False
    extra: list[str] = field(default_factory=list)  # more flags

    _READY = re.compile(r"agent serving: control (?:port \d+|socket \S+), peer port (\d+)")

    @property
    def data_dir(self) -> Path:
        return self.root / f"agent-{self.name}"

    @property
    def db_path(self) -> Path:
        return self.data_dir / f"{self.name}.db"

    @property
    def control_socket(self) -> Path | None:
        return self.data_dir / CONTROL_SOCKET if self.unix_control else None

    @property
    def control_listen(self) -> str:
        """Its --control-listen: "unix:PATH" or 127.0.0.1:PORT."""
        sock = self.control_socket
        return f"unix:{sock}" if sock is not None else f"127.0.0.1:{self.control_port}"

    @property
    def control_target(self) -> str:
        """The gRPC target of its control API (the same string: grpc dials "unix:PATH")."""
        return self.control_listen

    def start(self) -> Agent:
        assert self.child is None or not self.child.running, "already running"
        self.child = Child(
            [
                sys.executable,
                "-m",
                "p2pchat_agent",
                "--directory",
                self.directory.target,
                "--directory-ca",
                str(self.directory.ca_path),
                "--data-dir",
                str(self.data_dir),
                "--peer-listen",
                f"127.0.0.1:{self.peer_port}",
                "--control-listen",
                self.control_listen,
                "--retry-max",
                "1",
                *self.extra,
            ],
            self.root / "logs" / f"agent-{self.name}.log",
            self._READY,
        )
        return self

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def sync_client(self) -> SyncControl:
        return SyncControl(self.control_target)


class SyncControl:
    """Blocking control API client for setup steps (`target`: 127.0.0.1:PORT or unix:PATH)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)

    def register(self, name: str) -> None:
        request = apb.AgentRegisterRequest(username=name, password=PASSWORD)
        self.stub.Register(request, timeout=30)

    def login(self, name: str) -> None:
        self.stub.Login(apb.AgentLoginRequest(username=name, password=PASSWORD), timeout=30)

    def add_contact(self, name: str) -> None:
        self.stub.AddContact(apb.AgentAddContactRequest(username=name), timeout=30)

    def send(self, peer: str, body: str, wait: float | None = None) -> apb.ChatMessage:
        request = apb.SendRequest(peer=peer, body=body)
        if wait is not None:
            request.wait.FromMilliseconds(int(wait * 1000))
        return self.stub.Send(request, timeout=(wait or 0) + 30).message

    def status(self) -> apb.StatusResponse:
        return self.stub.Status(apb.StatusRequest(), timeout=30)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SyncControl:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class World:
    """A directory and agents under one work dir; `close()` stops them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.directory = Directory(root)
        self.agents: dict[str, Agent] = {}

    def agent(
        self, name: str, unix_control: bool = False, extra: Sequence[str] = ("--no-mailbox",)
    ) -> Agent:
        """An agent (not started yet). `extra`: more flags; by default --no-mailbox, so that
        the direct benchmarks measure the direct path alone (an outbox prefilled while the
        peer is away would otherwise go to the mailbox too)."""
        if name in self.agents:
            raise RuntimeError(f"agent {name} already exists in this world")
        agent = Agent(name, self.root, self.directory, unix_control=unix_control, extra=list(extra))
        self.agents[name] = agent
        return agent

    def users(
        self,
        *names: str,
        befriend: bool = True,
        unix_control: bool = False,
        extra: Sequence[str] = ("--no-mailbox",),
    ) -> list[Agent]:
        """Started agents for new users: registered, logged in, each with the others as contacts
        (`unix_control`: each serving its control API on its Unix socket, not on TCP; `extra`:
        as for `agent`)."""
        agents = [self.agent(name, unix_control, extra).start() for name in names]
        for agent in agents:
            with agent.sync_client() as c:
                c.register(agent.name)
        for agent in agents:
            with agent.sync_client() as c:
                c.login(agent.name)
                if befriend:
                    for other in names:
                        if other != agent.name:
                            c.add_contact(other)
        return agents

    def close(self) -> None:
        for agent in self.agents.values():
            agent.kill()
        self.directory.child.kill()
        kill_all_children()  # also any child of an agent object that failed half-way


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:.0f} s")
        time.sleep(interval)
