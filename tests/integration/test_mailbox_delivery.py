"""Delivery through the directory's sealed mailbox, with a real directory and real agents as
processes: agents never online together, agents that cannot dial each other, a peer frozen
under an open link, envelopes forged, tampered, truncated, replayed or re-targeted, a full
mailbox, expired envelopes and a directory restarted with envelopes held. Every check counts
exactly: nothing lost, nothing stored twice, the order the sender sent in."""

from __future__ import annotations

import json
import signal
import sqlite3
import statistics
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import mailbox_pb2 as mpb
from p2pchat.v1 import mailbox_pb2_grpc
from p2pchat_agent.identity import load_certificate
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.mailbox import mailbox_key_path
from p2pchat_agent.messages import IncomingMessage
from p2pchat_agent.sealing import INFO, SUITE, MailboxPrivateKey, seal
from tests.support.agent import AgentClient, wait_until
from tests.support.cluster import Cluster, Node, conversation, wait_for_conversation
from tests.support.postgres import PostgresServer, find_binary

FAST = ["--keepalive", "1", "--dial-timeout", "1"]
UNDIALLABLE = [*FAST, "--advertise", "127.0.0.1:9"]  # the discard port: nothing listens
TIMEOUT = 30.0


@pytest.fixture
def mailbox_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A cluster whose directory has a short presence TTL and the flags of the test's
    `directory_flags` mark."""
    marker = request.node.get_closest_marker("directory_flags")
    flags = list(marker.args) if marker is not None else []
    c = Cluster(tmp_path)
    try:
        c.start_directory("--presence-ttl", "2", *flags)
        yield c
    finally:
        c.close()
        c.dump_logs()


def pair(cluster: Cluster, *flags: str) -> tuple[Node, AgentClient, Node, AgentClient]:
    """alice and bob registered, logged in, each in the other's contacts, both collecting."""
    alice, bob = cluster.node("alice", 1.0, *flags), cluster.node("bob", 1.0, *flags)
    a, b = alice.start(), bob.start()
    a.register("alice")
    b.register("bob")
    for client, name, other in ((a, "alice", "bob"), (b, "bob", "alice")):
        client.login(name)
        client.add_contact(other)
    wait_until(lambda: a.status().mailbox_connected and b.status().mailbox_connected, TIMEOUT)
    return alice, a, bob, b


def counts(client: AgentClient) -> tuple[int, int, int]:
    """Outgoing messages pending (not relayed), relayed and delivered."""
    s = client.status()
    return s.pending_messages - s.relayed_messages, s.relayed_messages, s.delivered_messages


def directory_files(cluster: Cluster) -> bytes:
    """Every byte of the directory's databases, WAL files included."""
    return b"".join(
        p.read_bytes() for p in sorted(cluster.directory_dir.glob("*.db*")) if p.is_file()
    )


def held(cluster: Cluster) -> list[tuple[str, bytes]]:
    """(recipient, envelope) of what the directory's SQLite file holds, oldest first."""
    with sqlite3.connect(cluster.directory_dir / "users.db") as db:
        rows = db.execute("SELECT recipient, envelope FROM mailbox_envelopes ORDER BY id")
        return [(recipient, bytes(envelope)) for recipient, envelope in rows]


def stored_ids(node: Node, name: str) -> list[str]:
    """The message ids in `name`'s own database file, read with sqlite3 (not the agent)."""
    with sqlite3.connect(node.data_dir / f"{name}.db") as db:
        return [r[0] for r in db.execute("SELECT id FROM messages ORDER BY seq")]


def test_never_online_together_100_messages_arrive_and_come_back_delivered(
    mailbox_cluster: Cluster,
) -> None:
    alice, a, bob, b = pair(mailbox_cluster, *FAST)
    bob.terminate()
    bodies = [f"while you were away #{i:03d}" for i in range(100)]
    for body in bodies:
        a.send("bob", body)
    wait_until(lambda: counts(a) == (0, 100, 0), TIMEOUT, 0.1)
    alice.terminate()
    assert all(body.encode() not in directory_files(mailbox_cluster) for body in bodies)

    b = bob.start()  # alice is gone: only the mailbox can bring them
    got = wait_for_conversation(b, "alice", 100)
    assert [m.body for m in got] == bodies
    assert all(m.direction == apb.DIRECTION_INCOMING for m in got)

    a = alice.start()
    wait_until(lambda: counts(a) == (0, 0, 100), TIMEOUT, 0.1)
    assert {m.status for m in conversation(a, "bob")} == {apb.MESSAGE_STATUS_DELIVERED}
    assert len(stored_ids(bob, "bob")) == 100
    files = directory_files(mailbox_cluster)
    assert all(body.encode() not in files for body in bodies)
    wait_until(lambda: held(mailbox_cluster) == [], TIMEOUT, 0.2)


