"""The statements of presence streams (presence.py): one to open a stream, and per interval a
few for every stream of the replica at once, whatever their number (blocking; run in threads).

- `open_stream`: the session's owner and expiry, the user online now, when their contacts last
  changed: the only write a stream costs until its next interval.
- `renew`: the leases of the streams that beat since the last interval, in one statement
  (PostgreSQL: an UPDATE over `unnest` of arrays; SQLite: one prepared UPDATE run for each
  row in one transaction, all on this machine). Each row's `online_until` is its own last beat
  plus the TTL, so presence ends within the TTL of the last beat, as with unary heartbeats; a
  lease is written only while its session lives (checked in the same statement, so a logout
  that commits first is never undone).
- `sessions_due`: sessions past half their lifetime, extended in one statement.
- `poll`: which sessions still live (and until when) and when each user's contacts changed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, bindparam, select, text, update

from p2pchat_common.errors import Unauthenticated
from p2pchat_common.timestamps import sqlite_text
from p2pchat_directory.db import Databases
from p2pchat_directory.models import ContactsChanged, User, UserSession

# Rows per statement on SQLite (its default limit is 32,766 bound variables).
_SQLITE_CHUNK = 5_000


@dataclass(frozen=True)
class Opened:
    username: str
    session_expires_at: datetime
    contacts_changed_at: datetime | None


@dataclass(frozen=True)
class Lease:
    username: str
    token_hash: str
    beat: datetime  # the last beat: online until beat + TTL


@dataclass(frozen=True)
class Polled:
    sessions: dict[str, datetime]  # token hash -> expires_at, for the live ones only
    contacts_changed: dict[str, datetime]  # username -> changed_at, for those that ever did


_SESSION = select(UserSession.username, UserSession.expires_at).where(
    UserSession.token_hash == bindparam("token_hash"), UserSession.expires_at > bindparam("now")
)
_CHANGED = select(ContactsChanged.changed_at).where(
    ContactsChanged.username == bindparam("username")
)
_ONLINE = (
    update(User)
    .where(User.username == bindparam("name"))
    .values(online_until=bindparam("until"), last_seen=bindparam("seen"))
)
_EXTEND = (
    update(UserSession)
    .where(UserSession.token_hash == bindparam("token"), UserSession.expires_at > bindparam("now"))
    .values(expires_at=bindparam("expires"))
)

# PostgreSQL: every lease in one UPDATE. The timestamp columns are naive UTC (UTCDateTime).
_PG_RENEW = text(
    "UPDATE users AS u SET online_until = v.until, last_seen = v.seen "
    "FROM unnest(CAST(:names AS text[]), CAST(:tokens AS text[]), "
    "CAST(:untils AS timestamp[]), CAST(:seens AS timestamp[])) AS v(name, token, until, seen) "
    "WHERE u.username = v.name AND EXISTS (SELECT 1 FROM sessions AS s "
    "WHERE s.token_hash = v.token AND s.expires_at > CAST(:now AS timestamp))"
)
_PG_SESSIONS = text(
    "SELECT token_hash, expires_at FROM sessions "
    "WHERE token_hash = ANY(CAST(:tokens AS text[])) AND expires_at > CAST(:now AS timestamp)"
)
_PG_CHANGED = text(
    "SELECT username, changed_at FROM contacts_changed WHERE username = ANY(CAST(:names AS text[]))"
)
# SQLite: the same lease, with the session check, for one row.
_SQLITE_RENEW = text(
    "UPDATE users SET online_until = :until, last_seen = :seen WHERE username = :name "
    "AND EXISTS (SELECT 1 FROM sessions WHERE token_hash = :token AND expires_at > :now)"
)


def _utc_naive(value: datetime) -> datetime:
    """As UTCDateTime stores it: naive UTC (text() statements bind without the column type)."""
    return value.astimezone(UTC).replace(tzinfo=None)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _SQLITE_CHUNK):
        yield items[start : start + _SQLITE_CHUNK]


def open_stream(dbs: Databases, token_hash: str, now: datetime, online_until: datetime) -> Opened:
    """Authenticates the stream's session and marks its user online until `online_until`;
    Unauthenticated when the session is missing or expired."""
    with dbs.users_engine.begin() as conn:
        row = conn.execute(_SESSION, {"token_hash": token_hash, "now": now}).one_or_none()
        if row is None:
            raise Unauthenticated("session expired or revoked: log in again")
        username, expires_at = row
        conn.execute(_ONLINE, {"name": username, "until": online_until, "seen": now})
    with dbs.contacts_engine.connect() as conn:
        changed = conn.execute(_CHANGED, {"username": username}).scalar_one_or_none()
    return Opened(username, expires_at, changed)


def renew(dbs: Databases, leases: Sequence[Lease], ttl: timedelta, now: datetime) -> None:
    """Writes every lease in one statement: online until its beat + `ttl`, last seen at its
    beat; only where the session still lives at `now`."""
    if not leases:
        return
    with dbs.users_engine.begin() as conn:
        if _is_postgres(dbs.users_engine):
            conn.execute(
                _PG_RENEW,
                {
                    "names": [lease.username for lease in leases],
                    "tokens": [lease.token_hash for lease in leases],
                    "untils": [_utc_naive(lease.beat + ttl) for lease in leases],
                    "seens": [_utc_naive(lease.beat) for lease in leases],
                    "now": _utc_naive(now),
                },
            )
            return
        _sqlite_renew(conn, leases, ttl, now)


def _sqlite_renew(conn: Connection, leases: Sequence[Lease], ttl: timedelta, now: datetime) -> None:
    stamp = sqlite_text
    conn.execute(
        _SQLITE_RENEW,
        [
            {
                "name": lease.username,
                "token": lease.token_hash,
                "until": stamp(lease.beat + ttl),
                "seen": stamp(lease.beat),
                "now": stamp(now),
            }
            for lease in leases
        ],
    )


def extend_sessions(
    dbs: Databases, token_hashes: Sequence[str], expires_at: datetime, now: datetime
) -> None:
    """Extends these live sessions to `expires_at` (one prepared statement for all)."""
    if not token_hashes:
        return
    with dbs.users_engine.begin() as conn:
        conn.execute(
            _EXTEND, [{"token": t, "now": now, "expires": expires_at} for t in token_hashes]
        )


def poll(
    dbs: Databases, token_hashes: Sequence[str], usernames: Sequence[str], now: datetime
) -> Polled:
    """Which of these sessions live (with their expiry) and when these users' contacts last
    changed: one statement each on PostgreSQL, one per 5,000 on SQLite."""
    sessions: dict[str, datetime] = {}
    changed: dict[str, datetime] = {}
    if token_hashes:
        with dbs.users_engine.connect() as conn:
            if _is_postgres(dbs.users_engine):
                rows = conn.execute(
                    _PG_SESSIONS, {"tokens": list(token_hashes), "now": _utc_naive(now)}
                )
                sessions.update((t, _aware(e)) for t, e in rows)
            else:
                for chunk in _chunks(token_hashes):
                    sessions.update(_sqlite_sessions(conn, chunk, now))
    if usernames:
        with dbs.contacts_engine.connect() as conn:
            if _is_postgres(dbs.contacts_engine):
                rows = conn.execute(_PG_CHANGED, {"names": list(usernames)})
                changed.update((n, _aware(c)) for n, c in rows)
            else:
                for chunk in _chunks(usernames):
                    changed.update(_sqlite_changed(conn, chunk))
    return Polled(sessions, changed)


def _sqlite_sessions(
    conn: Connection, token_hashes: Sequence[str], now: datetime
) -> Iterator[tuple[str, datetime]]:
    stmt = select(UserSession.token_hash, UserSession.expires_at).where(
        UserSession.token_hash.in_(list(token_hashes)), UserSession.expires_at > now
    )
    for token, expires in conn.execute(stmt):
        yield str(token), expires


def _sqlite_changed(conn: Connection, usernames: Sequence[str]) -> Iterator[tuple[str, datetime]]:
    stmt = select(ContactsChanged.username, ContactsChanged.changed_at).where(
        ContactsChanged.username.in_(list(usernames))
    )
    for name, at in conn.execute(stmt):
        yield str(name), at


def _is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"
