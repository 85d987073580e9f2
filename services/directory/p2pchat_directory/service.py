"""The directory's use cases. Blocking (database): the servicer runs them in threads; scrypt
runs apart, on the hashing pool, between the phases of Register and Login (accounts.py).

Every method opens its own short transactions (`with db() as s, s.begin():`) and raises the domain
errors of p2pchat_common.errors; nothing here knows about gRPC.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from p2pchat_common.errors import (
    InvalidArgument,
    NotFound,
    RateLimited,
    Unauthenticated,
)
from p2pchat_common.validation import normalize_address, normalize_username, validate_password
from p2pchat_directory import consent_store
from p2pchat_directory import repository as repo
from p2pchat_directory.ca import CertificateAuthority, IssuedCertificate
from p2pchat_directory.certificates import (
    FIRST_LAYOUT_CERTIFICATE_TTL,
    CertificateState,
    record_certificate,
    reserved_usernames,
)
from p2pchat_directory.config import Settings
from p2pchat_directory.consent import ContactsService
from p2pchat_directory.consent_state import ContactView, contact_view, require_accepted
from p2pchat_directory.db import Databases
from p2pchat_directory.hot import Plan, run_plan
from p2pchat_directory.models import User, UserSession
from p2pchat_directory.passwords import DUMMY_HASH
from p2pchat_directory.throttle import login_refusal
from p2pchat_directory.tokens import SESSION_ENDED, checked_token_hash, token_hash
from p2pchat_directory.tokens import owner as session_owner

log = logging.getLogger(__name__)

MAX_STATUS_QUERIES = 256
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_BAD_LOGIN = "wrong username or password"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LookupView:
    contact: ContactView
    public_key_sha256: str
    certificate_pem: bytes
    mailbox_key: bytes = b""  # empty: none published for the current identity key
    mailbox_key_signature: bytes = b""


@dataclass(frozen=True)
class NewAccount:
    """A Register's checked name and address, waiting for its password hash."""

    username: str
    address: str


@dataclass(frozen=True)
class LoginAttempt:
    """What `begin_login_reads` found, for `finish_login` once the password has been checked."""

    username: str
    address: str
    source: str
    stored_hash: str  # DUMMY_HASH for an unknown name: it costs the same scrypt as a real one
    known: bool  # whether the user exists


@dataclass(frozen=True)
class LoginResult:
    username: str
    token: str
    session_expires_at: datetime
    certificate: IssuedCertificate | None
    ca_certificate_pem: bytes  # the users CA: the trust root of peer links
    directory_ca_pem: bytes  # the directory root: the trust root of this channel
    server_time: datetime


@dataclass(frozen=True)
class HeartbeatResult:
    session_expires_at: datetime
    online_until: datetime
    server_time: datetime
    contacts_changed_at: datetime | None = None  # None: never changed


