"""The delivery states of outgoing messages in `<username>.db` (store_deliveries.py): pending,
relayed (held by the directory's mailbox) and delivered, why a pending one is held back, and the
expiry of what the mailbox held."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from p2pchat_agent import store_deliveries
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.messages import Status, StoredMessage
from p2pchat_agent.store import MessageStore
from p2pchat_common.timestamps import sqlite_text

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MessageStore]:
    opened = MessageStore.open(tmp_path / "alice.db")
    try:
        yield opened
    finally:
        opened.close()


def _send(store: MessageStore, to: str, body: str) -> StoredMessage:
    return store.add_outgoing(new_message_id(), "alice", to, body, T0)


def _relay(store: MessageStore, peer: str, ids: list[str], until: datetime) -> list[str]:
    when = sqlite_text(until)
    return store.in_transaction(True, store_deliveries.mark_relayed, peer, ids, when)


def _states(store: MessageStore, peer: str) -> list[tuple[str, Status, str]]:
    return [(m.body, m.status, m.reason) for m in store.history(peer)[0]]


def test_relayed_messages_read_as_relayed_stay_in_the_direct_outbox_and_leave_the_mailbox_one(
    store: MessageStore,
) -> None:
    first, second, third = (_send(store, "bob", f"m{i}") for i in range(3))
    assert _relay(store, "bob", [first.id, second.id, "01JUNKNOWNUNKNOWNUNKNOWN00"], T0) == [
        first.id,
        second.id,
    ]
    assert _relay(store, "carol", [third.id], T0) == []  # not to carol: left alone
    assert _states(store, "bob") == [
        ("m0", Status.RELAYED, ""),
        ("m1", Status.RELAYED, ""),
        ("m2", Status.PENDING, ""),
    ]
    assert [m.id for m in store.pending_for("bob")] == [first.id, second.id, third.id]
    assert [m.id for m in store.pending_for("bob", unrelayed=True)] == [third.id]
    assert store.in_transaction(False, store_deliveries.counts) == (1, 2, 0)
    assert store.count_pending() == 3  # not yet delivered, whichever way


def test_an_ack_delivers_a_relayed_message_and_a_relayed_message_is_not_relayed_again(
    store: MessageStore,
) -> None:
    message = _send(store, "bob", "hello")
    _relay(store, "bob", [message.id], T0)
    assert store.mark_delivered("bob", [message.id], T0, "dev1") == [message.id]
    assert _states(store, "bob") == [("hello", Status.DELIVERED, "")]
    assert _relay(store, "bob", [message.id], T0) == []  # delivered: no longer relayed
    assert store.in_transaction(False, store_deliveries.counts) == (0, 0, 1)


def test_a_held_back_message_shows_its_reason_until_it_is_relayed(store: MessageStore) -> None:
    message = _send(store, "bob", "queued")
    reason = "not relayed: bob's mailbox is full"
    store.in_transaction(True, store_deliveries.hold_back, "bob", [message.id], reason)
    assert _states(store, "bob") == [("queued", Status.PENDING, reason)]
    _relay(store, "bob", [message.id], T0)
    assert _states(store, "bob") == [("queued", Status.RELAYED, "")]


def test_expired_relays_become_pending_with_the_reason_and_only_those(
    store: MessageStore,
) -> None:
    early, late = _send(store, "bob", "early"), _send(store, "carol", "late")
    _relay(store, "bob", [early.id], T0)
    _relay(store, "carol", [late.id], T0 + timedelta(days=1))
    assert store.in_transaction(False, store_deliveries.next_expiry) == sqlite_text(T0)
    now = sqlite_text(T0 + timedelta(hours=1))
    peers = store.in_transaction(True, store_deliveries.unrelay_expired, now, "dropped")
    assert peers == ["bob"]
    assert _states(store, "bob") == [("early", Status.PENDING, "dropped")]
    assert _states(store, "carol") == [("late", Status.RELAYED, "")]
    assert [m.id for m in store.pending_for("bob", unrelayed=True)] == [early.id]
