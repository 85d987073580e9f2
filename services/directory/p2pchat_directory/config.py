"""Settings of the directory service: flags, each with a P2PCHAT_* environment equivalent.

This is the only module of the directory that reads the environment.
"""

from __future__ import annotations

import argparse
import math
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
    non_negative_int,
    parse,
    positive_float,
    positive_int,
)
from p2pchat_common.tls import is_reserved_name

DEFAULT_LISTEN = "0.0.0.0:50051"
# Password hashing may use a quarter of the machine, at least half a core (hashing.py: paced,
# because scrypt slows every process on the machine whatever its priority), on as many threads
# as that share needs.
DEFAULT_HASH_SHARE = max(0.5, (os.cpu_count() or 1) / 4)
DEFAULT_HASH_WORKERS = math.ceil(DEFAULT_HASH_SHARE)


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
    # The sealed mailbox (MailboxService): what one recipient may hold, how fast one depositor
    # may deposit (per replica: an in-memory token bucket with a burst of 20 s of the rate), and
    # how long an envelope is kept when it is never collected and acknowledged.
    mailbox_max_envelopes: int = 10_000
    mailbox_max_bytes: int = 64 * 1024 * 1024
    mailbox_deposit_rate: float = 100.0
    mailbox_expiry: timedelta = timedelta(days=14)
    # Contact consent: requests one user may send in an hour (counted in the database, shared by
    # replicas), and requests awaiting one user's answer before further ones are refused.
    contact_request_rate: int = 20
    contact_request_cap: int = 100
    grace_period: float = 5.0
    workers: int = 8
    # Password hashing (scrypt, ~80 ms of CPU each) has threads of its own, and room for
    # hash_queue more hashes to wait (a waiting login costs nothing, a refused one comes back);
    # past that Register and Login are refused with the seconds to wait (hashing.py).
    hash_workers: int = DEFAULT_HASH_WORKERS
    hash_queue: int = 32 * DEFAULT_HASH_WORKERS
    hash_share: float = DEFAULT_HASH_SHARE  # of one core, on average, for all hash_workers
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
        "--mailbox-max-envelopes",
        type=positive_int,
        default=env(environ, "MAILBOX_MAX_ENVELOPES", str(d.mailbox_max_envelopes)),
        help="envelopes one recipient's mailbox holds before deposits to it get "
        "RESOURCE_EXHAUSTED [P2PCHAT_MAILBOX_MAX_ENVELOPES] (default %(default)s)",
    )
    p.add_argument(
        "--mailbox-max-bytes",
        type=positive_int,
        default=env(environ, "MAILBOX_MAX_BYTES", str(d.mailbox_max_bytes)),
        help="bytes of envelopes one recipient's mailbox holds before deposits to it get "
        "RESOURCE_EXHAUSTED [P2PCHAT_MAILBOX_MAX_BYTES] (default %(default)s)",
    )
    p.add_argument(
        "--mailbox-deposit-rate",
        type=positive_float,
        default=env(environ, "MAILBOX_DEPOSIT_RATE", str(d.mailbox_deposit_rate)),
        help="envelopes per second one user may deposit through one replica, sustained, with "
        "bursts of 20 seconds' worth; faster gets RESOURCE_EXHAUSTED with the wait "
        "[P2PCHAT_MAILBOX_DEPOSIT_RATE] (default %(default)s)",
    )
    p.add_argument(
        "--mailbox-expiry",
        type=positive_float,
        default=env(environ, "MAILBOX_EXPIRY", str(d.mailbox_expiry.total_seconds())),
        help="seconds an envelope is held when it is never acknowledged; then it is deleted "
        "[P2PCHAT_MAILBOX_EXPIRY] (default %(default)s)",
    )
    p.add_argument(
        "--contact-request-rate",
        type=positive_int,
        default=env(environ, "CONTACT_REQUEST_RATE", str(d.contact_request_rate)),
        help="contact requests one user may send in an hour; more get RESOURCE_EXHAUSTED "
        "[P2PCHAT_CONTACT_REQUEST_RATE] (default %(default)s)",
    )
    p.add_argument(
        "--contact-request-cap",
        type=positive_int,
        default=env(environ, "CONTACT_REQUEST_CAP", str(d.contact_request_cap)),
        help="contact requests that may await one user's answer; further requests to them get "
        "RESOURCE_EXHAUSTED (none is dropped) [P2PCHAT_CONTACT_REQUEST_CAP] "
        "(default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=env(environ, "WORKERS", str(d.workers)),
        help="threads for database work; password hashing has its own (--hash-workers) "
        "[P2PCHAT_WORKERS] (default %(default)s)",
    )
    p.add_argument(
        "--hash-workers",
        type=positive_int,
        default=env(environ, "HASH_WORKERS", str(d.hash_workers)),
        help="threads that hash passwords (scrypt, ~80 ms each) for Register and Login "
        "[P2PCHAT_HASH_WORKERS] (default %(default)s: enough for --hash-share)",
    )
    p.add_argument(
        "--hash-share",
        type=positive_float,
        default=env(environ, "HASH_SHARE", "") or None,
        help="how much of one core password hashing may use on average, all --hash-workers "
        "together (0.5: half a core); a burst of logins is spread out rather than slowing "
        "every other call, and at most --hash-workers [P2PCHAT_HASH_SHARE] "
        f"(default {d.hash_share:g}: a quarter of the cores, at least 0.5; at most "
        "--hash-workers)",
    )
    p.add_argument(
        "--hash-queue",
        type=non_negative_int,
        default=env(environ, "HASH_QUEUE", "") or None,
        help="password hashes that may wait for a hashing thread; past that, Register and "
        "Login get RESOURCE_EXHAUSTED at once, with a hint to retry [P2PCHAT_HASH_QUEUE] "
        "(default 32 x --hash-workers: at half a core, about 5 s of hashing, within the "
        "agents' 10 s deadline)",
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
    hash_workers = int(ns.hash_workers)
    if ns.hash_share is None:
        hash_share = min(DEFAULT_HASH_SHARE, hash_workers)
    else:
        hash_share = float(ns.hash_share)
        if hash_share > hash_workers:
            parser.error(
                f"--hash-share {hash_share:g} is more than --hash-workers {hash_workers} can "
                "use (one thread hashes on one core at most)"
            )
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
        mailbox_max_envelopes=int(ns.mailbox_max_envelopes),
        mailbox_max_bytes=int(ns.mailbox_max_bytes),
        mailbox_deposit_rate=float(ns.mailbox_deposit_rate),
        mailbox_expiry=timedelta(seconds=float(ns.mailbox_expiry)),
        contact_request_rate=int(ns.contact_request_rate),
        contact_request_cap=int(ns.contact_request_cap),
        grace_period=float(ns.grace_period),
        workers=int(ns.workers),
        hash_workers=hash_workers,
        hash_queue=32 * hash_workers if ns.hash_queue is None else int(ns.hash_queue),
        hash_share=hash_share,
        log_level=ns.log_level,
    )
