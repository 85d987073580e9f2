"""The user's own message store, `<username>.db`: every message sent or received, each in its
conversation (conversations.py), the delivery state of each outgoing one per recipient (the
outbox: those still pending), a full-text index over bodies, and the pinned keys of peers'
devices (store_pins.py). The tables are those of schema.py.

SQLite in WAL mode through plain sqlite3: one connection per thread, kept open. Every call blocks
and runs in its own transaction, so the store may be used from several threads at once (the async
agent calls it from one writer thread and a few reader threads). Writes take the write lock when
they begin (BEGIN IMMEDIATE): two writers never deadlock on a lock upgrade, they wait for each
other (busy_timeout).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TypeVar, TypeVarTuple

from p2pchat_agent import store_deliveries, store_pins
from p2pchat_agent.conversations import Conversations
from p2pchat_agent.messages import (
    Direction,
    DuplicateMessageError,
    IncomingMessage,
    OutgoingMessage,
    PeerKey,
    Status,
    StoredMessage,
    UnknownMessageError,
)
from p2pchat_agent.schema import connect, migrate, transaction
from p2pchat_agent.store_rows import (
    DELIVERY_MARKS,
    INSERT,
    INSERT_DELIVERIES,
    INSERT_NEW,
    MESSAGES,
    NO_SEQ_LIMIT,
    PENDING,
    PENDING_UNRELAYED,
    ROWS_PER_INSERT,
    SEARCH,
    SELECT_COLUMNS,
    aware,
    check_id,
    check_limit,
    chunks,
    duplicate,
    insert_rows,
    to_messages,
)
from p2pchat_common.errors import DiskFull
from p2pchat_common.files import private_dir, private_file
from p2pchat_common.sqlite import ThreadConnections
from p2pchat_common.timestamps import sqlite_text
from p2pchat_common.validation import shown

log = logging.getLogger(__name__)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def fts_query(text: str | None, prefix: bool = True) -> str | None:
    """User text as an FTS5 query that cannot be a syntax error: every whitespace-separated term
    becomes a quoted string (matched as a prefix with `prefix`), all terms required. None for
    no filter."""
    terms = (text or "").replace("\x00", " ").split()
    star = "*" if prefix else ""
    return " ".join('"' + term.replace('"', '""') + '"' + star for term in terms) or None


class MessageStore:
    """One user's `<username>.db`. Open with `MessageStore.open(path)`, close with `close()`."""

    def __init__(self, path: Path, owner: str) -> None:
        self._path = path
        self.owner = owner
        self._conversations = Conversations(owner)
        self._connections = ThreadConnections(lambda: connect(path), f"the message store {path}")

    @classmethod
    def open(cls, path: Path, owner: str | None = None) -> MessageStore:
        """Opens (creating if needed, mode 0600) `owner`'s database (by default the user the
        file is named after: `<username>.db`) and brings its schema up to date.

        Raises RuntimeError if the file was written by a newer version of the agent.
        """
        private_dir(path.parent)
        private_file(path)  # before SQLite opens it: its -wal and -shm files take its mode
        store = cls(path, owner or path.stem)
        try:
            with store._connections.use() as conn:
                version = migrate(conn, path)
        except BaseException:
            store.close()
            raise
        log.info("message store ready: %s (schema version %d)", path, version)
        return store

    def close(self) -> None:
        """Closes every connection (other threads' too, once their statement has ended); the
        store is unusable after."""
        self._connections.close()

    @contextmanager
    def _cursor(self, write: bool) -> Iterator[sqlite3.Cursor]:
        try:
            with self._connections.use() as conn, transaction(conn, write) as cursor:
                yield cursor
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            raise DiskFull(
                f"disk full at the agent ({self._path.parent}): nothing was stored; free some "
                "space and try again"
            ) from exc

    def in_transaction(self, write: bool, fn: Callable[[sqlite3.Cursor, *Ts], T], *args: *Ts) -> T:
        """`fn(cursor, *args)` in one transaction (the queries of store_deliveries.py)."""
        with self._cursor(write) as cur:
            return fn(cur, *args)

    # -- the full-text index (filled off the hot path; see schema._SCHEMA_V2) ----------------

    def index_pending(self, limit: int = 0) -> int:
        """Adds the messages not yet in the full-text index to it, oldest first, `limit` at most
        (0: all) in one transaction; returns how many were added (0 when it is up to date)."""
        with self._cursor(write=True) as cur:
            (indexed,) = cur.execute("SELECT indexed_seq FROM fts_progress").fetchone()
            cur.execute(
                "SELECT count(*), max(seq) FROM (SELECT seq FROM messages WHERE seq > ? "
                "ORDER BY seq LIMIT ?)",
                (indexed, limit or -1),
            )
            count, last = cur.fetchone()
            if not count:
                return 0
            cur.execute(
                "INSERT INTO messages_fts(rowid, body) SELECT seq, body FROM messages "
                "WHERE seq > ? AND seq <= ? ORDER BY seq",
                (indexed, last),
            )
            cur.execute("UPDATE fts_progress SET indexed_seq = ?", (last,))
            return int(count)

    def _unindexed(self, cur: sqlite3.Cursor) -> bool:
        cur.execute(
            "SELECT (SELECT indexed_seq FROM fts_progress) < "
            "(SELECT coalesce(max(seq), 0) FROM messages)"
        )
        return bool(cur.fetchone()[0])

    def checkpoint(self) -> None:
        """Copies the write-ahead log into the database without blocking readers or writers
        (PASSIVE), so that commits on the hot path never pay for it."""
        with self._connections.use() as conn:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    # -- messages ---------------------------------------------------------------------------

    def add_outgoing(
        self, id: str, sender: str, recipient: str, body: str, sent_at: datetime
    ) -> StoredMessage:
        """Stores a message to send as pending; committed when this returns."""
        (stored,) = self.add_outgoing_many([OutgoingMessage(id, sender, recipient, body, sent_at)])
        return stored

    def add_outgoing_many(self, messages: Sequence[OutgoingMessage]) -> list[StoredMessage]:
        """Stores messages to send as pending, in order, in one transaction (group commit):
        each in the direct conversation with its recipient, with one delivery row to them.
        A duplicate id raises DuplicateMessageError and stores none of them."""
        rows = []
        for m in messages:
            check_id(m.id)
            sent_at = aware(m.sent_at, "sent_at")
            rows.append(
                StoredMessage(
                    m.id,
                    m.recipient,
                    Direction.OUT,
                    m.sender,
                    m.recipient,
                    m.body,
                    sent_at,
                    None,
                    None,
                    Status.PENDING,
                )
            )
        if not rows:
            return []
        seqs: dict[str, int] = {}
        fresh: dict[str, int] = {}
        with self._cursor(write=True) as cur:
            for chunk in chunks(rows, ROWS_PER_INSERT):
                params: list[object] = []
                for row in chunk:
                    conversation = self._conversations.ensure(cur, row.peer, fresh)
                    params += (row.id, conversation, "out", row.sender, row.body)
                    params += (sqlite_text(row.sent_at), None)
                try:
                    cur.execute(insert_rows(len(chunk), INSERT, returning="seq, id"), params)
                except sqlite3.IntegrityError:
                    raise DuplicateMessageError(
                        f"message {duplicate(cur, chunk)} already exists"
                    ) from None
                seqs.update((id, seq) for seq, id in cur.fetchall())
                deliveries = [v for row in chunk for v in (seqs[row.id], row.recipient)]
                cur.execute(insert_rows(len(chunk), INSERT_DELIVERIES, DELIVERY_MARKS), deliveries)
        self._conversations.remember(fresh)
        return [row._replace(seq=seqs[row.id]) for row in rows]

    def store_incoming(
        self, messages: Sequence[IncomingMessage], received_at: datetime
    ) -> list[StoredMessage]:
        """Stores a batch of received messages in one transaction, each in the direct
        conversation with its sender, skipping ids already stored (also repeats within the
        batch: the first one counts). Returns the new ones, in order."""
        received_at = aware(received_at, "received_at")
        batch: dict[str, IncomingMessage] = {}
        for m in messages:
            check_id(m.id)
            batch.setdefault(m.id, m)
        if not batch:
            return []
        rows = list(batch.values())
        sent = [aware(m.sent_at, "sent_at") for m in rows]
        received = sqlite_text(received_at)
        seqs: dict[str, int] = {}
        fresh: dict[str, int] = {}
        with self._cursor(write=True) as cur:
            for start in range(0, len(rows), ROWS_PER_INSERT):
                chunk = zip(rows[start : start + ROWS_PER_INSERT], sent[start:], strict=False)
                params: list[object] = []
                for m, at in chunk:
                    conversation = self._conversations.ensure(cur, m.sender, fresh)
                    params += (m.id, conversation, "in", m.sender, m.body, sqlite_text(at))
                    params.append(received)
                cur.execute(insert_rows(len(params) // 7, INSERT_NEW, returning="seq, id"), params)
                seqs.update((id, seq) for seq, id in cur.fetchall())
        self._conversations.remember(fresh)
        in_, received_status = Direction.IN, Status.RECEIVED
        return [
            StoredMessage(
                m.id,
                m.sender,
                in_,
                m.sender,
                m.recipient,
                m.body,
                at,
                received_at,
                None,
                received_status,
                seqs[m.id],
            )
            for m, at in zip(rows, sent, strict=True)
            if m.id in seqs
        ]

    def mark_delivered(
        self, peer: str, ids: Sequence[str], delivered_at: datetime, device: str = ""
    ) -> list[str]:
        """See store_deliveries.mark_delivered (one transaction)."""
        when = sqlite_text(aware(delivered_at, "delivered_at"))
        with self._cursor(write=True) as cur:
            return store_deliveries.mark_delivered(cur, peer, ids, when, device)

    def get(self, id: str) -> StoredMessage | None:
        with self._cursor(write=False) as cur:
            cur.execute(f"SELECT {SELECT_COLUMNS} FROM {MESSAGES} WHERE m.id = ?", (id,))
            found = to_messages(cur.fetchall(), self.owner)
            return found[0] if found else None

    # -- the outbox -------------------------------------------------------------------------

    def pending_for(  # noqa: PLR0913
        self,
        peer: str,
        after_seq: int = 0,
        limit: int = 500,
        device: str = "",
        unrelayed: bool = False,
    ) -> list[StoredMessage]:
        """Outgoing messages whose delivery to `peer` (to `device`, or to whichever device of
        theirs) is pending, after `after_seq`, oldest first; with `unrelayed`, only those the
        mailbox does not hold already."""
        check_limit(limit)
        with self._cursor(write=False) as cur:
            cur.execute(
                PENDING_UNRELAYED if unrelayed else PENDING, (peer, device, after_seq, limit)
            )
            return to_messages(cur.fetchall(), self.owner)

    def peers_with_pending(self) -> list[str]:
        with self._cursor(write=False) as cur:
            cur.execute(
                "SELECT DISTINCT recipient FROM deliveries WHERE status = 'pending' "
                "ORDER BY recipient"
            )
            return [row[0] for row in cur.fetchall()]

    def count_pending(self) -> int:
        """Deliveries pending: one per outgoing message not yet acknowledged, today."""
        with self._cursor(write=False) as cur:
            cur.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'")
            return int(cur.fetchone()[0])

    # -- history ----------------------------------------------------------------------------

    def history(
        self,
        peer: str,
        limit: int = 50,
        before_id: str | None = None,
        query: str | None = None,
        catch_up: bool = True,
    ) -> tuple[list[StoredMessage], bool]:
        """The newest `limit` messages with `peer` (both directions), older than `before_id` if
        given, matching `query` if given (full text: whole words first, prefixes when that finds
        fewer than `limit`); oldest first, and whether older ones (matching) exist.
        Unknown `before_id` → UnknownMessageError. A search first indexes what is not yet in the
        full-text index: a write, which `catch_up=False` leaves to the caller (the agent does it
        in its writer thread just before, and reads in other threads)."""
        check_limit(limit)
        searching = fts_query(query) is not None
        if searching and catch_up:
            with self._cursor(write=False) as cur:
                behind = self._unindexed(cur)
            if behind:
                self.index_pending()
        with self._cursor(write=False) as cur:
            conversation = self._conversations.find(cur, peer)
            before = NO_SEQ_LIMIT
            if before_id is not None:
                cur.execute(
                    "SELECT seq FROM messages WHERE id = ? AND conversation = ?",
                    (before_id, conversation),
                )
                found = cur.fetchone()
                if found is None:
                    raise UnknownMessageError(f"no message {shown(before_id)} with {peer}")
                before = int(found[0])
            if conversation is None:
                return [], False
            if not searching:
                cur.execute(
                    f"SELECT {SELECT_COLUMNS} FROM {MESSAGES} WHERE m.conversation = ? "
                    "AND m.seq < ? ORDER BY m.seq DESC LIMIT ?",
                    (conversation, before, limit + 1),
                )
                rows = cur.fetchall()
            else:
                rows = []
                for prefix in (False, True):  # exact words are far cheaper than prefixes
                    params = (fts_query(query, prefix), before, conversation, limit + 1)
                    cur.execute(SEARCH, params)
                    rows = cur.fetchall()
                    if len(rows) > limit:
                        break
        has_more = len(rows) > limit
        rows.reverse()
        return to_messages(rows[1:] if has_more else rows, self.owner), has_more

    # -- pinned keys (store_pins.py) --------------------------------------------------------

    def get_pin(self, peer: str) -> PeerKey | None:
        with self._cursor(write=False) as cur:
            return store_pins.get_pin(cur, peer)

    def pin(self, peer: str, sha256: str, at: datetime) -> PeerKey:
        """Trusts `sha256` as the key of `peer` (first contact, or the user accepting a change)."""
        when = sqlite_text(aware(at, "at"))
        with self._cursor(write=True) as cur:
            return store_pins.pin(cur, peer, sha256, when)

    def record_key_change(self, peer: str, presented_sha256: str, at: datetime) -> PeerKey:
        """Notes that `peer` presented a key other than the pinned one. The first time a given
        key was seen is kept. Raises UnknownPeerKeyError if nothing is pinned for `peer`."""
        when = sqlite_text(aware(at, "at"))
        with self._cursor(write=True) as cur:
            return store_pins.record_key_change(cur, peer, presented_sha256, when)
