"""The migration of `<username>.db` to schema version 3 (conversations, deliveries, per-device
pinned keys) from files of versions 1 and 2 keeps every message, its delivery state, the
full-text index, the seq high-water mark and the pinned keys.

The old files are built here without the store: plain sqlite3, the shipped SQL of versions 1
and 2 (schema._SCHEMA_V1, _SCHEMA_V2) and rows with the old columns, as an old agent left them.
They are then opened with MessageStore.open and read back through its public API (and raw SQL
where the API cannot see)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from p2pchat_agent import schema
from p2pchat_agent.conversations import direct_key
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.messages import (
    Direction,
    IncomingMessage,
    PeerKey,
    Status,
    StoredMessage,
    UnknownPeerKeyError,
)
from p2pchat_agent.store import MessageStore

OWNER = "alice"
T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
EVERYTHING = 1000  # a history limit above any test's message count


def _at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def _text(value: datetime | None) -> str | None:
    """A time as the old agents stored it: naive UTC, "YYYY-MM-DD HH:MM:SS.ffffff"."""
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass(frozen=True)
class OldRow:
    """One row of a version 1 or 2 `messages` table."""

    id: str
    peer: str
    direction: str
    sender: str
    recipient: str
    body: str
    sent_at: datetime
    received_at: datetime | None
    delivered_at: datetime | None
    status: str

    def stored(self, seq: int) -> StoredMessage:
        """What the store should read back for this row, stored at `seq`."""
        return StoredMessage(
            self.id,
            self.peer,
            Direction(self.direction),
            self.sender,
            self.recipient,
            self.body,
            self.sent_at,
            self.received_at,
            self.delivered_at,
            Status(self.status),
            seq,
        )


def _out(peer: str, body: str, minute: int, delivered_minute: int | None = None) -> OldRow:
    """An outgoing message to `peer`: pending, or delivered at `delivered_minute`."""
    delivered = None if delivered_minute is None else _at(delivered_minute)
    status = "pending" if delivered is None else "delivered"
    return OldRow(
        new_message_id(), peer, "out", OWNER, peer, body, _at(minute), None, delivered, status
    )


def _in(peer: str, body: str, minute: int) -> OldRow:
    """An incoming message from `peer`, received a second after it was sent."""
    sent = _at(minute)
    return OldRow(
        new_message_id(),
        peer,
        "in",
        peer,
        OWNER,
        body,
        sent,
        sent + timedelta(seconds=1),
        None,
        "received",
    )


@dataclass(frozen=True)
class OldKey:
    """One row of a version 1 or 2 `peer_keys` table."""

    peer: str
    sha256: str
    pinned_at: datetime
    presented_sha256: str | None = None
    changed_at: datetime | None = None


@contextmanager
def _old_db(path: Path, version: int) -> Iterator[sqlite3.Connection]:
    """A new file at `path` with the schema of `version` (1 or 2), built from the shipped SQL
    without the store; closed when the block ends."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in schema._SCHEMA_V1:
            conn.execute(statement)
        if version >= 2:
            for statement in schema._SCHEMA_V2:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {version:d}")
        yield conn
    finally:
        conn.close()


def _insert(conn: sqlite3.Connection, rows: Sequence[OldRow]) -> list[StoredMessage]:
    """Inserts `rows` with the old columns, in order; returns what the store should read back."""
    stored = []
    for row in rows:
        cur = conn.execute(
            "INSERT INTO messages (id, peer, direction, sender, recipient, body, sent_at, "
            "received_at, delivered_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.id,
                row.peer,
                row.direction,
                row.sender,
                row.recipient,
                row.body,
                _text(row.sent_at),
                _text(row.received_at),
                _text(row.delivered_at),
                row.status,
            ),
        )
        assert cur.lastrowid is not None
        stored.append(row.stored(cur.lastrowid))
    return stored


def _index_all_v2(conn: sqlite3.Connection) -> None:
    """What MessageStore.index_pending did in version 2, for every row there is: the index
    rebuilt from the messages, fts_progress moved to the last one."""
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
    conn.execute(
        "UPDATE fts_progress SET indexed_seq = (SELECT coalesce(max(seq), 0) FROM messages)"
    )


