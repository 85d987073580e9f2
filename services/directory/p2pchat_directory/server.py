"""Wiring of the directory: databases, CA, TLS, gRPC server (DirectoryService, MailboxService)
with health and reflection.

`create_server(settings)` builds and starts a server (tests use it with port 0);
`serve(settings)` runs one until SIGTERM/SIGINT and shuts it down gracefully.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1._async import HealthServicer

from p2pchat.v1 import directory_pb2, directory_pb2_grpc, mailbox_pb2, mailbox_pb2_grpc
from p2pchat_common.errors import StartupError, add_service
from p2pchat_common.files import private_dir
from p2pchat_common.serving import (
    add_health_and_reflection,
    bind,
    serve_until_signal,
    set_serving,
)
from p2pchat_common.validation import is_wildcard
from p2pchat_directory.accounts import Accounts
from p2pchat_directory.ca import CertificateAuthority, Clock
from p2pchat_directory.config import Settings
from p2pchat_directory.db import Databases
from p2pchat_directory.hashing import HashingPool
from p2pchat_directory.mailbox import MailboxService
from p2pchat_directory.mailbox_relay import MailboxRelay
from p2pchat_directory.mailbox_servicer import MailboxServicer
from p2pchat_directory.presence import PresenceHub
from p2pchat_directory.service import DirectoryService, utcnow
from p2pchat_directory.servicer import DirectoryServicer
from p2pchat_directory.workers import Workers

log = logging.getLogger(__name__)

SERVICE_NAME = directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"].full_name
MAILBOX_SERVICE_NAME = mailbox_pb2.DESCRIPTOR.services_by_name["MailboxService"].full_name
# A Deposit carries up to ~4 MiB of envelopes (one may be 4 MiB + 64 KiB), and so does a
# CollectResponse: room for either with its framing. Every other message is far smaller.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Ping idle clients so that the Collect stream of a vanished one ends (within ~30 s)...
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # ...and accept the agents' own keepalive pings (every 10 s, also with no call open)
    # rather than answering them with GOAWAY too_many_pings.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    # Every connection is asked to move on (GOAWAY) after ~10 minutes, its calls given a
    # minute to end: a client then resolves the directory's name again, so a replica that
    # came back, or a new one, gets its share of the agents (round_robin only re-resolves
    # when a connection ends). The Presence and Collect streams reopen at once, anywhere.
    ("grpc.max_connection_age_ms", 600_000),
    ("grpc.max_connection_age_grace_ms", 60_000),
]


@dataclass
class DirectoryServer:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    databases: Databases
    executor: ThreadPoolExecutor
    ca: CertificateAuthority
    mailbox: MailboxRelay
    presence: PresenceHub
    hashing: HashingPool

    async def stop(self, grace: float | None) -> None:
        """Health NOT_SERVING, end the Collect streams (they would wait forever), stop accepting,
        let calls finish in `grace` s, release resources."""
        await self.health.enter_graceful_shutdown()
        await self.mailbox.close()
        await self.presence.close()
        await self.server.stop(grace)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.hashing.shutdown()
        await self.databases.aclose()
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
    # scrypt apart from the shared threads, bounded, so that logins never starve the rest.
    # Settings built in code may give fewer workers than the default share needs.
    share = min(settings.hash_share, settings.hash_workers)
    hashing = HashingPool(settings.hash_workers, settings.hash_queue, share)
    service = DirectoryService(settings, databases, ca, clock)
    workers = Workers(executor, databases)
    if ca.upgraded:
        await asyncio.to_thread(service.warn_of_lookalikes)

    presence = PresenceHub(databases, workers, settings.presence_ttl, settings.session_ttl, clock)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_service(
        server,
        directory_pb2_grpc.add_DirectoryServiceServicer_to_server,
        DirectoryServicer(service, workers, presence, Accounts(service, workers, hashing)),
    )
    mailbox = MailboxRelay.for_engine(
        MailboxService(settings, databases, service, clock),
        workers,
        databases.users_engine,
    )
    add_service(
        server, mailbox_pb2_grpc.add_MailboxServiceServicer_to_server, MailboxServicer(mailbox)
    )
    health = add_health_and_reflection(server, SERVICE_NAME, MAILBOX_SERVICE_NAME)
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
        hashing.shutdown()
        databases.dispose()
        raise
    try:
        await mailbox.start()
        await presence.start()
        await server.start()
    except BaseException:
        await presence.close()
        await mailbox.close()
        await server.stop(None)
        executor.shutdown()
        hashing.shutdown()
        databases.dispose()
        raise
    await set_serving(health, SERVICE_NAME, MAILBOX_SERVICE_NAME)
    log.info("directory serving on port %d (%s)", port, "insecure" if settings.insecure else "TLS")
    return DirectoryServer(
        server, port, health, databases, executor, ca, mailbox, presence, hashing
    )


# The cyclic garbage collector pauses the whole process while it scans the old generation:
# with 5,000 agents' streams open that took 40-340 ms each time, and every call waited (the
# p99 of bench directory_load was ~250 ms for it alone). A server's old objects are mostly
# made at start (modules, descriptors, metadata) and by its streams, which live long: they
# are frozen once started (never scanned again, still freed by reference counting), and the
# old generation is scanned ten times less often than by default (after 100 scans of the middle
# one, not 10, and only when it grew by a quarter, as always).
GC_THRESHOLDS = (700, 10, 100)


async def _started(settings: Settings, clock: Clock) -> DirectoryServer:
    server = await create_server(settings, clock)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return server


async def serve(settings: Settings) -> None:
    await serve_until_signal(__name__, lambda: _started(settings, utcnow), settings.grace_period)
    log.info("directory stopped")