@pytest.mark.postgres
def test_on_postgresql_the_directory_dump_holds_no_body_of_messages_relayed_through_it(
    tmp_path: Path, pg_server: PostgresServer
) -> None:
    """Never online together, with the directory on PostgreSQL: a pg_dump of its database
    while the mailbox holds the messages, and after, has none of their bodies."""
    pg_dump = find_binary("pg_dump")
    assert pg_dump is not None, "pg_dump not found"
    with pg_server.database() as url:
        name = url.rsplit("/", 1)[1]
        cluster = Cluster(tmp_path)
        try:
            cluster.start_directory("--presence-ttl", "2", "--users-db", url, "--contacts-db", url)
            alice, a, bob, b = pair(cluster, *FAST)
            bob.terminate()
            bodies = [f"kept from postgres {i:02d}" for i in range(20)]
            for body in bodies:
                a.send("bob", body)
            wait_until(lambda: counts(a) == (0, 20, 0), TIMEOUT, 0.1)
            alice.terminate()

            def dump() -> bytes:
                command = [pg_dump, "-h", "127.0.0.1", "-p", str(pg_server.port)]
                command += ["-U", pg_server.user, "--data-only", name]
                return subprocess.run(command, capture_output=True, check=True).stdout

            held = dump()
            assert b"mailbox_envelopes" in held  # the envelopes are in there, sealed
            b = bob.start()
            assert [m.body for m in wait_for_conversation(b, "alice", 20)] == bodies
            a = alice.start()
            wait_until(lambda: counts(a) == (0, 0, 20), TIMEOUT, 0.1)
            for text in (held, dump()):
                assert all(body.encode() not in text for body in bodies)
        finally:
            cluster.close()
            cluster.dump_logs()


def test_agents_that_cannot_dial_each_other_chat_live_both_ways_through_the_mailbox(
    mailbox_cluster: Cluster,
) -> None:
    alice, a, bob, b = pair(mailbox_cluster, *UNDIALLABLE)
    round_trips = []
    for i in range(10):
        for sender, client, peer in (("alice", a, "bob"), ("bob", b, "alice")):
            started = time.perf_counter()
            sent = client.send(peer, f"{sender} says {i}", wait=TIMEOUT)
            round_trips.append(time.perf_counter() - started)
            assert sent.status == apb.MESSAGE_STATUS_DELIVERED, sent
    for client, peer in ((a, "bob"), (b, "alice")):
        got = [m.body for m in conversation(client, peer)]
        assert got == [f"{who} says {i}" for i in range(10) for who in ("alice", "bob")]
        assert client.status().linked_peers == []  # no direct link: all through the mailbox
    p50 = statistics.median(round_trips) * 1000
    print(f"relayed send-to-delivered (message and receipt through the mailbox): p50 {p50:.1f} ms")


def test_a_frozen_peer_is_declared_dead_within_the_keepalive_and_messages_go_by_the_mailbox(
    mailbox_cluster: Cluster,
) -> None:
    alice, a, bob, b = pair(mailbox_cluster, *FAST)
    assert a.send("bob", "before", wait=TIMEOUT).status == apb.MESSAGE_STATUS_DELIVERED
    wait_until(lambda: a.status().linked_peers == ["bob"], TIMEOUT)
    assert bob.proc is not None
    bob.proc.proc.send_signal(signal.SIGSTOP)
    try:
        frozen = time.monotonic()
        for i in range(5):
            a.send("bob", f"while frozen {i}")
        wait_until(lambda: a.status().linked_peers == [], TIMEOUT, 0.05)
        detected = time.monotonic() - frozen
        wait_until(lambda: counts(a)[1] == 5, TIMEOUT, 0.05)
        print(f"frozen peer: link declared dead after {detected:.1f} s (keepalive 1 s)")
        assert detected < 2.5  # within the keepalive, and the status poll
    finally:
        bob.proc.proc.send_signal(signal.SIGCONT)
    got = wait_for_conversation(b, "alice", 6)
    assert [m.body for m in got] == ["before", *[f"while frozen {i}" for i in range(5)]]
    wait_until(lambda: counts(a) == (0, 0, 6), TIMEOUT, 0.1)
    assert len(stored_ids(bob, "bob")) == 6


