"""A directory process and agent processes around it, with fixed ports and data dirs so that
each can be killed and started again: what the fault and mailbox tests run on."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p2pchat.v1 import agent_pb2 as apb
from tests.support.agent import AgentClient, AgentProcess, wait_until
from tests.support.directory import DirectoryProcess
from tests.support.process import free_port

DELIVERY_TIMEOUT = 30.0


def close_stderr(proc: AgentProcess | DirectoryProcess) -> None:
    """Closes the pipe of an exited child once its log has been read to the end."""
    if proc.proc.poll() is not None and proc.proc.stderr is not None:
        proc._drain.join(5)
        proc.proc.stderr.close()


@dataclass
class Node:
    """One user's agent: fixed data dir and ports, so that it can be killed and started again."""

    name: str
    data_dir: Path
    directory_port: int
    directory_ca: Path
    peer_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    grace_period: float | None = 1.0  # None: the agent's default
    extra: list[str] = field(default_factory=list)  # more flags
    proc: AgentProcess | None = None
    clients: list[AgentClient] = field(default_factory=list)
    logs: list[list[str]] = field(default_factory=list)

    def args(self) -> list[str]:
        return [
            "--directory",
            f"localhost:{self.directory_port}",
            "--directory-ca",
            str(self.directory_ca),
            "--data-dir",
            str(self.data_dir),
            "--peer-listen",
            f"127.0.0.1:{self.peer_port}",
            "--control-listen",
            f"127.0.0.1:{self.control_port}",
            "--retry-max",
            "1",
            "--heartbeat-interval",
            "1",
            *(["--grace-period", str(self.grace_period)] if self.grace_period else []),
            *self.extra,
        ]

    def start(self) -> AgentClient:
        assert self.proc is None or self.proc.proc.poll() is not None, "already running"
        self.proc = AgentProcess(self.args())
        self.logs.append(self.proc.log)
        assert (self.proc.control_port, self.proc.peer_port) == (
            self.control_port,
            self.peer_port,
        )
        return self.client()

    def client(self) -> AgentClient:
        client = AgentClient(self.control_port)
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()

    def kill(self) -> None:
        """SIGKILL: no chance to close anything."""
        self.close_clients()
        if self.proc is not None:
            self.proc.kill()
            close_stderr(self.proc)

    def terminate(self, timeout: float = 15) -> int:
        self.close_clients()
        assert self.proc is not None
        try:
            return self.proc.terminate(timeout)
        finally:
            close_stderr(self.proc)

    def stop(self, sig: signal.Signals) -> None:
        if sig == signal.SIGKILL:
            self.kill()
        else:
            assert self.terminate() == 0, "".join(self.log)

    @property
    def log(self) -> list[str]:
        return self.proc.log if self.proc is not None else []


