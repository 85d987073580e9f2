"""Delivery over a transport: nothing lost, nothing shown twice (DESIGN.md "Delivery").

- Outgoing: messages are already committed as pending; whatever is pending for the peer goes out
  in order, as many as are waiting in one batch (one when only one is: never wait to fill).
- Incoming: batches that arrived together are committed in one transaction (group commit),
  then acknowledged together; ids already stored are acknowledged again but stored once.
- Acks mark messages delivered. A run that ends leaves the rest pending for the next one.

Delivery knows no wire and no socket: it runs over a `Transport` (transport.py), which checks and
decodes what arrives and frames what leaves. The direct link is one (direct.py); unit tests run
it over an in-memory one.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from p2pchat_agent.agent_store import AgentStore
from p2pchat_agent.events import DeliveryEvent, EventHub, MessageEvent
from p2pchat_agent.messages import IncomingMessage, Status, StoredMessage
from p2pchat_agent.transport import (
    BATCH,
    AcksReceived,
    HeldByMailbox,
    MessagesReceived,
    Transport,
    batches,
)
from p2pchat_common.errors import Unavailable

log = logging.getLogger(__name__)

RECEIVE_QUEUE_BATCHES = 16  # batches received but not yet committed (then the reader waits)
SEND_WINDOW = 4096  # messages sent but not yet acknowledged
FRESH_LIMIT = 4096  # messages handed over in memory before the sender reads the outbox again


class Outflow:
    """What Delivery keeps for one open transport on the sending side: the messages the outbox
    hands over in memory as they are committed, and the window of messages sent but not yet
    acknowledged (so a slow peer holds the sender back, not memory)."""

    def __init__(self) -> None:
        self.wakeup = asyncio.Event()  # set when new messages for the peer are pending
        self._fresh: list[StoredMessage] = []  # just committed, not yet taken by the sender
        self._fresh_overflow = False
        self._window = asyncio.Condition()
        self._in_flight: set[str] = set()  # ids sent on this transport, not yet acknowledged
        self.rewind = False  # set by reread: send again from the start of the outbox
        # Since when the oldest message in flight has waited for its ack (loop time; None with
        # none in flight): the watchdog's measure of a link that stopped answering.
        self.waiting_since: float | None = None

    def push_fresh(self, messages: list[StoredMessage]) -> None:
        """Hands over messages just committed as pending for this peer (in seq order)."""
        if self._fresh_overflow or len(self._fresh) + len(messages) > FRESH_LIMIT:
            self._fresh.clear()  # the sender is behind: it reads the outbox again instead
            self._fresh_overflow = True
        else:
            self._fresh.extend(messages)
        self.wakeup.set()

    def reread(self) -> None:
        """Makes the sender read the outbox again from its start: messages older than what it
        sent last became pending there again (a relayed envelope expired)."""
        self._fresh.clear()
        self._fresh_overflow = True
        self.rewind = True
        self.wakeup.set()

    def take_fresh(self) -> list[StoredMessage] | None:
        """The messages handed over since the last call, or None when some were dropped (the
        caller must read the outbox)."""
        fresh, overflow = self._fresh, self._fresh_overflow
        self._fresh, self._fresh_overflow = [], False
        return None if overflow else fresh

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def reserve(self, ids: list[str]) -> None:
        """Waits until the messages `ids` fit in the unacknowledged window, then counts them."""
        async with self._window:
            await self._window.wait_for(
                lambda: not self._in_flight or len(self._in_flight) + len(ids) <= SEND_WINDOW
            )
            if not self._in_flight:
                self.waiting_since = asyncio.get_running_loop().time()
            self._in_flight.update(ids)

    async def release(self, ids: list[str]) -> None:
        """`ids` were acknowledged (or taken by the mailbox). Only ids sent on this transport
        count: an ack for a message that went another way (a receipt, on this link, for one
        the mailbox carried) neither opens the window nor tells the watchdog that all is well."""
        in_flight = self._in_flight
        if not in_flight.intersection(ids):
            return
        async with self._window:
            in_flight.difference_update(ids)
            self.waiting_since = asyncio.get_running_loop().time() if in_flight else None
            self._window.notify_all()


class Delivery:
    def __init__(self, store: AgentStore, events: EventHub, ack_timeout: float = 0.0) -> None:
        """`ack_timeout`: a direct link whose peer acknowledges nothing for this many seconds
        while messages wait is declared dead (0: never), so that a frozen or cut-off peer is
        found even where TCP and HTTP/2 keepalives say nothing."""
        self._store = store
        self._events = events
        self._ack_timeout = ack_timeout

    async def run(self, transport: Transport, outflow: Outflow) -> None:
        """Runs delivery over `transport` until it ends or fails; raises the error that ended
        it. `outflow` is where the outbox hands this peer's new messages over."""
        received: asyncio.Queue[list[IncomingMessage]] = asyncio.Queue(RECEIVE_QUEUE_BATCHES)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._send_pending(transport, outflow))
                tasks.create_task(self._commit_received(transport, received))
                tasks.create_task(self._until_closed(transport))
                if self._ack_timeout and not transport.relays:
                    tasks.create_task(self._watchdog(transport, outflow))
                await self._read(transport, outflow, received)
                raise _Ended()
        except BaseExceptionGroup as group:
            errors = [e for e in group.exceptions if not isinstance(e, _Ended)]
            if errors:
                raise errors[0] from None
        finally:
            transport.close()

    async def _until_closed(self, transport: Transport) -> None:
        """Ends the run when this side closes the transport (shutdown, logout, a replaced
        link), even while the other side keeps its side open."""
        await transport.wait_closed()
        raise _Ended()

    async def _watchdog(self, transport: Transport, outflow: Outflow) -> None:
        """Ends the run when the peer leaves messages unacknowledged for `ack_timeout`."""
        loop = asyncio.get_running_loop()
        limit = self._ack_timeout
        while True:
            await asyncio.sleep(limit / 3)  # found within 4/3 of the limit at most
            since = outflow.waiting_since
            if since is not None and loop.time() - since > limit:
                raise Unavailable(
                    f"{transport.peer} acknowledged nothing for {limit:g} s: the link is dead"
                )

    # -- receiving --------------------------------------------------------------------------

    async def _read(
        self,
        transport: Transport,
        outflow: Outflow,
        received: asyncio.Queue[list[IncomingMessage]],
    ) -> None:
        async for event in transport.received():
            if isinstance(event, MessagesReceived):
                if event.messages:
                    await received.put(event.messages)
            elif isinstance(event, AcksReceived):
                await self._acknowledged(transport, outflow, event.ids)
            elif isinstance(event, HeldByMailbox):
                await self._relayed(transport, outflow, event)

    async def _commit_received(
        self, transport: Transport, received: asyncio.Queue[list[IncomingMessage]]
    ) -> None:
        while True:
            batch = await received.get()
            while not received.empty():  # group commit: everything that has arrived
                batch.extend(received.get_nowait())
            await self.commit(batch)
            await transport.send_acks([m.id for m in batch])

    async def commit(self, messages: list[IncomingMessage]) -> list[StoredMessage]:
        """Commits messages that arrived (whichever way), once each, and shows the new ones."""
        stored = await self._store.store_incoming(messages, datetime.now(UTC))
        if self._events.listening:
            for message in stored:
                self._events.publish(MessageEvent(message))
        return stored

    async def acknowledged(self, peer: str, ids: list[str], device: str) -> None:
        """`peer`'s `device` committed our messages `ids` (an ack on any path)."""
        when = datetime.now(UTC)
        changed = await self._store.mark_delivered(peer, ids, when, device)
        if changed:
            self._events.publish(DeliveryEvent(peer, tuple(changed), when))

    async def _acknowledged(self, transport: Transport, outflow: Outflow, ids: list[str]) -> None:
        await outflow.release(ids)
        await self.acknowledged(transport.peer, ids, transport.device)

    async def _relayed(self, transport: Transport, outflow: Outflow, held: HeldByMailbox) -> None:
        """The mailbox holds them: out of the window (their receipt may take days)."""
        await outflow.release(held.ids)
        changed = await self._store.mark_relayed(transport.peer, held.ids, held.until)
        if changed:
            when = datetime.now(UTC)
            event = DeliveryEvent(transport.peer, tuple(changed), when, Status.RELAYED)
            self._events.publish(event)

    # -- sending ----------------------------------------------------------------------------

    async def _send_pending(self, transport: Transport, outflow: Outflow) -> None:
        """Sends the outbox for this peer in order: first what the database holds, then what
        the outbox hands over in memory as it is committed (read back only after an overflow)."""
        after = 0
        caught_up = False
        while True:
            if caught_up:
                await outflow.wakeup.wait()
                outflow.wakeup.clear()
                fresh = outflow.take_fresh()
                if fresh is None:
                    caught_up = False
                    if outflow.rewind:
                        outflow.rewind, after = False, 0
                    continue
                pending = [m for m in fresh if m.seq > after]  # just committed: not relayed
            else:
                outflow.take_fresh()  # what it holds is in the database: read below
                pending = await self._store.pending_for(
                    transport.peer, after, BATCH, transport.device, transport.relays
                )
                caught_up = len(pending) < BATCH
            for batch in batches(pending):
                await outflow.reserve([m.id for m in batch])
                await transport.send_messages(batch)
                after = batch[-1].seq


class _Ended(Exception):
    """The transport ended (either side): a normal end of the run."""