class DirectoryService:
    def __init__(
        self,
        settings: Settings,
        dbs: Databases,
        ca: CertificateAuthority,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._dbs = dbs
        self._ca = ca
        self._now = clock
        self._reserved = reserved_usernames(settings)
        self.contacts = ContactsService(settings, dbs, self.authenticate, clock)

    def warn_of_lookalikes(self) -> None:
        """After an upgrade from the first layout (one CA for users and the directory): names
        the accounts called like a name this directory is served under. A certificate the old
        CA issued to one of them still chains to the root until it expires, and could pose as
        the directory where that name is dialled."""
        with self._dbs.users() as s:
            found = repo.existing_usernames(s, self._reserved)
        if found:
            log.warning(
                "accounts named like this directory exist: %s. Certificates issued to them "
                "before this upgrade could pose as the directory until they expire (%s after "
                "they were issued at most); remove these accounts if you did not expect them",
                ", ".join(sorted(found)),
                FIRST_LAYOUT_CERTIFICATE_TTL,
            )

    # -- accounts and sessions ---------------------------------------------------------------

    # Register and Login are split around scrypt, which runs on the hashing pool between these
    # phases (accounts.py) and never here: these run on the shared threads.

    def check_registration(self, username: str, password: str, address: str) -> NewAccount:
        """The account a Register asks for, checked before its password is hashed. No I/O."""
        name = normalize_username(username)
        if name in self._reserved:
            raise InvalidArgument(f"the username {name!r} is reserved: choose another")
        validate_password(password)
        return NewAccount(name, normalize_address(address))

    def add_account(self, account: NewAccount, password_hash: str) -> str:
        row = User(
            username=account.username,
            password_hash=password_hash,
            address=account.address,
            created_at=self._now(),
            public_key_sha256="",
        )
        with self._dbs.users() as s, s.begin():
            repo.add_user(s, row)
        log.info("registered user %s", account.username)
        return account.username

    def begin_login_reads(
        self, username: str, password: str, address: str, source: str
    ) -> Plan[LoginAttempt]:
        """The checks of a login before its password is: the failed-login throttles (RateLimited,
        nothing recorded) and the stored hash to verify against. `source` is where the client
        connects from (servicer.client_source): failed logins are throttled per (username,
        source), per source and per username (throttle.py). One hot read, no write."""
        name = normalize_username(username)
        if not password:
            raise InvalidArgument("password is required")
        addr = normalize_address(address)
        now = self._now()
        forget = now - self._settings.login_failure_window
        stored, recent = yield from repo.login_checks_reads(name, source, forget)
        refusal = login_refusal(self._settings, name, recent, now)
        if refusal is not None:
            log.warning("login for %s from %s refused: %s", name, source, refusal)
            raise RateLimited(refusal)
        known = stored is not None
        return LoginAttempt(name, addr, source, DUMMY_HASH if stored is None else stored, known)

    def finish_login(self, attempt: LoginAttempt, verified: bool, csr_pem: bytes) -> LoginResult:
        """After the password was checked (`verified`): a failure recorded, or a session."""
        name, source, settings = attempt.username, attempt.source, self._settings
        now = self._now()
        if not verified or not attempt.known:
            with self._dbs.users() as s, s.begin():
                repo.record_failure(s, name, source, now, now - settings.login_failure_window)
            log.info("failed login for %s from %s", name, source)
            raise Unauthenticated(_BAD_LOGIN)
        issued = (
            self._ca.sign_agent_csr(csr_pem, name, settings.certificate_ttl) if csr_pem else None
        )
        token = secrets.token_urlsafe(32)
        hashed = token_hash(token)
        expires = now + settings.session_ttl
        with self._dbs.users() as s, s.begin():
            repo.clear_failures(s, name, source)
            repo.delete_expired_sessions(s, name, now)
            repo.add_session(
                s,
                UserSession(token_hash=hashed, username=name, created_at=now, expires_at=expires),
            )
            user = repo.get_user(s, name)
            if user is None:  # deleted between the two transactions
                raise Unauthenticated(_BAD_LOGIN)
            if attempt.address:
                user.address = attempt.address
            user.last_seen = now
            user.online_until = now + settings.presence_ttl
            if issued is not None:
                record_certificate(s, user, issued, hashed, now)
        log.info("user %s logged in", name)
        return LoginResult(
            name,
            token,
            expires,
            issued,
            self._ca.users_cert_pem,
            self.directory_ca_pem,
            self._now(),
        )

    def authenticate(self, token: str) -> str:
        """The username a bearer token belongs to; Unauthenticated when missing/expired/revoked."""
        return session_owner(repo.session_owner(self._dbs, checked_token_hash(token), self._now()))

    def logout(self, token: str) -> None:
        name = self.authenticate(token)
        now = self._now()
        with self._dbs.users() as s, s.begin():
            repo.delete_session(s, token_hash(token))
            repo.revoke_certificates(s, now, session_hash=token_hash(token))
            if repo.count_live_sessions(s, name, now) == 0:
                user = repo.get_user(s, name)
                if user is not None:
                    user.online_until = None
                    user.last_seen = now
        log.info("user %s logged out", name)

    def heartbeat(self, token: str) -> HeartbeatResult:
        name = self.authenticate(token)
        now = self._now()
        expires, online_until = now + self._settings.session_ttl, now + self._settings.presence_ttl
        with self._dbs.users() as s, s.begin():  # two UPDATEs, no row loaded
            if not repo.beat(s, token_hash(token), name, expires, online_until, now):
                raise Unauthenticated(SESSION_ENDED)
        # Apart from the users transaction: the contacts may live in another database, and
        # this time is written with the change it reports. One primary-key read.
        changed = consent_store.changed_at(self._dbs, name)
        return HeartbeatResult(expires, online_until, self._now(), changed)

    def renew_certificate(self, token: str, csr_pem: bytes) -> IssuedCertificate:
        name = self.authenticate(token)
        if not csr_pem:
            raise InvalidArgument("csr_pem is required")
        issued = self._ca.sign_agent_csr(csr_pem, name, self._settings.certificate_ttl)
        with self._dbs.users() as s, s.begin():
            user = repo.get_user(s, name)
            if user is None:
                raise Unauthenticated("user no longer exists")
            record_certificate(s, user, issued, token_hash(token), self._now())
        return issued

    def certificate_status(self, token: str, sha256s: Sequence[str]) -> list[CertificateState]:
        """Whether each certificate (by the SHA-256 of its DER) is good, revoked or unknown."""
        self.authenticate(token)
        if not 1 <= len(sha256s) <= MAX_STATUS_QUERIES:
            raise InvalidArgument(f"ask about 1 to {MAX_STATUS_QUERIES} certificates at once")
        if not all(_SHA256_HEX.fullmatch(sha) for sha in sha256s):
            raise InvalidArgument("certificate_sha256 must be 64 lower-case hex digits")
        with self._dbs.users() as s:
            known = repo.certificate_states(s, sha256s)
        now = self._now()
        states = []
        for sha in sha256s:
            found = known.get(sha)
            if found is None:
                states.append(CertificateState.UNKNOWN)
            elif found[1] is not None or found[0] <= now:
                states.append(CertificateState.REVOKED)
            else:
                states.append(CertificateState.GOOD)
        return states

    @property
    def ca_certificate_pem(self) -> bytes:
        """The users CA (the trust root of peer links)."""
        return self._ca.users_cert_pem

    @property
    def directory_ca_pem(self) -> bytes:
        """The root this channel's certificate chains to; empty when it is not ours."""
        served_by_us = self._settings.tls_cert is None and not self._settings.insecure
        return self._ca.cert_pem if served_by_us else b""

    # -- contacts (consent.py has the use cases) -------------------------------------------------

    def caller_and_contact_reads(
        self, token: str, username: str, now: datetime
    ) -> Plan[tuple[str, str, repo.UserSummary, str]]:
        """(caller, contact's canonical name, their summary, pinned address) in one short read
        (two when users and contacts are apart);
        Unauthenticated, NotFound, or FailedPrecondition unless they are ACCEPTED contacts."""
        name, hashed = normalize_username(username), checked_token_hash(token)
        pair: consent_store.Pair | None
        if self._dbs.one_database:  # one statement, one round trip
            joined = consent_store.owner_user_and_pair_reads(hashed, now, name)
            found, user, pair = yield from joined
            owner = session_owner(found)
        else:
            found, user = yield from repo.owner_and_user_reads(hashed, now, name)
            owner = session_owner(found)
            pair = None if user is None else (yield from consent_store.pair_reads(owner, name))
        if user is None or pair is None:
            raise NotFound(f"no such user: {name!r}")
        return owner, name, user, require_accepted(name, pair)

    def caller_and_contact(
        self, token: str, username: str, now: datetime
    ) -> tuple[str, str, repo.UserSummary, str]:
        """`caller_and_contact_reads`, blocking (Deposit)."""
        plan = self.caller_and_contact_reads(token, username, now)
        return run_plan(plan, self._dbs.users_reader, self._dbs.contacts_reader)

    def lookup_reads(self, token: str, username: str) -> Plan[LookupView]:
        """Where a contact's agent is. The hottest call: one short read, no ORM objects."""
        now = self._now()
        _, name, user, pinned = yield from self.caller_and_contact_reads(token, username, now)
        return LookupView(
            contact=contact_view(
                name, pinned, user.address, user.online_until, user.last_seen, now
            ),
            public_key_sha256=user.public_key_sha256,
            certificate_pem=user.certificate_pem or b"",
            mailbox_key=user.mailbox_key or b"",
            mailbox_key_signature=user.mailbox_key_signature or b"",
        )
