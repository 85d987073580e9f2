"""The agent's copy of its contacts under races (issue 14's review): an acceptance seconds old
loses no message, a failed refresh does not end the heartbeats, an older listing never undoes
a newer block, and a block seen by any refresh closes the blocked user's link."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import grpc

from p2pchat.v1 import agent_pb2 as apb
from p2pchat_agent.session import UserSession
from p2pchat_common.errors import RemoteError
from tests.support.agent import users_with, wait_until


def session_of(agent: Any) -> UserSession:
    session: UserSession | None = agent.server.agent.active
    assert session is not None, "not logged in"
    return session


def rows(agent: Any, name: str) -> int:
    with sqlite3.connect(agent.settings.data_dir / f"{name}.db") as db:
        return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])


def test_the_first_relayed_message_of_a_contact_accepted_a_moment_ago_arrives(
    make_agent: Any,
) -> None:
    # Alice cannot be dialled (her advertised port refuses): bob's message goes by the mailbox
    # at once, while alice's copy of her contacts may still say bob only asked.
    alice = make_agent("alice", advertise="127.0.0.1:9", dial_timeout=1.0, keepalive=1.0)
    bob = make_agent("bob", dial_timeout=1.0, keepalive=1.0)
    a, b = alice.client(), bob.client()
    a.register("alice")
    b.register("bob")
    a.login("alice")
    b.login("bob")
    a.add_contact("bob")
    b.add_contact("alice")  # accepted at once
    b.send("alice", "are you there?")
    wait_until(lambda: [m.body for m in a.history("bob")] == ["are you there?"], timeout=15)


def test_a_refresh_that_fails_does_not_end_the_heartbeats(make_agent: Any) -> None:
    agents, (a, b) = users_with(make_agent, "alice", "bob", befriend=False)
    a.add_contact("bob")
    session = session_of(agents["alice"])
    real = session.directory.list_contacts
    failed: list[bool] = []

    async def fails_once(*args: Any, **kw: Any) -> Any:
        if not failed:
            failed.append(True)
            raise RemoteError(grpc.StatusCode.INTERNAL, "directory failed: internal error")
        return await real(*args, **kw)

    session.directory.list_contacts = fails_once  # type: ignore[method-assign]
    b.add_contact("alice")  # accepted: alice's next beat says her contacts changed
    book = session.contact_book().book
    wait_until(lambda: failed and book.state("bob") == "accepted", timeout=10)
    (task,) = [t for t in session.tasks if t.get_name() == "heartbeats"]
    assert not task.done()


def test_a_change_made_before_the_first_beat_reaches_the_copy(make_agent: Any) -> None:
    agents, (a, b) = users_with(make_agent, "alice", "bob", befriend=False)
    a.add_contact("bob")
    b.add_contact("alice")  # through bob's agent: alice's copy learns it from her beats
    book = session_of(agents["alice"]).contact_book().book
    wait_until(lambda: book.state("bob") == "accepted", timeout=10)


def test_an_older_listing_never_undoes_a_newer_block(make_agent: Any) -> None:
    agents, (a, b) = users_with(make_agent, "alice", "bob", dial_timeout=1.0, keepalive=1.0)
    alice = agents["alice"]
    session = session_of(alice)
    contacts = session.contact_book()
    real = session.directory.list_contacts
    calls: list[bool] = []

    async def first_answer_late(*args: Any, **kw: Any) -> Any:
        calls.append(True)
        answer = await real(*args, **kw)  # the answer from before the block...
        if len(calls) == 1:
            await asyncio.sleep(1.0)  # ...comes back late
        return answer

    session.directory.list_contacts = first_answer_late  # type: ignore[method-assign]
    listing = asyncio.run_coroutine_threadsafe(contacts.all(), alice.loop.loop)
    time.sleep(0.2)
    a.stub.BlockContact(apb.AgentContactAnswerRequest(username="bob"), timeout=10)
    listing.result(10)
    assert contacts.book.state("bob") == "blocked"
    assert not alice.loop.run(contacts.book.admits("bob"))


def test_a_block_seen_by_any_refresh_closes_the_blocked_users_link(make_agent: Any) -> None:
    agents, (a, b) = users_with(make_agent, "alice", "bob", dial_timeout=1.0, keepalive=1.0)
    b.send("alice", "hello", wait=10)  # a direct link is open
    alice, bob = agents["alice"], agents["bob"]
    # Bob's agent is hostile (or slow to notice): it never closes a link itself.
    session_of(bob).contact_book()._links.close_peer = lambda peer: None  # type: ignore[method-assign]
    session = session_of(alice)
    contacts = session.contact_book()

    async def block_then_a_strangers_hello() -> None:
        await session.directory.block_contact("bob")  # the directory knows; the copy not yet
        await contacts.book.admits("carol")  # a stranger's Hello refreshes the copy first
        await contacts.refresh()  # then Contacts.block's own refresh: nothing new to it

    alice.loop.run(block_then_a_strangers_hello())
    assert contacts.book.state("bob") == "blocked"
    wait_until(lambda: session.links.registry.get("bob") is None, timeout=5)
    before = rows(alice, "alice")
    b.send("alice", "after the block")
    time.sleep(1.5)
    assert rows(alice, "alice") == before
