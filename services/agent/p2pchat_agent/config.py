"""Settings of the agent daemon: flags, each with a P2PCHAT_* environment equivalent.

This is the only module of the agent that reads the environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pchat_common.flags import (
    add_lifecycle_flags,
    address,
    env,
    env_flag,
    parse,
    positive_float,
    positive_int,
)
from p2pchat_common.validation import is_wildcard

DEFAULT_DIRECTORY = "localhost:50051"
DEFAULT_PEER_LISTEN = "0.0.0.0:50052"
DEFAULT_CONTROL_LISTEN = "127.0.0.1:50053"
DEFAULT_BODY_LIMIT = 16 * 1024
MAX_BODY_LIMIT = 4 * 1024 * 1024  # one such body still fits a peer frame and a control call
# The largest control message either way (agent and CLI): one body at MAX_BODY_LIMIT in a reply
# or a chat event, with room to spare. History pages are trimmed to fit gRPC's default 4 MiB.
MAX_CONTROL_MESSAGE = 16 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    directory: str = DEFAULT_DIRECTORY
    directory_ca: Path | None = None  # None: <data_dir>/directory-ca.pem must exist, or --insecure
    directory_insecure: bool = False
    data_dir: Path = Path("./data")
    peer_listen: str = DEFAULT_PEER_LISTEN
    advertise: str = ""  # the address other agents dial; "" = derived from peer_listen
    control_listen: str = DEFAULT_CONTROL_LISTEN
    allow_remote_control: bool = False
    body_limit: int = DEFAULT_BODY_LIMIT
    heartbeat_interval: float = 10.0
    retry_max: float = 30.0
    grace_period: float = 5.0
    log_level: str = "INFO"

    @property
    def advertised_address(self) -> str:
        """Where other agents reach this one: --advertise, or the peer listen address when it
        names a concrete host."""
        if self.advertise:
            return self.advertise
        host, _, port = self.peer_listen.rpartition(":")
        if is_wildcard(host):
            return f"localhost:{port}"
        return self.peer_listen


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="p2pchat-agent",
        description=(
            "The p2pchat agent: keeps one user's messages in <data-dir>/<username>.db, talks to "
            "other agents directly over mutual TLS, and is driven by the `p2pchat` CLI over its "
            "loopback control port. Starts logged out (or resumes a stored session). Every flag "
            "has an environment variable (in brackets)."
        ),
    )
    add = p.add_argument
    add(
        "--directory",
        type=address("directory address"),
        default=env(environ, "DIRECTORY", d.directory),
        help="HOST:PORT of the directory [P2PCHAT_DIRECTORY] (default %(default)s)",
    )
    add(
        "--directory-ca",
        type=Path,
        default=env(environ, "DIRECTORY_CA", "") or None,
        help="the directory's CA certificate (its <data-dir>/ca.pem) [P2PCHAT_DIRECTORY_CA] "
        "(default DATA_DIR/directory-ca.pem)",
    )
    add(
        "--directory-insecure",
        action="store_true",
        default=env_flag(environ, "DIRECTORY_INSECURE"),
        help="talk to a directory started with --insecure (debugging only) "
        "[P2PCHAT_DIRECTORY_INSECURE=1]",
    )
    add(
        "--data-dir",
        type=Path,
        default=Path(env(environ, "DATA_DIR", str(d.data_dir))),
        help="where the key, the session and <username>.db live [P2PCHAT_DATA_DIR] "
        "(default %(default)s)",
    )
    add(
        "--peer-listen",
        type=address("peer listen address", allow_port_zero=True),
        default=env(environ, "PEER_LISTEN", d.peer_listen),
        help="HOST:PORT other agents connect to (mutual TLS) [P2PCHAT_PEER_LISTEN] "
        "(default %(default)s)",
    )
    add(
        "--advertise",
        type=address("advertised address"),
        default=env(environ, "ADVERTISE", "") or None,
        help="HOST:PORT other agents dial to reach this one; required when --peer-listen is "
        "0.0.0.0 in a container [P2PCHAT_ADVERTISE]",
    )
    add(
        "--control-listen",
        type=address("control listen address", allow_port_zero=True),
        default=env(environ, "CONTROL_LISTEN", d.control_listen),
        help="HOST:PORT for the CLI; loopback only unless --allow-remote-control "
        "[P2PCHAT_CONTROL_LISTEN] (default %(default)s)",
    )
    add(
        "--allow-remote-control",
        action="store_true",
        default=env_flag(environ, "ALLOW_REMOTE_CONTROL"),
        help="let --control-listen bind a non-loopback address: anyone who reaches it controls "
        "this user's account [P2PCHAT_ALLOW_REMOTE_CONTROL=1]",
    )
    add(
        "--body-limit",
        type=positive_int,
        default=env(environ, "BODY_LIMIT", str(d.body_limit)),
        help="largest message body in bytes of UTF-8, at most 4 MiB [P2PCHAT_BODY_LIMIT] "
        "(default %(default)s)",
    )
    add(
        "--heartbeat-interval",
        type=positive_float,
        default=env(environ, "HEARTBEAT_INTERVAL", str(d.heartbeat_interval)),
        help="seconds between heartbeats to the directory [P2PCHAT_HEARTBEAT_INTERVAL] "
        "(default %(default)s)",
    )
    add(
        "--retry-max",
        type=positive_float,
        default=env(environ, "RETRY_MAX", str(d.retry_max)),
        help="longest wait in seconds between delivery retries [P2PCHAT_RETRY_MAX] "
        "(default %(default)s)",
    )
    add_lifecycle_flags(p, environ, d.grace_period, d.log_level)
    return p


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags over environment over defaults; exits with a usage error when invalid."""
    environ = os.environ if environ is None else environ
    parser, ns = parse(build_parser, "p2pchat-agent", argv, environ)
    if not ns.allow_remote_control and not is_loopback(ns.control_listen):
        parser.error(
            f"--control-listen {ns.control_listen} is not a loopback address; the control port "
            "gives full control of the account (add --allow-remote-control to force it)"
        )
    if int(ns.body_limit) > MAX_BODY_LIMIT:
        parser.error(f"--body-limit must be at most {MAX_BODY_LIMIT} bytes (4 MiB)")
    return Settings(
        directory=ns.directory,
        directory_ca=ns.directory_ca,
        directory_insecure=ns.directory_insecure,
        data_dir=ns.data_dir,
        peer_listen=ns.peer_listen,
        advertise=ns.advertise or "",
        control_listen=ns.control_listen,
        allow_remote_control=ns.allow_remote_control,
        body_limit=int(ns.body_limit),
        heartbeat_interval=float(ns.heartbeat_interval),
        retry_max=float(ns.retry_max),
        grace_period=float(ns.grace_period),
        log_level=ns.log_level,
    )
