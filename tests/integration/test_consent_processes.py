"""Contact consent with the directory and the agents as real processes: a request not
accepted leaves nothing in the recipient's database file on either path (direct, or the
mailbox), acceptance lets what waited flow exactly once, and a block stops everything and
survives a restart of the blocker's agent."""

from __future__ import annotations

import sqlite3
import time

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import common_pb2
from tests.support.agent import AgentClient, wait_until
from tests.support.cluster import Cluster, Node

FAST = ["--keepalive", "1", "--dial-timeout", "1"]
UNDIALLABLE = [*FAST, "--advertise", "127.0.0.1:9"]  # only the mailbox can carry anything
TIMEOUT = 30.0


def rows(node: Node, name: str) -> list[str]:
    """The bodies in `name`'s own database file, read with sqlite3, not through the agent."""
    with sqlite3.connect(node.data_dir / f"{name}.db") as db:
        return [r[0] for r in db.execute("SELECT body FROM messages ORDER BY seq")]


def answer(client: AgentClient, how: str, name: str) -> None:
    getattr(client.stub, how)(apb.AgentContactAnswerRequest(username=name), timeout=10)


def strangers(cluster: Cluster, *flags: str) -> tuple[Node, AgentClient, Node, AgentClient]:
    alice, bob = cluster.node("alice", 1.0, *flags), cluster.node("bob", 1.0, *flags)
    a, b = alice.start(), bob.start()
    for client, name in ((a, "alice"), (b, "bob")):
        client.register(name)
        client.login(name)
    wait_until(lambda: a.status().mailbox_connected and b.status().mailbox_connected, TIMEOUT)
    return alice, a, bob, b


def test_processes_a_request_not_accepted_stores_nothing_then_acceptance_delivers_once(
    cluster: Cluster,
) -> None:
    alice, a, bob, b = strangers(cluster, *FAST)
    a.add_contact("bob")
    bodies = [f"hello before you know me {i}" for i in range(5)]
    for body in bodies:
        a.send("bob", body)
    time.sleep(3)  # direct dials and mailbox deposits are refused meanwhile
    assert rows(bob, "bob") == []
    assert b.status().envelopes_refused == 0  # the directory took no deposit either
    pending = [m for m in a.history("bob") if m.status == apb.MESSAGE_STATUS_PENDING]
    assert len(pending) == 5 and all("accepted" in m.status_reason for m in pending)

    answer(b, "AcceptContact", "alice")
    wait_until(lambda: len(rows(bob, "bob")) == 5, TIMEOUT, 0.1)
    assert rows(bob, "bob") == bodies
    wait_until(lambda: a.status().pending_messages == 0, TIMEOUT, 0.1)
    time.sleep(1)
    assert rows(bob, "bob") == bodies  # exactly once


def test_processes_a_block_stops_both_paths_and_survives_a_restart(cluster: Cluster) -> None:
    alice, a, bob, b = strangers(cluster, *UNDIALLABLE)
    a.add_contact("bob")
    b.add_contact("alice")  # both asked: accepted
    assert a.send("bob", "before the block", wait=TIMEOUT).status == apb.MESSAGE_STATUS_DELIVERED

    answer(b, "BlockContact", "alice")
    bob.terminate()
    b = bob.start()
    wait_until(lambda: b.status().mailbox_connected, TIMEOUT)
    for i in range(3):
        a.send("bob", f"after the block {i}")
    time.sleep(3)
    assert rows(bob, "bob") == ["before the block"]
    blocked = [c for c in b.contacts() if c.username == "alice"]
    assert [c.state for c in blocked] == [common_pb2.CONTACT_STATE_BLOCKED]
