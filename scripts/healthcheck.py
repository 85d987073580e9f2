"""Container HEALTHCHECK of the p2pchat images: asks a service's grpc.health.v1 if it is SERVING.

    healthcheck.py directory   TLS to the directory's port (P2PCHAT_LISTEN) on loopback, trusting
                               P2PCHAT_DATA_DIR/ca.pem. When healthy and P2PCHAT_CA_PUBLISH_DIR
                               names a writable folder, also copies ca.pem there (atomically, only
                               when it changed): the public CA certificate, never the key, for the
                               agents to trust (docker-compose.yml shares that folder read-only).
    healthcheck.py agent       plaintext to the agent's control API: P2PCHAT_CONTROL_LISTEN
                               (unix:PATH or HOST:PORT) when set, else its default, the socket
                               unix:$P2PCHAT_DATA_DIR/control.sock (as the agent's config.py).

Exit status 0 healthy, 1 not (the reason on stderr). Runs inside the image's venv.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT = 3.0


def _dial_target(listen: str) -> str:
    """Where to reach a server that listens on `listen`: wildcard hosts become loopback."""
    host, _, port = listen.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def _check(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(
            f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        )


def _publish_ca(ca_pem: bytes, folder: Path) -> None:
    target = folder / "ca.pem"
    if target.exists() and target.read_bytes() == ca_pem:
        return
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ca.pem.")
    with os.fdopen(fd, "wb") as out:
        out.write(ca_pem)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)


def check_directory() -> None:
    data_dir = Path(os.environ.get("P2PCHAT_DATA_DIR", "/data"))
    ca_pem = (data_dir / "ca.pem").read_bytes()
    target = _dial_target(os.environ.get("P2PCHAT_LISTEN", "0.0.0.0:50051"))
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    # The server certificate names localhost and 127.0.0.1 whatever --tls-name says.
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(target, credentials, options=options) as channel:
        _check(channel)
    publish = os.environ.get("P2PCHAT_CA_PUBLISH_DIR", "")
    if publish and os.access(publish, os.W_OK):
        _publish_ca(ca_pem, Path(publish))


def _agent_target() -> str:
    """Where the agent serves its control API, derived as p2pchat_agent.config does."""
    listen = os.environ.get("P2PCHAT_CONTROL_LISTEN", "")
    if not listen:
        return f"unix:{Path(os.environ.get('P2PCHAT_DATA_DIR') or 'data') / 'control.sock'}"
    if listen.startswith("unix:"):
        return listen
    if "/" in listen:
        return f"unix:{listen}"
    return _dial_target(listen)


def check_agent() -> None:
    target = _agent_target()
    with grpc.insecure_channel(target) as channel:
        _check(channel)


def main(argv: list[str]) -> int:
    checks = {"directory": check_directory, "agent": check_agent}
    if len(argv) != 2 or argv[1] not in checks:
        print(f"usage: {argv[0]} directory|agent", file=sys.stderr)
        return 1
    try:
        checks[argv[1]]()
    except Exception as exc:  # any failure means "unhealthy", with the reason for docker inspect
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
