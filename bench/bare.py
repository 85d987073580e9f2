"""The baselines: a bare grpc.aio server with generic bytes handlers (no protobuf, no database,
no TLS unless asked), run as its own process so that client and server do not share a core, just
as two agents do not.

    python -m bench.bare [--tls DIR] [--unix PATH]
        serves /bare.Bare/Unary and /bare.Bare/Stream on a loopback TCP port (with --unix, on the
        Unix socket PATH too: the same server, both listeners)

Unary answers every request with a 2-byte reply; Stream answers every message with one ack
message (its first 26 bytes: the id), one gRPC message each way per chat message.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench.cluster import Child, cpu_seconds

UNARY = "/bare.Bare/Unary"
STREAM = "/bare.Bare/Stream"
ID_LEN = 26
# Every client channel gets its own TCP connection (no sharing through the global subchannel pool).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def _unary(request: bytes, context: Any) -> bytes:
    return b"ok"


async def _stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request[:ID_LEN]


async def _serve(tls_dir: Path | None, unix: Path | None) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bare.Bare",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.stream_stream_rpc_method_handler(_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    if tls_dir is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        creds = grpc.ssl_server_credentials(
            [((tls_dir / "key.pem").read_bytes(), (tls_dir / "cert.pem").read_bytes())]
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
    if unix is not None:
        server.add_insecure_port(f"unix:{unix}")
    await server.start()
    print(f"bare serving on port {port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


def make_tls(dir: Path) -> bytes:
    """A self-signed certificate for `localhost` in `dir`; returns its PEM (the client's root)."""
    from p2pchat_common.tls import self_signed

    cert_pem, key_pem = self_signed("localhost", ["localhost"])
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "cert.pem").write_bytes(cert_pem)
    (dir / "key.pem").write_bytes(key_pem)
    return cert_pem


class BareServer:
    """The bare server as a child process; without TLS it also serves on the Unix socket
    `unix_path` (ROOT/bare.sock)."""

    _READY = re.compile(r"bare serving on port (\d+)")

    def __init__(self, root: Path, tls: bool = False) -> None:
        self.root_pem: bytes | None = None
        self.unix_path: Path | None = None
        args = [sys.executable, "-m", "bench.bare"]
        if tls:
            tls_dir = root / "bare-tls"
            self.root_pem = make_tls(tls_dir)
            args += ["--tls", str(tls_dir)]
        else:
            self.unix_path = root / "bare.sock"
            self.unix_path.unlink(missing_ok=True)
            args += ["--unix", str(self.unix_path)]
        name = "bare-tls" if tls else "bare"
        self.child = Child(args, root / "logs" / f"{name}.log", self._READY)
        self.port = int(self.child.match.group(1))

    def channel(self, unix: bool = False) -> grpc.aio.Channel:
        """A channel of its own (its own connection) to the server: over loopback TCP, or with
        `unix` over its Unix socket."""
        if unix:
            if self.unix_path is None:
                raise ValueError("the TLS bare server has no Unix socket")
            return grpc.aio.insecure_channel(f"unix:{self.unix_path}", options=OWN_CONNECTION)
        if self.root_pem is None:
            return grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=OWN_CONNECTION)
        creds = grpc.ssl_channel_credentials(self.root_pem)
        return grpc.aio.secure_channel(f"localhost:{self.port}", creds, options=OWN_CONNECTION)

    def stop(self) -> None:
        self.child.kill()


# -- clients ------------------------------------------------------------------------------------


