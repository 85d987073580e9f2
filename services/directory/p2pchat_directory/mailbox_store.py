"""Queries of the sealed mailbox (mailbox_keys, mailbox_envelopes), in SQLAlchemy Core: the
deposit and collect paths build no ORM objects. Each takes the Connection it works in; the
caller owns the transaction (`write_transaction` for the deposit)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, delete, func, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite

from p2pchat_directory.models import MailboxEnvelope, MailboxKey, User

CHANNEL = "p2pchat_mailbox"  # PostgreSQL NOTIFY channel; the payload is the recipient

_KEYS: Table = MailboxKey.__table__  # type: ignore[assignment]
_ENVELOPES: Table = MailboxEnvelope.__table__  # type: ignore[assignment]
_E = _ENVELOPES.c

# Built once: the hot paths only bind values.
_IDENTITY = select(User.certificate_pem, User.public_key_sha256).where(
    User.username == bindparam("username")
)
_LOCK_KEY = select(_KEYS.c.username).where(_KEYS.c.username == bindparam("username"))
_HELD = select(func.count(), func.coalesce(func.sum(_E.size), 0)).where(
    _E.recipient == bindparam("recipient"), _E.expires_at > bindparam("now")
)
_INSERT = insert(_ENVELOPES).returning(_E.id, sort_by_parameter_order=True)
_SIZES = (
    select(_E.id, _E.size)
    .where(_E.recipient == bindparam("recipient"), _E.id > bindparam("after"))
    .where(_E.expires_at > bindparam("now"))
    .order_by(_E.id)
    .limit(bindparam("limit"))
)
_ENVELOPES_UP_TO = (
    select(_E.id, _E.depositor, _E.envelope, _E.deposited_at)
    .where(_E.recipient == bindparam("recipient"), _E.id > bindparam("after"))
    .where(_E.id <= bindparam("upto"), _E.expires_at > bindparam("now"))
    .order_by(_E.id)
)
_NOTIFY = text("SELECT pg_notify(:channel, :recipient)")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction committed at the end of the block, rolled back on an exception. On SQLite it
    holds the write lock from its first statement (BEGIN IMMEDIATE), so that what it reads
    (a quota) cannot change before it writes; on PostgreSQL the caller locks rows it needs."""
    with engine.connect() as conn, conn.begin():
        if conn.dialect.name == "sqlite":
            # pysqlite would begin only at the first INSERT, after the quota was read.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn


def identity(conn: Connection, username: str) -> tuple[bytes | None, str] | None:
    """(certificate PEM, SHA-256 of its public key) of a user; None when there is no such user."""
    row = conn.execute(_IDENTITY, {"username": username}).one_or_none()
    return None if row is None else (row[0], row[1])


def upsert_key(
    conn: Connection, username: str, key: bytes, signature: bytes, key_sha256: str, now: datetime
) -> None:
    """Publishes (or replaces) `username`'s mailbox key, on SQLite and PostgreSQL alike."""
    values: dict[str, Any] = {
        "username": username,
        "mailbox_key": key,
        "signature": signature,
        "public_key_sha256": key_sha256,
        "published_at": now,
    }
    name = conn.dialect.name
    if name not in ("postgresql", "sqlite"):  # no upsert in Core: delete then insert
        conn.execute(delete(_KEYS).where(_KEYS.c.username == username))
        conn.execute(insert(_KEYS).values(values))
        return
    stmt = (postgresql.insert if name == "postgresql" else sqlite.insert)(_KEYS).values(values)
    excluded = stmt.excluded
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[_KEYS.c.username],
            set_={k: excluded[k] for k in values if k != "username"},
        )
    )


def lock_recipient(conn: Connection, recipient: str) -> bool:
    """Locks the recipient's mailbox key row until the transaction ends (PostgreSQL: FOR UPDATE;
    SQLite: the transaction already holds the write lock), so that deposits to one recipient
    are serialised: their quota checks cannot race, and ids are taken in commit order (a
    Collect reading `id > last sent` never skips one committed late). False: no key row."""
    found = conn.execute(_LOCK_KEY.with_for_update(), {"username": recipient}).first()
    return found is not None


def held(conn: Connection, recipient: str, now: datetime) -> tuple[int, int]:
    """How many unexpired envelopes the recipient holds, and their total size in bytes."""
    count, size = conn.execute(_HELD, {"recipient": recipient, "now": now}).one()
    return int(count), int(size)


def insert_envelopes(conn: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Inserts the rows in one statement (batched VALUES with RETURNING); their ids, in order."""
    return [int(i) for i in conn.execute(_INSERT, list(rows)).scalars()]


def notify(conn: Connection, recipient: str) -> None:
    """PostgreSQL: tells every replica listening on CHANNEL, when this transaction commits."""
    conn.execute(_NOTIFY, {"channel": CHANNEL, "recipient": recipient})


def sizes_after(
    conn: Connection, recipient: str, after: int, now: datetime, limit: int
) -> list[tuple[int, int]]:
    """(id, size) of the first `limit` unexpired envelopes of `recipient` after id `after`."""
    params = {"recipient": recipient, "after": after, "now": now, "limit": limit}
    return [(int(i), int(s)) for i, s in conn.execute(_SIZES, params)]


def envelopes_up_to(
    conn: Connection, recipient: str, after: int, upto: int, now: datetime
) -> list[tuple[int, str, bytes, datetime]]:
    """(id, depositor, envelope, deposited_at) of the unexpired envelopes of `recipient` with
    `after` < id <= `upto`, oldest first."""
    params = {"recipient": recipient, "after": after, "upto": upto, "now": now}
    return [(int(i), d, e, at) for i, d, e, at in conn.execute(_ENVELOPES_UP_TO, params)]


def delete_envelopes(conn: Connection, recipient: str, ids: Sequence[int]) -> int:
    """Deletes those of `ids` held for `recipient`; how many."""
    result = conn.execute(delete(_ENVELOPES).where(_E.recipient == recipient, _E.id.in_(ids)))
    return int(getattr(result, "rowcount", 0) or 0)


def delete_expired(conn: Connection, now: datetime) -> int:
    """Deletes every envelope expired by `now` (one index range on expires_at); how many."""
    result = conn.execute(delete(_ENVELOPES).where(_E.expires_at <= now))
    return int(getattr(result, "rowcount", 0) or 0)
