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
from p2pchat_common.validation import shown

T = TypeVar("T")

_CHUNK = 500  # ids per IN (...) list, well under SQLite's bound-parameter limit


NO_SEQ_LIMIT = 2**63 - 1

# A StoredMessage read from a message row `m` and its conversation `c`. An outgoing message's
# state is folded from its deliveries into one value: 'p' and the reason it is held back (if
# any) while a recipient's device has it neither acknowledged nor held by the mailbox; else 'r'
# while the mailbox holds it for one; else 'd' and the latest acknowledgement's time. NULL for
# an incoming message (received). One scalar subquery (a primary-key range) per outgoing row.
_STATE = (
    "CASE m.direction WHEN 'out' THEN (SELECT CASE "
    "WHEN max(d.status = 'pending' AND d.relayed_until IS NULL) "
    "THEN 'p' || coalesce(max(d.reason), '') WHEN max(d.status = 'pending') THEN 'r' "
    "ELSE 'd' || coalesce(max(d.delivered_at), '') END FROM deliveries d "
    "WHERE d.message = m.seq) END"
)
_ROW = "m.seq, m.id, c.peer, m.direction, m.sender, m.body, m.sent_at, m.received_at"
SELECT_COLUMNS = f"{_ROW}, {_STATE}"
MESSAGES = "messages m CROSS JOIN conversations c ON c.id = m.conversation"
# The outbox of one recipient's device, driven by the partial index ix_deliveries_pending
# (CROSS JOIN fixes the order in SQLite); every row it yields is pending by construction.
PENDING = (
    f"SELECT {_ROW}, 'p' FROM deliveries dl "
    "CROSS JOIN messages m ON m.seq = dl.message "
    "CROSS JOIN conversations c ON c.id = m.conversation WHERE dl.recipient = ? "
    "AND dl.status = 'pending' AND dl.device IN ('', ?) AND dl.message > ? "
    "ORDER BY dl.message LIMIT ?"
)
# The same, without what the mailbox holds already (what the mailbox transport sends).
PENDING_UNRELAYED = PENDING.replace(
    " AND dl.message > ?", " AND dl.relayed_until IS NULL AND dl.message > ?"
)
# Driven by the full-text index (CROSS JOIN fixes the order in SQLite): FTS5 yields the hits newest
# first, so the search stops after limit + 1 hits in this conversation. The other way round
# (walking the conversation, matching each row) costs a full FTS5 query per row.
SEARCH = (
    f"SELECT {SELECT_COLUMNS} FROM messages_fts "
    "CROSS JOIN messages m ON m.seq = messages_fts.rowid "
    "CROSS JOIN conversations c ON c.id = m.conversation WHERE messages_fts MATCH ? "
    "AND messages_fts.rowid < ? AND m.conversation = ? ORDER BY messages_fts.rowid DESC LIMIT ?"
)
_INSERT_COLUMNS = "id, conversation, direction, sender, body, sent_at, received_at"
INSERT = f"INSERT INTO messages ({_INSERT_COLUMNS}) VALUES "
INSERT_NEW = INSERT.replace("INSERT INTO", "INSERT OR IGNORE INTO")
MESSAGE_MARKS = "(?, ?, ?, ?, ?, ?, ?)"
# One delivery row per outgoing message today: to the recipient, whichever device takes it.
INSERT_DELIVERIES = "INSERT INTO deliveries (message, recipient, status) VALUES "
DELIVERY_MARKS = "(?, ?, 'pending')"
# Rows per INSERT statement: one statement for a batch costs far less than one per row, and
# 100 x 7 parameters stay well under SQLite's limit.
ROWS_PER_INSERT = 100
# Queries name 'pending' literally, not as a bound parameter, so that SQLite can pick the
# partial index ix_deliveries_pending.


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
def insert_rows(count: int, insert: str, marks: str = MESSAGE_MARKS, returning: str = "") -> str:
    """`insert` for `count` rows of `marks`, with its RETURNING clause if any."""
    return insert + ", ".join([marks] * count) + (f" RETURNING {returning}" if returning else "")


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


def to_messages(rows: list[tuple[Any, ...]], owner: str) -> list[StoredMessage]:
    """StoredMessages from rows of SELECT_COLUMNS (or PENDING) in `owner`'s database: the
    recipient of a direct message is the peer when it went out, the owner when it came in."""
    out = []
    in_, out_ = Direction.IN, Direction.OUT
    received, pending, delivered = Status.RECEIVED, Status.PENDING, Status.DELIVERED
    relayed = Status.RELAYED
    for seq, id, peer, direction, sender, body, sent_at, received_at, state in rows:
        delivered_at = None
        reason = ""
        if direction == "in":
            status = received
        elif state is None or state[0] == "p":
            status = pending
            reason = "" if state is None else state[1:]
        elif state == "r":
            status = relayed
        else:
            status = delivered
            if len(state) > 1:  # a delivery recorded without its time stays delivered
                delivered_at = datetime.fromisoformat(state[1:] + "+00:00")
        outgoing = direction == "out"
        out.append(  # positional: several times faster than keywords for a NamedTuple
            StoredMessage(
                id,
                peer,
                out_ if outgoing else in_,
                sender,
                peer if outgoing else owner,
                body,
                datetime.fromisoformat(sent_at + "+00:00"),
                None if received_at is None else datetime.fromisoformat(received_at + "+00:00"),
                delivered_at,
                status,
                seq,
                reason,
            )
        )
    return out
