"""The receiving end of live_latency, in its own process: bob's `Serve` stream, arrival times.

    python -m bench.latency_recv --port CONTROL_PORT --count N --timeout S --out FILE

Prints "warm" on stderr when the first warm-up message arrives (the subscription is live), then
records time.monotonic() (one clock for every process on this machine) for each message whose
body starts with "lat ", until N of them, the timeout or SIGTERM; then writes
{body: [monotonic, wall clock, the message's sent_at]} to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import grpc

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import agent_pb2_grpc


async def receive(port: int, count: int, timeout: float, arrived: dict[str, list[float]]) -> None:
    warm = False
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        call = stub.Serve(apb.ServeRequest())
        try:
            async with asyncio.timeout(timeout):
                async for event in call:
                    if event.WhichOneof("kind") != "message":
                        continue
                    now = time.monotonic()
                    body = event.message.body
                    if body.startswith("lat "):
                        sent_at = event.message.sent_at
                        arrived[body] = [now, time.time(), sent_at.seconds + sent_at.nanos / 1e9]
                        if len(arrived) >= count:
                            break
                    elif not warm:
                        warm = True
                        print("warm", file=sys.stderr, flush=True)
        except TimeoutError:
            pass
        finally:
            call.cancel()


async def run(port: int, count: int, timeout: float, out: Path) -> None:
    """Receives until done, the timeout, or SIGTERM; then writes what arrived."""
    arrived: dict[str, list[float]] = {}
    task = asyncio.create_task(receive(port, count, timeout, arrived))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    out.write_text(json.dumps(arrived))
    print(f"done {len(arrived)}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency_recv")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print("receiver started", file=sys.stderr, flush=True)
    asyncio.run(run(args.port, args.count, args.timeout, args.out))


if __name__ == "__main__":
    main()
