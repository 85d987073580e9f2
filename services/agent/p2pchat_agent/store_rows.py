"""How a message maps to rows of `<username>.db`: the column lists and statements the store
runs, and the conversions between rows and StoredMessage (built positionally, for speed)."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from p2pchat_agent.ids import valid_message_id
from p2pchat_agent.messages import Direction, Status, StoredMessage
from p2pchat_common.timestamps import sqlite_text
from p2pchat_common.validation import shown

T = TypeVar("T")

_CHUNK = 500  # ids per IN (...) list, well under SQLite's bound-parameter limit


NO_SEQ_LIMIT = 2**63 - 1
_COLUMN_NAMES = (
    "seq",
    "id",
    "peer",
    "direction",
    "sender",
    "recipient",
    "body",
    "sent_at",
    "received_at",
    "delivered_at",
    "status",
)
SELECT_COLUMNS = ", ".join(_COLUMN_NAMES)
# Driven by the full-text index (CROSS JOIN fixes the order in SQLite): FTS5 yields the hits newest
# first, so the search stops after limit + 1 hits in this conversation. The other way round
# (walking the conversation, matching each row) costs a full FTS5 query per row.
SEARCH = (
    f"SELECT {', '.join('messages.' + c for c in _COLUMN_NAMES)} FROM messages_fts "
    "CROSS JOIN messages ON messages.seq = messages_fts.rowid WHERE messages_fts MATCH ? "
    "AND messages_fts.rowid < ? AND messages.peer = ? ORDER BY messages_fts.rowid DESC LIMIT ?"
)
_INSERT_COLUMNS = "id, peer, direction, sender, recipient, body, sent_at, received_at, status"
INSERT = f"INSERT INTO messages ({_INSERT_COLUMNS}) VALUES "
INSERT_NEW = INSERT.replace("INSERT INTO", "INSERT OR IGNORE INTO")
_ROW_MARKS = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
# Rows per INSERT statement: one statement for a batch costs far less than one per row, and
# 100 x 9 parameters stay well under SQLite's limit.
ROWS_PER_INSERT = 100
# Queries name 'pending' literally, not as a bound parameter, so that SQLite can pick the
# partial index ix_messages_pending.


def aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is UTC:  # the usual case, and the cheapest test
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime")
    return value.astimezone(UTC)


def check_id(id: str) -> None:
    if not valid_message_id(id):
        raise ValueError(f"invalid message id: {shown(id)}")


def check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be positive: {limit}")


def chunks(items: list[T], size: int = _CHUNK) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@functools.cache
def insert_rows(count: int, insert: str) -> str:
    """`insert` for `count` rows, returning the seq and id of each row it inserts."""
    return insert + ", ".join([_ROW_MARKS] * count) + " RETURNING seq, id"


def flat_params(rows: list[StoredMessage]) -> list[object]:
    return [value for row in rows for value in _params(row)]


def duplicate(cur: sqlite3.Cursor, rows: list[StoredMessage]) -> str:
    """The first id of `rows` (the chunk whose INSERT failed) that was stored before it or is
    repeated in it."""
    seen: set[str] = set()
    for row in rows:
        if row.id in seen:
            return row.id
        seen.add(row.id)
        if cur.execute("SELECT 1 FROM messages WHERE id = ?", (row.id,)).fetchone():
            return row.id
    return "(unknown)"


def _params(m: StoredMessage) -> tuple[object, ...]:
    """The INSERT values of an outgoing message (the enums are str: sqlite3 stores their text)."""
    return (
        m.id,
        m.peer,
        m.direction,
        m.sender,
        m.recipient,
        m.body,
        sqlite_text(m.sent_at),
        None,
        m.status,
    )


_DIRECTIONS = {d.value: d for d in Direction}
_STATUSES = {s.value: s for s in Status}


def from_tuple(row: tuple[Any, ...]) -> StoredMessage:
    (
        seq,
        id,
        peer,
        direction,
        sender,
        recipient,
        body,
        sent_at,
        received_at,
        delivered_at,
        status,
    ) = row
    return StoredMessage(  # positional: several times faster than keywords for a NamedTuple
        id,
        peer,
        _DIRECTIONS[direction],
        sender,
        recipient,
        body,
        datetime.fromisoformat(sent_at + "+00:00"),
        None if received_at is None else datetime.fromisoformat(received_at + "+00:00"),
        None if delivered_at is None else datetime.fromisoformat(delivered_at + "+00:00"),
        _STATUSES[status],
        seq,
    )
