"""Settings of the agent daemon: flags, each with a P2PCHAT_* environment equivalent.

This is the only module of the agent that reads the environment.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
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
from p2pchat_common.tls import is_reserved_name
from p2pchat_common.validation import is_wildcard

DEFAULT_DIRECTORY = "localhost:50051"
DEFAULT_PEER_LISTEN = "0.0.0.0:50052"
# The control API's default: a Unix socket in the data dir (0600, in the 0700 data dir), so that
# only the user the agent runs as can drive it. Loopback TCP stays available as an option.
CONTROL_SOCKET_FILE = "control.sock"
UNIX_PREFIX = "unix:"
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108 with the terminating NUL
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
    control_listen: str = ""  # "unix:PATH" or HOST:PORT; "" = unix:DATA_DIR/control.sock
    allow_remote_control: bool = False
    body_limit: int = DEFAULT_BODY_LIMIT
    heartbeat_interval: float = 10.0
    retry_max: float = 30.0
    # How long a peer certificate found good is trusted before the directory is asked again,
    # and how often open links are checked: the delay with which a logout closes links.
    revocation_interval: float = 30.0
    # A peer not linked within this many seconds (connect, TLS and the Hellos) counts as
    # unreachable: what is pending for it goes through the directory's mailbox meanwhile.
    dial_timeout: float = 3.0
    # Seconds of silence on a link (or on the mailbox stream) before a ping, one not answered
    # within half that closing it; and, with the mailbox on, a link that leaves messages
    # unacknowledged is declared dead within this time (delivery.Delivery's watchdog).
    keepalive: float = 10.0
    mailbox: bool = True  # relay through (and collect from) the directory's sealed mailbox
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

    @property
    def control_address(self) -> str:
        """Where the control API is served: "unix:PATH" or HOST:PORT."""
        return self.control_listen or default_control_listen(self.data_dir)

    @property
    def control_socket(self) -> Path | None:
        """The control API's Unix socket, or None when it is served on TCP."""
        return socket_path(self.control_address)


def default_control_listen(data_dir: Path) -> str:
    """The agent's control address when none is given: its socket in its data dir. The one
    place that says so, for the agent and the CLI alike."""
    return f"{UNIX_PREFIX}{data_dir / CONTROL_SOCKET_FILE}"


def default_agent_address(environ: Mapping[str, str]) -> str:
    """The CLI's default --agent: P2PCHAT_AGENT, else where an agent started in this same
    environment serves (as the image's healthcheck finds it): P2PCHAT_CONTROL_LISTEN (a wildcard
    host dialled on loopback), else the socket in P2PCHAT_DATA_DIR (as in the image), else the
    socket of an agent run with the defaults."""
    if environ.get("P2PCHAT_AGENT"):
        return environ["P2PCHAT_AGENT"]
    listen = environ.get("P2PCHAT_CONTROL_LISTEN", "")
    if listen and socket_path(listen) is None:
        host, _, port = listen.rpartition(":")
        if is_wildcard(host):
            return f"{'[::1]' if ':' in host else '127.0.0.1'}:{port}"
        return listen
    return listen or default_control_listen(
        Path(environ.get("P2PCHAT_DATA_DIR") or Settings.data_dir)
    )


def socket_path(address: str) -> Path | None:
    """The Unix socket path of a control address ("unix:PATH", "unix:///PATH", or any path with
    a "/" in it), None for HOST:PORT."""
    if address.startswith(UNIX_PREFIX):
        path = address[len(UNIX_PREFIX) :]
        return Path("/" + path.lstrip("/") if path.startswith("/") else path)
    return Path(address) if "/" in address else None


