"""The live-event hub behind the CLI streams (p2pchat_agent.events): each subscriber gets what it
accepts, in order, in its own bounded queue; one that falls behind is dropped with an Overflow,
and one that left gets nothing more."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import grpc
import pytest

from p2pchat_agent.events import (
    QUEUE_LIMIT,
    DeliveryEvent,
    Event,
    EventHub,
    InputEnded,
    KeyChangedEvent,
    Notice,
    Overflow,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def delivered(peer: str, *ids: str) -> DeliveryEvent:
    return DeliveryEvent(peer=peer, ids=ids, delivered_at=NOW)


def test_a_hub_with_no_subscriber_is_not_listening_and_publishing_is_a_no_op() -> None:
    hub = EventHub()
    assert not hub.listening
    hub.publish(delivered("bob", "1"))  # nothing to deliver to, nothing kept
    with hub.subscribe(lambda event: True) as sub:
        assert hub.listening
        assert sub.get_nowait() is None


def test_each_subscriber_gets_only_the_events_it_accepts_in_the_order_published() -> None:
    hub = EventHub()
    everything = hub.subscribe(lambda event: True)
    bobs = hub.subscribe(lambda event: getattr(event, "peer", None) == "bob")
    events: list[Event] = [
        delivered("bob", "1"),
        KeyChangedEvent(peer="carol", pinned_sha256="aa", presented_sha256="bb"),
        delivered("bob", "2", "3"),
    ]
    for event in events:
        hub.publish(event)
    assert [everything.get_nowait() for _ in events] == events
    assert [bobs.get_nowait(), bobs.get_nowait()] == [events[0], events[2]]
    assert everything.get_nowait() is None and bobs.get_nowait() is None


def test_get_waits_for_the_next_item() -> None:
    async def body() -> object:
        hub = EventHub()
        with hub.subscribe(lambda event: True) as sub:
            waiting = asyncio.ensure_future(sub.get())
            await asyncio.sleep(0)
            assert not waiting.done()
            hub.publish(delivered("bob", "1"))
            return await asyncio.wait_for(waiting, 5)

    assert asyncio.run(body()) == delivered("bob", "1")


def test_an_owner_can_queue_its_own_notices_between_events() -> None:
    hub = EventHub()
    with hub.subscribe(lambda event: True) as sub:
        hub.publish(delivered("bob", "1"))
        sub.put(Notice(code="INVALID_ARGUMENT", message="too long"))
        sub.put(InputEnded())
        assert sub.get_nowait() == delivered("bob", "1")
        assert sub.get_nowait() == Notice(code="INVALID_ARGUMENT", message="too long")
        assert sub.get_nowait() == InputEnded(error=None)


def test_an_unsubscribed_subscriber_gets_nothing_more() -> None:
    hub = EventHub()
    staying = hub.subscribe(lambda event: True)
    with hub.subscribe(lambda event: True) as leaving:
        hub.publish(delivered("bob", "1"))
    assert not leaving.overflowed
    hub.publish(delivered("bob", "2"))
    assert leaving.get_nowait() == delivered("bob", "1")
    assert leaving.get_nowait() is None
    assert [staying.get_nowait(), staying.get_nowait()] == [
        delivered("bob", "1"),
        delivered("bob", "2"),
    ]
    staying.close()
    assert not hub.listening


def test_a_subscriber_that_falls_queue_limit_behind_is_dropped_with_an_overflow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = EventHub()
    slow = hub.subscribe(lambda event: True)
    fast = hub.subscribe(lambda event: True)
    with caplog.at_level(logging.WARNING, logger="p2pchat_agent.events"):
        for n in range(QUEUE_LIMIT + 5):
            hub.publish(delivered("bob", str(n)))
            if fast.get_nowait() is None:
                raise AssertionError("a subscriber that keeps up lost an event")
    assert slow.overflowed and not fast.overflowed
    assert [r.getMessage() for r in caplog.records] == [
        f"dropping a live subscriber that fell {QUEUE_LIMIT} events behind"
    ]
    # What it had queued is still read, then the stream ends; nothing was queued after the drop.
    drained = 0
    with pytest.raises(Overflow) as info:
        while slow.get_nowait() is not None:
            drained += 1
    assert drained == QUEUE_LIMIT - 1
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    slow.put(Notice(code="X", message="ignored once dropped"))
    assert slow.get_nowait() is None


def test_waiting_on_a_dropped_subscriber_raises_overflow() -> None:
    async def body() -> None:
        hub = EventHub()
        with hub.subscribe(lambda event: True) as sub:
            for n in range(QUEUE_LIMIT + 1):
                hub.publish(delivered("bob", str(n)))
            for _ in range(QUEUE_LIMIT - 1):
                await sub.get()
            with pytest.raises(Overflow, match="reconnect to catch up"):
                await sub.get()

    asyncio.run(body())
