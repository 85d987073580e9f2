"""A load generator of `directory_load`: simulated online agents in one grpc.aio event loop.

    python -m bench.load_agents CONFIG.json

Each simulated agent does what a real agent does against the directory: it holds one
`Presence` stream and sends a beat every period, reading one answer per beat (or, when the
directory answers UNIMPLEMENTED, calls the unary `Heartbeat` every period instead), and looks
up a random ACCEPTED contact every period; every call with `authorization: Bearer <token>`,
over TLS with the directory's CA. The agents' phases are spread uniformly (at random) over the
period; by default every agent has its own channel (its own HTTP/2 connection), as real agents
do. With "bare" in the config both calls go to the bare unary server instead (the baseline).

Files in the config's "dir": this process writes ready.json after connecting, waits for
go.json ({"t0": monotonic time, "seconds": window}), runs the window, writes results.json,
keeps its connections and streams open until stop exists (so that presence can be read while
every agent is still connected), then closes them and exits. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.bare import OWN_CONNECTION, UNARY
from bench.cluster import rss_mb
from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_common.serving import keepalive_options

BEAT, LOOKUP = 0, 1
GO_TIMEOUT = 300.0  # longest wait for go.json
HOLD_TIMEOUT = 120.0  # longest wait for stop after the window
SETUP_CONCURRENCY = 100  # connections (and streams) being opened at once
KEEPALIVE = 10.0  # the agent's default --keepalive
Sample = tuple[int, float, float, str, float]  # kind, start - t0, latency, code ("": ok), lag


class WrongAnswer(Exception):
    pass


def write_json(path: Path, value: object) -> None:
    """Whole or not at all: the reader polls for the file."""
    part = path.with_suffix(".part")
    part.write_text(json.dumps(value))
    part.rename(path)


class SimAgent:
    def __init__(
        self, name: str, token: str, contacts: list[str], channel: grpc.aio.Channel, bare: bool
    ) -> None:
        self.name = name
        self.contacts = contacts
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.stub = directory_pb2_grpc.DirectoryServiceStub(channel)
        self.bare: Any = channel.unary_unary(UNARY) if bare else None
        self.stream: Any = None  # the Presence call, when one is open
        self.presence = False  # beats on Presence (else on Heartbeat)
        self.last_beat = 0.0  # time.time() of the last answered beat

    async def open_presence(self, timeout: float) -> bool:
        """Opens Presence and sends the first beat: True when answered; False when the
        directory has no Presence (UNIMPLEMENTED); raises for any other failure."""
        try:
            await self._stream_beat(timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False
            raise
        self.presence = True
        return True

    async def join(self, timeout: float) -> str:
        """open_presence for an agent after the first: on Presence whatever happens (a
        failed stream is opened again at its next beat); what went wrong, or ""."""
        self.presence = True
        try:
            await self._stream_beat(timeout)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        except TimeoutError:
            return "TIMEOUT"
        return ""

    async def _stream_beat(self, timeout: float) -> None:
        """One beat and its answer, within `timeout` (the write too: it waits for flow
        control)."""
        if self.stream is None:
            self.stream = self.stub.Presence(metadata=self.metadata)
        stream = self.stream
        try:
            await asyncio.wait_for(self._exchange(stream), timeout)
        except BaseException:
            stream.cancel()  # the next beat opens a new stream, as an agent reconnects
            self.stream = None
            raise

    @staticmethod
    async def _exchange(stream: Any) -> None:
        await stream.write(dpb.HeartbeatRequest())
        answer = await stream.read()
        if answer is grpc.aio.EOF:
            raise grpc.aio.AioRpcError(
                await stream.code(), grpc.aio.Metadata(), grpc.aio.Metadata(), "stream ended"
            )

    async def beat(self, timeout: float) -> None:
        if self.bare is not None:
            await self.bare(b"x" * 32, metadata=self.metadata, timeout=timeout)
        elif self.presence:
            await self._stream_beat(timeout)
        else:
            await self.stub.Heartbeat(
                dpb.HeartbeatRequest(), metadata=self.metadata, timeout=timeout
            )
        self.last_beat = time.time()

    async def lookup(self, rng: random.Random, timeout: float) -> None:
        contact = rng.choice(self.contacts)
        if self.bare is not None:
            await self.bare(b"x" * 32, metadata=self.metadata, timeout=timeout)
            return
        request = dpb.LookupRequest(username=contact)
        answer = await self.stub.Lookup(request, metadata=self.metadata, timeout=timeout)
        if answer.contact.username != contact:
            raise WrongAnswer(f"asked for {contact}, got {answer.contact.username!r}")

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None


async def _every(
    action: Callable[[], Awaitable[None]],
    kind: int,
    first: float,
    t0: float,
    end: float,
    period: float,
    samples: list[Sample],
    details: dict[str, str],
) -> None:
    """`action` at first, first + period, ... while before `end` (late ones right away).
    `details`: what the first failure of each status code said."""
    due = first
    while due < end:
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.monotonic()
        code = ""
        try:
            await action()
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            details.setdefault(code, str(exc.details())[:200])
        except TimeoutError:
            code = "TIMEOUT"
        except WrongAnswer:
            code = "WRONG_ANSWER"
        except Exception as exc:  # anything else grpc.aio raises: counted, not fatal
            code = type(exc).__name__
        done = time.monotonic()
        samples.append((kind, started - t0, done - started, code, started - due))
        due += period


async def _bounded(what: str, coros: Sequence[Awaitable[object]], timeout: float) -> None:
    limit = asyncio.Semaphore(SETUP_CONCURRENCY)

    async def one(coro: Awaitable[object]) -> None:
        async with limit:
            await coro

    try:
        await asyncio.wait_for(asyncio.gather(*(one(c) for c in coros)), timeout)
    except TimeoutError:
        raise RuntimeError(f"{what} took over {timeout:.0f} s") from None


async def _wait_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def run(config: dict[str, Any]) -> None:
    work = Path(config["dir"])
    period, timeout = float(config["period"]), float(config["timeout"])
    bare = bool(config.get("bare"))
    rng = random.Random(config["seed"])
    started = time.perf_counter()
    creds = grpc.ssl_channel_credentials(Path(config["ca"]).read_bytes())
    options = [*OWN_CONNECTION, *keepalive_options(KEEPALIVE)]
    per_channel = max(1, int(config["agents_per_channel"]))
    entries = config["agents"]
    channels = [
        grpc.aio.secure_channel(config["target"], creds, options=options)
        for _ in range(0, len(entries), per_channel)
    ]
    agents = [
        SimAgent(name, token, contacts, channels[i // per_channel], bare)
        for i, (name, token, contacts) in enumerate(entries)
    ]
    try:
        await _bounded("connecting", [c.channel_ready() for c in channels], 120)
        mode = "bare unary" if bare else "Heartbeat"
        joined: list[str] = []
        if not bare and agents and await agents[0].open_presence(timeout):
            mode = "Presence"

            async def join(agent: SimAgent) -> None:
                joined.append(await agent.join(timeout))

            await _bounded("opening Presence", [join(a) for a in agents[1:]], 120)
        setup_s = time.perf_counter() - started
        ready = {
            "agents": len(agents),
            "channels": len(channels),
            "mode": mode,
            "setup_errors": sum(1 for code in joined if code),
            "setup_s": setup_s,
            "rss_mb": rss_mb(os.getpid()),
        }
        write_json(work / "ready.json", ready)
        print(f"loadgen ready: {len(agents)} agents, {mode}", file=sys.stderr, flush=True)
        if not await _wait_file(work / "go.json", GO_TIMEOUT):
            raise RuntimeError("no go.json")
        go = json.loads((work / "go.json").read_text())
        t0, end = float(go["t0"]), float(go["t0"]) + float(go["seconds"])
        samples: list[Sample] = []
        details: dict[str, str] = {}
        loops = []
        for agent in agents:

            def beat(a: SimAgent = agent) -> Awaitable[None]:
                return a.beat(timeout)

            def lookup(a: SimAgent = agent) -> Awaitable[None]:
                return a.lookup(rng, timeout)

            for kind, action in ((BEAT, beat), (LOOKUP, lookup)):
                first = t0 + rng.uniform(0, period)
                loops.append(_every(action, kind, first, t0, end, period, samples, details))
        await asyncio.wait_for(asyncio.gather(*loops), end - time.monotonic() + timeout + 30)
        results = {
            "samples": samples,
            "last_beat": {a.name: a.last_beat for a in agents},
            "presence_agents": sum(a.presence for a in agents),
            "error_details": details,
            "mode": mode,
        }
        write_json(work / "results.json", results)
        await _wait_file(work / "stop", HOLD_TIMEOUT)
    finally:
        for agent in agents:
            await agent.close()
        for channel in channels:
            await channel.close()
    print("loadgen closed", file=sys.stderr, flush=True)


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    print("loadgen started", file=sys.stderr, flush=True)
    try:
        asyncio.run(run(config))
    except Exception as exc:  # told to the bench, which would otherwise wait for files
        (Path(config["dir"]) / "error.txt").write_text(f"{type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    main()
