"""Agents exchanging messages directly over mutual TLS, driven through their control API."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

from p2pchat.v1 import agent_pb2 as apb
from tests.support.agent import AgentClient, InProcessAgent, logged_in, wait_until


def _contacts(
    make_agent: Callable[..., InProcessAgent], *names: str, **settings: Any
) -> list[tuple[InProcessAgent, AgentClient]]:
    """Agents (with their clients) for `names`, logged in, each the others' contact, with
    `settings` overridden; for tests that look into the agents' files or restart them."""
    agents = [make_agent(name, **settings) for name in names]
    clients = [agent.client() for agent in agents]
    for client, name in zip(clients, names, strict=True):
        client.register(name)
        client.login(name)
    for client, name in zip(clients, names, strict=True):
        for other in names:
            if other != name:
                client.add_contact(other)
    return list(zip(agents, clients, strict=True))


def test_alice_and_bob_exchange_messages_both_ways(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    sent = alice.send("bob", "hello bob", wait=10)
    assert sent.status == apb.MESSAGE_STATUS_DELIVERED
    reply = bob.send("alice", "hi alice", wait=10)
    assert reply.status == apb.MESSAGE_STATUS_DELIVERED
    wait_until(lambda: len(bob.history("alice")) == 2)
    for client, peer in ((alice, "bob"), (bob, "alice")):
        assert [m.body for m in client.history(peer)] == ["hello bob", "hi alice"]
    assert alice.status().linked_peers == ["bob"]


def test_history_pages_and_searches_the_conversation(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    for i in range(30):
        alice.send("bob", f"message {i} {'apple' if i % 10 == 0 else 'pear'}")
    wait_until(lambda: len(bob.history("alice")) == 30)
    page = alice.stub.History(apb.HistoryRequest(peer="bob", limit=10))
    assert [m.body.split()[1] for m in page.messages] == [str(i) for i in range(20, 30)]
    assert page.has_more
    older = alice.stub.History(
        apb.HistoryRequest(peer="bob", limit=10, before_id=page.messages[0].id)
    )
    assert [m.body.split()[1] for m in older.messages] == [str(i) for i in range(10, 20)]
    found = bob.history("alice", query="apple")
    assert [m.body for m in found] == ["message 0 apple", "message 10 apple", "message 20 apple"]
    assert all(m.direction == apb.DIRECTION_INCOMING for m in found)
    assert bob.history("alice", query='"unbalanced AND (') == []


def test_both_user_databases_hold_the_same_conversation(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    (a, alice), (b, bob) = _contacts(make_agent, "alice", "bob")
    for i in range(5):
        alice.send("bob", f"a{i}")
        bob.send("alice", f"b{i}")
    wait_until(lambda: alice.status().pending_messages == 0 and bob.status().pending_messages == 0)
    wait_until(lambda: len(alice.history("bob")) == 10 and len(bob.history("alice")) == 10)

    def rows(path: str) -> set[tuple[str, str, str, str]]:
        # Each message in the one conversation both databases name alike (schema v3).
        with sqlite3.connect(path) as db:
            return set(
                db.execute(
                    "SELECT m.id, m.sender, c.key, m.body FROM messages m "
                    "JOIN conversations c ON c.id = m.conversation"
                )
            )

    alice_rows = rows(str(a.settings.data_dir / "alice.db"))
    assert alice_rows == rows(str(b.settings.data_dir / "bob.db"))
    assert len(alice_rows) == 10
    assert {key for _, _, key, _ in alice_rows} == {"direct:alice:bob"}


def test_the_pin_and_the_delivery_state_name_the_device_the_link_reached(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    from cryptography import x509

    from p2pchat_common.tls import user_identity

    (a, alice), (b, bob) = _contacts(make_agent, "alice", "bob")
    alice.send("bob", "to your device")
    wait_until(lambda: alice.status().pending_messages == 0)
    cert = x509.load_pem_x509_certificate((b.settings.data_dir / "bob.crt").read_bytes())
    named = user_identity(cert)
    assert named is not None and named[0] == "bob"
    bobs_device = named[1]

    with sqlite3.connect(a.settings.data_dir / "alice.db") as db:
        pins = db.execute("SELECT peer, device, substr(sha256, 1, 16) FROM peer_keys").fetchall()
        deliveries = db.execute(
            "SELECT recipient, device, status, delivered_to FROM deliveries"
        ).fetchall()
    db.close()
    assert pins == [("bob", bobs_device, bobs_device)]
    assert deliveries == [("bob", "", "delivered", bobs_device)]


def test_bad_sends_are_refused_with_clear_errors(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    import grpc

    from tests.support.directory import expect_error

    alice, bob = logged_in(make_agent, "alice", "bob")
    bob.register("carol")
    code = grpc.StatusCode
    msg = expect_error(code.INVALID_ARGUMENT, alice.stub.Send, apb.SendRequest(peer="bob"))
    assert "empty" in msg
    msg = expect_error(
        code.INVALID_ARGUMENT,
        alice.stub.Send,
        apb.SendRequest(peer="bob", body="x" * (16 * 1024 + 1)),
    )
    assert "16384" in msg
    assert alice.send("bob", "é" * (8 * 1024)).id  # exactly 16 KiB of UTF-8 is fine
    msg = expect_error(
        code.FAILED_PRECONDITION, alice.stub.Send, apb.SendRequest(peer="carol", body="hi")
    )
    assert "contacts" in msg
    expect_error(code.NOT_FOUND, alice.stub.Send, apb.SendRequest(peer="nobody", body="hi"))
    expect_error(code.INVALID_ARGUMENT, alice.stub.Send, apb.SendRequest(peer="alice", body="hi"))
    expect_error(code.INVALID_ARGUMENT, alice.stub.Send, apb.SendRequest(peer="b@d", body="hi"))
    assert len(alice.history("bob")) == 1  # nothing half-written


def test_logged_out_agent_refuses_user_calls(make_agent: Callable[[str], InProcessAgent]) -> None:
    import grpc

    from tests.support.directory import expect_error

    client = make_agent("alice").client()
    fresh = client.status()
    assert not fresh.logged_in
    assert fresh.directory_reachable  # probed, even before any call to the directory
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        client.stub.Send,
        apb.SendRequest(peer="bob", body="hi"),
    )
    client.register("alice")
    expect_error(grpc.StatusCode.UNAUTHENTICATED, client.login, "alice", "wrong password!")
    client.login("alice")
    status = client.status()
    assert status.logged_in and status.username == "alice" and status.directory_reachable
    client.logout()
    assert not client.status().logged_in


def test_status_says_when_the_directory_is_unreachable(
    make_agent: Callable[..., InProcessAgent],
) -> None:
    from tests.support.process import free_port

    client = make_agent("alice", directory=f"localhost:{free_port()}").client()
    status = client.status()
    assert not status.logged_in and not status.directory_reachable


def test_received_messages_are_indexed_in_the_background_and_found_by_a_search_at_once(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    (a, alice), (b, bob) = _contacts(make_agent, "alice", "bob")
    db = str(b.settings.data_dir / "bob.db")

    def index_lag() -> int:
        with sqlite3.connect(db) as conn:
            (lag,) = conn.execute(
                "SELECT (SELECT max(seq) FROM messages) - indexed_seq FROM fts_progress"
            ).fetchone()
        conn.close()
        return int(lag)

    for i in range(40):
        alice.send("bob", f"walrus {i}")
    wait_until(lambda: len(bob.history("alice")) == 40)
    # A search right away finds all of them, whether the indexer has been by or not...
    assert len(bob.history("alice", query="walrus")) == 40
    alice.send("bob", "narwhal", wait=10)
    # ...and without any search the background indexer catches up within a few rounds.
    wait_until(lambda: index_lag() == 0, timeout=10)
    assert [m.body for m in bob.history("alice", query="narwhal")] == ["narwhal"]


def test_a_backlog_of_large_messages_reaches_the_agent_whose_dial_holds_the_link(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    (a, alice), (_b, bob) = _contacts(make_agent, "alice", "bob")
    alice.send("bob", "hello", wait=10)  # keys pinned both ways
    a.stop()
    body = "x" * 16_000  # the largest default body, nearly: 300 of them fill one 4.8 MB frame
    for i in range(300):
        bob.send("alice", f"{i:03d} {body}")
    a.start()
    alice = a.client()
    # alice keeps sending, so her dial (the smaller name's) is the link that stays: bob's backlog
    # travels on it as responses, to the side that dialled.
    deadline = time.monotonic() + 30
    while bob.status().pending_messages and time.monotonic() < deadline:
        alice.send("bob", "still here")
        time.sleep(0.2)
    assert bob.status().pending_messages == 0
    # 300 x 16 KB is more than a History response may hold (4 MiB): it comes in pages, newest
    # first, each trimmed to fit and saying there is more.
    pages: list[list[apb.ChatMessage]] = []
    before = ""
    while True:
        page = alice.stub.History(apb.HistoryRequest(peer="bob", limit=1000, before_id=before))
        pages.insert(0, list(page.messages))
        if not page.has_more:
            break
        before = page.messages[0].id
    assert len(pages) > 1 and all(len(p) < 1000 for p in pages)
    received = [m for p in pages for m in p if m.direction == apb.DIRECTION_INCOMING]
    assert [m.body[:3] for m in received] == [f"{i:03d}" for i in range(300)]


def test_messages_of_the_largest_body_limit_travel_on_the_link_the_receiver_dialled(
    make_agent: Callable[..., InProcessAgent],
) -> None:
    limit = 4 * 1024 * 1024
    (a, alice), (b, bob) = _contacts(make_agent, "alice", "bob", body_limit=limit)
    alice.send("bob", "hello", wait=10)
    a.stop()
    for letter in "vwxyz":  # 4 MiB of body each: 20 MiB pending, more than one gRPC message holds
        bob.send("alice", letter * limit)
    a.start()
    alice = a.client()
    deadline = time.monotonic() + 30
    while bob.status().pending_messages and time.monotonic() < deadline:
        alice.send("bob", "still here")  # alice's dial is the link that stays
        time.sleep(0.2)
    assert bob.status().pending_messages == 0
    query = "SELECT substr(body, 1, 1), length(body) FROM messages WHERE sender = 'bob'"
    with sqlite3.connect(a.settings.data_dir / "alice.db") as db:
        received = db.execute(query + " ORDER BY seq").fetchall()
    db.close()
    assert received == [(letter, limit) for letter in "vwxyz"]
