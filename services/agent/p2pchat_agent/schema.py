"""The schema of `<username>.db`: its columns, the SQL of each schema version, the migrations
(PRAGMA user_version), and the connection setup (WAL, BEGIN IMMEDIATE for writers)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from p2pchat_common.tls import DEVICE_ID_HEX

log = logging.getLogger(__name__)

AUTOCHECKPOINT_PAGES = 10_000


# The columns the queries of store.py rely on, with whether each may be NULL. The tables are
# created by MIGRATIONS; a test checks the migrated schema against this. (No ORM, no SQLAlchemy:
# the agent talks to sqlite3 directly. Building ORM objects cost ten times the queries on the hot
# paths, an engine's checkout and BEGIN cost ~50 us per transaction, and the import ~10 MB.)
COLUMNS: dict[str, dict[str, bool]] = {
    "conversations": {
        "id": False,
        "key": False,
        "kind": False,
        "peer": True,
    },
    "conversation_members": {
        "conversation": False,
        "member": False,
    },
    "messages": {
        "seq": False,
        "id": False,
        "conversation": False,
        "direction": False,
        "sender": False,
        "body": False,
        "sent_at": False,
        "received_at": True,
    },
    "deliveries": {
        "message": False,
        "recipient": False,
        "device": False,
        "status": False,
        "delivered_at": True,
        "delivered_to": True,
        "relayed_until": True,
        "reason": True,
    },
    "peer_keys": {
        "peer": False,
        "device": False,
        "sha256": False,
        "pinned_at": False,
    },
    "key_changes": {
        "peer": False,
        "presented_sha256": False,
        "changed_at": False,
    },
    "contacts": {
        "peer": False,
        "state": False,
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


# The delete/update triggers keep the index right for rows already in it (schema v2 on; v3
# makes them again on its rebuilt messages table).
_FTS_TRIGGERS = [
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
    *_FTS_TRIGGERS,
]


# Version 3: conversations, and delivery state per (message, recipient, device).
#
# - `conversations`: a message belongs to one. A direct conversation's `key` is derived from the
#   two usernames (conversations.direct_key: "direct:" + both names in code point order, joined
#   by ":", which no username holds), the same string in both users' databases; `id` is the
#   local handle that rows refer to (an integer: four bytes a row, not a key's forty). A direct
#   conversation is a two-member one (`conversation_members`: the owner and `peer`), so that a
#   group is more members, not another model.
# - `messages` loses `peer`, `recipient`, `status` and `delivered_at`: who a message is for, and
#   whether it got there, is per recipient, in `deliveries` (one row per outgoing message and
#   recipient today; per member and device later, or held by a mailbox). An incoming message has
#   no delivery rows: it is received.
# - `deliveries.device`: the device addressed, '' for whichever device of the recipient takes it
#   (one device per user today); `delivered_to` names the device that acknowledged it.
# - `peer_keys` is per (user, device): a device is named by its key (tls.device_id), and a second
#   device of a contact is a second row. A key presented but not trusted is kept per user in
#   `key_changes`.
#
# The rows are copied into the new tables in one transaction, in seq order, keeping seq: the
# full-text index (content_rowid = seq) and fts_progress stay valid as they are. About 3 s for a
# million messages on a 2-core machine (`make bench`, store_migration), once, at the first open;
# a failure (a full disk) rolls it all back and leaves the version 2 file as it was.
_DEVICE_OF_SHA = f"substr(sha256, 1, {DEVICE_ID_HEX:d})"
_SCHEMA_V3 = [
    """CREATE TABLE conversations (
        id INTEGER PRIMARY KEY, key VARCHAR(80) NOT NULL UNIQUE,
        kind VARCHAR(8) NOT NULL CHECK (kind IN ('direct')),
        peer VARCHAR(32), CHECK (kind != 'direct' OR peer IS NOT NULL))""",
    "CREATE UNIQUE INDEX ix_conversations_direct ON conversations (peer) WHERE kind = 'direct'",
    """CREATE TABLE conversation_members (
        conversation INTEGER NOT NULL REFERENCES conversations (id), member VARCHAR(32) NOT NULL,
        PRIMARY KEY (conversation, member)) WITHOUT ROWID""",
    # Each peer's first row names both users (the index on (peer, seq) finds it).
    """INSERT INTO conversations (key, kind, peer)
        SELECT (SELECT 'direct:' || min(m.sender, m.recipient) || ':' || max(m.sender, m.recipient)
                FROM messages m WHERE m.peer = p.peer ORDER BY m.seq LIMIT 1), 'direct', p.peer
        FROM (SELECT DISTINCT peer FROM messages) p ORDER BY p.peer""",
    # The two members, from the key ("direct:" is 7 characters).
    """INSERT INTO conversation_members (conversation, member)
        SELECT id, substr(pair, 1, instr(pair, ':') - 1) FROM
            (SELECT id, substr(key, 8) AS pair FROM conversations)
        UNION SELECT id, substr(pair, instr(pair, ':') + 1) FROM
            (SELECT id, substr(key, 8) AS pair FROM conversations)""",
    "DROP TRIGGER messages_fts_ad",
    "DROP TRIGGER messages_fts_au",
    "DROP INDEX ix_messages_pending",
    "DROP INDEX ix_messages_peer_seq",
    "ALTER TABLE messages RENAME TO messages_v2",
    """CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id VARCHAR(64) NOT NULL UNIQUE,
        conversation INTEGER NOT NULL REFERENCES conversations (id),
        direction VARCHAR(3) NOT NULL CHECK (direction IN ('out', 'in')),
        sender VARCHAR(32) NOT NULL, body TEXT NOT NULL,
        sent_at DATETIME NOT NULL, received_at DATETIME)""",
    """INSERT INTO messages (seq, id, conversation, direction, sender, body, sent_at, received_at)
        SELECT m.seq, m.id, c.id, m.direction, m.sender, m.body, m.sent_at, m.received_at
        FROM messages_v2 m JOIN conversations c ON c.kind = 'direct' AND c.peer = m.peer
        ORDER BY m.seq""",
    """CREATE TABLE deliveries (
        message INTEGER NOT NULL REFERENCES messages (seq), recipient VARCHAR(32) NOT NULL,
        device VARCHAR(16) NOT NULL DEFAULT '',
        status VARCHAR(9) NOT NULL CHECK (status IN ('pending', 'delivered')),
        delivered_at DATETIME, delivered_to VARCHAR(16),
        PRIMARY KEY (message, recipient, device)) WITHOUT ROWID""",
    """INSERT INTO deliveries (message, recipient, device, status, delivered_at)
        SELECT seq, peer, '', status, delivered_at FROM messages_v2 WHERE direction = 'out'
        ORDER BY seq""",
    # AUTOINCREMENT: never hand out a seq again, even one whose row is gone.
    """UPDATE sqlite_sequence SET seq = max(seq, coalesce(
        (SELECT seq FROM sqlite_sequence WHERE name = 'messages_v2'), 0))
        WHERE name = 'messages'""",
    "DROP TABLE messages_v2",
    "CREATE INDEX ix_messages_conversation_seq ON messages (conversation, seq)",
    # The outbox: small, and it serves pending_for, peers_with_pending and count_pending.
    """CREATE INDEX ix_deliveries_pending ON deliveries (recipient, message)
        WHERE status = 'pending'""",
    """CREATE TRIGGER messages_deliveries_ad AFTER DELETE ON messages BEGIN
        DELETE FROM deliveries WHERE message = old.seq;
    END""",
    *_FTS_TRIGGERS,
    "ALTER TABLE peer_keys RENAME TO peer_keys_v2",
    """CREATE TABLE peer_keys (
        peer VARCHAR(32) NOT NULL, device VARCHAR(16) NOT NULL, sha256 VARCHAR(64) NOT NULL,
        pinned_at DATETIME NOT NULL, PRIMARY KEY (peer, device)) WITHOUT ROWID""",
    f"""INSERT INTO peer_keys (peer, device, sha256, pinned_at)
        SELECT peer, {_DEVICE_OF_SHA}, sha256, pinned_at FROM peer_keys_v2""",
    """CREATE TABLE key_changes (
        peer VARCHAR(32) NOT NULL PRIMARY KEY, presented_sha256 VARCHAR(64) NOT NULL,
        changed_at DATETIME NOT NULL)""",
    """INSERT INTO key_changes (peer, presented_sha256, changed_at)
        SELECT peer, presented_sha256, coalesce(changed_at, pinned_at) FROM peer_keys_v2
        WHERE presented_sha256 IS NOT NULL""",
    "DROP TABLE peer_keys_v2",
]


# Version 4: the sealed mailbox. A pending delivery may be held by the directory's mailbox
# (`relayed_until`: when the mailbox drops it if never collected; NULL when not relayed) and
# may carry why it is held back (`reason`: a full mailbox, an expired envelope). Still
# 'pending' in `status`: what is relayed also goes direct once a link opens (the receiver
# stores a message once whichever path brings it), and the partial index stays as it is.
_SCHEMA_V4 = [
    "ALTER TABLE deliveries ADD COLUMN relayed_until DATETIME",
    "ALTER TABLE deliveries ADD COLUMN reason TEXT",
]


# Version 5: contact consent. This agent's own copy of where consent stands with each user
# (the directory's ContactState, as a word), kept from the directory's answers: what the agent
# checks before it stores anything from anyone, also while the directory is unreachable or
# wrong. Empty after the upgrade: filled at the first login or resume.
_SCHEMA_V5 = [
    """CREATE TABLE contacts (
        peer VARCHAR(32) NOT NULL PRIMARY KEY,
        state VARCHAR(9) NOT NULL CHECK (state IN ('accepted', 'requested', 'awaiting', 'blocked'))
    ) WITHOUT ROWID""",
]


def _run(statements: list[str]) -> Callable[[sqlite3.Connection], None]:
    def migration(conn: sqlite3.Connection) -> None:
        for statement in statements:
            conn.execute(statement)

    return migration


# MIGRATIONS[i] moves the schema from version i to i + 1 (PRAGMA user_version). Never edit one
# that has shipped: append a new one (and update COLUMNS above).
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _run(_SCHEMA_V1),
    _run(_SCHEMA_V2),
    _run(_SCHEMA_V3),
    _run(_SCHEMA_V4),
    _run(_SCHEMA_V5),
]


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
