"""The direct transport: one `PeerService.Link` stream with another agent, over mutual TLS.

It frames what Delivery sends (a batch of messages is one frame; acks are cut into frames of
MAX_FRAME_ACKS ids) and checks every frame where it arrives, whole, before anything of it is
handed on: the limits below (RESOURCE_EXHAUSTED), then each message or ack id (INVALID_ARGUMENT,
or PERMISSION_DENIED for a message not from the peer or not for us). A refused frame ends the
link. (The peer service skips the generic request check of p2pchat_common.errors for speed:
this is its check.) Who the peer is was settled before: peer.py checks the certificate and the
Hellos (handshake.py) on this very stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from p2pchat.v1 import peer_pb2 as pb
from p2pchat_agent.delivery import SEND_WINDOW
from p2pchat_agent.ids import valid_message_id
from p2pchat_agent.messages import IncomingMessage, StoredMessage
from p2pchat_agent.transport import BATCH_BODY_BYTES, AcksReceived, MessagesReceived, Received
from p2pchat_common.errors import InvalidArgument, PermissionDenied, TooLarge
from p2pchat_common.text import BODY_CONTROL
from p2pchat_common.timestamps import from_timestamp, timestamp_parts, valid_timestamp
from p2pchat_common.validation import shown, utf8_size_over

# Bytes of message bodies in one frame at most (a frame always carries at least one message),
# and the largest gRPC message a link accepts either way: one body at the largest allowed size
# (config.MAX_BODY_LIMIT) plus the rest of the frame fits with room to spare.
FRAME_BODY_BYTES = BATCH_BODY_BYTES
MAX_PEER_MESSAGE = 16 * 1024 * 1024
# Messages in one frame at most, and ids in one AckBatch at most: no honest sender has more than
# SEND_WINDOW messages unacknowledged, so no frame of one needs more (this version sends at most
# transport.BATCH; earlier ones handed up to FRESH_LIMIT over in one frame). The receiver enforces
# both, and FRAME_BODY_BYTES: a frame over a limit gives RESOURCE_EXHAUSTED, closes the link, and
# nothing of it is stored.
MAX_FRAME_MESSAGES = SEND_WINDOW
MAX_FRAME_ACKS = SEND_WINDOW
OUTGOING_FRAMES = 64  # frames queued for the stream's writer at most
_ID_RULE = "1-64 characters of [0-9A-Za-z_-]"
_BODY_RULE = "tab and line breaks are the only control characters a message body may hold"


def messages_frame(messages: list[StoredMessage]) -> pb.Frame:
    """A frame carrying `messages`, built in place: twice as fast as making each PeerMessage
    (and its Timestamp) and copying it into the batch."""
    frame = pb.Frame()
    add = frame.messages.messages.add
    for m in messages:
        sent_at = add(id=m.id, sender=m.sender, recipient=m.recipient, body=m.body).sent_at
        sent_at.seconds, sent_at.nanos = timestamp_parts(m.sent_at)
    return frame


@dataclass(slots=True)
class FrameCounts:
    """gRPC messages written and read on links (Hellos included), shared by the links of one
    session: what `p2pchat status` reports as link frames."""

    sent: int = 0
    received: int = 0


class DirectLink:
    """A Transport over one Link stream: `frames_out()` is what the stream writes, `incoming`
    what it reads after the Hellos (the dialler sets it once the call exists: the call needs
    `frames_out()` first)."""

    def __init__(
        self,
        me: str,
        peer: str,
        device: str,
        dialed_by: str,
        body_limit: int,
        incoming: AsyncIterator[pb.Frame] | None = None,
        counts: FrameCounts | None = None,
    ) -> None:
        self.me = me
        self._peer = peer
        self.counts = counts if counts is not None else FrameCounts()
        self._device = device  # the peer's device: its certificate's key (tls.device_id)
        self.dialed_by = dialed_by
        self.incoming = incoming
        self._body_limit = body_limit
        self._outgoing: asyncio.Queue[pb.Frame | None] = asyncio.Queue(OUTGOING_FRAMES)
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"DirectLink({self.me}<->{self._peer}, dialed by {self.dialed_by})"

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def device(self) -> str:
        return self._device

    @property
    def relays(self) -> bool:
        return False

    # -- sending ----------------------------------------------------------------------------

    async def send(self, frame: pb.Frame) -> None:
        await self._outgoing.put(frame)

    async def send_messages(self, messages: list[StoredMessage]) -> None:
        await self._outgoing.put(messages_frame(messages))

    async def send_acks(self, ids: list[str]) -> None:
        for start in range(0, len(ids), MAX_FRAME_ACKS):
            chunk = ids[start : start + MAX_FRAME_ACKS]
            await self._outgoing.put(pb.Frame(acks=pb.AckBatch(ids=chunk)))

    async def frames_out(self) -> AsyncIterator[pb.Frame]:
        """What the stream writes: frames until the link closes."""
        while True:
            frame = await self._outgoing.get()
            if frame is None:
                return
            self.counts.sent += 1
            yield frame

    def close(self) -> None:
        if self.closed:
            return
        self._closed.set()
        # Wake the writer even when the queue is full: drop what is queued, it will be resent.
        while not self._outgoing.empty():
            self._outgoing.get_nowait()
        self._outgoing.put_nowait(None)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Returns once the link was closed (from either end)."""
        await self._closed.wait()

    # -- receiving --------------------------------------------------------------------------

    async def received(self) -> AsyncIterator[Received]:
        if self.incoming is None:
            raise RuntimeError("the link's incoming stream is not set")
        async for frame in self.incoming:
            self.counts.received += 1
            kind = frame.WhichOneof("kind")
            if kind == "messages":
                yield MessagesReceived(self._checked_messages(frame.messages.messages))
            elif kind == "acks":
                yield AcksReceived(_checked_acks(frame.acks.ids))
            elif kind == "hello":
                raise InvalidArgument("unexpected second Hello on the link")

    def _checked_messages(self, batch: Sequence[pb.PeerMessage]) -> list[IncomingMessage]:
        if len(batch) > MAX_FRAME_MESSAGES:
            raise TooLarge(
                f"a frame carries at most {MAX_FRAME_MESSAGES} messages, not {len(batch)}"
            )
        messages = list(batch)
        chars = 0
        for m in messages:
            chars += self._check(m)
        if chars > FRAME_BODY_BYTES // 4:  # else even 4 bytes a character fit
            _check_frame_bodies(messages, chars)
        return [
            IncomingMessage(
                id=m.id,
                sender=m.sender,
                recipient=m.recipient,
                body=m.body,
                sent_at=from_timestamp(m.sent_at),
            )
            for m in messages
        ]

    def _check(self, m: pb.PeerMessage) -> int:
        """Refuses a message this link may not carry; returns its body's length in characters."""
        if m.sender != self._peer:
            raise PermissionDenied(
                f"message claims sender {shown(m.sender)} but the link belongs to "
                f"{shown(self._peer)}"
            )
        if m.recipient != self.me:
            raise PermissionDenied(f"message is for {shown(m.recipient)}, not {shown(self.me)}")
        if not valid_message_id(m.id):
            raise InvalidArgument(f"message id must be {_ID_RULE}")
        if not valid_timestamp(m.sent_at):
            raise InvalidArgument("message sent_at must be between 1970 and 9999")
        body = m.body  # read once: each read makes a new str
        check_body(body, self._body_limit)
        return len(body)


def check_body(body: str, limit: int) -> None:
    """InvalidArgument for a body this agent does not store, whichever way it came: empty,
    over `limit` bytes of UTF-8, or holding a control character other than tab and line
    breaks."""
    if not body or utf8_size_over(body, limit) is not None:
        raise InvalidArgument(f"message body must be 1-{limit} bytes of UTF-8")
    if not body.isprintable() and BODY_CONTROL.search(body):  # isprintable: the fast "no"
        raise InvalidArgument(_BODY_RULE)


def _checked_acks(ids: Sequence[str]) -> list[str]:
    if len(ids) > MAX_FRAME_ACKS:
        raise TooLarge(f"a frame carries at most {MAX_FRAME_ACKS} acks, not {len(ids)}")
    checked = list(ids)
    for id in checked:
        if not valid_message_id(id):
            raise InvalidArgument(f"an acknowledged id must be {_ID_RULE}")
    return checked


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
