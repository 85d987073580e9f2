"""Agents reach two directory replicas through one name, round-robin, and carry on on one when
the other is killed.

`localhost` is the one name: gRPC's resolver (c-ares) gives it both loopback addresses, 127.0.0.1
and ::1 (RFC 6761), whatever /etc/hosts lists. Replica A listens on 127.0.0.1:P and replica B on
[::1]:P, with the same port P; they share one PostgreSQL database and one data dir (one CA, whose
server certificates name localhost). The agents are real processes given `--directory
localhost:P`, as every process-level test does. Which replica took a call is read from the
replicas' logs ("registered user NAME").
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from p2pchat.v1 import agent_pb2 as apb
from p2pchat_agent.directory_client import directory_target
from tests.support.agent import AgentClient, wait_until
from tests.support.cli import CLI, cli_env
from tests.support.cluster import Node, close_stderr, conversation
from tests.support.directory import DirectoryProcess
from tests.support.postgres import PostgresServer
from tests.support.process import free_port

pytestmark = pytest.mark.postgres

HOSTS = {"a": "127.0.0.1", "b": "[::1]"}
# No direct link between the agents (they advertise the discard port, where nothing listens):
# every message goes through the mailbox, on both agents' Collect streams.
UNDIALLABLE = ["--keepalive", "1", "--dial-timeout", "1", "--advertise", "127.0.0.1:9"]
TIMEOUT = 30.0
REGISTERED = re.compile(r"registered user (\S+)")


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def port_free_on_both() -> int:
    """A port free on 127.0.0.1 (free_port) and on ::1 too."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("::1", port))
            except OSError:
                continue
        return port


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children inherit os.environ: neither a P2PCHAT_* variable of the developer's shell nor a
    GRPC_DNS_RESOLVER=native (getaddrinfo, which gives only what /etc/hosts lists) may leak."""
    for name in [n for n in os.environ if n.startswith("P2PCHAT_")]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("GRPC_DNS_RESOLVER", raising=False)


@dataclass
class Replicas:
    """Directory replicas A (127.0.0.1:port) and B ([::1]:port) on one database and data dir."""

    url: str
    data_dir: Path
    port: int = field(default_factory=port_free_on_both)
    running: dict[str, DirectoryProcess] = field(default_factory=dict)
    logs: dict[str, list[list[str]]] = field(default_factory=dict)  # every run's, by replica
    nodes: list[Node] = field(default_factory=list)  # the agents on them
    _names: Iterator[int] = field(default_factory=itertools.count)

    def start(self, replica: str) -> None:
        proc = DirectoryProcess(
            [
                "--listen",  # after DirectoryProcess's own --listen: this one counts
                f"{HOSTS[replica]}:{self.port}",
                "--data-dir",
                str(self.data_dir),
                "--users-db",
                self.url,
                "--contacts-db",
                self.url,
                "--presence-ttl",
                "3",
            ]
        )
        assert proc.port == self.port
        self.running[replica] = proc
        self.logs.setdefault(replica, []).append(proc.log)

    def kill(self, replica: str) -> None:
        """SIGKILL: no goodbye to the connections it holds."""
        proc = self.running.pop(replica)
        proc.kill()
        close_stderr(proc)

    def registered(self, replica: str) -> list[str]:
        """The users registered through `replica`, in every run of it."""
        lines = [line for log in self.logs.get(replica, []) for line in list(log)]
        return [m[1] for line in lines if (m := REGISTERED.search(line))]

    def agent(self, root: Path, name: str, *extra: str) -> tuple[Node, AgentClient]:
        """Starts the agent `name` with `--directory localhost:PORT`."""
        taken = {self.port} | {p for n in self.nodes for p in (n.peer_port, n.control_port)}
        ports: list[int] = []
        while len(ports) < 2:
            if (port := free_port()) not in taken:
                taken.add(port)
                ports.append(port)
        node = Node(
            name,
            root / f"agent-{name}",
            self.port,
            self.data_dir / "ca.pem",
            peer_port=ports[0],
            control_port=ports[1],
            extra=list(extra),
        )
        self.nodes.append(node)
        return node, node.start()

    def register_through(self, client: AgentClient, count: int) -> list[str]:
        """Registers `count` new users through the agent; waits until the replicas logged them
        all; returns their names."""
        names = [f"user{next(self._names)}" for _ in range(count)]
        for name in names:
            client.register(name)
        wait_until(lambda: set(names) <= {*self.registered("a"), *self.registered("b")}, TIMEOUT)
        return names

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        for replica in list(self.running):
            self.kill(replica)

    def dump_logs(self) -> None:
        """Printed at teardown; pytest shows it only when the test failed."""
        for replica, runs in self.logs.items():
            for i, log in enumerate(runs):
                print(f"===== replica {replica} run {i} =====\n{''.join(log)}")
        for node in self.nodes:
            for i, log in enumerate(node.logs):
                print(f"===== {node.name} run {i} =====\n{''.join(log)}")


@pytest.fixture
def replicas(pg_server: PostgresServer, tmp_path: Path) -> Iterator[Replicas]:
    if not ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    with pg_server.database() as url:
        r = Replicas(url, tmp_path / "directory")
        try:
            r.start("a")  # one after the other: the second loads the CA the first made
            r.start("b")
            yield r
        finally:
            r.close()
            r.dump_logs()


def send_and_wait(
    sender: AgentClient, sender_name: str, receiver: AgentClient, receiver_name: str, body: str
) -> None:
    """`sender` sends `body`: it reaches the receiver and comes back delivered."""
    sent = sender.send(receiver_name, body)
    wait_until(lambda: body in [m.body for m in conversation(receiver, sender_name)], TIMEOUT, 0.1)
    wait_until(
        lambda: (
            [m.status for m in conversation(sender, receiver_name) if m.id == sent.id]
            == [apb.MESSAGE_STATUS_DELIVERED]
        ),
        TIMEOUT,
        0.1,
    )


def cli_contacts(tmp_path: Path, node: Node) -> list[str]:
    """`p2pchat contacts --json` against the node's agent: the usernames listed."""
    result = subprocess.run(
        [*CLI, "--agent", f"127.0.0.1:{node.control_port}", "contacts", "--json"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [c["username"] for c in json.loads(result.stdout)]


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("localhost:50051", "dns:///localhost:50051"),  # every address of the name
        ("directory:50051", "dns:///directory:50051"),
        ("127.0.0.1:50051", "127.0.0.1:50051"),  # one address: nothing to resolve
        ("[::1]:50051", "[::1]:50051"),
        ("unix:/run/directory.sock", "unix:/run/directory.sock"),  # a gRPC target already
        ("dns://127.0.0.1:53/directory:50051", "dns://127.0.0.1:53/directory:50051"),
    ],
)
def test_the_channel_target_resolves_a_host_name_and_leaves_addresses_and_uris_alone(
    address: str, target: str
) -> None:
    assert directory_target(address) == target


