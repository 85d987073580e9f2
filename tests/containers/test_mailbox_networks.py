"""The sealed mailbox as users run it: alice and bob on two Docker networks that both reach the
directory but not each other, so no direct link can ever open. They chat both ways, live,
exactly once and in order, through the directory's mailbox; and the directory's database holds
none of what they said."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from p2pchat.v1 import agent_pb2 as apb
from tests.containers.harness import PASSWORD, Deployment, wait_until

pytestmark = [pytest.mark.containers, pytest.mark.timeout(600)]

FAST = {"P2PCHAT_DIAL_TIMEOUT": "1", "P2PCHAT_KEEPALIVE": "2"}
COUNT = 20


@pytest.fixture(scope="module")
def split(docker_images: None) -> Iterator[Deployment]:
    """The directory on networks a and b; alice only on a, bob only on b."""
    d = Deployment()
    try:
        d.start_directory()
        d.wait_healthy(["directory"])
        nets = {"alice": d.add_network("net-a"), "bob": d.add_network("net-b")}
        for network in nets.values():
            d.connect("directory", network, "directory")
        for name, network in nets.items():
            d.start_agent(name, remote_control=True, network=network, env=FAST)
        d.start_agent("carol", remote_control=True, network=nets["alice"], env=FAST)
        d.wait_healthy(["alice", "bob", "carol"])
        yield d
    finally:
        d.close()


def test_alice_and_bob_on_networks_apart_chat_live_both_ways_through_the_mailbox(
    split: Deployment,
) -> None:
    d = split
    stubs = {name: d.agent_stub(name) for name in ("alice", "bob")}
    for name, stub in stubs.items():
        stub.Register(apb.AgentRegisterRequest(username=name, password=PASSWORD), timeout=30)
        stub.Login(apb.AgentLoginRequest(username=name, password=PASSWORD), timeout=30)
    for name, stub in stubs.items():
        other = "bob" if name == "alice" else "alice"
        stub.AddContact(apb.AgentAddContactRequest(username=other), timeout=30)
    for stub in stubs.values():
        wait_until(
            lambda s=stub: s.Status(apb.StatusRequest(), timeout=10).mailbox_connected,  # type: ignore[misc]
            60,
            "the mailbox stream",
        )

    # bob listens as "Set up as server" does; alice sends; each arrival is timed.
    arrived: dict[str, float] = {}
    stream = stubs["bob"].Serve(apb.ServeRequest())

    def listen() -> None:
        try:
            for event in stream:
                if event.WhichOneof("kind") == "message":
                    arrived.setdefault(event.message.body, time.time())
        except grpc.RpcError:
            pass  # cancelled at the end

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.5)
    sent_at: dict[str, float] = {}
    for i in range(COUNT):
        body = f"alice to bob {i:02d}"
        sent_at[body] = time.time()
        stubs["alice"].Send(apb.SendRequest(peer="bob", body=body), timeout=30)
        reply = f"bob to alice {i:02d}"
        stubs["bob"].Send(apb.SendRequest(peer="alice", body=reply), timeout=30)
        time.sleep(0.05)
    wait_until(lambda: len(arrived) == COUNT, 60, "alice's messages live at bob")
    stream.cancel()
    listener.join(10)

    def conversation(user: str, peer: str) -> list[apb.ChatMessage]:
        request = apb.HistoryRequest(peer=peer, limit=1000)
        return list(stubs[user].History(request, timeout=30).messages)

    def all_delivered() -> bool:
        return all(
            stubs[u].Status(apb.StatusRequest(), timeout=10).pending_messages == 0 for u in stubs
        )

    wait_until(all_delivered, 60, "every message delivered both ways")
    expected = [f"{who} {i:02d}" for i in range(COUNT) for who in ("alice to bob", "bob to alice")]
    for user, peer in (("alice", "bob"), ("bob", "alice")):
        got = conversation(user, peer)
        assert [m.body for m in got if m.body.startswith("alice")] == expected[0::2]
        assert [m.body for m in got if m.body.startswith("bob")] == expected[1::2]
        assert len(got) == 2 * COUNT  # exactly once
        status = stubs[user].Status(apb.StatusRequest(), timeout=10)
        assert list(status.linked_peers) == []  # never a direct link: all through the mailbox
        outgoing = [m for m in got if m.direction == apb.DIRECTION_OUTGOING]
        assert {m.status for m in outgoing} == {apb.MESSAGE_STATUS_DELIVERED}

    latencies = sorted((arrived[b] - sent_at[b]) * 1000 for b in sent_at)
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"relayed one-way latency alice -> bob: p50 {p50:.1f} ms, max {p99:.1f} ms")

    # The directory's database holds envelopes at most, never a body.
    listing = d.exec("directory", "ls", "/data").stdout.split()
    files = [name for name in listing if ".db" in name]
    assert "users.db" in files, listing
    dump = b"".join(d.read_file("directory", f"/data/{name}") for name in files)
    assert all(body.encode() not in dump for body in expected)


def test_a_stranger_on_alices_network_stores_nothing_with_her_until_she_accepts(
    split: Deployment,
) -> None:
    """carol can reach alice's agent directly, but until alice accepts her request nothing of
    hers is stored in alice's container; once accepted, what waited arrives once."""
    d = split
    carol, alice = d.agent_stub("carol"), d.agent_stub("alice")
    carol.Register(apb.AgentRegisterRequest(username="carol", password=PASSWORD), timeout=30)
    carol.Login(apb.AgentLoginRequest(username="carol", password=PASSWORD), timeout=30)
    request = apb.AgentAddContactRequest(username="alice", note="hi, it's carol")
    assert carol.AddContact(request, timeout=30).contact.address == ""  # nothing revealed
    for i in range(3):
        carol.Send(apb.SendRequest(peer="alice", body=f"before the answer {i}"), timeout=30)
    time.sleep(3)  # dials and relays are refused meanwhile

    def from_carol() -> list[str]:
        reply = alice.History(apb.HistoryRequest(peer="carol", limit=100), timeout=30)
        return [m.body for m in reply.messages]

    assert from_carol() == []
    waiting = alice.ListContactRequests(apb.AgentListContactRequestsRequest(), timeout=30)
    assert [(r.username, r.note) for r in waiting.requests] == [("carol", "hi, it's carol")]
    assert carol.Status(apb.StatusRequest(), timeout=10).pending_messages == 3

    alice.AcceptContact(apb.AgentContactAnswerRequest(username="carol"), timeout=30)
    wait_until(lambda: len(from_carol()) == 3, 60, "carol's messages once accepted")
    assert from_carol() == [f"before the answer {i}" for i in range(3)]
    wait_until(
        lambda: carol.Status(apb.StatusRequest(), timeout=10).pending_messages == 0,
        60,
        "carol's messages delivered",
    )
