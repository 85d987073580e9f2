"""The receiving side of the mailbox with in-process agents: what is committed but not yet
acknowledged at the directory (an agent that died in between) comes again and is stored once."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import pytest

from p2pchat.v1 import agent_pb2 as apb
from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_agent.inbox import Inbox
from p2pchat_agent.mailbox import Mailbox
from p2pchat_common.errors import RateLimited, Unavailable
from tests.support.agent import InProcessAgent, users_with, wait_until
from tests.support.directory import InProcessDirectory

UNDIALLABLE: dict[str, Any] = {"advertise": "127.0.0.1:9", "dial_timeout": 1.0, "keepalive": 1.0}


def test_envelopes_committed_but_not_acknowledged_come_again_and_are_stored_once(
    make_agent: Callable[..., InProcessAgent],
    agent_directory: InProcessDirectory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures = {"left": 2}
    real = DirectoryClient.acknowledge

    async def lost_ack(self: DirectoryClient, ids: list[int]) -> int:
        if failures["left"]:  # as if the agent died after its commit, before the ack
            failures["left"] -= 1
            raise Unavailable("the acknowledgement was lost")
        return await real(self, ids)

    monkeypatch.setattr(DirectoryClient, "acknowledge", lost_ack)
    agents, (a, b) = users_with(make_agent, "alice", "bob", **UNDIALLABLE)
    wait_until(lambda: a.status().mailbox_connected and b.status().mailbox_connected)
    sent = [a.send("bob", f"once {i}") for i in range(5)]
    wait_until(lambda: a.status().delivered_messages == 5, 30)
    assert failures["left"] == 0

    history = b.history("alice")
    assert [m.body for m in history] == [f"once {i}" for i in range(5)]
    assert [m.id for m in history] == [m.id for m in sent]
    db = agents["bob"].settings.data_dir / "bob.db"
    with sqlite3.connect(db) as conn:
        (count,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    assert count == 5
    assert {m.status for m in a.history("bob")} == {apb.MESSAGE_STATUS_DELIVERED}

    def held() -> int:  # what the directory still holds: the lost acks were made again
        with sqlite3.connect(agent_directory.settings.data_dir / "users.db") as conn:
            return int(conn.execute("SELECT count(*) FROM mailbox_envelopes").fetchone()[0])

    wait_until(lambda: held() == 0, 30)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (5,)


def test_a_reconnect_of_the_collect_stream_keeps_the_inbox_collecting(
    make_agent: Callable[..., InProcessAgent],
) -> None:
    """What `p2pchat trust` does to bring again what was kept for a new key: the stream is
    cancelled and opened again; the inbox does not end with it."""
    agents, (a, b) = users_with(make_agent, "alice", "bob", **UNDIALLABLE)
    wait_until(lambda: a.status().mailbox_connected and b.status().mailbox_connected)
    bob = agents["bob"]
    active = bob.server.agent.active
    assert active is not None and active.inbox is not None
    inbox = active.inbox
    bob.loop.run(_reconnect(inbox))
    sent = a.send("bob", "after the reconnect", wait=20)
    assert sent.status == apb.MESSAGE_STATUS_DELIVERED
    assert [m.body for m in b.history("alice")] == ["after the reconnect"]


async def _reconnect(inbox: Inbox) -> None:
    inbox.reconnect()


def test_a_receipt_that_cannot_go_keeps_the_envelopes_until_it_goes(
    make_agent: Callable[..., InProcessAgent],
    agent_directory: InProcessDirectory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bob commits, but his receipt is refused (say alice's mailbox is full): the envelopes stay
    at the directory, come again, are stored once, and the receipt goes on a later try."""
    failures = {"left": 1}
    real = Mailbox.send_receipt

    async def refused_once(self: Mailbox, peer: str, ids: list[str]) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RateLimited("alice's mailbox is full")
        await real(self, peer, ids)

    monkeypatch.setattr(Mailbox, "send_receipt", refused_once)
    agents, (a, b) = users_with(make_agent, "alice", "bob", **UNDIALLABLE)
    wait_until(lambda: a.status().mailbox_connected and b.status().mailbox_connected)
    sent = a.send("bob", "receipted at last", wait=20)
    assert sent.status == apb.MESSAGE_STATUS_DELIVERED and failures["left"] == 0
    assert [m.body for m in b.history("alice")] == ["receipted at last"]
    with sqlite3.connect(agents["bob"].settings.data_dir / "bob.db") as conn:
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)
