"""Wiring of the agent: the control server (AgentService, on a Unix socket in the data dir or on
loopback TCP) and the peer server (PeerService, mutual TLS), each with health and reflection.

`create_agent(settings)` builds and starts both (tests use port 0); `serve(settings)` runs until
SIGTERM/SIGINT and shuts down gracefully: stop accepting, close links, commit, dispose.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1._async import HealthServicer

from p2pchat.v1 import agent_pb2, agent_pb2_grpc, peer_pb2, peer_pb2_grpc
from p2pchat_agent.agent import Agent
from p2pchat_agent.config import MAX_CONTROL_MESSAGE, Settings
from p2pchat_agent.control import AgentServicer
from p2pchat_agent.control_socket import ControlSocket
from p2pchat_agent.identity import Identity
from p2pchat_agent.peer import LinkManager, PeerServicer, channel_options
from p2pchat_common.errors import add_service
from p2pchat_common.files import private_dir
from p2pchat_common.serving import (
    add_health_and_reflection,
    bind,
    serve_until_signal,
    set_serving,
)
from p2pchat_common.tls import self_signed

log = logging.getLogger(__name__)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
PEER_SERVICE = peer_pb2.DESCRIPTOR.services_by_name["PeerService"].full_name


def _placeholder_config() -> grpc.ServerCertificateConfiguration:
    """Until the first login the peer port presents a throwaway self-signed certificate that no
    agent trusts: every handshake fails, which is what a logged-out agent wants."""
    cert_pem, key_pem = self_signed("p2pchat agent (logged out)")
    return grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], cert_pem)


class _PeerCredentials:
    """Serves the current identity's certificate; grpc asks before each new handshake."""

    def __init__(self, identity: Callable[[], Identity | None]) -> None:
        self._identity = identity
        self._served: Identity | None = None

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        identity = self._identity()
        if identity is self._served:
            return None
        self._served = identity
        if identity is None:  # logged out: the user's certificate is no longer presented
            return _placeholder_config()
        return grpc.ssl_server_certificate_configuration(
            [(identity.key_pem, identity.cert_pem)], identity.ca_pem
        )

    def credentials(self) -> grpc.ServerCredentials:
        fetch: Any = self.fetch  # returning None means "unchanged" (the stubs miss that)
        return grpc.dynamic_ssl_server_credentials(
            _placeholder_config(), fetch, require_client_authentication=True
        )


@dataclass
class AgentServer:
    agent: Agent
    control: grpc.aio.Server
    peer: grpc.aio.Server
    control_port: int  # 0 when the control API is on a Unix socket
    peer_port: int
    health: list[HealthServicer]
    socket: ControlSocket | None = None

    @property
    def control_socket(self) -> Path | None:
        return self.socket.path if self.socket is not None else None

    async def stop(self, grace: float | None) -> None:
        for health in self.health:
            await health.enter_graceful_shutdown()
        await self.agent.close()  # closes links first so that peer streams end
        await asyncio.gather(self.control.stop(grace), self.peer.stop(grace))
        if self.socket is not None:
            await asyncio.to_thread(self.socket.release)


async def create_agent(settings: Settings) -> AgentServer:
    await asyncio.to_thread(private_dir, settings.data_dir)  # key, session, <user>.db: 0700
    socket_path = settings.control_socket
    unix_socket = ControlSocket(socket_path) if socket_path is not None else None
    if unix_socket is not None:
        await asyncio.to_thread(unix_socket.claim)

    # The peer port is bound before the agent exists (the agent is told its port): the servicer
    # and the credentials ask the agent, once it exists, for its current links and identity.
    def links() -> LinkManager | None:
        return agent.current_links()

    def identity() -> Identity | None:
        return agent.current_identity()

    peer = grpc.aio.server(
        options=[
            *channel_options(settings.keepalive),
            # Peers ping every --keepalive seconds, with or without calls: not a strike.
            ("grpc.http2.min_ping_interval_without_data_ms", int(settings.keepalive * 500)),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    add_service(
        peer,
        peer_pb2_grpc.add_PeerServiceServicer_to_server,
        PeerServicer(links),
        check_strings=False,  # direct.DirectLink checks each frame's fields itself
    )
    peer_health = add_health_and_reflection(peer, PEER_SERVICE)
    credentials = _PeerCredentials(identity).credentials()
    peer_port = bind(peer, settings.peer_listen, credentials, "peer port")
    agent = Agent(settings, peer_port)

    control = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_CONTROL_MESSAGE),
            ("grpc.max_send_message_length", MAX_CONTROL_MESSAGE),
        ]
    )
    add_service(control, agent_pb2_grpc.add_AgentServiceServicer_to_server, AgentServicer(agent))
    control_health = add_health_and_reflection(control, AGENT_SERVICE)
    if unix_socket is None:
        control_port = bind(control, settings.control_address, None, "control port")
        serving = f"control port {control_port}"
    else:
        bind(control, f"unix:{unix_socket.path}", None, "control socket")
        await asyncio.to_thread(unix_socket.bound)
        control_port = 0
        serving = f"control socket {unix_socket.path}"

    await agent.resume()
    await peer.start()
    await control.start()
    for health, service in ((peer_health, PEER_SERVICE), (control_health, AGENT_SERVICE)):
        await set_serving(health, service)
    log.info("agent serving: %s, peer port %d, reachable at %s", serving, peer_port, agent.address)
    return AgentServer(
        agent, control, peer, control_port, peer_port, [peer_health, control_health], unix_socket
    )


async def serve(settings: Settings) -> None:
    await serve_until_signal(__name__, lambda: create_agent(settings), settings.grace_period)
    log.info("agent stopped")