def _insert_keys(conn: sqlite3.Connection, keys: Sequence[OldKey]) -> None:
    for key in keys:
        conn.execute(
            "INSERT INTO peer_keys (peer, sha256, pinned_at, presented_sha256, changed_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                key.peer,
                key.sha256,
                _text(key.pinned_at),
                key.presented_sha256,
                _text(key.changed_at),
            ),
        )


@contextmanager
def _opened(path: Path) -> Iterator[MessageStore]:
    store = MessageStore.open(path)
    try:
        yield store
    finally:
        store.close()


def _query(path: Path, sql: str, params: Sequence[object] = ()) -> list[Any]:
    """Rows of `sql` on the file at `path`, read with a connection of its own."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _user_version(path: Path) -> int:
    (row,) = _query(path, "PRAGMA user_version")
    return int(row[0])


def _indexed_seq(path: Path) -> int:
    (row,) = _query(path, "SELECT indexed_seq FROM fts_progress")
    return int(row[0])


def _fts_integrity_check(path: Path) -> None:
    """Raises sqlite3.DatabaseError unless the full-text index is sound and holds exactly the
    bodies of `messages` (rank 1: checked against the content table too)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")
    finally:
        conn.close()


def _history(store: MessageStore, peer: str, query: str | None = None) -> list[StoredMessage]:
    messages, more = store.history(peer, limit=EVERYTHING, query=query)
    assert not more
    return messages


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / f"{OWNER}.db"


# Several peers, both directions, every status, interleaved so that each peer's seqs have gaps.
def _mixed_rows() -> list[OldRow]:
    return [
        _out("bob", "hi bob", 0, delivered_minute=1),
        _in("bob", "hi alice", 2),
        _out("carol", "hello carol", 3),
        _out("bob", "still there?", 4),
        _in("carol", "hey", 5),
        _out("dave", "dave, pending one", 6),
        _out("bob", "bob pending two", 7),
        _out("erin", "to erin, delivered", 8, delivered_minute=20),
        _in("frank", "only incoming from frank", 9),
        _out("carol", "carol delivered", 10, delivered_minute=11),
        _out("dave", "dave, pending two", 12),
        _in("bob", "later reply", 13),
    ]


def _by_peer(stored: Sequence[StoredMessage]) -> dict[str, list[StoredMessage]]:
    peers: dict[str, list[StoredMessage]] = {}
    for message in stored:
        peers.setdefault(message.peer, []).append(message)
    return peers


# -- messages and their delivery state ---------------------------------------------------------


def test_v2_messages_keep_every_field_and_their_delivery_state_after_migrating_to_v3(
    db_path: Path,
) -> None:
    with _old_db(db_path, 2) as conn:
        stored = _insert(conn, _mixed_rows())
        _index_all_v2(conn)
    pending = [m for m in stored if m.status == Status.PENDING]
    assert {m.status for m in stored} == {Status.PENDING, Status.DELIVERED, Status.RECEIVED}

    with _opened(db_path) as store:
        assert _user_version(db_path) == len(schema.MIGRATIONS)
        for peer, messages in _by_peer(stored).items():
            assert _history(store, peer) == messages
            assert store.pending_for(peer) == [m for m in pending if m.peer == peer]
        for message in stored:
            assert store.get(message.id) == message
        assert store.count_pending() == len(pending) == 5
        assert store.peers_with_pending() == ["bob", "carol", "dave"]
        assert store.pending_for("frank") == [] and store.pending_for("erin") == []
        assert store.history("nobody") == ([], False)
        # Paging back through a migrated conversation still works.
        bob = _by_peer(stored)["bob"]
        assert store.history("bob", limit=2, before_id=bob[-1].id) == (bob[-3:-1], True)

    # One delivery row per outgoing message, to its peer, from whichever device took it.
    deliveries = _query(
        db_path,
        "SELECT message, recipient, device, status, delivered_at, delivered_to FROM deliveries "
        "ORDER BY message",
    )
    assert deliveries == [
        (m.seq, m.peer, "", m.status.value, _text(m.delivered_at), None)
        for m in stored
        if m.direction == Direction.OUT
    ]


