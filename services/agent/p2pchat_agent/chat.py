"""The two live streams of the CLI, as use cases that know no protobuf: "Connect to user" (a chat
with one contact) and "Set up as server" (everything incoming, from anyone). control.py only
translates what they yield into ChatEvents and what the CLI writes into texts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from p2pchat_agent.agent import Agent
from p2pchat_agent.events import Event, InputEnded, Item, MessageEvent, Notice
from p2pchat_agent.messages import StoredMessage
from p2pchat_common.errors import DomainError
from p2pchat_common.validation import normalize_username


@dataclass(frozen=True)
class Past:
    """A message of the history shown first."""

    message: StoredMessage


@dataclass(frozen=True)
class PastEnd:
    """The history shown first is over; what follows is live."""


ChatItem = Past | PastEnd | Event | Notice


def event_peer(event: Event) -> str:
    return event.message.peer if isinstance(event, MessageEvent) else event.peer


# Backpressure on a chat's input (ChatInput): the agent reads the next input only while fewer
# than IN_FLIGHT of this chat's texts wait for their commit and fewer than UNREAD events wait
# for the client to read them. A faster writer is held back by gRPC flow control (the agent
# stops reading its stream), never dropped; only a client that stops reading while others'
# messages pile up is (events.QUEUE_LIMIT).
IN_FLIGHT = 2_000
UNREAD = 1_000
SLICE = 100  # texts of one input submitted between two checks


async def chat(
    agent: Agent, username: str, history_limit: int, texts: AsyncIterator[list[str]]
) -> AsyncIterator[list[ChatItem]]:
    """A chat with `username`: the last `history_limit` messages, then live messages, delivery
    updates, key warnings and the notices of texts refused, until `texts` ends (once what it
    sent is committed or refused) or fails. Yields what is ready together, in order: a burst
    goes at once, nothing waits to fill a batch. Texts (several per input at will) are queued
    in order without waiting for each commit: a fast writer is limited by group commit, not by a
    transaction each, and held back (see IN_FLIGHT, UNREAD) rather than queued without bound."""
    peer = normalize_username(username)
    await agent.require_contact(peer)
    with agent.events.subscribe(lambda e: event_peer(e) == peer) as sub:

        def refused(exc: BaseException) -> None:
            code = exc.code.name if isinstance(exc, DomainError) else "INTERNAL"
            sub.put(Notice(code, str(exc)))

        submitted: set[asyncio.Future[StoredMessage]] = set()
        room = asyncio.Event()  # set when fewer than IN_FLIGHT texts wait for their commit

        def stored(future: asyncio.Future[StoredMessage]) -> None:
            submitted.discard(future)
            if len(submitted) < IN_FLIGHT:
                room.set()
            exc = None if future.cancelled() else future.exception()
            if exc is not None:
                refused(exc)

        async def read_texts() -> None:
            async for bodies in texts:
                # A slice at a time: one input may hold thousands of texts, and the checks
                # below must hold between them, not only between inputs.
                for start in range(0, len(bodies), SLICE):
                    for body in bodies[start : start + SLICE]:
                        try:
                            future = agent.submit(peer, body)
                        except DomainError as exc:
                            refused(exc)
                            continue
                        submitted.add(future)
                        future.add_done_callback(stored)
                    while len(submitted) >= IN_FLIGHT:
                        room.clear()
                        await room.wait()
                    await sub.room(UNREAD)
            # The CLI closed its side: the chat ends once what it sent is committed (or
            # refused, with its notice shown first).
            await asyncio.gather(*submitted, return_exceptions=True)

        def input_ended(task: asyncio.Task[None]) -> None:
            sub.put(InputEnded(None if task.cancelled() else task.exception()))

        history, _ = await agent.history(peer, history_limit)
        shown = {m.id for m in history}
        yield [*(Past(m) for m in history), PastEnd()]
        reader = asyncio.create_task(read_texts())
        reader.add_done_callback(input_ended)
        try:
            # One queue holds the live events, this chat's notices and the end of its input, in
            # order: one wait per burst, no task per event.
            while True:
                burst: list[ChatItem] = []
                item: Item | None = await sub.get()
                while item is not None:
                    if isinstance(item, InputEnded):
                        if burst:
                            yield burst
                        if item.error is not None:
                            raise item.error
                        return  # the CLI closed its side: end the chat
                    if not (isinstance(item, MessageEvent) and item.message.id in shown):
                        burst.append(item)
                    item = sub.get_nowait()
                if burst:
                    yield burst
        finally:
            reader.cancel()


async def serve(agent: Agent) -> AsyncIterator[list[Event]]:
    """Every incoming message from anyone, and delivery updates and key warnings, live; what is
    ready together comes as one list."""
    agent.identity()  # FAILED_PRECONDITION when logged out

    def wanted(event: Event) -> bool:
        if isinstance(event, MessageEvent):
            return event.message.direction == "in"
        return True

    with agent.events.subscribe(wanted) as sub:
        while True:
            burst: list[Event] = []
            item: Item | None = await sub.get()
            while item is not None:
                assert not isinstance(item, Notice | InputEnded)  # only a chat puts those
                burst.append(item)
                item = sub.get_nowait()
            yield burst