def control_address(what: str, *, allow_port_zero: bool = False) -> Callable[[str], str]:
    """An argparse type for control addresses: a Unix socket, as "unix:PATH", or HOST:PORT."""
    tcp = address(what, allow_port_zero=allow_port_zero)

    def parse(text: str) -> str:
        path = socket_path(text)
        if path is None:
            return tcp(text)
        if not str(path) or str(path) == ".":
            raise argparse.ArgumentTypeError(f"{what} {text!r}: the socket path is missing")
        return f"{UNIX_PREFIX}{path}"

    return parse


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
            "control socket (DATA_DIR/control.sock, for this user only). Starts logged out (or "
            "resumes a stored session). Every flag has an environment variable (in brackets)."
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
        metavar="unix:PATH|HOST:PORT",
        type=control_address("control listen address", allow_port_zero=True),
        default=env(environ, "CONTROL_LISTEN", "") or None,
        help="where the CLI drives the agent: a Unix socket (mode 0600), or loopback TCP "
        "HOST:PORT, which any local user can reach (non-loopback only with "
        "--allow-remote-control) [P2PCHAT_CONTROL_LISTEN] (default unix:DATA_DIR/control.sock)",
    )
    add(
        "--allow-remote-control",
        action="store_true",
        default=env_flag(environ, "ALLOW_REMOTE_CONTROL"),
        help="let --control-listen bind a non-loopback HOST:PORT: anyone who reaches it "
        "controls this user's account [P2PCHAT_ALLOW_REMOTE_CONTROL=1]",
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
    add(
        "--revocation-interval",
        type=positive_float,
        default=env(environ, "REVOCATION_INTERVAL", str(d.revocation_interval)),
        help="seconds between asking the directory whether linked peers' certificates are "
        "still good; a logged-out peer's links close within this [P2PCHAT_REVOCATION_INTERVAL] "
        "(default %(default)s)",
    )
    add(
        "--dial-timeout",
        type=positive_float,
        default=env(environ, "DIAL_TIMEOUT", str(d.dial_timeout)),
        help="seconds to link with a peer before it counts as unreachable and pending messages "
        "go through the directory's sealed mailbox [P2PCHAT_DIAL_TIMEOUT] (default %(default)s)",
    )
    add(
        "--keepalive",
        type=positive_float,
        default=env(environ, "KEEPALIVE", str(d.keepalive)),
        help="seconds of silence on a peer link or the mailbox stream before a ping (one not "
        "answered in half that ends the connection); a link that leaves messages "
        "unacknowledged this long is declared dead and they go through the mailbox "
        "[P2PCHAT_KEEPALIVE] (default %(default)s)",
    )
    add(
        "--no-mailbox",
        action="store_true",
        default=env_flag(environ, "NO_MAILBOX"),
        help="never relay through or collect from the directory's sealed mailbox: messages "
        "wait until both agents are online and one can dial the other [P2PCHAT_NO_MAILBOX=1]",
    )
    add_lifecycle_flags(p, environ, d.grace_period, d.log_level)
    return p


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags over environment over defaults; exits with a usage error when invalid."""
    environ = os.environ if environ is None else environ
    parser, ns = parse(build_parser, "p2pchat-agent", argv, environ)
    if is_reserved_name(ns.directory.rpartition(":")[0]):
        parser.error(f"--directory {ns.directory}: names under .invalid are where users are named")
    control_listen: str = ns.control_listen or ""
    tcp = bool(control_listen) and socket_path(control_listen) is None
    if tcp and not ns.allow_remote_control and not is_loopback(control_listen):
        parser.error(
            f"--control-listen {control_listen} is not a loopback address; the control port "
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
        control_listen=control_listen,
        allow_remote_control=ns.allow_remote_control,
        body_limit=int(ns.body_limit),
        heartbeat_interval=float(ns.heartbeat_interval),
        retry_max=float(ns.retry_max),
        revocation_interval=float(ns.revocation_interval),
        dial_timeout=float(ns.dial_timeout),
        keepalive=float(ns.keepalive),
        mailbox=not ns.no_mailbox,
        grace_period=float(ns.grace_period),
        log_level=ns.log_level,
    )
