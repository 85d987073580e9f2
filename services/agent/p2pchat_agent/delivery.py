"""Delivery over a link: nothing lost, nothing shown twice (DESIGN.md "Delivery").

- Outgoing: messages are already committed as pending; whatever is pending for the peer goes out
  in order, as many as are waiting in one frame (one when only one is: never wait to fill).
- Incoming: batches that arrived together are committed in one transaction (group commit),
  then acknowledged together; ids already stored are acknowledged again but stored once.
- Acks mark messages delivered. A link that ends leaves the rest pending for the next link.
- Every frame is checked where it arrives, whole, before anything of it is stored or applied
  (the peer service skips the generic request check for speed; this is its check): the limits
  of link.py (RESOURCE_EXHAUSTED), then each message or ack id (INVALID_ARGUMENT, or
  PERMISSION_DENIED for a forged sender). A refused frame ends the link.
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
from p2pchat_agent.link import FRAME_BODY_BYTES, MAX_FRAME_ACKS, MAX_FRAME_MESSAGES, PeerLink
from p2pchat_agent.store import IncomingMessage, MessageStore, StoredMessage
from p2pchat_common.errors import InvalidArgument, PermissionDenied, TooLarge
from p2pchat_common.text import BODY_CONTROL
from p2pchat_common.timestamps import from_timestamp, timestamp_parts, valid_timestamp
from p2pchat_common.validation import shown, utf8_size_over

log = logging.getLogger(__name__)

BATCH = 500  # messages in one frame at most (link.MAX_FRAME_MESSAGES is what a receiver takes)
_ID_RULE = "1-64 characters of [0-9A-Za-z_-]"
_BODY_RULE = "tab and line breaks are the only control characters a message body may hold"


def frame_chunks(messages: list[StoredMessage]) -> Iterator[list[StoredMessage]]:
    """`messages` cut into frames of at most BATCH messages and FRAME_BODY_BYTES of bodies
    (4 bytes per character at most in UTF-8: a bound, no encoding), at least one message each."""
    chunk: list[StoredMessage] = []
    size = 0
    for m in messages:
        bound = 4 * len(m.body)
        if chunk and (size + bound > FRAME_BODY_BYTES or len(chunk) == BATCH):
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
                batch = frame.messages.messages
                if len(batch) > MAX_FRAME_MESSAGES:
                    raise TooLarge(
                        f"a frame carries at most {MAX_FRAME_MESSAGES} messages, not {len(batch)}"
                    )
                messages = list(batch)
                chars = 0
                for m in messages:
                    chars += self._check(link, m)
                if chars > FRAME_BODY_BYTES // 4:  # else even 4 bytes a character fit
                    _check_frame_bodies(messages, chars)
                if messages:
                    await link.received.put(messages)
            elif kind == "acks":
                ids = frame.acks.ids
                if len(ids) > MAX_FRAME_ACKS:
                    raise TooLarge(f"a frame carries at most {MAX_FRAME_ACKS} acks, not {len(ids)}")
                await self._acknowledged(link, list(ids))
            elif kind == "hello":
                raise InvalidArgument("unexpected second Hello on the link")

    def _check(self, link: PeerLink, m: pb.PeerMessage) -> int:
        """Refuses a message this link may not carry; returns its body's length in characters."""
        if m.sender != link.peer:
            raise PermissionDenied(
                f"message claims sender {shown(m.sender)} but the link belongs to "
                f"{shown(link.peer)}"
            )
        if m.recipient != link.me:
            raise PermissionDenied(f"message is for {shown(m.recipient)}, not {shown(link.me)}")
        if not valid_message_id(m.id):
            raise InvalidArgument(f"message id must be {_ID_RULE}")
        if not valid_timestamp(m.sent_at):
            raise InvalidArgument("message sent_at must be between 1970 and 9999")
        body = m.body  # read once: each read makes a new str
        if not body or utf8_size_over(body, self._body_limit) is not None:
            raise InvalidArgument(f"message body must be 1-{self._body_limit} bytes of UTF-8")
        if not body.isprintable() and BODY_CONTROL.search(body):  # isprintable: the fast "no"
            raise InvalidArgument(_BODY_RULE)
        return len(body)

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
            ids = [m.id for m in batch]  # up to RECEIVE_QUEUE_BATCHES frames' worth
            for start in range(0, len(ids), MAX_FRAME_ACKS):
                await link.send(pb.Frame(acks=pb.AckBatch(ids=ids[start : start + MAX_FRAME_ACKS])))

    async def _acknowledged(self, link: PeerLink, ids: list[str]) -> None:
        for id in ids:
            if not valid_message_id(id):
                raise InvalidArgument(f"an acknowledged id must be {_ID_RULE}")
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


def _check_frame_bodies(messages: list[pb.PeerMessage], chars: int) -> None:
    """TooLarge when the bodies of one frame hold more than FRAME_BODY_BYTES of UTF-8 (`chars`
    characters in all): an ASCII body is as long in bytes as in characters, others are encoded."""
    size = chars
    if size <= FRAME_BODY_BYTES:
        for m in messages:
            if not m.body.isascii():
                size += len(m.body.encode()) - len(m.body)
    if size > FRAME_BODY_BYTES:
        raise TooLarge(f"a frame carries at most {FRAME_BODY_BYTES} bytes of message bodies")


class _StreamEnded(Exception):
    """The peer closed its side of the stream: a normal end of the link."""