def _token(node: Node) -> str:
    return str(json.loads((node.data_dir / "session.json").read_text())["token"])


def test_forged_tampered_truncated_replayed_and_retargeted_envelopes_store_nothing(
    mailbox_cluster: Cluster,
) -> None:
    alice, a, bob, b = pair(mailbox_cluster, *UNDIALLABLE)
    mallory = mailbox_cluster.node("mallory", 1.0, *UNDIALLABLE)
    m = mallory.start()
    m.register("mallory")
    m.login("mallory")
    for client, other in ((m, "bob"), (m, "alice"), (a, "mallory"), (b, "mallory")):
        client.add_contact(other)  # all accepted: the checks under test are the envelope's
    wait_until(lambda: m.status().mailbox_connected, TIMEOUT)

    # Real envelopes of alice's, to bob and to mallory, as the directory holds them.
    mallory.terminate()
    bob.terminate()
    a.send("bob", "the real one")
    a.send("mallory", "for mallory only")
    wait_until(lambda: len(held(mailbox_cluster)) == 2, TIMEOUT, 0.1)
    by_recipient = dict(held(mailbox_cluster))
    real, to_mallory = by_recipient["bob"], by_recipient["mallory"]
    mallory_key = MailboxPrivateKey.from_bytes(
        mailbox_key_path(mallory.data_dir, "mallory").read_bytes()
    )
    bob_key = MailboxPrivateKey.from_bytes(mailbox_key_path(bob.data_dir, "bob").read_bytes())

    b = bob.start()
    wait_for_conversation(b, "alice", 1)
    before = stored_ids(bob, "bob")

    # mallory's forgeries: her own key and certificate, claiming to be alice.
    cert_der = load_certificate((mallory.data_dir / "mallory.crt").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    claim = IncomingMessage(new_message_id(), "alice", "bob", "forged", datetime.now(UTC))
    key_pem = (mallory.data_dir / "mallory.key").read_bytes()
    forged = seal(claim, "direct:alice:bob", key_pem, cert_der, bob_key.public())
    tampered = bytearray(real)
    tampered[len(tampered) // 2] ^= 0x01
    # alice's envelope to mallory, opened by mallory and sealed again to bob: re-targeted.
    plaintext = SUITE.decrypt(to_mallory, mallory_key.hpke_key(), info=INFO)
    retargeted = SUITE.encrypt(plaintext, bob_key.public().hpke_key(), info=INFO)
    # mallory as herself, but with a body no agent stores (a terminal escape).
    escape = IncomingMessage(new_message_id(), "mallory", "bob", "\x1b[2Jhi", datetime.now(UTC))
    unstorable = seal(escape, "direct:bob:mallory", key_pem, cert_der, bob_key.public())
    bad = [b"junk", forged, bytes(tampered), real[:-16], retargeted, unstorable]

    ca = (mailbox_cluster.directory_dir / "ca.pem").read_bytes()
    target = f"localhost:{mailbox_cluster.directory_port}"
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
        stub = mailbox_pb2_grpc.MailboxServiceStub(channel)
        metadata = (("authorization", f"Bearer {_token(mallory)}"),)
        request = mpb.DepositRequest(recipient="bob", envelopes=bad)
        stub.Deposit(request, metadata=metadata, timeout=10)
        wait_until(lambda: b.status().envelopes_refused == len(bad), TIMEOUT, 0.1)
        # alice's real envelope again, deposited by mallory: sealed by one, deposited by another.
        replay = mpb.DepositRequest(recipient="bob", envelopes=[real])
        stub.Deposit(replay, metadata=metadata, timeout=10)
        wait_until(lambda: b.status().envelopes_refused == len(bad) + 1, TIMEOUT, 0.1)
        wait_until(lambda: "bob" not in dict(held(mailbox_cluster)), TIMEOUT, 0.1)

    assert stored_ids(bob, "bob") == before  # not the forgeries, not the replay again
    assert [x.body for x in conversation(b, "alice")] == ["the real one"]
    assert conversation(b, "mallory") == []


@pytest.mark.directory_flags("--mailbox-max-envelopes", "5")
def test_a_full_mailbox_leaves_the_rest_pending_with_the_reason_then_all_flow_once(
    mailbox_cluster: Cluster,
) -> None:
    alice, a, bob, b = pair(mailbox_cluster, *FAST)
    bob.terminate()
    bodies = [f"queued {i}" for i in range(8)]
    for body in bodies:
        a.send("bob", body)
    wait_until(lambda: counts(a)[:2] == (3, 5), TIMEOUT, 0.1)

    def held_back() -> list[apb.ChatMessage]:  # each has been tried (and refused) by now
        found = [m for m in conversation(a, "bob") if m.status == apb.MESSAGE_STATUS_PENDING]
        return found if all(m.status_reason for m in found) else []

    pending = wait_until(held_back, TIMEOUT, 0.1)
    assert len(pending) == 3
    assert all("mailbox is full" in m.status_reason for m in pending)
    assert counts(a)[:2] == (3, 5)

    b = bob.start()
    got = wait_for_conversation(b, "alice", 8)
    assert [m.body for m in got] == bodies
    wait_until(lambda: counts(a) == (0, 0, 8), TIMEOUT, 0.1)
    assert all(not m.status_reason for m in conversation(a, "bob"))


@pytest.mark.directory_flags("--mailbox-expiry", "2")
@pytest.mark.parametrize("flags", [FAST, UNDIALLABLE], ids=["dialable", "undialable"])
def test_an_expired_envelope_leaves_the_message_pending_with_the_reason_until_the_peer_returns(
    mailbox_cluster: Cluster, flags: list[str]
) -> None:
    """Dialable, it goes direct once bob is back; undialable, through the mailbox again."""
    alice, a, bob, b = pair(mailbox_cluster, *flags)
    bob.terminate()
    a.send("bob", "will expire")
    wait_until(lambda: counts(a)[1] == 1, TIMEOUT, 0.1)
    wait_until(lambda: counts(a)[:2] == (1, 0), TIMEOUT, 0.2)
    (message,) = conversation(a, "bob")
    assert message.status == apb.MESSAGE_STATUS_PENDING
    assert "dropped" in message.status_reason
    wait_until(lambda: held(mailbox_cluster) == [], TIMEOUT, 0.2)

    b = bob.start()
    assert [m.body for m in wait_for_conversation(b, "alice", 1)] == ["will expire"]
    wait_until(lambda: counts(a) == (0, 0, 1), TIMEOUT, 0.1)


def test_envelopes_held_when_the_directory_is_killed_are_collected_after_its_restart(
    mailbox_cluster: Cluster,
) -> None:
    alice, a, bob, b = pair(mailbox_cluster, *UNDIALLABLE)
    bob.terminate()
    for i in range(10):
        a.send("bob", f"held {i}")
    wait_until(lambda: counts(a) == (0, 10, 0), TIMEOUT, 0.1)
    mailbox_cluster.kill_directory()
    mailbox_cluster.start_directory("--presence-ttl", "2")
    b = bob.start()
    assert [m.body for m in wait_for_conversation(b, "alice", 10)] == [
        f"held {i}" for i in range(10)
    ]
    wait_until(lambda: counts(a) == (0, 0, 10), TIMEOUT, 0.1)
    # The stream reconnects after another restart, and live relaying goes on.
    mailbox_cluster.kill_directory()
    mailbox_cluster.start_directory("--presence-ttl", "2")
    assert a.send("bob", "after the restart", wait=TIMEOUT).status == apb.MESSAGE_STATUS_DELIVERED
    assert len(stored_ids(bob, "bob")) == 11
