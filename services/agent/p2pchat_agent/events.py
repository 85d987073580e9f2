"""Live events for the CLI streams (Chat, Serve): a small publish/subscribe hub.

Each subscriber has its own bounded queue; a subscriber that falls too far behind is dropped
(its stream ends with an error) rather than letting memory grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import grpc

from p2pchat_agent.messages import Status, StoredMessage
from p2pchat_common.errors import DomainError

log = logging.getLogger(__name__)

# Events waiting unread before a subscriber is dropped. A chat's own texts cannot fill it (its
# input is held back long before: chat.UNREAD); others' messages to a client that reads nothing
# can, and then its stream ends with RESOURCE_EXHAUSTED once the client reads what gRPC already
# holds for it (the messages are stored: History).
QUEUE_LIMIT = 10_000
_OVERFLOW = "too many events not read in time; reconnect to catch up"


@dataclass(frozen=True)
class MessageEvent:
    message: StoredMessage


@dataclass(frozen=True)
class DeliveryEvent:
    """Outgoing messages to `peer` acknowledged together (one ack frame), in the order sent;
    or, with `status` RELAYED, now held by the directory's mailbox for `peer` (`delivered_at`
    is then when it took them)."""

    peer: str
    ids: tuple[str, ...]
    delivered_at: datetime
    status: Status = Status.DELIVERED


@dataclass(frozen=True)
class KeyChangedEvent:
    peer: str
    pinned_sha256: str
    presented_sha256: str


Event = MessageEvent | DeliveryEvent | KeyChangedEvent


@dataclass(frozen=True)
class Notice:
    """Something for one subscriber only (a send of its own was refused); put by its owner."""

    code: str
    message: str


@dataclass(frozen=True)
class InputEnded:
    """The owner's input side ended (with `error` when it failed); put by its owner."""

    error: BaseException | None = None


Item = Event | Notice | InputEnded


class Overflow(DomainError):
    """The subscriber did not keep up; its stream is closed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Subscription:
    def __init__(self, hub: EventHub, accepts: Callable[[Event], bool]) -> None:
        self._hub = hub
        self.accepts = accepts
        self.queue: asyncio.Queue[Item | None] = asyncio.Queue(QUEUE_LIMIT)
        self.overflowed = False
        self._taken = asyncio.Event()  # set whenever the reader takes items

    async def get(self) -> Item:
        """The next item; waits for one."""
        item = await self.queue.get()
        self._taken.set()
        if item is None:
            raise Overflow(_OVERFLOW)
        return item

    def get_nowait(self) -> Item | None:
        """The next item if one is waiting, else None (no wait: drains a burst in one go)."""
        if self.queue.empty():
            return None
        item = self.queue.get_nowait()
        self._taken.set()
        if item is None:
            raise Overflow(_OVERFLOW)
        return item

    async def room(self, below: int) -> None:
        """Waits until fewer than `below` items wait unread: how the owner of a subscription
        holds its own input back while its reader falls behind."""
        while self.queue.qsize() >= below:
            self._taken.clear()
            await self._taken.wait()

    def put(self, item: Item) -> None:
        """Queues an item for this subscriber (events come from the hub; the owner may add its
        own notices); a subscriber that fell QUEUE_LIMIT behind is dropped."""
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            log.warning("dropping a live subscriber that fell %d events behind", QUEUE_LIMIT)
            self.queue.get_nowait()
            self.queue.put_nowait(None)

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

    @property
    def listening(self) -> bool:
        """Whether anyone subscribes: a flood with no one watching makes no event objects."""
        return bool(self._subs)

    def publish(self, event: Event) -> None:
        """Called on the event loop thread."""
        if not self._subs:
            return
        for sub in list(self._subs):
            if sub.accepts(event):
                sub.put(event)
