"""Live events for the CLI streams (Chat, Serve): a small publish/subscribe hub.

Each subscriber has its own bounded queue; a subscriber that falls too far behind is dropped
(its stream ends with an error) rather than letting memory grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from p2pchat_agent.store import StoredMessage
from p2pchat_common.errors import DomainError

log = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000


@dataclass(frozen=True)
class MessageEvent:
    message: StoredMessage


@dataclass(frozen=True)
class DeliveryEvent:
    message: StoredMessage


@dataclass(frozen=True)
class KeyChangedEvent:
    peer: str
    pinned_sha256: str
    presented_sha256: str


Event = MessageEvent | DeliveryEvent | KeyChangedEvent


class Overflow(DomainError):
    """The subscriber did not keep up; its stream is closed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Subscription:
    def __init__(self, hub: EventHub, accepts: Callable[[Event], bool]) -> None:
        self._hub = hub
        self.accepts = accepts
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE_LIMIT)
        self.overflowed = False

    async def get(self) -> Event:
        event = await self.queue.get()
        if event is None:
            raise Overflow("too many events not read in time; reconnect to catch up")
        return event

    def close(self) -> None:
        self._hub.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class EventHub:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()

    def subscribe(self, accepts: Callable[[Event], bool]) -> Subscription:
        sub = Subscription(self, accepts)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, event: Event) -> None:
        """Called on the event loop thread."""
        for sub in list(self._subs):
            if sub.overflowed or not sub.accepts(event):
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.overflowed = True
                log.warning("dropping a live subscriber that fell %d events behind", QUEUE_LIMIT)
                sub.queue.get_nowait()
                sub.queue.put_nowait(None)