async def stream_rate(
    server: BareServer, count: int, body: bytes, timeout: float
) -> dict[str, Any]:
    """`count` messages on one bidi stream, one per gRPC message, each acked by one gRPC message.
    msg/s from the first write to the last ack; the CPU per message of the server and of this
    process (the client)."""
    async with server.channel() as channel:
        await channel.channel_ready()
        call: Any = channel.stream_stream(STREAM)()
        server_cpu, client_cpu = cpu_seconds(server.child.pid), time.process_time()

        async def writer() -> None:
            for i in range(count):
                await call.write(b"%026d" % i + body)
            await call.done_writing()

        started = time.perf_counter()
        task = asyncio.create_task(writer())
        acked = 0
        deadline = started + timeout
        try:
            async with asyncio.timeout(timeout):
                async for _ack in call:
                    acked += 1
                    if acked == count:
                        break
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - started
        server_cpu = cpu_seconds(server.child.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
        task.cancel()
        call.cancel()
        return {
            "messages": acked,
            "seconds": elapsed,
            "msgs_per_s": acked / elapsed,
            "complete": acked == count and time.perf_counter() <= deadline + 1,
            "server_cpu_us_per_msg": server_cpu / max(1, acked) * 1e6,
            "client_cpu_us_per_msg": client_cpu / max(1, acked) * 1e6,
        }


async def ping_pong(
    server: BareServer,
    count: int,
    body: bytes,
    timeout: float,
    warmup: int = 20,
    unix: bool = False,
) -> dict[str, Any]:
    """`count` sequential round trips on one bidi stream: write one message, wait for its echo
    (one gRPC message each way: one hop there and back), over loopback TCP or with `unix` over
    the server's Unix socket. Returns the round-trip times (s)."""
    async with server.channel(unix) as channel:
        await channel.channel_ready()
        call: Any = channel.stream_stream(STREAM)()
        rtts: list[float] = []
        try:
            async with asyncio.timeout(timeout):
                for i in range(warmup + count):
                    t = time.perf_counter()
                    await call.write(b"%026d" % i + body)
                    await call.read()
                    if i >= warmup:
                        rtts.append(time.perf_counter() - t)
        except TimeoutError:
            pass
        finally:
            call.cancel()
        return {"round_trips": len(rtts), "rtts": rtts, "complete": len(rtts) == count}


async def unary_rate(
    channels: list[grpc.aio.Channel],
    call_once: Any,
    duration: float,
    max_calls: int,
    warmup: int = 20,
    server_pids: Sequence[int] = (),
) -> dict[str, Any]:
    """len(channels) concurrent callers, each on its own channel, each calling `call_once(channel)`
    in a loop for `duration` seconds or until `max_calls` calls in all; calls/s, and the CPU time
    the `server_pids` used per call (steadier than calls/s when the machine is shared)."""
    for ch in channels:
        await ch.channel_ready()
    await asyncio.gather(*(_n_calls(call_once, ch, warmup) for ch in channels))
    done = 0
    stop = time.perf_counter() + duration
    latencies: list[float] = []

    async def caller(ch: grpc.aio.Channel) -> None:
        nonlocal done
        while done < max_calls and time.perf_counter() < stop:
            done += 1
            t = time.perf_counter()
            await call_once(ch)
            latencies.append(time.perf_counter() - t)

    cpu_before = sum(map(cpu_seconds, server_pids))
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(caller(ch) for ch in channels)), duration + 30)
    elapsed = time.perf_counter() - started
    cpu = sum(map(cpu_seconds, server_pids)) - cpu_before
    latencies.sort()
    n = len(latencies)
    return {
        "calls": n,
        "seconds": elapsed,
        "calls_per_s": n / elapsed,
        **({"server_cpu_us_per_call": cpu / n * 1e6} if server_pids and n else {}),
        "call_p50_ms": latencies[n // 2] * 1000 if n else None,
        "call_p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
    }


async def _n_calls(call_once: Any, ch: grpc.aio.Channel, n: int) -> None:
    for _ in range(n):
        await call_once(ch)


async def bare_unary_rate(
    server: BareServer, concurrency: int, duration: float, max_calls: int
) -> dict[str, Any]:
    channels = [server.channel() for _ in range(concurrency)]
    try:

        async def once(ch: grpc.aio.Channel) -> None:
            method: Any = ch.unary_unary(UNARY)
            await method(b"x" * 32, timeout=30)

        return await unary_rate(channels, once, duration, max_calls, server_pids=[server.child.pid])
    finally:
        for ch in channels:
            await ch.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--tls", type=Path, default=None)
    parser.add_argument("--unix", type=Path, default=None, help="also serve on this Unix socket")
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.tls, args.unix))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
