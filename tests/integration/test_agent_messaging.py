"""Agents exchanging messages directly over mutual TLS, driven through their control API."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from p2pchat.v1 import agent_pb2 as apb
from tests.support.agent import AgentClient, InProcessAgent, wait_until

pytestmark = pytest.mark.parametrize("db_backend", ["sqlite"])


def pair(make_agent: Callable[[str], InProcessAgent]) -> tuple[AgentClient, AgentClient]:
    alice, bob = make_agent("alice").client(), make_agent("bob").client()
    for client, name, other in ((alice, "alice", "bob"), (bob, "bob", "alice")):
        client.register(name)
    for client, name, other in ((alice, "alice", "bob"), (bob, "bob", "alice")):
        client.login(name)
        client.add_contact(other)
    return alice, bob


def test_alice_and_bob_exchange_messages_both_ways(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice, bob = pair(make_agent)
    sent = alice.send("bob", "hello bob", wait=10)
    assert sent.status == apb.MESSAGE_STATUS_DELIVERED
    reply = bob.send("alice", "hi alice", wait=10)
    assert reply.status == apb.MESSAGE_STATUS_DELIVERED
    for client in (alice, bob):
        got = wait_until(
            lambda c=client: (
                len(c.history("alice" if c is bob else "bob")) == 2
                and c.history("alice" if c is bob else "bob")
            )
        )
        assert [m.body for m in got] == ["hello bob", "hi alice"]
    assert alice.status().linked_peers == ["bob"]
