"""An in-memory Transport pair: Delivery over it with no sockets, no TLS, no protobuf. Each end
records what it was asked to send, and can be told to fail partway (a transport that breaks
mid-batch)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from p2pchat_agent.messages import IncomingMessage, StoredMessage
from p2pchat_agent.transport import AcksReceived, MessagesReceived, Received
from p2pchat_common.errors import Unavailable


class MemoryTransport:
    def __init__(self, me: str, peer: str, device: str = "") -> None:
        self.me = me
        self._peer = peer
        self._device = device
        self.inbox: asyncio.Queue[Received | None] = asyncio.Queue()
        self.other: MemoryTransport | None = None
        self.sent: list[list[str]] = []  # ids of each batch sent
        self.acked: list[list[str]] = []  # ids of each ack sent
        self.fail_after: int | None = None  # messages sent before send_messages fails
        self._closed = asyncio.Event()

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def device(self) -> str:
        return self._device

    @property
    def relays(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def received(self) -> AsyncIterator[Received]:
        while True:
            event = await self.inbox.get()
            if event is None:
                return
            yield event

    async def send_messages(self, messages: list[StoredMessage]) -> None:
        if self.fail_after is not None and sum(map(len, self.sent)) + len(messages) > (
            self.fail_after
        ):
            raise Unavailable("the in-memory transport broke")
        self.sent.append([m.id for m in messages])
        incoming = [
            IncomingMessage(m.id, m.sender, m.recipient, m.body, m.sent_at) for m in messages
        ]
        self._deliver(MessagesReceived(incoming))

    async def send_acks(self, ids: list[str]) -> None:
        self.acked.append(list(ids))
        self._deliver(AcksReceived(list(ids)))

    def _deliver(self, event: Received) -> None:
        if self.other is not None and not self.other.closed:
            self.other.inbox.put_nowait(event)

    def close(self) -> None:
        """Ends both sides, as a stream that closes does."""
        if self.closed:
            return
        self._closed.set()
        self.inbox.put_nowait(None)
        if self.other is not None:
            self.other.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()


def memory_pair(
    a: str, b: str, b_device: str = "", a_device: str = ""
) -> tuple[MemoryTransport, MemoryTransport]:
    """(a's end towards b's `b_device`, b's end towards a's `a_device`)."""
    one, two = MemoryTransport(a, b, b_device), MemoryTransport(b, a, a_device)
    one.other, two.other = two, one
    return one, two