def test_one_agent_channel_spreads_calls_over_every_replica_its_name_resolves_to(
    replicas: Replicas, tmp_path: Path
) -> None:
    _, client = replicas.agent(tmp_path, "alice")
    names = replicas.register_through(client, 12)
    on_a, on_b = replicas.registered("a"), replicas.registered("b")
    assert sorted(on_a + on_b) == sorted(names)
    # round_robin over the ready connections: once both are up, the calls alternate.
    assert len(on_a) >= 4 and len(on_b) >= 4, (on_a, on_b)


def test_a_replica_killed_under_the_agents_leaves_their_sessions_and_mailbox_streams_working(
    replicas: Replicas, tmp_path: Path
) -> None:
    alice_node, alice = replicas.agent(tmp_path, "alice", *UNDIALLABLE)
    bob_node, bob = replicas.agent(tmp_path, "bob", *UNDIALLABLE)
    alice.register("alice")
    bob.register("bob")
    for client, name, other in ((alice, "alice", "bob"), (bob, "bob", "alice")):
        client.login(name)
        client.add_contact(other)

    def collecting() -> bool:
        return alice.status().mailbox_connected and bob.status().mailbox_connected

    wait_until(collecting, TIMEOUT)
    send_and_wait(alice, "alice", bob, "bob", "before")
    expected = [(apb.DIRECTION_OUTGOING, "before")]

    # Each Collect stream is on A or on B: killing each in turn moves every stream once.
    for dead, survivor in (("a", "b"), ("b", "a")):
        replicas.kill(dead)
        # Unary calls go to the survivor at once: the directory's contact list through the
        # control API and through the CLI, on the session of before (no new login).
        assert [c.username for c in alice.contacts()] == ["bob"]
        assert cli_contacts(tmp_path, bob_node) == ["alice"]
        for client, name in ((alice, "alice"), (bob, "bob")):
            status = client.status()
            assert status.logged_in and status.username == name
        # The mailbox path both ways: deposits through the survivor reach the Collect streams
        # open on it (one that was on the dead replica opened again there); receipts come back.
        wait_until(collecting, TIMEOUT)
        send_and_wait(alice, "alice", bob, "bob", f"{dead} killed: to bob")
        send_and_wait(bob, "bob", alice, "alice", f"{dead} killed: to alice")
        expected += [
            (apb.DIRECTION_OUTGOING, f"{dead} killed: to bob"),
            (apb.DIRECTION_INCOMING, f"{dead} killed: to alice"),
        ]
        before = len(replicas.registered(survivor))
        replicas.register_through(alice, 3)
        assert len(replicas.registered(survivor)) == before + 3  # it took every call

        # The dead replica comes back on its address: each agent's calls reach it again (its
        # reconnect backoff, up to 10 s, has passed) before the next loop kills the other one.
        replicas.start(dead)
        for client in (alice, bob):
            count = len(replicas.registered(dead))

            def reached_again(
                replica: str = dead, count: int = count, client: AgentClient = client
            ) -> bool:
                replicas.register_through(client, 1)
                return len(replicas.registered(replica)) > count

            wait_until(reached_again, TIMEOUT, 0.5)

    for client in (alice, bob):
        assert client.status().envelopes_refused == 0
    assert [(m.direction, m.body) for m in conversation(alice, "bob")] == expected
    flipped = {apb.DIRECTION_OUTGOING: apb.DIRECTION_INCOMING}
    flipped[apb.DIRECTION_INCOMING] = apb.DIRECTION_OUTGOING
    assert [(m.direction, m.body) for m in conversation(bob, "alice")] == [
        (flipped[d], body) for d, body in expected
    ]
    assert alice_node.proc is not None and alice_node.proc.proc.poll() is None