def test_a_migrated_store_takes_new_messages_in_the_migrated_conversations(db_path: Path) -> None:
    with _old_db(db_path, 2) as conn:
        stored = _insert(conn, _mixed_rows())
        _index_all_v2(conn)

    with _opened(db_path) as store:
        sent = store.add_outgoing(new_message_id(), OWNER, "bob", "after the migration", _at(30))
        (received,) = store.store_incoming(
            [IncomingMessage(new_message_id(), "frank", OWNER, "frank again", _at(31))], _at(32)
        )
        assert sent.seq > stored[-1].seq and received.seq > sent.seq
        peers = _by_peer(stored)
        assert _history(store, "bob") == [*peers["bob"], sent]
        assert _history(store, "frank") == [*peers["frank"], received]
        assert store.pending_for("bob")[-1] == sent


# -- the full-text index -----------------------------------------------------------------------


def test_v2_full_text_index_is_kept_and_unindexed_rows_are_still_found_after_migrating(
    db_path: Path,
) -> None:
    with _old_db(db_path, 2) as conn:
        indexed = _insert(
            conn,
            [
                _out("bob", "apple pie", 0, delivered_minute=1),
                _in("bob", "apple crumble", 2),
                _out("carol", "an apple for carol", 3),
                _in("bob", "nothing to see", 4),
            ],
        )
        _index_all_v2(conn)
        unindexed = _insert(
            conn,
            [
                _out("bob", "apple tart, not yet indexed", 5),
                _in("carol", "apple juice, not yet indexed", 6),
                _in("bob", "unrelated", 7),
            ],
        )
    high_water = indexed[-1].seq

    with _opened(db_path) as store:
        assert _indexed_seq(db_path) == high_water  # the migration leaves the progress alone
        # Without catching up, a search sees exactly the index as version 2 left it.
        found, _ = store.history("bob", limit=EVERYTHING, query="apple", catch_up=False)
        assert found == indexed[:2]

        assert _history(store, "bob", query="apple") == [*indexed[:2], unindexed[0]]
        assert _history(store, "carol", query="apple") == [indexed[2], unindexed[1]]
        assert _history(store, "bob", query="indexed") == [unindexed[0]]
        assert _history(store, "bob", query="crumble") == [indexed[1]]
        assert _indexed_seq(db_path) == unindexed[-1].seq
        _fts_integrity_check(db_path)


def test_v1_full_text_index_is_kept_through_v2_and_v3_and_new_messages_are_found(
    db_path: Path,
) -> None:
    with _old_db(db_path, 1) as conn:  # version 1 indexed every row by a trigger
        before = _insert(
            conn,
            [
                _out("bob", "from version one, delivered", 0, delivered_minute=1),
                _in("bob", "from version one, received", 2),
                _out("bob", "from version one, pending", 3),
                _in("carol", "carol in version one", 4),
            ],
        )

    with _opened(db_path) as store:
        assert _user_version(db_path) == len(schema.MIGRATIONS)
        assert _indexed_seq(db_path) == before[-1].seq
        found, _ = store.history("bob", limit=EVERYTHING, query="version", catch_up=False)
        assert found == before[:3]
        _fts_integrity_check(db_path)

        sent = store.add_outgoing(new_message_id(), OWNER, "bob", "from version three", _at(10))
        (received,) = store.store_incoming(
            [IncomingMessage(new_message_id(), "bob", OWNER, "version three reply", _at(11))],
            _at(12),
        )
        assert _history(store, "bob", query="version") == [*before[:3], sent, received]
        assert _history(store, "carol", query="version") == [before[3]]
        assert _history(store, "bob") == [*before[:3], sent, received]
        assert store.pending_for("bob") == [before[2], sent]
        _fts_integrity_check(db_path)


