"""Queries of the users database (consent_store has those of contacts). Most functions take the
SQLAlchemy session it works in (the caller owns the transaction); the hot reads every
authenticated call makes are plans (hot.py): plain SQL on either backend, run inline, in a
thread or on the event loop."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from p2pchat_common.errors import AlreadyExists
from p2pchat_directory.db import Databases
from p2pchat_directory.hot import Plan, Read, Row, run_plan, to_time
from p2pchat_directory.models import (
    FailedLogin,
    IssuedCertificateRow,
    User,
    UserSession,
)


@dataclass(frozen=True)
class UserSummary:
    address: str
    last_seen: datetime | None
    online_until: datetime | None
    public_key_sha256: str
    certificate_pem: bytes | None
    # The published mailbox key and its binding, None unless bound to the current identity key.
    mailbox_key: bytes | None = None
    mailbox_key_signature: bytes | None = None


# The hot reads in plain SQL (hot.py), on either backend, each one statement.
_SESSION_OWNER = "SELECT username FROM sessions WHERE token_hash = ? AND expires_at > ?"
# A live session's owner (s) and one user's summary (u, m): OWNER_AND_USER_COLUMNS, then
# OWNER_AND_USER_JOINS (the user's name), then LIVE_SESSION (the token hash and now). Also the
# first part of consent_store's Lookup in one statement.
OWNER_AND_USER_COLUMNS = (
    "s.username, u.username, u.address, u.last_seen, u.online_until, "
    "u.public_key_sha256, u.certificate_pem, m.mailbox_key, m.signature"
)
OWNER_AND_USER_JOINS = (
    "FROM sessions AS s LEFT JOIN users AS u ON u.username = ? "
    "LEFT JOIN mailbox_keys AS m "
    "ON m.username = u.username AND m.public_key_sha256 = u.public_key_sha256 "
)
LIVE_SESSION = "WHERE s.token_hash = ? AND s.expires_at > ?"
_OWNER_AND_USER = f"SELECT {OWNER_AND_USER_COLUMNS} {OWNER_AND_USER_JOINS}{LIVE_SESSION}"
# A list of names, in one prepared statement whatever its length: a JSON array on SQLite, an
# array on PostgreSQL. The primary key's index finds each.
_PRESENCE = (
    "SELECT username, address, online_until, last_seen FROM users "
    "WHERE username IN (SELECT value FROM json_each(?))"
)
_PG_PRESENCE = (
    "SELECT username, address, online_until, last_seen FROM users WHERE username = ANY(?)"
)


def session_owner_reads(token_hash: str, now: datetime) -> Plan[str | None]:
    """The user of a live session (None: none)."""
    rows = yield Read("users", _SESSION_OWNER, (token_hash, now))
    return str(rows[0][0]) if rows else None


def session_owner(dbs: Databases, token_hash: str, now: datetime) -> str | None:
    return run_plan(session_owner_reads(token_hash, now), dbs.users_reader, dbs.contacts_reader)


def owner_and_user_reads(
    token_hash: str, now: datetime, username: str
) -> Plan[tuple[str | None, UserSummary | None]]:
    """The user of a live session (None: no such session) and the summary of `username` (None:
    no such user), in one read."""
    rows = yield Read("users", _OWNER_AND_USER, (username, token_hash, now))
    return owner_and_user(rows[0]) if rows else (None, None)


def owner_and_user(row: Row) -> tuple[str, UserSummary | None]:
    """The first OWNER_AND_USER_COLUMNS of a row: the owner, the user's summary (None: no such
    user)."""
    owner, found, address, last_seen, online_until, key_sha256, cert, mkey, msig = row[:9]
    if found is None:
        return str(owner), None
    return str(owner), UserSummary(
        address,
        to_time(last_seen),
        to_time(online_until),
        key_sha256,
        _bytes(cert),
        _bytes(mkey),
        _bytes(msig),
    )


@dataclass(frozen=True)
class Presence:
    address: str
    online_until: datetime | None
    last_seen: datetime | None


def presence_reads(usernames: Sequence[str]) -> Plan[dict[str, Presence]]:
    """The address and presence of each of these users (ListContacts): those columns only."""
    if not usernames:
        return {}
    rows = yield Read("users", _PRESENCE, (list(usernames),), one=False, pg_sql=_PG_PRESENCE)
    return {
        name: Presence(address, to_time(online_until), to_time(last_seen))
        for name, address, online_until, last_seen in rows
    }


def _bytes(value: object) -> bytes | None:
    """A BLOB/bytea as bytes (psycopg may hand out a memoryview)."""
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def add_user(s: Session, user: User) -> None:
    s.add(user)
    try:
        s.flush()
    except IntegrityError:
        raise AlreadyExists(f"username {user.username!r} is taken") from None


def get_user(s: Session, username: str) -> User | None:
    return s.get(User, username)


def existing_usernames(s: Session, usernames: Iterable[str]) -> set[str]:
    names = list(usernames)
    return set(s.scalars(select(User.username).where(User.username.in_(names)))) if names else set()


@dataclass(frozen=True)
class Failures:
    """Failed logins in a window: how many, and when the latest was (None when none)."""

    count: int
    latest: datetime | None


@dataclass(frozen=True)
class RecentFailures:
    account_and_source: Failures  # this username from this source
    source: Failures  # this source, whatever the username
    account: Failures  # this username, from any source


# A login's checks in one hot read: the stored hash of `username` (NULL: no such user) and
# the failed logins since a time, counted and the latest, by (username, source), by source and
# by username (conditional aggregates over the rows of either).
_LOGIN_CHECKS = (
    "SELECT (SELECT password_hash FROM users WHERE username = ?), "
    "count(*) FILTER (WHERE username = ? AND source = ?), "
    "max(at) FILTER (WHERE username = ? AND source = ?), "
    "count(*) FILTER (WHERE source = ?), max(at) FILTER (WHERE source = ?), "
    "count(*) FILTER (WHERE username = ?), max(at) FILTER (WHERE username = ?) "
    "FROM failed_logins WHERE at > ? AND (source = ? OR username = ?)"
)


def login_checks_reads(
    username: str, source: str, since: datetime
) -> Plan[tuple[str | None, RecentFailures]]:
    """The stored password hash of `username` (None: no such user) and the failed logins since
    `since` of `username` from `source`, of `source` and of `username`, in one read."""
    name, src = username, source
    params = (name, name, src, name, src, src, src, name, name, since, src, name)
    rows = yield Read("users", _LOGIN_CHECKS, params)
    stored, both, both_at, by_source, source_at, by_name, name_at = rows[0]
    recent = RecentFailures(
        Failures(int(both), to_time(both_at)),
        Failures(int(by_source), to_time(source_at)),
        Failures(int(by_name), to_time(name_at)),
    )
    return (None if stored is None else str(stored)), recent


def record_failure(s: Session, username: str, source: str, at: datetime, forget: datetime) -> None:
    """Records a failed login and deletes every failure from before `forget` (out of every
    window: they only cost space; one index seek on `at`, so the table stays as large as one
    window's failures whatever names and sources are tried)."""
    s.add(FailedLogin(username=username, source=source, at=at))
    s.execute(delete(FailedLogin).where(FailedLogin.at <= forget))


def clear_failures(s: Session, username: str, source: str) -> None:
    """Forgets the failed logins of `username` from `source` (after a successful login)."""
    s.execute(
        delete(FailedLogin).where(FailedLogin.username == username, FailedLogin.source == source)
    )


def add_session(s: Session, session: UserSession) -> None:
    s.add(session)


def beat(
    s: Session,
    token_hash: str,
    username: str,
    expires: datetime,
    online_until: datetime,
    now: datetime,
) -> bool:
    """A unary heartbeat: the session extended and the user online; False (nothing written)
    when the session ended meanwhile."""
    extended = s.execute(
        update(UserSession)
        .where(UserSession.token_hash == token_hash, UserSession.expires_at > now)
        .values(expires_at=expires)
    )
    if not getattr(extended, "rowcount", 0):
        return False
    s.execute(
        update(User)
        .where(User.username == username)
        .values(last_seen=now, online_until=online_until)
    )
    return True


def delete_session(s: Session, token_hash: str) -> None:
    s.execute(delete(UserSession).where(UserSession.token_hash == token_hash))


def delete_expired_sessions(s: Session, username: str, now: datetime) -> None:
    s.execute(
        delete(UserSession).where(UserSession.username == username, UserSession.expires_at <= now)
    )


def count_live_sessions(s: Session, username: str, now: datetime) -> int:
    return int(
        s.scalar(
            select(func.count()).where(
                UserSession.username == username, UserSession.expires_at > now
            )
        )
        or 0
    )


# -- issued user certificates ---------------------------------------------------------------


def add_certificate(s: Session, row: IssuedCertificateRow) -> None:
    s.add(row)


def revoke_certificates(
    s: Session,
    at: datetime,
    *,
    session_hash: str = "",
    username: str = "",
    other_than_key: str = "",
) -> int:
    """Revokes the live certificates of one session, or those of `username` whose key is not
    `other_than_key`; how many."""
    stmt = update(IssuedCertificateRow).where(IssuedCertificateRow.revoked_at.is_(None))
    if session_hash:
        stmt = stmt.where(IssuedCertificateRow.session_hash == session_hash)
    if username:
        stmt = stmt.where(
            IssuedCertificateRow.username == username,
            IssuedCertificateRow.public_key_sha256 != other_than_key,
        )
    result = s.execute(stmt.values(revoked_at=at))
    return int(getattr(result, "rowcount", 0) or 0)


def delete_other_sessions(s: Session, username: str, keep_hash: str) -> int:
    """Ends every session of `username` but the one whose token hashes to `keep_hash`."""
    result = s.execute(
        delete(UserSession).where(
            UserSession.username == username, UserSession.token_hash != keep_hash
        )
    )
    return int(getattr(result, "rowcount", 0) or 0)


def forget_certificates(s: Session, username: str, expired_before: datetime) -> None:
    """Drops the records of `username`'s certificates that expired long ago."""
    s.execute(
        delete(IssuedCertificateRow).where(
            IssuedCertificateRow.username == username,
            IssuedCertificateRow.expires_at < expired_before,
        )
    )


def certificate_states(
    s: Session, sha256s: Sequence[str]
) -> dict[str, tuple[datetime, datetime | None]]:
    """(expires_at, revoked_at) of each known certificate among `sha256s`."""
    rows = s.execute(
        select(
            IssuedCertificateRow.sha256,
            IssuedCertificateRow.expires_at,
            IssuedCertificateRow.revoked_at,
        ).where(IssuedCertificateRow.sha256.in_(list(sha256s)))
    )
    return {sha: (expires, revoked) for sha, expires, revoked in rows}
