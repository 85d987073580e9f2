"""Wiring of the directory: databases, CA, TLS, gRPC server with health and reflection.

`create_server(settings)` builds and starts a server (tests use it with port 0);
`serve(settings)` runs one until SIGTERM/SIGINT and shuts it down gracefully.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1._async import HealthServicer

from p2pchat.v1 import directory_pb2, directory_pb2_grpc
from p2pchat_common.errors import StartupError, add_service
from p2pchat_common.files import private_dir
from p2pchat_common.serving import (
    add_health_and_reflection,
    bind,
    serve_until_signal,
    set_serving,
)
from p2pchat_common.validation import is_wildcard
from p2pchat_directory.ca import CertificateAuthority, Clock
from p2pchat_directory.config import Settings
from p2pchat_directory.db import Databases
from p2pchat_directory.service import DirectoryService, utcnow
from p2pchat_directory.servicer import DirectoryServicer

log = logging.getLogger(__name__)

SERVICE_NAME = directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name
MAX_MESSAGE_BYTES = 1024 * 1024


@dataclass
class DirectoryServer:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    databases: Databases
    executor: ThreadPoolExecutor
    ca: CertificateAuthority

    async def stop(self, grace: float | None) -> None:
        """Health NOT_SERVING, stop accepting, let calls finish in `grace` s, release resources."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.databases.dispose()


def _server_credentials(settings: Settings, ca: CertificateAuthority) -> grpc.ServerCredentials:
    if settings.tls_cert is not None and settings.tls_key is not None:
        cert_pem, key_pem = settings.tls_cert.read_bytes(), settings.tls_key.read_bytes()
    else:
        host = settings.listen.rpartition(":")[0]
        names = [*settings.tls_names, *([] if is_wildcard(host) else [host.strip("[]")])]
        cert_pem, key_pem = ca.issue_server_certificate(names)
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


async def create_server(settings: Settings, clock: Clock = utcnow) -> DirectoryServer:
    """Makes the data dir private (0700), opens the databases and the CA, then starts serving
    on `settings.listen`. `clock` is the directory's time (tests move it)."""
    await asyncio.to_thread(private_dir, settings.data_dir)
    databases = await asyncio.to_thread(Databases.open, settings.users_url, settings.contacts_url)
    ca = await asyncio.to_thread(CertificateAuthority.load_or_create, settings.data_dir, clock)
    executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="directory")
    service = DirectoryService(settings, databases, ca, clock)
    if ca.upgraded:
        await asyncio.to_thread(service.warn_of_lookalikes)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    add_service(
        server,
        directory_pb2_grpc.add_DirectoryServiceServicer_to_server,
        DirectoryServicer(service, executor, inline_reads=databases.local_only),
    )
    health = add_health_and_reflection(server, SERVICE_NAME)
    if settings.insecure:
        log.warning(
            "INSECURE MODE: serving without TLS on %s; passwords and tokens travel in clear. "
            "Use only for debugging.",
            settings.listen,
        )
    try:
        port = bind(
            server,
            settings.listen,
            None if settings.insecure else _server_credentials(settings, ca),
        )
    except StartupError:
        executor.shutdown()
        databases.dispose()
        raise
    await server.start()
    await set_serving(health, SERVICE_NAME)
    log.info("directory serving on port %d (%s)", port, "insecure" if settings.insecure else "TLS")
    return DirectoryServer(server, port, health, databases, executor, ca)


async def serve(settings: Settings) -> None:
    await serve_until_signal(__name__, lambda: create_server(settings), settings.grace_period)
    log.info("directory stopped")
