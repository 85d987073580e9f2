"""Agents as real processes under faults: SIGKILL mid-burst, restarts with pending messages, the
directory going away under an open link, a peer offline, and SIGTERM. Every check counts exactly:
nothing lost, nothing shown twice, the order the sender sent in (DESIGN.md "Delivery")."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from p2pchat.v1 import agent_pb2 as apb
from tests.support.agent import wait_until
from tests.support.cluster import (
    Cluster,
    Node,
    assert_delivered_in_order,
    close_stderr,
    conversation,
    setup_pair,
    wait_for_conversation,
    wait_no_pending,
)


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
    waiting = {apb.MESSAGE_STATUS_PENDING, apb.MESSAGE_STATUS_RELAYED}  # the mailbox may hold them
    assert len(conversation(a, "bob")[1:]) == count
    assert {m.status for m in conversation(a, "bob")[1:]} <= waiting

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
    time.sleep(1.5)  # a few failed dial attempts change nothing (the mailbox may hold them)
    assert a.status().pending_messages == count
    waiting = {apb.MESSAGE_STATUS_PENDING, apb.MESSAGE_STATUS_RELAYED}
    assert {m.status for m in conversation(a, "bob")} <= waiting

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
