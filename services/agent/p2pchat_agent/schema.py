"""The schema of `<username>.db`: its columns, the SQL of each schema version, the migrations
(PRAGMA user_version), and the connection setup (WAL, BEGIN IMMEDIATE for writers)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)

IMMEDIATE = "p2pchat_begin_immediate"  # execution option read by the "begin" listener
AUTOCHECKPOINT_PAGES = 10_000


# The columns the queries of store.py rely on, with whether each may be NULL. The tables are
# created by MIGRATIONS; a test checks the migrated schema against this. (No ORM models: the
# agent talks to sqlite3 directly, and not importing sqlalchemy.orm saves ~6 MB per agent.)
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


def _migrate_to_v1(conn: Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.exec_driver_sql(statement)


# MIGRATIONS[i] moves the schema from version i to i + 1 (PRAGMA user_version). Never edit one
# that has shipped: append a new one (and update the models above).
MIGRATIONS: list[Callable[[Connection], None]] = [_migrate_to_v1]


def on_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling skips BEGIN before DDL; SQLAlchemy emits it (_on_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    # Checkpoints run in the background (MessageStore.checkpoint); the automatic one, in the
    # committing thread, stays only as a far-off safety net (about 40 MB of WAL).
    cursor.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES:d}")
    cursor.close()


def on_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get(IMMEDIATE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def migrate(engine: Engine) -> int:
    """Applies the missing migrations, one transaction each; returns the schema version."""
    while True:
        with engine.connect() as conn:
            conn.execution_options(**{IMMEDIATE: True})
            with conn.begin():
                version: int = conn.exec_driver_sql("PRAGMA user_version").scalar_one()
                if version > len(MIGRATIONS):
                    raise RuntimeError(
                        f"{engine.url.database}: schema version {version} is newer than this "
                        f"agent knows ({len(MIGRATIONS)}); upgrade the agent"
                    )
                if version == len(MIGRATIONS):
                    return version
                log.info("migrating %s to schema version %d", engine.url.database, version + 1)
                MIGRATIONS[version](conn)
                conn.exec_driver_sql(f"PRAGMA user_version = {version + 1:d}")
