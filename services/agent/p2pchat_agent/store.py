"""The user's own message store, `<username>.db`: every message sent or received, the outbox
(outgoing messages still pending), a full-text index over bodies, and the pinned keys of peers.

SQLite in WAL mode through a synchronous SQLAlchemy engine. Every call blocks and opens its own
session, so the store may be used from several threads (the async agent calls it in a thread).
Writes take the write lock when they begin (BEGIN IMMEDIATE): two writers never deadlock on a
lock upgrade, they wait for each other (busy_timeout).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from sqlalchemy import (
    URL,
    Engine,
    create_engine,
    event,
    func,
    insert,
    literal_column,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from p2pchat_agent.ids import valid_message_id
from p2pchat_agent.schema import (
    IMMEDIATE,
    MessageRow,
    PeerKeyRow,
    migrate,
    on_begin,
    on_connect,
)
from p2pchat_common.errors import AlreadyExists, NotFound

log = logging.getLogger(__name__)

_CHUNK = 500  # ids per IN (...) list, well under SQLite's bound-parameter limit


class Direction(StrEnum):
    OUT = "out"
    IN = "in"


class Status(StrEnum):
    PENDING = "pending"  # outgoing, not yet acknowledged by the peer
    DELIVERED = "delivered"  # outgoing, acknowledged
    RECEIVED = "received"  # incoming


class DuplicateMessageError(AlreadyExists, ValueError):
    """A message with this id is already stored."""


class _Missing(NotFound, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownMessageError(_Missing):
    """No message with this id (in the conversation asked about)."""


class UnknownPeerKeyError(_Missing):
    """No key is pinned for this peer."""


_NO_SEQ_LIMIT = 2**63 - 1
# Driven by the full-text index (CROSS JOIN fixes the order in SQLite): FTS5 yields the hits newest
# first, so the search stops after limit + 1 hits in this conversation. The other way round
# (walking the conversation, matching each row) costs a full FTS5 query per row.
_SEARCH = text(
    "SELECT messages.* FROM messages_fts CROSS JOIN messages ON messages.seq = messages_fts.rowid"
    " WHERE messages_fts MATCH :match AND messages_fts.rowid < :before AND messages.peer = :peer"
    " ORDER BY messages_fts.rowid DESC LIMIT :limit"
)
# Literal, not a bound parameter, so that SQLite can pick the partial index ix_messages_pending.
_IS_PENDING = MessageRow.status == literal_column("'pending'")
_COLUMNS = [c.key for c in MessageRow.__table__.columns if c.key != "seq"]


@dataclass(frozen=True)
class StoredMessage:
    id: str
    peer: str  # the other party
    direction: Direction
    sender: str
    recipient: str
    body: str
    sent_at: datetime
    received_at: datetime | None
    delivered_at: datetime | None
    status: Status
    seq: int = 0  # local order of creation or arrival; 0 until stored


@dataclass(frozen=True)
class IncomingMessage:
    id: str
    sender: str
    recipient: str
    body: str
    sent_at: datetime


@dataclass(frozen=True)
class PeerKey:
    sha256: str  # the pinned key
    pinned_at: datetime
    presented_sha256: str | None  # a different key seen since, not (yet) trusted
    changed_at: datetime | None


def fts_query(text: str | None) -> str | None:
    """User text as an FTS5 query that cannot be a syntax error: every whitespace-separated term
    becomes a quoted string matched as a prefix, all terms required. None for no filter."""
    terms = (text or "").replace("\x00", " ").split()
    return " ".join('"' + term.replace('"', '""') + '"*' for term in terms) or None


class MessageStore:
    """One user's `<username>.db`. Open with `MessageStore.open(path)`, close with `close()`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, path: Path) -> MessageStore:
        """Opens (creating if needed, mode 0600) the database and brings its schema up to date.

        Raises RuntimeError if the file was written by a newer version of the agent.
        """
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)  # SQLite gives its -wal and -shm files the same mode
        url = URL.create("sqlite", database=str(path))  # no URL parsing of the path
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", on_connect)
        event.listen(engine, "begin", on_begin)
        try:
            version = migrate(engine)
        except BaseException:
            engine.dispose()
            raise
        log.info("message store ready: %s (schema version %d)", path, version)
        return cls(engine)

    def close(self) -> None:
        self._engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            s.connection(execution_options={IMMEDIATE: True})
            yield s

    # -- messages ---------------------------------------------------------------------------

    def add_outgoing(
        self, id: str, sender: str, recipient: str, body: str, sent_at: datetime
    ) -> StoredMessage:
        """Stores a message to send as pending; committed when this returns."""
        _check_id(id)
        sent_at = _aware(sent_at, "sent_at")
        fields = (recipient, Direction.OUT, sender, recipient, body, sent_at, None, None)
        message = StoredMessage(id, *fields, Status.PENDING)
        with self._write() as s:
            if s.scalar(select(MessageRow.seq).where(MessageRow.id == id)) is not None:
                raise DuplicateMessageError(f"message {id} already exists")
            (stored,) = _insert(s, [message])
        return stored

    def store_incoming(
        self, messages: Sequence[IncomingMessage], received_at: datetime
    ) -> list[StoredMessage]:
        """Stores a batch of received messages in one transaction, skipping ids already stored
        (also repeats within the batch: the first one counts). Returns the new ones, in order."""
        received_at = _aware(received_at, "received_at")
        batch: dict[str, StoredMessage] = {}
        for m in messages:
            _check_id(m.id)
            sent_at = _aware(m.sent_at, "sent_at")
            fields = (m.sender, Direction.IN, m.sender, m.recipient, m.body, sent_at, received_at)
            batch.setdefault(m.id, StoredMessage(m.id, *fields, None, Status.RECEIVED))
        if not batch:
            return []
        with self._write() as s:
            known: set[str] = set()
            for chunk in _chunks(list(batch)):
                known.update(s.scalars(select(MessageRow.id).where(MessageRow.id.in_(chunk))))
            fresh = [m for m in batch.values() if m.id not in known]
            return _insert(s, fresh) if fresh else []

    def mark_delivered(self, ids: Sequence[str], delivered_at: datetime) -> list[StoredMessage]:
        """Marks outgoing pending messages delivered, in one transaction. Returns those that
        changed, in seq order; unknown ids and messages not pending are left alone."""
        delivered_at = _aware(delivered_at, "delivered_at")
        changed: list[MessageRow] = []
        with self._write() as s:
            for chunk in _chunks(list(dict.fromkeys(ids))):
                stmt = (
                    update(MessageRow)
                    .where(MessageRow.id.in_(chunk), _IS_PENDING)
                    .where(MessageRow.direction == Direction.OUT.value)
                    .values(status=Status.DELIVERED.value, delivered_at=delivered_at)
                    .returning(MessageRow)
                    .execution_options(synchronize_session=False)
                )
                changed.extend(s.scalars(stmt))
        return sorted((_from_row(r) for r in changed), key=lambda m: m.seq)

    def get(self, id: str) -> StoredMessage | None:
        with self._read() as s:
            row = s.scalar(select(MessageRow).where(MessageRow.id == id))
            return None if row is None else _from_row(row)

    # -- the outbox -------------------------------------------------------------------------

    def pending_for(self, peer: str, after_seq: int = 0, limit: int = 500) -> list[StoredMessage]:
        """Outgoing messages to `peer` still pending, after `after_seq`, oldest first."""
        _check_limit(limit)
        stmt = (
            select(MessageRow)
            .where(MessageRow.peer == peer, _IS_PENDING, MessageRow.seq > after_seq)
            .where(MessageRow.direction == Direction.OUT.value)
            .order_by(MessageRow.seq)
            .limit(limit)
        )
        with self._read() as s:
            return [_from_row(r) for r in s.scalars(stmt)]

    def peers_with_pending(self) -> list[str]:
        stmt = select(MessageRow.peer).where(_IS_PENDING).distinct().order_by(MessageRow.peer)
        with self._read() as s:
            return list(s.scalars(stmt))

    def count_pending(self) -> int:
        with self._read() as s:
            return s.scalar(select(func.count()).where(_IS_PENDING)) or 0

    # -- history ----------------------------------------------------------------------------

    def history(
        self,
        peer: str,
        limit: int = 50,
        before_id: str | None = None,
        query: str | None = None,
    ) -> tuple[list[StoredMessage], bool]:
        """The newest `limit` messages with `peer` (both directions), older than `before_id` if
        given, matching `query` if given (full text, each term a prefix); oldest first, and
        whether older ones (matching) exist. Unknown `before_id` → UnknownMessageError."""
        _check_limit(limit)
        match = fts_query(query)
        with self._read() as s:
            before = _NO_SEQ_LIMIT
            if before_id is not None:
                mine = (MessageRow.id == before_id, MessageRow.peer == peer)
                found = s.scalar(select(MessageRow.seq).where(*mine))
                if found is None:
                    raise UnknownMessageError(f"no message {before_id} with {peer}")
                before = found
            if match is None:
                stmt = (
                    select(MessageRow)
                    .where(MessageRow.peer == peer, MessageRow.seq < before)
                    .order_by(MessageRow.seq.desc())
                    .limit(limit + 1)
                )
                rows = list(s.scalars(stmt))
            else:
                params = dict(match=match, before=before, peer=peer, limit=limit + 1)
                rows = list(s.scalars(select(MessageRow).from_statement(_SEARCH), params))
        has_more = len(rows) > limit
        return [_from_row(r) for r in reversed(rows[:limit])], has_more

    # -- pinned keys ------------------------------------------------------------------------

    def get_pin(self, peer: str) -> PeerKey | None:
        with self._read() as s:
            row = s.get(PeerKeyRow, peer)
            return None if row is None else _pin_from_row(row)

    def pin(self, peer: str, sha256: str, at: datetime) -> PeerKey:
        """Trusts `sha256` as the key of `peer` (first contact, or the user accepting a change)."""
        at = _aware(at, "at")
        with self._write() as s:
            row = s.get(PeerKeyRow, peer)
            if row is None:
                row = PeerKeyRow(peer=peer, sha256=sha256, pinned_at=at)
                s.add(row)
            row.sha256, row.pinned_at = sha256, at
            row.presented_sha256, row.changed_at = None, None
            return _pin_from_row(row)

    def record_key_change(self, peer: str, presented_sha256: str, at: datetime) -> PeerKey:
        """Notes that `peer` presented a key other than the pinned one. The first time a given
        key was seen is kept. Raises UnknownPeerKeyError if nothing is pinned for `peer`."""
        at = _aware(at, "at")
        with self._write() as s:
            row = s.get(PeerKeyRow, peer)
            if row is None:
                raise UnknownPeerKeyError(f"no key pinned for {peer}")
            if row.presented_sha256 != presented_sha256:
                row.presented_sha256, row.changed_at = presented_sha256, at
            return _pin_from_row(row)


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime")
    return value.astimezone(UTC)


