"""Small pieces every gRPC server of p2pchat needs."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import grpc

from p2pchat_common.errors import StartupError


def bind(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None,
    what: str = "port",
) -> int:
    """Adds a listening port (TLS when `credentials` is given); StartupError when it cannot."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise StartupError(f"cannot listen on {address} ({what}): {exc}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {address} ({what})")
    return port


def run_service(name: str, log_level: str, main: Coroutine[Any, Any, None]) -> int:
    """Configures logging once and runs a service's main coroutine; a startup failure becomes
    one error line and exit code 1."""
    logging.basicConfig(
        level=log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(main)
    except (StartupError, OSError) as exc:
        logging.getLogger(name).error("%s", exc)
        return 1
    return 0


class Stoppable(Protocol):
    async def stop(self, grace: float | None) -> None: ...


async def serve_until_signal(
    name: str, start: Callable[[], Awaitable[Stoppable]], grace: float
) -> None:
    """Starts a service and runs it until SIGTERM/SIGINT, then stops it within `grace` seconds.

    The handlers are installed before starting, so a signal that arrives while the service
    starts (or right after it says it is serving) still stops it gracefully.
    """
    log = logging.getLogger(name)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    running = await start()
    await stopping.wait()
    log.info("shutting down (grace %.1f s)", grace)
    await running.stop(grace)
