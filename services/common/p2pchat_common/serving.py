"""Small pieces every gRPC server of p2pchat needs."""

from __future__ import annotations

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
