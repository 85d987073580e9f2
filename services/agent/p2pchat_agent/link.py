"""One open peer link: a symmetric bidirectional stream of Frames with one other agent.

The link knows nothing of databases: it holds the outgoing queue, the bounded queue of received
message batches (so a flood waits in HTTP/2 flow control, not in memory), and the window of
messages sent but not yet acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from p2pchat.v1 import peer_pb2 as pb
from p2pchat_agent.store import StoredMessage

RECEIVE_QUEUE_BATCHES = 16  # message batches read from the stream but not yet committed
SEND_WINDOW = 4096  # messages sent but not yet acknowledged
FRESH_LIMIT = 4096  # messages handed over in memory before the sender reads the outbox again
# Bytes of message bodies in one frame at most (a frame always carries at least one message),
# and the largest gRPC message a link accepts either way: one body at the largest allowed size
# (config.MAX_BODY_LIMIT) plus the rest of the frame fits with room to spare.
FRAME_BODY_BYTES = 4 * 1024 * 1024
MAX_PEER_MESSAGE = 16 * 1024 * 1024
# Messages in one frame at most, and ids in one AckBatch at most: no honest sender has more than
# SEND_WINDOW messages unacknowledged, so no frame of one needs more (this version sends at most
# delivery.BATCH; earlier ones handed up to FRESH_LIMIT over in one frame). The receiver enforces
# both, and FRAME_BODY_BYTES: a frame over a limit gives RESOURCE_EXHAUSTED, closes the link, and
# nothing of it is stored.
MAX_FRAME_MESSAGES = SEND_WINDOW
MAX_FRAME_ACKS = SEND_WINDOW


class PeerLink:
    def __init__(self, me: str, peer: str, dialed_by: str) -> None:
        self.me = me
        self.peer = peer
        self.dialed_by = dialed_by
        self._outgoing: asyncio.Queue[pb.Frame | None] = asyncio.Queue(64)
        self.received: asyncio.Queue[list[pb.PeerMessage]] = asyncio.Queue(RECEIVE_QUEUE_BATCHES)
        self.wakeup = asyncio.Event()  # set when new messages for `peer` are pending
        self._fresh: list[StoredMessage] = []  # just committed, not yet taken by the sender
        self._fresh_overflow = False
        self._window = asyncio.Condition()
        self.in_flight = 0
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"PeerLink({self.me}<->{self.peer}, dialed by {self.dialed_by})"

    def push_fresh(self, messages: list[StoredMessage]) -> None:
        """Hands over messages just committed as pending for this peer (in seq order)."""
        if self._fresh_overflow or len(self._fresh) + len(messages) > FRESH_LIMIT:
            self._fresh.clear()  # the sender is behind: it reads the outbox again instead
            self._fresh_overflow = True
        else:
            self._fresh.extend(messages)
        self.wakeup.set()

    def take_fresh(self) -> list[StoredMessage] | None:
        """The messages handed over since the last call, or None when some were dropped (the
        caller must read the outbox)."""
        fresh, overflow = self._fresh, self._fresh_overflow
        self._fresh, self._fresh_overflow = [], False
        return None if overflow else fresh

    async def send(self, frame: pb.Frame) -> None:
        await self._outgoing.put(frame)

    async def frames_out(self) -> AsyncIterator[pb.Frame]:
        """What the stream writes: frames until the link closes."""
        while True:
            frame = await self._outgoing.get()
            if frame is None:
                return
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

    async def reserve(self, count: int) -> None:
        """Waits until `count` more messages fit in the unacknowledged window."""
        async with self._window:
            await self._window.wait_for(
                lambda: self.in_flight == 0 or self.in_flight + count <= SEND_WINDOW
            )
            self.in_flight += count

    async def release(self, count: int) -> None:
        async with self._window:
            self.in_flight = max(0, self.in_flight - count)
            self._window.notify_all()