# -- pinned keys -------------------------------------------------------------------------------


def test_v2_pinned_keys_and_a_pending_key_change_survive_and_still_work(db_path: Path) -> None:
    bob = OldKey("bob", "aa" * 32, _at(0), presented_sha256="bb" * 32, changed_at=_at(5))
    carol = OldKey("carol", "cc" * 32, _at(1))
    with _old_db(db_path, 2) as conn:
        _insert_keys(conn, [bob, carol])

    with _opened(db_path) as store:
        for key in (bob, carol):
            assert store.get_pin(key.peer) == PeerKey(
                key.sha256, key.pinned_at, key.presented_sha256, key.changed_at, key.sha256[:16]
            )
        assert store.get_pin("dave") is None
        assert _query(db_path, "SELECT peer, device, sha256 FROM peer_keys ORDER BY peer") == [
            ("bob", "aa" * 8, "aa" * 32),
            ("carol", "cc" * 8, "cc" * 32),
        ]
        assert _query(db_path, "SELECT peer, presented_sha256, changed_at FROM key_changes") == [
            ("bob", "bb" * 32, _text(bob.changed_at))
        ]

        # The first time a presented key was seen is kept; another key replaces it.
        assert store.record_key_change("bob", "bb" * 32, _at(9)).changed_at == bob.changed_at
        changed = store.record_key_change("bob", "dd" * 32, _at(10))
        assert (changed.sha256, changed.presented_sha256, changed.changed_at) == (
            "aa" * 32,
            "dd" * 32,
            _at(10),
        )
        carol_changed = store.record_key_change("carol", "ee" * 32, _at(11))
        assert carol_changed == PeerKey("cc" * 32, _at(1), "ee" * 32, _at(11), "cc" * 8)

        # Accepting the change pins the new key (a new device) and forgets the change.
        assert store.pin("bob", "dd" * 32, _at(12)) == PeerKey(
            "dd" * 32, _at(12), None, None, "dd" * 8
        )
        assert store.get_pin("bob") == PeerKey("dd" * 32, _at(12), None, None, "dd" * 8)
        with pytest.raises(UnknownPeerKeyError):
            store.record_key_change("dave", "ff" * 32, _at(13))


# -- conversations -----------------------------------------------------------------------------


def test_migration_makes_one_direct_conversation_per_peer_keyed_by_both_sorted_names(
    db_path: Path,
) -> None:
    with _old_db(db_path, 2) as conn:
        stored = _insert(
            conn,
            [
                _out("bob", "to bob", 0),
                _in("aaron", "from aaron, who sorts before alice", 1),
                _in("zoe", "from zoe", 2),
                _out("aaron", "to aaron", 3),
                _in("bob", "from bob", 4),
            ],
        )
        _index_all_v2(conn)

    with _opened(db_path) as store:
        conversations = _query(db_path, "SELECT id, key, kind, peer FROM conversations ORDER BY id")
        assert [(key, kind, peer) for _, key, kind, peer in conversations] == [
            ("direct:aaron:alice", "direct", "aaron"),
            ("direct:alice:bob", "direct", "bob"),
            ("direct:alice:zoe", "direct", "zoe"),
        ]
        for _, key, _, peer in conversations:
            assert key == direct_key(OWNER, peer) == direct_key(peer, OWNER)
        ids = {peer: id for id, _, _, peer in conversations}
        assert _query(db_path, "SELECT seq, conversation FROM messages ORDER BY seq") == [
            (m.seq, ids[m.peer]) for m in stored
        ]

        # New messages go into the existing conversations; a new peer gets a new one.
        store.add_outgoing(new_message_id(), OWNER, "zoe", "to zoe", _at(10))
        store.add_outgoing(new_message_id(), OWNER, "carol", "to carol", _at(11))
        after = _query(db_path, "SELECT key, peer FROM conversations ORDER BY id")
        assert after == [(key, peer) for _, key, _, peer in conversations] + [
            ("direct:alice:carol", "carol")
        ]
        # Each is a two-member conversation: the owner and the peer, migrated or new.
        members = _query(
            db_path,
            "SELECT c.peer, group_concat(cm.member, ',') FROM conversations c JOIN "
            "(SELECT * FROM conversation_members ORDER BY member) cm ON cm.conversation = c.id "
            "GROUP BY c.id ORDER BY c.id",
        )
        assert members == [
            ("aaron", "aaron,alice"),
            ("bob", "alice,bob"),
            ("zoe", "alice,zoe"),
            ("carol", "alice,carol"),
        ]


