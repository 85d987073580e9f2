"""The client streams of chat_burst and ping_pong (issue 12): alice's `Chat` client, which runs in
the bench process, and bob's clients, each in a process of its own (one core each way, as two
users' terminals would be).

    python -m bench.streams count --agent TARGET --peer alice --messages N --timeout S
        bob's `Serve(batches=True)`: counts the messages of each burst (bodies "cbKK-..."), prints
        "warm" at the first other message from the peer, "done K MONOTONIC EVENTS DUPLICATES"
        once burst K is complete, "at K COUNT" about once a second while one is under way,
        "failed CODE" when the stream fails (it is opened again).
    python -m bench.streams echo --agent TARGET --peer alice --timeout S
        bob's `Chat(batches=True)` with the peer, as a user in `p2pchat chat alice`: every
        incoming "ping ..." or "warm ..." is answered with "pong ..." on the same stream.

TARGET is bob's control API: 127.0.0.1:PORT (loopback TCP) or unix:PATH (his control socket).
Both end at the timeout or on SIGTERM and then print "stats k=v ..." (what they read and wrote).
Every time is time.monotonic(): one clock for every process on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import agent_pb2_grpc

BURST_BODY = re.compile(r"cb(\d\d)-")
FILLER = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor " * 3


def flatten(event: apb.ChatEvent) -> Iterator[apb.ChatEvent]:
    """The events one ChatEvent carries (a batch holds several, never nested)."""
    if event.WhichOneof("kind") == "batch":
        yield from event.batch.events
    else:
        yield event


def burst_body(prefix: str, i: int, size: int) -> str:
    """A text of exactly `size` characters (ASCII: as many bytes) that names its burst."""
    head = f"{prefix}{i:07d} "
    return (head + FILLER)[:size]


_SS_PIDS = re.compile(r"pid=(\d+),")
_SS_FIELD = re.compile(r"\b(bytes_sent|bytes_received|data_segs_out|data_segs_in):(\d+)")
TCP_FIELDS = ("bytes_sent", "bytes_received", "data_segs_out", "data_segs_in")


def tcp_counters(pid: int, ports: set[int]) -> dict[str, dict[str, int]] | None:
    """The kernel's counters (ss -tinp) of the established TCP connections of process `pid`
    with a local or remote port in `ports`, by "local-remote" port pair; None without ss."""
    try:
        out = subprocess.run(
            ["ss", "-tinpH", "state", "established"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found: dict[str, dict[str, int]] = {}
    key: str | None = None
    for line in out.splitlines():
        if not line[:1].isspace():  # a socket: "RecvQ SendQ local:port remote:port users:..."
            key = None
            cols = line.split()
            if len(cols) < 4 or str(pid) not in _SS_PIDS.findall(line):
                continue
            local, remote = int(cols[2].rsplit(":", 1)[1]), int(cols[3].rsplit(":", 1)[1])
            if local in ports or remote in ports:
                key = f"{local}-{remote}"
                found[key] = dict.fromkeys(TCP_FIELDS, 0)
        elif key is not None:  # its details
            for name, value in _SS_FIELD.findall(line):
                found[key][name] = int(value)
    return found


def tcp_delta(
    before: dict[str, dict[str, int]] | None, after: dict[str, dict[str, int]] | None
) -> dict[str, int] | None:
    """What the connections of `after` counted since `before` (a new one from zero); None when
    either is unknown or a connection of `before` is gone (a reconnection: no delta)."""
    if before is None or after is None or not set(before) <= set(after):
        return None
    zero = dict.fromkeys(TCP_FIELDS, 0)
    return {f: sum(c[f] - before.get(k, zero)[f] for k, c in after.items()) for f in TCP_FIELDS}


async def link_frames(stubs: dict[str, Any]) -> dict[str, int] | None:
    """The link frames (gRPC messages on peer links, Hellos included) each agent has written and
    read since its login, from its `Status` (link_frames_sent/_received), as "NAME_sent" and
    "NAME_received" for each of `stubs` (control API stubs by name); None if a call fails."""
    found: dict[str, int] = {}
    for name, stub in stubs.items():
        try:
            status = await stub.Status(apb.StatusRequest(), timeout=10)
        except grpc.aio.AioRpcError:
            return None
        found[f"{name}_sent"] = status.link_frames_sent
        found[f"{name}_received"] = status.link_frames_received
    return found


def frames_delta(
    before: dict[str, int] | None, after: dict[str, int] | None
) -> dict[str, int] | None:
    """What `link_frames` counted since `before`; None when either is unknown or a counter went
    back (a new login starts from zero: no delta)."""
    if before is None or after is None or set(before) != set(after):
        return None
    delta = {k: after[k] - before[k] for k in after}
    return None if any(v < 0 for v in delta.values()) else delta


# -- alice's client: a Chat stream in the bench process ---------------------------------------


@dataclass
class Burst:
    """What alice's Chat has shown of one burst: echoes (its stored texts) and delivery updates."""

    prefix: str
    n: int
    waiting: set[str] = field(default_factory=set)  # echoed, not yet delivered
    echoed: int = 0
    acked: int = 0
    t_acked: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class ChatClient:
    """One `Chat(batches=True)` stream of alice's with `peer`, read by one task: counts the
    gRPC messages read (`events`) and written (`inputs`), follows the current burst, and hands
    incoming messages to whoever waits for one (`expect`)."""

    def __init__(self, stub: Any, peer: str) -> None:
        self.peer = peer
        self.call: Any = stub.Chat()
        self.events = 0  # ChatEvents read (gRPC messages)
        self.inputs = 0  # ChatInputs written after the open (gRPC messages)
        self.notices: list[str] = []
        self.error: str | None = None  # the status code name when the stream failed
        self.ended = asyncio.Event()
        self.history_done = asyncio.Event()
        self.burst: Burst | None = None
        self.delivered_early: set[str] = set()  # delivery updates seen before the echo
        self.expect: tuple[str, asyncio.Future[float]] | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self, timeout: float = 20.0) -> None:
        await self.call.write(
            apb.ChatInput(open=apb.ChatOpen(peer=self.peer, history_limit=1, batches=True))
        )
        self._reader = asyncio.create_task(self._read())
        async with asyncio.timeout(timeout):
            await self.history_done.wait()
        if self.error is not None:
            raise RuntimeError(f"alice's Chat stream failed at once: {self.error}")

    async def write_text(self, body: str) -> None:
        await self.call.write(apb.ChatInput(text=apb.ChatText(body=body)))
        self.inputs += 1

    async def write_texts(self, bodies: list[str]) -> None:
        """One ChatInput for all of `bodies` (a single text as ChatInput.text, as the CLI does)."""
        if len(bodies) == 1:
            await self.write_text(bodies[0])
            return
        texts = apb.ChatTexts(texts=[apb.ChatText(body=b) for b in bodies])
        await self.call.write(apb.ChatInput(texts=texts))
        self.inputs += 1

    def start_burst(self, prefix: str, n: int) -> Burst:
        self.burst = Burst(prefix, n)
        self.delivered_early.clear()
        return self.burst

    async def _read(self) -> None:
        try:
            async for event in self.call:
                self.events += 1
                now = time.monotonic()
                for e in flatten(event):
                    self._one(e, now)
        except grpc.aio.AioRpcError as exc:
            self.error = exc.code().name
        except asyncio.CancelledError:
            self.error = self.error or "CANCELLED (by the bench)"
            raise
        finally:
            if self.error is None:
                self.error = "ENDED (the agent closed the stream)"
            self.ended.set()
            self.history_done.set()
            if self.burst is not None:
                self.burst.done.set()
            if self.expect is not None and not self.expect[1].done():
                self.expect[1].set_exception(RuntimeError(f"Chat stream ended: {self.error}"))

    def _one(self, e: apb.ChatEvent, now: float) -> None:
        kind = e.WhichOneof("kind")
        b = self.burst
        if kind == "message":
            m = e.message
            if m.direction == apb.DIRECTION_OUTGOING:
                if b is not None and m.body.startswith(b.prefix):
                    b.echoed += 1
                    if m.id in self.delivered_early:
                        self.delivered_early.discard(m.id)
                        self._acked(b, now)
                    else:
                        b.waiting.add(m.id)
            elif self.expect is not None and m.body == self.expect[0]:
                future = self.expect[1]
                self.expect = None
                if not future.done():
                    future.set_result(now)
        elif kind == "deliveries":
            for id in e.deliveries.ids:
                self._delivered(id, now)
        elif kind == "delivery":
            self._delivered(e.delivery.id, now)
        elif kind == "history_end":
            self.history_done.set()
        elif kind == "notice":
            self.notices.append(e.notice.code)

    def _delivered(self, id: str, now: float) -> None:
        b = self.burst
        if b is not None and id in b.waiting:
            b.waiting.discard(id)
            self._acked(b, now)
        elif b is not None and not b.done.is_set():
            self.delivered_early.add(id)

    def _acked(self, b: Burst, now: float) -> None:
        b.acked += 1
        if b.acked == b.n:
            b.t_acked = now
            b.done.set()

    async def close(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


# -- bob's clients, as child processes ------------------------------------------------------


class StreamsChild:
    """`python -m bench.streams ...` as a child process; its stdout lines queued."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._pump = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, log: Path, *args: str) -> StreamsChild:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as log_f:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.streams",
                *args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_f,
            )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            while line := await self.proc.stdout.readline():
                await self.lines.put(line.decode().strip())
        finally:
            await self.lines.put(None)

    async def line(self, timeout: float) -> str | None:
        """The next line, None at its end; TimeoutError after `timeout`."""
        return await asyncio.wait_for(self.lines.get(), max(0.0, timeout))

    async def stop(self, timeout: float = 10.0) -> dict[str, str]:
        """SIGTERM, then its last "stats" line (SIGKILL if it does not end in `timeout`)."""
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await asyncio.wait_for(self.proc.wait(), 10)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pump, 5)
        stats: dict[str, str] = {}
        while not self.lines.empty():
            line = self.lines.get_nowait()
            if line and line.startswith("stats "):
                stats = dict(kv.split("=", 1) for kv in line.split()[1:])
        return stats


def _say(line: str) -> None:
    print(line, flush=True)


async def _count(
    target: str, peer: str, messages: int, timeout: float, stats: dict[str, int]
) -> None:
    """bob's Serve stream for chat_burst (see the module's doc)."""
    got: dict[int, set[str]] = {}
    total: dict[int, int] = {}
    events_of: dict[int, int] = {}  # ChatEvents (gRPC messages) whose first message is burst K's
    finished: set[int] = set()
    stats.update(events=0, messages=0, failures=0)
    warm = False
    async with grpc.aio.insecure_channel(target) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        deadline = time.monotonic() + timeout
        last_progress = time.monotonic()
        while time.monotonic() < deadline and stats["failures"] < 20:
            call = stub.Serve(apb.ServeRequest(batches=True))
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    async for event in call:
                        now = time.monotonic()
                        stats["events"] += 1
                        first: int | None = None
                        touched: set[int] = set()
                        for e in flatten(event):
                            if e.WhichOneof("kind") != "message":
                                continue
                            m = e.message
                            if m.direction != apb.DIRECTION_INCOMING or m.sender != peer:
                                continue
                            stats["messages"] += 1
                            found = BURST_BODY.match(m.body)
                            if found is None:
                                if not warm:
                                    warm = True
                                    _say("warm")
                                continue
                            k = int(found.group(1))
                            first = k if first is None else first
                            touched.add(k)
                            got.setdefault(k, set()).add(m.id)
                            total[k] = total.get(k, 0) + 1
                        if first is not None:
                            events_of[first] = events_of.get(first, 0) + 1
                        for k in sorted(touched):
                            if len(got[k]) >= messages and k not in finished:
                                finished.add(k)
                                duplicates = total[k] - len(got[k])
                                _say(f"done {k} {now:.6f} {events_of.get(k, 0)} {duplicates}")
                        if now - last_progress > 1.0:
                            last_progress = now
                            for k, ids in got.items():
                                if k not in finished:
                                    _say(f"at {k} {len(ids)}")
            except TimeoutError:
                break
            except grpc.aio.AioRpcError as exc:
                stats["failures"] += 1
                _say(f"failed {exc.code().name}")
                await asyncio.sleep(0.2)
            finally:
                call.cancel()


async def _echo(target: str, peer: str, timeout: float, stats: dict[str, int]) -> None:
    """bob's Chat stream with the peer for ping_pong (see the module's doc): what a user in
    `p2pchat chat alice` has open, reading alice's messages and answering on the same stream."""
    stats.update(chat_events=0, echoed=0, chat_inputs=0)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        chat: Any = stub.Chat()
        await chat.write(apb.ChatInput(open=apb.ChatOpen(peer=peer, history_limit=1, batches=True)))
        _say("ready")
        live = False
        try:
            async with asyncio.timeout(timeout):
                async for event in chat:
                    stats["chat_events"] += 1
                    for e in flatten(event):
                        kind = e.WhichOneof("kind")
                        if kind == "history_end":
                            live = True
                        if kind != "message" or not live:
                            continue
                        m = e.message
                        if m.direction != apb.DIRECTION_INCOMING or m.sender != peer:
                            continue
                        if m.body.startswith(("ping ", "warm ")):
                            reply = apb.ChatText(body="pong " + m.body)
                            await chat.write(apb.ChatInput(text=reply))
                            stats["echoed"] += 1
                            stats["chat_inputs"] += 1
        except TimeoutError:
            pass
        except grpc.aio.AioRpcError as exc:
            _say(f"failed chat {exc.code().name}")
        finally:
            chat.cancel()


async def _run(args: argparse.Namespace) -> None:
    stats: dict[str, int] = {}
    if args.mode == "count":
        work = _count(args.agent, args.peer, args.messages, args.timeout, stats)
    else:
        work = _echo(args.agent, args.peer, args.timeout, stats)
    task = asyncio.create_task(work)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    _say("stats " + " ".join(f"{k}={v}" for k, v in stats.items()))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streams")
    parser.add_argument("mode", choices=["count", "echo"])
    parser.add_argument(
        "--agent", required=True, help="the control API: 127.0.0.1:PORT or unix:PATH"
    )
    parser.add_argument("--peer", required=True)
    parser.add_argument("--messages", type=int, default=0)
    parser.add_argument("--timeout", type=float, required=True)
    args = parser.parse_args()
    print(f"streams {args.mode} started", file=sys.stderr, flush=True)
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
