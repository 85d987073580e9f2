"""Small pieces every gRPC server of p2pchat needs."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from p2pchat_common.errors import StartupError
from p2pchat_common.files import PRIVATE_UMASK

_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


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


def add_health_and_reflection(server: grpc.aio.Server, *services: str) -> HealthServicer:
    """The standard health service and server reflection for `services` (full names) and
    themselves; the health says SERVING once `set_serving` is called."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([*services, _HEALTH, reflection.SERVICE_NAME], server)
    return health


async def set_serving(health: HealthServicer, *services: str) -> None:
    """Health SERVING for the server as a whole and for each of `services`."""
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    for service in services:
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)


def run_service(name: str, log_level: str, main: Coroutine[Any, Any, None]) -> int:
    """Configures logging and the umask once and runs a service's main coroutine; a startup
    failure becomes one error line and exit code 1.

    The umask (0077) is a second line of defence: what the service creates without saying a mode
    is readable by its own user only. Public files (the directory's ca.pem) chmod themselves.
    """
    os.umask(PRIVATE_UMASK)
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


def keepalive_options(seconds: float) -> list[tuple[str, Any]]:
    """Channel options for a ping after `seconds` of silence (also with no call open), the
    connection closed when one is not answered within half that: what agents use on peer links
    and towards the directory."""
    return [
        ("grpc.keepalive_time_ms", int(seconds * 1000)),
        ("grpc.keepalive_timeout_ms", int(seconds * 500)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
