"""The live screens: "Connect to user" (a chat with one contact) and "Set up as server"
(every incoming message, with replies). Incoming messages and delivery updates are printed as
they arrive, above the line being typed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

import grpc

from p2pchat.v1 import agent_pb2 as apb
from p2pchat_agent.cli.client import AgentConnection, CliError, Exit
from p2pchat_agent.cli.console import Console
from p2pchat_agent.cli.render import delivery_line, message_line, safe
from p2pchat_common.text import BODY_CONTROL

CHAT_HELP = "commands: /history N, /search TEXT, /quit (or Ctrl-D) to leave"
SERVE_HELP = (
    "type '@user text' to message someone, plain text replies to the last sender, "
    "/quit (or Ctrl-D) to leave"
)


class _Printer:
    """Prints a stream's events; remembers bodies so delivery updates can name the message."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bodies: dict[str, str] = {}
        self.last_sender = ""
        self.history_done = asyncio.Event()
        self.batches = False  # the agent takes ChatTexts (HistoryEnd.batches)

    def _body(self, update: apb.DeliveryUpdate) -> str:
        """The body of the message updated (kept until it is delivered)."""
        if update.status == apb.MESSAGE_STATUS_DELIVERED:
            return self.bodies.pop(update.id, "")
        return self.bodies.get(update.id, "")

    def show(self, event: apb.ChatEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "batch":
            for one in event.batch.events:
                self.show(one)
        elif kind == "deliveries":
            updates = event.deliveries
            for id in updates.ids:
                update = apb.DeliveryUpdate(
                    id=id,
                    peer=updates.peer,
                    status=updates.status,
                    delivered_at=updates.delivered_at,
                )
                self.console.say(delivery_line(update, self._body(update)))
        elif kind == "message":
            m = event.message
            self.bodies[m.id] = m.body
            if m.direction == apb.DIRECTION_INCOMING:
                self.last_sender = m.sender
            self.console.say(message_line(m))
        elif kind == "delivery":
            self.console.say(delivery_line(event.delivery, self._body(event.delivery)))
        elif kind == "history_end":
            self.batches = event.history_end.batches
            self.history_done.set()
        elif kind == "key_changed":
            k = event.key_changed
            peer, pinned, presented = safe(k.peer), safe(k.pinned_sha256), safe(k.presented_sha256)
            self.console.say(
                f"  ! WARNING: {peer}'s key changed ({pinned[:16]}… -> {presented[:16]}…). "
                f"Messages with {peer} are held until you run `p2pchat trust {peer}` — do so "
                f"only if {peer} really moved to a new agent."
            )
        elif kind == "notice":
            self.console.error(safe(event.notice.message))

    async def run(self, conn: AgentConnection, stream: AsyncIterable[apb.ChatEvent]) -> None:
        async for event in conn.events(stream):
            self.show(event)


async def _until_ready(printer_task: asyncio.Task[None], ready: asyncio.Event) -> None:
    """Waits for the history (or the stream's failure, raised here)."""
    waiter = asyncio.ensure_future(ready.wait())
    done, _ = await asyncio.wait({printer_task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if printer_task in done:
        printer_task.result()  # raises CliError when the agent refused the chat
        raise CliError("the chat ended before it began", Exit.REFUSED)


async def _read_lines(
    console: Console, me: str, stream: asyncio.Task[None], handle: Callable[[str], Awaitable[None]]
) -> None:
    """Reads what the user types until /quit, Ctrl-D or Ctrl-C (or the stream ends), passing
    each non-empty line to `handle`; printed events appear above the line being typed."""
    with console.live():
        while not stream.done():
            try:
                line = await console.ask(f"{safe(me)}> ", erase=True)
            except (EOFError, KeyboardInterrupt):
                break
            if line.strip() in ("/quit", "/exit", "/q"):
                break
            if line.strip():
                await handle(line)
    if stream.done():
        stream.result()  # the agent ended the stream: say why


LINES_PER_INPUT = 500


async def _batches(
    lines: asyncio.Queue[str | None], batches: Callable[[], bool]
) -> AsyncIterator[apb.ChatInput]:
    """Lines as ChatInputs until None: while `batches()` (the agent takes ChatTexts), every
    line waiting goes in one input, at once; nothing waits for a batch to fill."""
    while True:
        line = await lines.get()
        if line is None:
            return
        texts = [apb.ChatText(body=line)]
        while batches() and len(texts) < LINES_PER_INPUT and not lines.empty():
            more = lines.get_nowait()
            if more is None:
                yield apb.ChatInput(texts=apb.ChatTexts(texts=texts))
                return
            texts.append(apb.ChatText(body=more))
        if len(texts) == 1:
            yield apb.ChatInput(text=texts[0])
        else:
            yield apb.ChatInput(texts=apb.ChatTexts(texts=texts))


async def _stop(call: grpc.aio.Call, stream: asyncio.Task[None]) -> None:
    call.cancel()
    stream.cancel()
    with contextlib.suppress(asyncio.CancelledError, CliError):
        await stream


async def _show_history(conn: AgentConnection, console: Console, peer: str, arg: str) -> None:
    query = ""
    limit = 20
    if arg.startswith("/search"):
        query = arg.removeprefix("/search").strip()
        if not query:
            console.error("usage: /search TEXT")
            return
    else:
        text = arg.removeprefix("/history").strip() or "20"
        if not text.isdigit() or not 1 <= int(text) <= 1000:
            console.error("usage: /history N (1-1000)")
            return
        limit = int(text)
    response = await conn.history(peer, limit=limit, query=query)
    title = f"search {query!r}" if query else f"last {limit}"
    console.say(f"--- {title}: {len(response.messages)} message(s) ---")
    for m in response.messages:
        console.say(message_line(m))
    console.say("--- end ---")


async def chat(conn: AgentConnection, console: Console, peer: str, me: str) -> None:
    """Prints the history with `peer`, then chats live until /quit, Ctrl-D or Ctrl-C."""
    # Not bounded: what the user typed or pasted waits here while the agent holds the stream
    # back, and a line put after the stream ended must not block leaving the chat.
    outgoing: asyncio.Queue[str | None] = asyncio.Queue()
    printer = _Printer(console)

    async def inputs() -> AsyncIterator[apb.ChatInput]:
        yield apb.ChatInput(open=apb.ChatOpen(peer=peer, history_limit=50, batches=True))
        async for texts in _batches(outgoing, lambda: printer.batches):
            yield texts

    call = conn.stub.Chat(inputs())
    console.say(f"--- chat with {peer} ({CHAT_HELP}) ---")
    task = asyncio.create_task(printer.run(conn, call))

    async def handle(line: str) -> None:
        if line.strip().startswith(("/history", "/search")):
            await _show_history(conn, console, peer, line.strip())
        elif BODY_CONTROL.search(line):  # the agent would end the chat for it: say so here
            console.say("(not sent: the line holds control characters, e.g. a pasted escape)")
        else:
            await outgoing.put(line)

    try:
        await _until_ready(task, printer.history_done)
        console.say("--- end of history; you are live ---")
        await _read_lines(console, me, task, handle)
    finally:
        await outgoing.put(None)
        await _stop(call, task)
    console.say(f"--- left the chat with {peer} ---")


async def serve(conn: AgentConnection, console: Console, me: str) -> None:
    """Shows where this agent is reachable, then every incoming message live, with replies."""
    status = await conn.status()
    console.say(f"--- serving as {safe(me)}, reachable at {safe(status.address)} ---")
    console.say(f"--- {SERVE_HELP} ---")
    call = conn.stub.Serve(apb.ServeRequest(batches=True))
    printer = _Printer(console)
    task = asyncio.create_task(printer.run(conn, call))

    async def handle(line: str) -> None:
        text = line.strip()
        if text.startswith("@"):
            peer, _, body = text[1:].partition(" ")
        elif printer.last_sender:
            peer, body = printer.last_sender, line
        else:
            console.error("nobody to reply to yet: use '@user text'")
            return
        try:
            sent = await conn.send(peer, body)
        except CliError as exc:
            console.error(str(exc))
            return
        printer.bodies[sent.id] = sent.body
        console.say(f"[→ {safe(peer)}] {message_line(sent)}")

    try:
        await _read_lines(console, me, task, handle)
    finally:
        await _stop(call, task)
    console.say("--- stopped serving ---")
