"""The schema of `<username>.db`: its columns, the SQL of each schema version, the migrations
(PRAGMA user_version), and the connection setup (WAL, BEGIN IMMEDIATE for writers)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

AUTOCHECKPOINT_PAGES = 10_000


# The columns the queries of store.py rely on, with whether each may be NULL. The tables are
# created by MIGRATIONS; a test checks the migrated schema against this. (No ORM, no SQLAlchemy:
# the agent talks to sqlite3 directly. Building ORM objects cost ten times the queries on the hot
# paths, an engine's checkout and BEGIN cost ~50 us per transaction, and the import ~10 MB.)
COLUMNS: dict[str, dict[str, bool]] = {
    "messages": {
        "seq": False,
        "id": False,
        "peer": False,
        "direction": False,
        "sender": False,
        "recipient": False,
        "body": False,
        "sent_at": False,
        "received_at": True,
        "delivered_at": True,
        "status": False,
    },
    "peer_keys": {
        "peer": False,
        "sha256": False,
        "pinned_at": False,
        "presented_sha256": True,
        "changed_at": True,
    },
    "fts_progress": {
        "id": False,
        "indexed_seq": False,
    },
}

_SCHEMA_V1 = [
    """CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id VARCHAR(64) NOT NULL UNIQUE,
        peer VARCHAR(32) NOT NULL, direction VARCHAR(3) NOT NULL CHECK (direction IN ('out', 'in')),
        sender VARCHAR(32) NOT NULL, recipient VARCHAR(32) NOT NULL, body TEXT NOT NULL,
        sent_at DATETIME NOT NULL, received_at DATETIME, delivered_at DATETIME,
        status VARCHAR(9) NOT NULL CHECK (status IN ('pending', 'delivered', 'received')))""",
    "CREATE INDEX ix_messages_peer_seq ON messages (peer, seq)",
    # Only the outbox: small, and it serves pending_for, peers_with_pending and count_pending.
    "CREATE INDEX ix_messages_pending ON messages (peer, seq) WHERE status = 'pending'",
    """CREATE VIRTUAL TABLE messages_fts USING fts5(
        body, content='messages', content_rowid='seq', tokenize='unicode61 remove_diacritics 2')""",
    """CREATE TRIGGER messages_fts_ai AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, body) VALUES (new.seq, new.body);
    END""",
    """CREATE TRIGGER messages_fts_ad AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, body) VALUES ('delete', old.seq, old.body);
    END""",
    # OF body: marking a message delivered leaves the index alone.
    """CREATE TRIGGER messages_fts_au AFTER UPDATE OF body ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, body) VALUES ('delete', old.seq, old.body);
        INSERT INTO messages_fts(rowid, body) VALUES (new.seq, new.body);
    END""",
    """CREATE TABLE peer_keys (
        peer VARCHAR(32) NOT NULL PRIMARY KEY, sha256 VARCHAR(64) NOT NULL,
        pinned_at DATETIME NOT NULL, presented_sha256 VARCHAR(64), changed_at DATETIME)""",
]


# Version 2: the full-text index is filled off the hot path. An insert trigger cost ~28 us per
# message in the committing transaction (a third of a received batch's commit); indexing the new
# rows later in batches of hundreds costs a third of that, outside the delivery path.
# `fts_progress.indexed_seq`: every message with seq <= it is in messages_fts, none above it.
# MessageStore.index_pending moves it forward; a search first catches it up, so it stays exact.
# The delete/update triggers touch the index only for rows already in it.
_SCHEMA_V2 = [
    "DROP TRIGGER messages_fts_ai",
    "DROP TRIGGER messages_fts_ad",
    "DROP TRIGGER messages_fts_au",
    """CREATE TABLE fts_progress (
        id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1), indexed_seq INTEGER NOT NULL)""",
    # Version 1 indexed every row as it went in.
    "INSERT INTO fts_progress VALUES (1, (SELECT coalesce(max(seq), 0) FROM messages))",
    """CREATE TRIGGER messages_fts_ad AFTER DELETE ON messages
    WHEN old.seq <= (SELECT indexed_seq FROM fts_progress) BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, body) VALUES ('delete', old.seq, old.body);
    END""",
    """CREATE TRIGGER messages_fts_au AFTER UPDATE OF body ON messages
    WHEN old.seq <= (SELECT indexed_seq FROM fts_progress) BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, body) VALUES ('delete', old.seq, old.body);
        INSERT INTO messages_fts(rowid, body) VALUES (new.seq, new.body);
    END""",
]


def _run(statements: list[str]) -> Callable[[sqlite3.Connection], None]:
    def migration(conn: sqlite3.Connection) -> None:
        for statement in statements:
            conn.execute(statement)

    return migration


# MIGRATIONS[i] moves the schema from version i to i + 1 (PRAGMA user_version). Never edit one
# that has shipped: append a new one (and update COLUMNS above).
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_run(_SCHEMA_V1), _run(_SCHEMA_V2)]


def connect(path: Path) -> sqlite3.Connection:
    """A connection to `<username>.db` set up for the store: WAL, no implicit transactions (the
    store says BEGIN itself), and usable from the thread that closes it."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    # Checkpoints run in the background (MessageStore.checkpoint); the automatic one, in the
    # committing thread, stays only as a far-off safety net (about 40 MB of WAL).
    conn.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES:d}")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, write: bool) -> Iterator[sqlite3.Cursor]:
    """One transaction on `conn`, committed when the block ends, rolled back if it raises.
    Writers take the write lock when they begin (BEGIN IMMEDIATE): two writers never deadlock
    on a lock upgrade, they wait for each other (busy_timeout)."""
    cursor = conn.cursor()
    try:
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield cursor
            cursor.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT (a full disk): the kept-open connection must not stay
            # inside the transaction, holding the write lock for every later one.
            if conn.in_transaction:
                cursor.execute("ROLLBACK")
            raise
    finally:
        cursor.close()


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Applies the missing migrations, one transaction each; returns the schema version."""
    while True:
        with transaction(conn, write=True) as cur:
            version: int = cur.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"{path}: schema version {version} is newer than this agent knows "
                    f"({len(MIGRATIONS)}); upgrade the agent"
                )
            if version == len(MIGRATIONS):
                return version
            log.info("migrating %s to schema version %d", path, version + 1)
            MIGRATIONS[version](conn)
            cur.execute(f"PRAGMA user_version = {version + 1:d}")
