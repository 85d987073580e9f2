"""Settings of the directory service: flags, each with a P2PCHAT_* environment equivalent.

This is the only module of the directory that reads the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
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

DEFAULT_LISTEN = "0.0.0.0:50051"


@dataclass(frozen=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = Path("./data")
    users_db: str = ""  # SQLAlchemy URL; empty means sqlite:///<data_dir>/users.db
    contacts_db: str = ""  # SQLAlchemy URL; empty means sqlite:///<data_dir>/contacts.db
    tls_names: tuple[str, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    session_ttl: timedelta = timedelta(days=7)
    presence_ttl: timedelta = timedelta(seconds=30)
    # Short-lived: renewed by agents while logged in, so a certificate that leaks or outlives its
    # session (a directory that cannot be asked about revocation) is good for hours at most.
    certificate_ttl: timedelta = timedelta(hours=12)
    login_max_failures: int = 5  # per (username, source)
    login_max_failures_per_source: int = 20  # per source, over all usernames
    login_max_failures_per_account: int = 100  # per username, from all sources
    login_failure_window: timedelta = timedelta(hours=1)  # older failures are forgotten
    grace_period: float = 5.0
    workers: int = 8
    log_level: str = "INFO"

    @property
    def users_url(self) -> str:
        return self.users_db or f"sqlite:///{self.data_dir / 'users.db'}"

    @property
    def contacts_url(self) -> str:
        return self.contacts_db or f"sqlite:///{self.data_dir / 'contacts.db'}"


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    d = Settings()
    p = argparse.ArgumentParser(
        prog="p2pchat-directory",
        description=(
            "The p2pchat directory: registers users, checks passwords, keeps contacts and "
            "presence, and signs agents' certificates. Every flag has an environment variable "
            "(shown in brackets)."
        ),
    )
    p.add_argument(
        "--listen",
        type=address("listen address", allow_port_zero=True),
        default=env(environ, "LISTEN", d.listen),
        help="HOST:PORT to serve gRPC on [P2PCHAT_LISTEN] (default %(default)s)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env(environ, "DATA_DIR", str(d.data_dir))),
        help="directory for the CA, the TLS material and the default SQLite databases "
        "[P2PCHAT_DATA_DIR] (default %(default)s)",
    )
    p.add_argument(
        "--users-db",
        default=env(environ, "USERS_DB", ""),
        help="SQLAlchemy URL of the users database, e.g. postgresql+psycopg://u:p@host/db "
        "[P2PCHAT_USERS_DB] (default sqlite:///DATA_DIR/users.db)",
    )
    p.add_argument(
        "--contacts-db",
        default=env(environ, "CONTACTS_DB", ""),
        help="SQLAlchemy URL of the contacts database (may be the same as --users-db) "
        "[P2PCHAT_CONTACTS_DB] (default sqlite:///DATA_DIR/contacts.db)",
    )
    p.add_argument(
        "--tls-name",
        action="append",
        default=None,
        help="extra DNS name or IP for the server certificate; repeatable "
        "[P2PCHAT_TLS_NAMES, comma-separated]",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=env(environ, "TLS_CERT", "") or None,
        help="serve this PEM certificate (chain) instead of one from the directory CA "
        "[P2PCHAT_TLS_CERT]",
    )
    p.add_argument(
        "--tls-key",
        type=Path,
        default=env(environ, "TLS_KEY", "") or None,
        help="private key for --tls-cert [P2PCHAT_TLS_KEY]",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=env_flag(environ, "INSECURE"),
        help="serve without TLS. For debugging only: passwords and tokens cross the network "
        "in clear [P2PCHAT_INSECURE=1]",
    )
    p.add_argument(
        "--session-ttl",
        type=positive_float,
        default=env(environ, "SESSION_TTL", str(d.session_ttl.total_seconds())),
        help="seconds a session lives without a heartbeat [P2PCHAT_SESSION_TTL] "
        "(default %(default)s)",
    )
    p.add_argument(
        "--presence-ttl",
        type=positive_float,
        default=env(environ, "PRESENCE_TTL", str(d.presence_ttl.total_seconds())),
        help="seconds a user stays online after a heartbeat [P2PCHAT_PRESENCE_TTL] "
        "(default %(default)s)",
    )
    p.add_argument(
        "--certificate-ttl",
        type=positive_float,
        default=env(environ, "CERTIFICATE_TTL", str(d.certificate_ttl.total_seconds())),
        help="seconds an agent certificate is valid [P2PCHAT_CERTIFICATE_TTL] "
        "(default %(default)s)",
    )
    p.add_argument(
        "--login-max-failures",
        type=positive_int,
        default=env(environ, "LOGIN_MAX_FAILURES", str(d.login_max_failures)),
        help="failed logins per user from one address allowed in the window before that "
        "address gets RESOURCE_EXHAUSTED for that user, for a wait that doubles with each "
        "further failure [P2PCHAT_LOGIN_MAX_FAILURES] (default %(default)s)",
    )
    p.add_argument(
        "--login-max-failures-per-source",
        type=positive_int,
        default=env(environ, "LOGIN_MAX_FAILURES_PER_SOURCE", str(d.login_max_failures_per_source)),
        help="failed logins from one address (IPv4, or IPv6 /64), whatever the user, allowed "
        "in the window before it gets RESOURCE_EXHAUSTED, for a wait that doubles with each "
        "further failure [P2PCHAT_LOGIN_MAX_FAILURES_PER_SOURCE] (default %(default)s)",
    )
    p.add_argument(
        "--login-max-failures-per-account",
        type=positive_int,
        default=env(
            environ, "LOGIN_MAX_FAILURES_PER_ACCOUNT", str(d.login_max_failures_per_account)
        ),
        help="failed logins per user from all addresses allowed in the window before every "
        "login of that user gets RESOURCE_EXHAUSTED, for a wait that doubles with each "
        "further failure [P2PCHAT_LOGIN_MAX_FAILURES_PER_ACCOUNT] (default %(default)s)",
    )
    p.add_argument(
        "--login-failure-window",
        type=positive_float,
        default=env(environ, "LOGIN_FAILURE_WINDOW", str(d.login_failure_window.total_seconds())),
        help="seconds after which a failed login is forgotten; no wait lasts longer "
        "[P2PCHAT_LOGIN_FAILURE_WINDOW] (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=env(environ, "WORKERS", str(d.workers)),
        help="threads for database work and password hashing [P2PCHAT_WORKERS] "
        "(default %(default)s)",
    )
    add_lifecycle_flags(p, environ, d.grace_period, d.log_level)
    return p


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags over environment over defaults; exits with a usage error when invalid."""
    environ = os.environ if environ is None else environ
    parser, ns = parse(build_parser, "p2pchat-directory", argv, environ)
    env_names = tuple(n.strip() for n in env(environ, "TLS_NAMES", "").split(",") if n.strip())
    if (ns.tls_cert is None) != (ns.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls_names = tuple(ns.tls_name) if ns.tls_name is not None else env_names
    for name in tls_names:
        if is_reserved_name(name):
            parser.error(f"--tls-name {name}: names under .invalid are where users are named")
    return Settings(
        listen=ns.listen,
        data_dir=ns.data_dir,
        users_db=ns.users_db,
        contacts_db=ns.contacts_db,
        tls_names=tls_names,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        insecure=ns.insecure,
        session_ttl=timedelta(seconds=float(ns.session_ttl)),
        presence_ttl=timedelta(seconds=float(ns.presence_ttl)),
        certificate_ttl=timedelta(seconds=float(ns.certificate_ttl)),
        login_max_failures=int(ns.login_max_failures),
        login_max_failures_per_source=int(ns.login_max_failures_per_source),
        login_max_failures_per_account=int(ns.login_max_failures_per_account),
        login_failure_window=timedelta(seconds=float(ns.login_failure_window)),
        grace_period=float(ns.grace_period),
        workers=int(ns.workers),
        log_level=ns.log_level,
    )