def _check_id(id: str) -> None:
    if not valid_message_id(id):
        raise ValueError(f"invalid message id: {id!r}")


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be positive: {limit}")


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _insert(s: Session, messages: list[StoredMessage]) -> list[StoredMessage]:
    """Inserts the messages (seq left to SQLite); returns them with their seq."""
    rows = [{name: getattr(m, name) for name in _COLUMNS} for m in messages]
    # RETURNING the id too: asking SQLAlchemy for rows in parameter order would insert one by one.
    stmt = insert(MessageRow).returning(MessageRow.id, MessageRow.seq)
    seqs = {id: seq for id, seq in s.execute(stmt, rows)}
    return [replace(m, seq=seqs[m.id]) for m in messages]


def _from_row(row: MessageRow) -> StoredMessage:
    return StoredMessage(
        id=row.id,
        peer=row.peer,
        direction=Direction(row.direction),
        sender=row.sender,
        recipient=row.recipient,
        body=row.body,
        sent_at=row.sent_at,
        received_at=row.received_at,
        delivered_at=row.delivered_at,
        status=Status(row.status),
        seq=row.seq,
    )


def _pin_from_row(row: PeerKeyRow) -> PeerKey:
    return PeerKey(row.sha256, row.pinned_at, row.presented_sha256, row.changed_at)