# -- seq numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "deleted",
    ["an unindexed top row", "the top rows, an indexed one too", "every row"],
)
def test_seq_numbers_of_deleted_v2_rows_are_never_handed_out_again_after_migrating(
    db_path: Path, deleted: str
) -> None:
    with _old_db(db_path, 2) as conn:
        stored = _insert(conn, [_out("bob", f"old word{n}", n) for n in range(3)])
        _index_all_v2(conn)
        stored += _insert(conn, [_out("bob", f"old word{n}", n) for n in range(3, 5)])
        gone = {
            "an unindexed top row": stored[4:],
            "the top rows, an indexed one too": stored[2:],  # indexed_seq above max(seq)
            "every row": stored,
        }[deleted]
        for message in gone:
            conn.execute("DELETE FROM messages WHERE seq = ?", (message.seq,))
        ((high_water,),) = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
        ).fetchall()
        ((top,),) = conn.execute("SELECT coalesce(max(seq), 0) FROM messages").fetchall()
        assert high_water == stored[-1].seq > top
    kept = [m for m in stored if m not in gone]

    with _opened(db_path) as store:
        assert _query(db_path, "SELECT seq FROM sqlite_sequence WHERE name = 'messages'") == [
            (high_water,)
        ]
        sent = store.add_outgoing(new_message_id(), OWNER, "bob", "new word", _at(10))
        (received,) = store.store_incoming(
            [IncomingMessage(new_message_id(), "bob", OWNER, "new reply word", _at(11))], _at(12)
        )
        assert high_water < sent.seq < received.seq
        for message in gone:
            assert store.get(message.id) is None
        assert _history(store, "bob") == [*kept, sent, received]
        # The new rows are above fts_progress, so they get indexed and found.
        assert _history(store, "bob", query="new") == [sent, received]
        assert _history(store, "bob", query="word") == [*kept, sent, received]
        _fts_integrity_check(db_path)


# -- acknowledgements --------------------------------------------------------------------------


def test_a_message_pending_in_v2_can_be_marked_delivered_only_by_its_peer_after_migrating(
    db_path: Path,
) -> None:
    with _old_db(db_path, 2) as conn:
        old_delivered, to_bob, from_bob, to_carol = _insert(
            conn,
            [
                _out("bob", "delivered in v2", 0, delivered_minute=1),
                _out("bob", "pending in v2", 2),
                _in("bob", "received in v2", 3),
                _out("carol", "pending for carol", 4),
            ],
        )
        _index_all_v2(conn)
    acked = _at(30)

    with _opened(db_path) as store:
        # An ack from the wrong peer, of a message delivered already or of an incoming one
        # changes nothing.
        assert store.mark_delivered("carol", [to_bob.id], acked) == []
        ids = [to_carol.id, old_delivered.id, from_bob.id, "unknown"]
        assert store.mark_delivered("bob", ids, acked) == []
        assert _history(store, "bob") == [old_delivered, to_bob, from_bob]
        assert _history(store, "carol") == [to_carol]
        assert store.count_pending() == 2

        assert store.mark_delivered("bob", [to_bob.id], acked) == [to_bob.id]
        delivered = to_bob._replace(status=Status.DELIVERED, delivered_at=acked)
        assert _history(store, "bob") == [old_delivered, delivered, from_bob]
        assert store.get(to_bob.id) == delivered
        assert store.pending_for("bob") == []
        assert store.peers_with_pending() == ["carol"] and store.count_pending() == 1
        assert store.mark_delivered("bob", [to_bob.id], _at(40)) == []  # once only
        assert store.get(to_bob.id) == delivered

        device = "0123456789abcdef"
        assert store.mark_delivered("carol", [to_carol.id], acked, device=device) == [to_carol.id]
        assert _query(
            db_path, "SELECT delivered_to FROM deliveries WHERE message = ?", (to_carol.seq,)
        ) == [(device,)]


