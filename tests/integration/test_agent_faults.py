"""Agents as real processes under faults: SIGKILL mid-burst, restarts with pending messages, the
directory going away under an open link, a peer offline, and SIGTERM. Every check counts exactly:
nothing lost, nothing shown twice, the order the sender sent in (DESIGN.md "Delivery")."""

from __future__ import annotations

import signal
import threading
import time
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

    def start_directory(self) -> None:
        self.directory = DirectoryProcess(
            [
                "--data-dir",
                str(self.directory_dir),
                "--listen",
                f"127.0.0.1:{self.directory_port}",
            ]
        )
        assert self.directory.port == self.directory_port
        self.directory_logs.append(self.directory.log)

    def node(self, name: str, grace_period: float | None = 1.0) -> Node:
        node = Node(
            name,
            self.root / f"agent-{name}",
            self.directory_port,
            self.directory_dir / "ca.pem",
            grace_period=grace_period,
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


def test_receiver_killed_mid_burst_of_1000_then_restarted_gets_each_exactly_once_in_order(
    cluster: Cluster,
) -> None:
    total, kill_after = 1000, 200
    alice, a, bob, b = setup_pair(cluster)
    bodies = [f"burst {i:04d}" for i in range(total)]
    sent: list[apb.ChatMessage] = []
    errors: list[BaseException] = []
    sender = alice.client()  # its own channel: the burst runs in another thread

    def burst() -> None:
        try:
            for body in bodies:
                sent.append(sender.send("bob", body))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=burst, name="burst", daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(sent) >= kill_after or errors, 30, 0.005)
        assert not errors, errors
        assert a.status().linked_peers == ["bob"], "no link: nothing would be in flight"
        bob.kill()
        sent_at_kill = len(sent)
        # Sends go on while bob is dead: they commit as pending and wait.
        wait_until(lambda: len(sent) >= sent_at_kill + 150 or errors, 30, 0.01)
        assert not errors, errors
        sent_now = len(sent)
        # Whatever alice sent after bob died cannot have been delivered yet.
        assert a.status().pending_messages >= sent_now - sent_at_kill - 1
        b = bob.start()  # same data dir and ports, stored session: no login
        assert b.status().logged_in
    finally:
        thread.join(60)
    assert not thread.is_alive(), "the burst did not finish"
    assert not errors, errors
    assert sent_at_kill < total, "bob was killed after the burst: nothing was in flight"
    assert [m.body for m in sent] == bodies
    assert_delivered_in_order(a, b, "alice", "bob", bodies, sent)
    assert a.status().pending_messages == 0
    assert len(conversation(a, "bob")) == total


# -- 2. the sender restarted with messages pending ---------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_sender_restarted_with_pending_resumes_without_login_and_delivers_all_in_order(
    cluster: Cluster, sig: signal.Signals
) -> None:
    count = 50
    alice, a, bob, b = setup_pair(cluster)
    first = a.send("bob", "before the outage", wait=10)
    assert first.status == apb.MESSAGE_STATUS_DELIVERED
    assert bob.terminate() == 0
    bodies = [f"pending {i:02d}" for i in range(count)]
    sent = [a.send("bob", body) for body in bodies]
    assert [m.status for m in sent] == [apb.MESSAGE_STATUS_PENDING] * count
    assert a.status().pending_messages == count

    alice.stop(sig)
    a = alice.start()  # no login: the stored session is resumed
    status = a.status()
    assert status.logged_in and status.username == "alice"
    assert status.pending_messages == count
    assert [m.status for m in conversation(a, "bob")[1:]] == [apb.MESSAGE_STATUS_PENDING] * count

    b = bob.start()
    assert_delivered_in_order(a, b, "alice", "bob", [first.body, *bodies], [first, *sent])
    assert a.status().pending_messages == 0
    assert "resumed the session of alice" in "".join(alice.log)


# -- 3. the directory down under an open link ---------------------------------------------------