class Cluster:
    """A directory process on a fixed port and agent processes around it; `close` kills them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.directory_dir = root / "directory"
        self.directory_port = free_port()
        self.directory: DirectoryProcess | None = None
        self.nodes: list[Node] = []
        self.directory_logs: list[list[str]] = []

    def start_directory(self, *extra: str) -> None:
        self.directory = DirectoryProcess(
            [
                "--data-dir",
                str(self.directory_dir),
                "--listen",
                f"127.0.0.1:{self.directory_port}",
                *extra,
            ]
        )
        assert self.directory.port == self.directory_port
        self.directory_logs.append(self.directory.log)

    def kill_directory(self) -> None:
        """SIGKILL: what it committed stays, nothing else."""
        if self.directory is not None:
            self.directory.kill()
            close_stderr(self.directory)

    def _port(self) -> int:
        """A free port no process of this cluster was given yet: free_port() may hand the
        same one out twice (it is free until someone binds it), and a TLS peer port that is
        also a control port makes a test fail far from the cause."""
        taken = {self.directory_port} | {
            p for n in self.nodes for p in (n.peer_port, n.control_port)
        }
        while (port := free_port()) in taken:
            pass
        return port

    def node(self, name: str, grace_period: float | None = 1.0, *extra: str) -> Node:
        peer_port = self._port()
        control_port = self._port()
        while control_port == peer_port:
            control_port = self._port()
        node = Node(
            name,
            self.root / f"agent-{name}",
            self.directory_port,
            self.directory_dir / "ca.pem",
            peer_port=peer_port,
            control_port=control_port,
            grace_period=grace_period,
            extra=list(extra),
        )
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        if self.directory is not None:
            self.directory.kill()
            close_stderr(self.directory)

    def dump_logs(self) -> None:
        """Printed at teardown; pytest shows it only when the test failed."""
        for i, log in enumerate(self.directory_logs):
            print(f"===== directory run {i} =====\n{''.join(log)}")
        for node in self.nodes:
            for i, log in enumerate(node.logs):
                print(f"===== {node.name} run {i} =====\n{''.join(log)}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.start_directory()
        yield c
    finally:
        c.close()
        c.dump_logs()


def setup_pair(
    cluster: Cluster, grace_period: float | None = 1.0
) -> tuple[Node, AgentClient, Node, AgentClient]:
    """alice and bob running, registered, logged in, each in the other's contacts."""
    alice, bob = cluster.node("alice", grace_period), cluster.node("bob", grace_period)
    with ThreadPoolExecutor(2) as pool:  # each start takes a second of imports: overlap them
        a, b = pool.map(Node.start, (alice, bob))
    a.register("alice")
    b.register("bob")
    for client, name, other in ((a, "alice", "bob"), (b, "bob", "alice")):
        client.login(name)
        client.add_contact(other)
    return alice, a, bob, b


def conversation(client: AgentClient, peer: str) -> list[apb.ChatMessage]:
    """The whole conversation with `peer`, oldest first (paged: History returns at most 1000)."""
    messages: list[apb.ChatMessage] = []
    before = ""
    while True:
        page = client.stub.History(apb.HistoryRequest(peer=peer, limit=1000, before_id=before))
        messages[:0] = page.messages
        if not page.has_more:
            return messages
        before = page.messages[0].id


def wait_for_conversation(client: AgentClient, peer: str, count: int) -> list[apb.ChatMessage]:
    """Waits until the conversation has `count` messages; fails on more (a duplicate)."""

    assert count > 0

    def ready() -> list[apb.ChatMessage]:
        got = conversation(client, peer)
        assert len(got) <= count, f"{len(got)} messages with {peer}, expected {count}"
        return got if len(got) == count else []

    result: list[apb.ChatMessage] = wait_until(ready, DELIVERY_TIMEOUT, 0.2)
    return result


def wait_no_pending(client: AgentClient) -> None:
    wait_until(lambda: client.status().pending_messages == 0, DELIVERY_TIMEOUT, 0.1)


def assert_delivered_in_order(
    sender: AgentClient,
    receiver: AgentClient,
    sender_name: str,
    receiver_name: str,
    bodies: list[str],
    sent: list[apb.ChatMessage],
) -> None:
    """Both sides hold exactly `bodies` (each once, in this order, with the sender's ids); the
    sender shows every one delivered."""
    received = wait_for_conversation(receiver, sender_name, len(bodies))
    assert [m.body for m in received] == bodies
    assert [m.id for m in received] == [m.id for m in sent]
    assert len({m.id for m in received}) == len(bodies)
    assert all(m.direction == apb.DIRECTION_INCOMING for m in received)
    assert all(m.status == apb.MESSAGE_STATUS_RECEIVED for m in received)
    wait_no_pending(sender)
    mine = conversation(sender, receiver_name)
    assert [m.body for m in mine] == bodies
    assert [m.status for m in mine] == [apb.MESSAGE_STATUS_DELIVERED] * len(bodies)


# -- 1. SIGKILL of the receiver during a burst ---------------------------------------------------
