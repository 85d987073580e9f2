"""`p2pchat send USER -`: every line of standard input as a message, over one Chat stream in
batches (what is read together goes in one ChatTexts), held back by the agent's flow control
rather than queued without bound. Prints each stored message's id and state, in order."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import TextIO

from p2pchat.v1 import agent_pb2 as apb
from p2pchat_agent.cli.client import AgentConnection, CliError, Exit
from p2pchat_agent.cli.console import Console
from p2pchat_agent.cli.render import STATUS_NAMES, safe
from p2pchat_common.text import BODY_CONTROL

LINES_PER_INPUT = 500


async def _read_chunks(source: TextIO, out: asyncio.Queue[list[str] | None]) -> int:
    """Puts the non-blank lines of `source` on `out` in chunks (None at the end); returns how
    many lines were skipped for holding control characters."""
    skipped = 0
    while True:
        chunk = await asyncio.to_thread(_chunk, source)
        if not chunk:
            await out.put(None)
            return skipped
        kept = [line for line in chunk if line.strip() and not BODY_CONTROL.search(line)]
        skipped += sum(1 for line in chunk if line.strip() and BODY_CONTROL.search(line))
        if kept:
            await out.put(kept)


def _warn(text: str) -> None:
    print(f"p2pchat: {text}", file=sys.stderr, flush=True)


def _chunk(source: TextIO) -> list[str]:
    lines = []
    for line in source:
        lines.append(line.rstrip("\r\n"))
        if len(lines) == LINES_PER_INPUT:
            break
    return lines


async def send_lines(
    conn: AgentConnection,
    console: Console,
    peer: str,
    wait: float | None,
    source: TextIO = sys.stdin,
) -> int:
    chunks: asyncio.Queue[list[str] | None] = asyncio.Queue(4)
    input_done = asyncio.Event()  # every line written
    finished = asyncio.Event()  # what the agent stored is known (and delivered, with --wait)
    written = 0

    async def inputs() -> AsyncIterator[apb.ChatInput]:
        nonlocal written
        yield apb.ChatInput(open=apb.ChatOpen(peer=peer, history_limit=1, batches=True))
        while (chunk := await chunks.get()) is not None:
            written += len(chunk)
            yield apb.ChatInput(texts=apb.ChatTexts(texts=[apb.ChatText(body=b) for b in chunk]))
        input_done.set()
        if wait is not None:  # keep the stream open for the delivery updates
            await finished.wait()

    call = conn.stub.Chat(inputs())
    reader = asyncio.create_task(_read_chunks(source, chunks))
    sent: dict[str, apb.MessageStatus.ValueType] = {}  # id -> status, in the order stored
    refused = 0
    live = False
    delivered_pending = 0

    def settled() -> bool:
        return input_done.is_set() and len(sent) + refused >= written

    async def watch() -> None:
        nonlocal refused, live, delivered_pending
        async for top in conn.events(call):
            events = top.batch.events if top.WhichOneof("kind") == "batch" else [top]
            for event in events:
                kind = event.WhichOneof("kind")
                if kind == "history_end":
                    live = True
                elif (
                    kind == "message"
                    and live
                    and event.message.direction == (apb.DIRECTION_OUTGOING)
                ):
                    sent[event.message.id] = event.message.status
                elif kind == "deliveries":
                    for id in event.deliveries.ids:
                        if id in sent:
                            sent[id] = apb.MESSAGE_STATUS_DELIVERED
                elif kind == "notice":
                    refused += 1
                    _warn(f"not sent: {safe(event.notice.message)}")
            check()

    def check() -> None:
        if wait is not None and settled():
            if all(s != apb.MESSAGE_STATUS_PENDING for s in sent.values()):
                finished.set()

    watcher = asyncio.create_task(watch())
    try:
        if wait is not None:
            await input_done.wait()
            check()
            try:
                await asyncio.wait_for(finished.wait(), wait)
            except TimeoutError:
                pass
            finished.set()  # ends the input: the agent ends the chat
        await watcher
        skipped = await reader
    finally:
        call.cancel()
        reader.cancel()
        watcher.cancel()
    for id, status in sent.items():
        state = STATUS_NAMES.get(status, "unknown")
        if wait is not None and state == "pending":
            state += " (not delivered in time; it stays queued)"
        console.say(f"{safe(id)} {state}")
    if skipped:
        _warn(f"{skipped} line(s) not sent: they hold control characters")
    if refused or skipped:
        raise CliError(f"{refused + skipped} line(s) not sent", Exit.REFUSED)
    return Exit.OK
