"""The statements of presence streams (presence.py): a few for all the streams that open
together, and per interval a few for every stream of the replica at once, whatever their
number (blocking; run in threads).

- `open_streams`: for every stream opened together, the session's owner and expiry, the user
  online now, when their contacts last changed: the only write a stream costs until its next
  interval.
- `renew`: the leases of the streams that beat since the last interval, in one statement
  (PostgreSQL: an UPDATE over `unnest` of arrays; SQLite: one prepared UPDATE run for each
  row in one transaction, all on this machine). Each row's `online_until` is its own last beat
  plus the TTL, so presence ends within the TTL of the last beat, as with unary heartbeats; a
  lease is written only while its session lives (checked in the same statement, so a logout
  that commits first is never undone).
- `extend_sessions`: sessions past half their lifetime, extended in one statement.
- `poll`: which sessions still live (and until when) and when each user's contacts changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, bindparam, text, update

from p2pchat_common.timestamps import sqlite_text
from p2pchat_directory.db import Databases
from p2pchat_directory.hot import Plan, Read, run_plan, to_time
from p2pchat_directory.models import UserSession


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


# The owners of many sessions at once (the streams opened together).
_OWNERS = (
    "SELECT token_hash, username, expires_at FROM sessions "
    "WHERE token_hash IN (SELECT value FROM json_each(?)) AND expires_at > ?"
)
_PG_OWNERS = (
    "SELECT token_hash, username, expires_at FROM sessions "
    "WHERE token_hash = ANY(?) AND expires_at > ?"
)


def open_streams(
    dbs: Databases, token_hashes: Sequence[str], now: datetime, ttl: timedelta
) -> dict[str, Opened]:
    """Opens many streams at once, whatever their number in three statements: the
    sessions' owners and expiries, their users online until `now` + `ttl` (where the session
    still lives, as `renew`), when their contacts last changed. A token without a live session
    is missing from the answer."""
    owners = dbs.users_reader.read(
        Read("users", _OWNERS, (list(token_hashes), now), one=False, pg_sql=_PG_OWNERS)
    )
    found: dict[str, tuple[str, datetime]] = {}
    for token, name, expires in owners:
        expires_at = to_time(expires)
        if expires_at is not None:
            found[str(token)] = (str(name), expires_at)
    if not found:
        return {}
    renew(dbs, [Lease(name, token, now) for token, (name, _) in found.items()], ttl, now)
    names = sorted({name for name, _ in found.values()})
    changed = _changed_times(dbs.contacts_reader.read(_changed_of(names)))
    return {
        token: Opened(name, expires_at, changed.get(name))
        for token, (name, expires_at) in found.items()
    }


def renew(dbs: Databases, leases: Sequence[Lease], ttl: timedelta, now: datetime) -> None:
    """Writes every lease in one statement: online until its beat + `ttl`, last seen at its
    beat; only where the session still lives at `now`."""
    if not leases:
        return
    with dbs.users_engine.begin() as conn:
        if dbs.users_engine.dialect.name == "postgresql":
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


# Which of a slice's sessions live, and when its users' contacts changed: one statement each
# whatever the slice's size (a JSON array on SQLite, an array on PostgreSQL; see hot.py).
_LIVE = (
    "SELECT token_hash, expires_at FROM sessions "
    "WHERE token_hash IN (SELECT value FROM json_each(?)) AND expires_at > ?"
)
_PG_LIVE = (
    "SELECT token_hash, expires_at FROM sessions WHERE token_hash = ANY(?) AND expires_at > ?"
)
_CHANGED_OF = (
    "SELECT username, changed_at FROM contacts_changed "
    "WHERE username IN (SELECT value FROM json_each(?))"
)
_PG_CHANGED_OF = "SELECT username, changed_at FROM contacts_changed WHERE username = ANY(?)"


def _changed_of(usernames: Sequence[str]) -> Read:
    """When each of these users' contacts last changed (rows for those that ever did)."""
    return Read("contacts", _CHANGED_OF, (list(usernames),), one=False, pg_sql=_PG_CHANGED_OF)


def _changed_times(rows: Sequence[tuple[object, ...]]) -> dict[str, datetime]:
    return {str(n): c for n, c in ((n, to_time(c)) for n, c in rows) if c is not None}


def poll_reads(
    token_hashes: Sequence[str], usernames: Sequence[str], now: datetime
) -> Plan[Polled]:
    live = yield Read("users", _LIVE, (list(token_hashes), now), one=False, pg_sql=_PG_LIVE)
    changed = yield _changed_of(usernames)
    return Polled(
        {str(t): e for t, e in ((t, to_time(e)) for t, e in live) if e is not None},
        _changed_times(changed),
    )


def poll(
    dbs: Databases, token_hashes: Sequence[str], usernames: Sequence[str], now: datetime
) -> Polled:
    """Which of these sessions live (with their expiry) and when these users' contacts last
    changed."""
    plan = poll_reads(token_hashes, usernames, now)
    return run_plan(plan, dbs.users_reader, dbs.contacts_reader)