# -- a failed migration ------------------------------------------------------------------------


def _schema_and_rows(path: Path) -> tuple[list[Any], dict[str, list[Any]]]:
    """The schema of the file and every row of its ordinary tables (not the FTS5 shadow ones)."""
    master = _query(path, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name")
    tables = ["messages", "peer_keys", "fts_progress", "sqlite_sequence"]
    rows = {table: _query(path, f"SELECT * FROM {table} ORDER BY 1") for table in tables}
    return master, rows


def test_a_failed_v3_migration_leaves_the_v2_file_as_it_was(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _old_db(db_path, 2) as conn:
        stored = _insert(conn, _mixed_rows())
        _index_all_v2(conn)
        conn.execute("DELETE FROM messages WHERE seq = ?", (stored[-1].seq,))  # a seq gap
        _insert_keys(conn, [OldKey("bob", "aa" * 32, _at(0), "bb" * 32, _at(1))])
    before = _schema_and_rows(db_path)

    def v3_then_full_disk(conn: sqlite3.Connection) -> None:
        schema._run(schema._SCHEMA_V3)(conn)
        raise sqlite3.OperationalError("database or disk is full")

    failing: list[Callable[[sqlite3.Connection], None]] = [*schema.MIGRATIONS[:2]]
    failing.append(v3_then_full_disk)
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", failing)
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            MessageStore.open(db_path)

    assert _user_version(db_path) == 2
    assert _schema_and_rows(db_path) == before
    tables = {name for _, name, _, _ in before[0]}
    assert {"conversations", "deliveries", "key_changes", "messages_v2"}.isdisjoint(tables)
    assert "peer" in {row[1] for row in _query(db_path, "PRAGMA table_info(messages)")}

    # The next open, with the real migrations, migrates it whole.
    with _opened(db_path) as store:
        assert _user_version(db_path) == len(schema.MIGRATIONS)
        peers = _by_peer(stored[:-1])
        for peer, messages in peers.items():
            assert _history(store, peer) == messages
        pin = store.get_pin("bob")
        assert pin is not None and (pin.sha256, pin.presented_sha256) == ("aa" * 32, "bb" * 32)


# -- the migrated file -------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_the_migrated_file_passes_integrity_and_foreign_key_checks(
    db_path: Path, version: int
) -> None:
    with _old_db(db_path, version) as conn:
        stored = _insert(conn, _mixed_rows())
        if version == 2:
            _index_all_v2(conn)
        _insert_keys(
            conn,
            [
                OldKey("bob", "aa" * 32, _at(0), "bb" * 32, _at(1)),
                OldKey("carol", "cc" * 32, _at(2)),
            ],
        )

    with _opened(db_path) as store:
        assert _user_version(db_path) == len(schema.MIGRATIONS)
        more = store.add_outgoing(new_message_id(), OWNER, "bob", "one more", _at(50))
        assert _history(store, "bob") == [*_by_peer(stored)["bob"], more]
        assert _history(store, "bob", query="more") == [more]  # indexes it first

    assert _query(db_path, "PRAGMA integrity_check") == [("ok",)]
    assert _query(db_path, "PRAGMA foreign_key_check") == []
    tables = {name for (name,) in _query(db_path, "SELECT name FROM sqlite_master")}
    assert not {"messages_v2", "peer_keys_v2"} & tables
    for table, columns in schema.COLUMNS.items():
        info = _query(db_path, f"PRAGMA table_info({table})")
        # (name, nullable); an INTEGER PRIMARY KEY is reported nullable: it is the rowid.
        assert {row[1]: not (row[3] or row[5]) for row in info} == columns, table
    _fts_integrity_check(db_path)
