"""`p2pchat send USER -`: every line of standard input as a message, over one Chat stream in
batches: whatever lines are waiting go in one ChatTexts, at once (nothing waits for a batch to
fill), held back by the agent's flow control rather than queued without bound. Prints each
stored message's id and state, in order, also when the stream fails part way."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import BinaryIO

from p2pchat.v1 import agent_pb2 as apb
from p2pchat_agent.cli.client import AgentConnection, CliError, Exit
from p2pchat_agent.cli.console import Console
from p2pchat_agent.cli.render import STATUS_NAMES, safe
from p2pchat_common.text import BODY_CONTROL

LINES_PER_INPUT = 500
QUEUED_LINES = 2_000  # read ahead of the stream at most

_END = None


class _Lines:
    """The lines of a byte stream, read by a daemon thread (a blocked read of stdin never holds
    the command's exit) into a bounded queue; lines that are not UTF-8 or hold control
    characters are counted and skipped."""

    def __init__(self, source: BinaryIO) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUED_LINES)
        self.skipped: Counter[str] = Counter()
        self._loop = asyncio.get_running_loop()
        self._source = source
        threading.Thread(target=self._read, name="stdin-lines", daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self._source:
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    self.skipped["they are not valid UTF-8"] += 1
                    continue
                if not line.strip():
                    continue
                if BODY_CONTROL.search(line):
                    self.skipped["they hold control characters"] += 1
                    continue
                self._put(line)
        finally:
            self._put(_END)

    def _put(self, line: str | None) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.queue.put(line), self._loop).result()
        except RuntimeError:  # the command has ended
            pass


def _warn(text: str) -> None:
    print(f"p2pchat: {text}", file=sys.stderr, flush=True)


async def send_lines(
    conn: AgentConnection,
    console: Console,
    peer: str,
    wait: float | None,
    source: BinaryIO | None = None,
) -> int:
    # A reader of its own on a copy of stdin's descriptor: at exit, the interpreter closes
    # sys.stdin, which must not be the object a daemon thread is blocked reading.
    lines = _Lines(source if source is not None else open(os.dup(sys.stdin.fileno()), "rb"))
    opened = asyncio.Event()  # the agent opened the chat (history_end): texts may go
    input_done = asyncio.Event()  # every line written
    finished = asyncio.Event()  # the input may end (with --wait: everything delivered)
    state = {"batches": False, "written": 0, "refused": 0}
    ours: Counter[str] = Counter()  # bodies written and not yet echoed
    sent: dict[str, apb.MessageStatus.ValueType] = {}  # id -> status, in the order stored

    async def inputs() -> AsyncIterator[apb.ChatInput]:
        yield apb.ChatInput(open=apb.ChatOpen(peer=peer, history_limit=1, batches=True))
        await opened.wait()  # a refused chat ends before any text is written
        while (line := await lines.queue.get()) is not _END:
            chunk = [line]
            while state["batches"] and len(chunk) < LINES_PER_INPUT and not lines.queue.empty():
                more = lines.queue.get_nowait()
                if more is _END:
                    lines.queue.put_nowait(_END)
                    break
                chunk.append(more)
            ours.update(chunk)
            state["written"] += len(chunk)
            if len(chunk) == 1:
                yield apb.ChatInput(text=apb.ChatText(body=chunk[0]))
            else:
                yield apb.ChatInput(
                    texts=apb.ChatTexts(texts=[apb.ChatText(body=b) for b in chunk])
                )
        input_done.set()
        await finished.wait()  # without --wait at once; with it, once delivered or timed out

    call = conn.stub.Chat(inputs())

    def check() -> None:
        settled = input_done.is_set() and len(sent) + state["refused"] >= state["written"]
        if settled and all(s == apb.MESSAGE_STATUS_DELIVERED for s in sent.values()):
            finished.set()

    async def watch() -> None:
        async for top in conn.events(call):
            events = top.batch.events if top.WhichOneof("kind") == "batch" else [top]
            for event in events:
                kind = event.WhichOneof("kind")
                if kind == "history_end":
                    state["batches"] = event.history_end.batches
                    opened.set()
                elif kind == "message" and opened.is_set():
                    m = event.message
                    if m.direction == apb.DIRECTION_OUTGOING and ours[m.body] > 0:
                        ours[m.body] -= 1
                        sent[m.id] = m.status
                elif kind == "deliveries":
                    for id in event.deliveries.ids:
                        if id in sent and sent[id] != apb.MESSAGE_STATUS_DELIVERED:
                            sent[id] = event.deliveries.status
                elif kind == "delivery" and event.delivery.id in sent:
                    if sent[event.delivery.id] != apb.MESSAGE_STATUS_DELIVERED:
                        sent[event.delivery.id] = event.delivery.status
                elif kind == "notice":
                    state["refused"] += 1
                    _warn(f"not sent: {safe(event.notice.message)}")
            if wait is not None:
                check()

    watcher = asyncio.create_task(watch())
    try:
        await _first(watcher, input_done)
        if not watcher.done():
            if wait is None:
                finished.set()
            else:
                check()
                await _first(watcher, finished, timeout=wait)
                finished.set()  # ends the input: the agent ends the chat
        await watcher  # the stream's error, if it failed
    finally:
        call.cancel()
        watcher.cancel()
        _report(console, sent, wait)
    skipped = sum(lines.skipped.values())
    for why, count in lines.skipped.items():
        _warn(f"{count} line(s) not sent: {why}")
    if state["refused"] or skipped:
        raise CliError(f"{state['refused'] + skipped} line(s) not sent", Exit.REFUSED)
    return Exit.OK


async def _first(
    task: asyncio.Task[None], event: asyncio.Event, timeout: float | None = None
) -> None:
    """Waits until `task` ends or `event` is set (or `timeout` passes)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _report(
    console: Console, sent: dict[str, apb.MessageStatus.ValueType], wait: float | None
) -> None:
    for id, status in sent.items():
        state = STATUS_NAMES.get(status, "unknown")
        if wait is not None and state in ("pending", "relayed"):
            state += " (not delivered in time; it stays queued)"
        console.say(f"{safe(id)} {state}")
