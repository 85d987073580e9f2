"""Delivery over a link: nothing lost, nothing shown twice (DESIGN.md "Delivery").

- Outgoing: messages are already committed as pending; whatever is pending for the peer goes out
  in order, as many as are waiting in one frame (one when only one is: never wait to fill).
- Incoming: batches that arrived together are committed in one transaction (group commit),
  then acknowledged together; ids already stored are acknowledged again but stored once.
- Acks mark messages delivered. A link that ends leaves the rest pending for the next link.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from p2pchat.v1 import peer_pb2 as pb
from p2pchat_agent.events import DeliveryEvent, EventHub, MessageEvent
from p2pchat_agent.ids import valid_message_id
from p2pchat_agent.link import FRAME_BODY_BYTES, PeerLink
from p2pchat_agent.store import IncomingMessage, MessageStore, StoredMessage
from p2pchat_common.errors import InvalidArgument, PermissionDenied
from p2pchat_common.timestamps import from_timestamp, timestamp_parts, valid_timestamp
from p2pchat_common.validation import utf8_size_over

log = logging.getLogger(__name__)

BATCH = 500


def frame_chunks(messages: list[StoredMessage]) -> Iterator[list[StoredMessage]]:
    """`messages` cut into frames of at most FRAME_BODY_BYTES of bodies (4 bytes per character
    at most in UTF-8: a bound, no encoding), at least one message each."""
    chunk: list[StoredMessage] = []
    size = 0
    for m in messages:
        bound = 4 * len(m.body)
        if chunk and size + bound > FRAME_BODY_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(m)
        size += bound
    if chunk:
        yield chunk


def messages_frame(messages: list[StoredMessage]) -> pb.Frame:
    """A frame carrying `messages`, built in place: twice as fast as making each PeerMessage
    (and its Timestamp) and copying it into the batch."""
    frame = pb.Frame()
    add = frame.messages.messages.add
    for m in messages:
        sent_at = add(id=m.id, sender=m.sender, recipient=m.recipient, body=m.body).sent_at
        sent_at.seconds, sent_at.nanos = timestamp_parts(m.sent_at)
    return frame


class Delivery:
    def __init__(
        self,
        store: MessageStore,
        events: EventHub,
        body_limit: int,
        read: Callable[..., Awaitable[Any]],
        write: Callable[..., Awaitable[Any]],
    ) -> None:
        self._store = store
        self._events = events
        self._body_limit = body_limit
        self._read_db = read
        self._write_db = write

    async def run(self, link: PeerLink, incoming: AsyncIterator[pb.Frame]) -> None:
        """Runs the link until the stream ends or fails; raises the error that ended it."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._send_pending(link))
                tasks.create_task(self._commit_received(link))
                tasks.create_task(self._until_closed(link))
                await self._read(link, incoming)
                raise _StreamEnded()
        except BaseExceptionGroup as group:
            errors = [e for e in group.exceptions if not isinstance(e, _StreamEnded)]
            if errors:
                raise errors[0] from None
        finally:
            link.close()

    async def _until_closed(self, link: PeerLink) -> None:
        """Ends the run when this side closes the link (shutdown, logout, a replaced link),
        even while the other side keeps its request stream open."""
        await link.wait_closed()
        raise _StreamEnded()

    # -- reading ----------------------------------------------------------------------------

    async def _read(self, link: PeerLink, incoming: AsyncIterator[pb.Frame]) -> None:
        async for frame in incoming:
            kind = frame.WhichOneof("kind")
            if kind == "messages":
                messages = list(frame.messages.messages)
                for m in messages:
                    self._check(link, m)
                if messages:
                    await link.received.put(messages)
            elif kind == "acks":
                await self._acknowledged(link, list(frame.acks.ids))
            elif kind == "hello":
                raise InvalidArgument("unexpected second Hello on the link")

    def _check(self, link: PeerLink, m: pb.PeerMessage) -> None:
        if m.sender != link.peer:
            raise PermissionDenied(
                f"message claims sender {m.sender[:40]!r} but the link belongs to {link.peer!r}"
            )
        if m.recipient != link.me:
            raise PermissionDenied(f"message is for {m.recipient[:40]!r}, not {link.me!r}")
        if not valid_message_id(m.id):
            raise InvalidArgument("message id must be 1-64 characters of [0-9A-Za-z_-]")
        if not valid_timestamp(m.sent_at):
            raise InvalidArgument("message sent_at must be between 1970 and 9999")
        if not m.body or utf8_size_over(m.body, self._body_limit) is not None:
            raise InvalidArgument(f"message body must be 1-{self._body_limit} bytes of UTF-8")

    async def _commit_received(self, link: PeerLink) -> None:
        while True:
            batch = await link.received.get()
            while not link.received.empty():  # group commit: everything that has arrived
                batch.extend(link.received.get_nowait())
            incoming = [
                IncomingMessage(
                    id=m.id,
                    sender=m.sender,
                    recipient=m.recipient,
                    body=m.body,
                    sent_at=from_timestamp(m.sent_at),
                )
                for m in batch
            ]
            stored: list[StoredMessage] = await self._write_db(
                self._store.store_incoming, incoming, datetime.now(UTC)
            )
            if self._events.listening:
                for message in stored:
                    self._events.publish(MessageEvent(message))
            await link.send(pb.Frame(acks=pb.AckBatch(ids=[m.id for m in batch])))

    async def _acknowledged(self, link: PeerLink, ids: list[str]) -> None:
        await link.release(len(ids))
        when = datetime.now(UTC)
        changed: list[str] = await self._write_db(self._store.mark_delivered, link.peer, ids, when)
        if changed:
            self._events.publish(DeliveryEvent(link.peer, tuple(changed), when))

    # -- sending ----------------------------------------------------------------------------

    async def _send_pending(self, link: PeerLink) -> None:
        """Sends the outbox for this peer in order: first what the database holds, then what
        the outbox hands over in memory as it is committed (read back only after an overflow)."""
        after = 0
        caught_up = False
        while True:
            if caught_up:
                await link.wakeup.wait()
                link.wakeup.clear()
                fresh = link.take_fresh()
                if fresh is None:
                    caught_up = False
                    continue
                pending = [m for m in fresh if m.seq > after]
            else:
                link.take_fresh()  # what it holds is in the database: read below
                pending = await self._read_db(self._store.pending_for, link.peer, after, BATCH)
                caught_up = len(pending) < BATCH
            for chunk in frame_chunks(pending):
                await link.reserve(len(chunk))
                await link.send(messages_frame(chunk))
                after = chunk[-1].seq


class _StreamEnded(Exception):
    """The peer closed its side of the stream: a normal end of the link."""