def test_open_link_keeps_chatting_both_ways_while_directory_is_down_and_after_it_returns(
    cluster: Cluster,
) -> None:
    each_way = 20
    alice, a, bob, b = setup_pair(cluster)
    first = a.send("bob", "link up", wait=10)
    assert first.status == apb.MESSAGE_STATUS_DELIVERED
    wait_until(lambda: a.status().linked_peers == ["bob"] and b.status().linked_peers == ["alice"])

    assert cluster.directory is not None
    assert cluster.directory.terminate() == 0
    close_stderr(cluster.directory)
    wait_until(lambda: not a.status().directory_reachable and not b.status().directory_reachable)

    expected: list[apb.ChatMessage] = [first]
    for i in range(each_way):
        expected.append(a.send("bob", f"alice {i:02d} while the directory is down"))
        expected.append(b.send("alice", f"bob {i:02d} while the directory is down"))
    wait_no_pending(a)
    wait_no_pending(b)
    for client, peer in ((a, "bob"), (b, "alice")):
        got = wait_for_conversation(client, peer, 1 + 2 * each_way)
        assert sorted(m.id for m in got) == sorted(m.id for m in expected)
        assert [m.body for m in got if m.sender == "alice"] == [
            m.body for m in expected if m.sender == "alice"
        ]
        assert [m.body for m in got if m.sender == "bob"] == [
            m.body for m in expected if m.sender == "bob"
        ]
        assert all(
            m.status in (apb.MESSAGE_STATUS_DELIVERED, apb.MESSAGE_STATUS_RECEIVED) for m in got
        )
    assert a.status().linked_peers == ["bob"] and b.status().linked_peers == ["alice"]

    cluster.start_directory()  # same data dir and port: sessions and contacts are still there
    wait_until(lambda: a.status().directory_reachable and b.status().directory_reachable)
    for i in range(each_way):
        expected.append(a.send("bob", f"alice {i:02d} after the directory returned"))
        expected.append(b.send("alice", f"bob {i:02d} after the directory returned"))
    wait_no_pending(a)
    wait_no_pending(b)
    for client, peer in ((a, "bob"), (b, "alice")):
        got = wait_for_conversation(client, peer, 1 + 4 * each_way)
        assert sorted(m.id for m in got) == sorted(m.id for m in expected)
        for name in ("alice", "bob"):
            assert [m.body for m in got if m.sender == name] == [
                m.body for m in expected if m.sender == name
            ]
    status = a.status()
    assert status.logged_in and status.directory_reachable and status.pending_messages == 0


# -- 4. the receiver offline ---------------------------------------------------------------------


def test_messages_to_an_offline_peer_stay_pending_then_arrive_once_in_order_when_it_returns(
    cluster: Cluster,
) -> None:
    count = 10
    alice, a, bob, b = setup_pair(cluster)
    assert bob.terminate() == 0  # never linked with alice: first contact happens after
    bodies = [f"while you were out {i}" for i in range(count)]
    sent = [a.send("bob", body) for body in bodies]
    assert [m.status for m in sent] == [apb.MESSAGE_STATUS_PENDING] * count
    status = a.status()
    assert status.pending_messages == count and list(status.linked_peers) == []
    time.sleep(1.5)  # a few failed dial attempts change nothing
    assert a.status().pending_messages == count
    assert [m.status for m in conversation(a, "bob")] == [apb.MESSAGE_STATUS_PENDING] * count

    b = bob.start()
    assert_delivered_in_order(a, b, "alice", "bob", bodies, sent)
    assert a.status().pending_messages == 0
    assert b.status().pending_messages == 0


# -- 5. SIGTERM ----------------------------------------------------------------------------------


def linked_pair(cluster: Cluster) -> tuple[Node, Node]:
    """alice and bob (default grace period) with a link open, dialled by alice."""
    alice, a, bob, b = setup_pair(cluster, grace_period=None)
    assert a.send("bob", "hello", wait=10).status == apb.MESSAGE_STATUS_DELIVERED
    assert b.send("alice", "hi", wait=10).status == apb.MESSAGE_STATUS_DELIVERED
    assert a.status().linked_peers == ["bob"] and b.status().linked_peers == ["alice"]
    return alice, bob


def timed_sigterm(node: Node) -> tuple[int, float, str]:
    started = time.monotonic()
    code = node.terminate(timeout=15)
    return code, time.monotonic() - started, "".join(node.log)


@pytest.mark.parametrize("state", ["logged-out", "link-dialler", "link-acceptor"])
def test_sigterm_exits_zero_within_10_s_and_logs_agent_stopped(
    cluster: Cluster, state: str
) -> None:
    if state == "logged-out":
        victim = cluster.node("carol", grace_period=None)
        assert not victim.start().status().logged_in
    else:
        alice, bob = linked_pair(cluster)
        victim = alice if state == "link-dialler" else bob
    code, took, log = timed_sigterm(victim)
    assert code == 0, log
    assert took < 10, f"SIGTERM took {took:.1f} s"
    assert "agent stopped" in log
    assert "Traceback" not in log


def test_sigterm_with_an_accepted_link_open_stops_at_once_not_after_the_grace_period(
    cluster: Cluster,
) -> None:
    alice, bob = linked_pair(cluster)  # bob accepted the link; default grace period: 5 s
    code, took, log = timed_sigterm(bob)
    assert code == 0 and "agent stopped" in log, log
    assert took < 2.5, f"SIGTERM took {took:.1f} s with nothing left to do"
    assert "Aborting method" not in log and "Traceback" not in log
