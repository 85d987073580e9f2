"""The agent's message store on real SQLite files: outbox, idempotent receipt, history and search,
pinned keys, schema versions, file mode and concurrent use."""

from __future__ import annotations

import random
import sqlite3
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from p2pchat_agent import schema as schema_module
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.messages import (
    Direction,
    DuplicateMessageError,
    IncomingMessage,
    OutgoingMessage,
    Status,
    StoredMessage,
    UnknownMessageError,
    UnknownPeerKeyError,
)
from p2pchat_agent.schema import COLUMNS
from p2pchat_agent.store import MessageStore
from p2pchat_common.errors import AlreadyExists, NotFound

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "alice.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[MessageStore]:
    opened = MessageStore.open(db_path)
    try:
        yield opened
    finally:
        opened.close()


def _send(store: MessageStore, to: str, body: str, at: datetime = T0) -> StoredMessage:
    return store.add_outgoing(new_message_id(), "alice", to, body, at)


def _incoming(sender: str, body: str, id: str | None = None) -> IncomingMessage:
    return IncomingMessage(id or new_message_id(), sender, "alice", body, T0)


def _receive(store: MessageStore, sender: str, body: str) -> StoredMessage:
    (stored,) = store.store_incoming([_incoming(sender, body)], T0)
    return stored


def _user_version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    return version


# -- sending and receiving ---------------------------------------------------------------------


def test_add_outgoing_stores_a_pending_message_that_reads_back_equal(store: MessageStore) -> None:
    sent = store.add_outgoing("m1", "alice", "bob", "hello ✓", T0)

    assert sent.id == "m1"
    assert (sent.peer, sent.sender, sent.recipient, sent.body) == ("bob", "alice", "bob", "hello ✓")
    assert (sent.direction, sent.status) == (Direction.OUT, Status.PENDING)
    assert sent.direction == "out" and sent.status == "pending"
    assert (sent.sent_at, sent.received_at, sent.delivered_at) == (T0, None, None)
    assert store.get("m1") == sent
    assert store.get("nope") is None


def test_datetimes_in_other_zones_come_back_as_aware_utc(store: MessageStore) -> None:
    local = T0.astimezone(timezone(timedelta(hours=-5)))

    sent = store.add_outgoing("m1", "alice", "bob", "hi", local)

    assert sent.sent_at == T0 and sent.sent_at.tzinfo == UTC
    fetched = store.get("m1")
    assert fetched is not None and fetched.sent_at.tzinfo == UTC and fetched.sent_at == T0


def test_add_outgoing_with_a_used_id_raises_and_keeps_the_first(store: MessageStore) -> None:
    first = store.add_outgoing("m1", "alice", "bob", "first", T0)

    with pytest.raises(DuplicateMessageError) as caught:
        store.add_outgoing("m1", "alice", "carol", "second", T0)

    assert isinstance(caught.value, ValueError) and isinstance(caught.value, AlreadyExists)
    assert store.get("m1") == first
    assert store.count_pending() == 1


def test_a_duplicate_deep_in_a_large_batch_is_named_and_nothing_of_the_batch_is_stored(
    store: MessageStore,
) -> None:
    taken = _send(store, "bob", "already here")
    batch = [
        OutgoingMessage(taken.id if n == 130 else new_message_id(), "alice", "bob", f"b{n}", T0)
        for n in range(150)  # the duplicate is in the second INSERT of the batch
    ]

    with pytest.raises(DuplicateMessageError, match=f"message {taken.id} already exists"):
        store.add_outgoing_many(batch)

    assert store.count_pending() == 1


def test_a_repeat_within_one_batch_is_named(store: MessageStore) -> None:
    batch = [OutgoingMessage(id, "alice", "bob", "x", T0) for id in ("r1", "r2", "r1")]

    with pytest.raises(DuplicateMessageError, match="message r1 already exists"):
        store.add_outgoing_many(batch)
    assert store.count_pending() == 0


@pytest.mark.parametrize("bad_id", ["", "a b", "x" * 65, 'a"'])
def test_add_outgoing_rejects_an_invalid_id(store: MessageStore, bad_id: str) -> None:
    with pytest.raises(ValueError, match="invalid message id"):
        store.add_outgoing(bad_id, "alice", "bob", "hi", T0)


def test_naive_datetimes_are_refused(store: MessageStore) -> None:
    with pytest.raises(ValueError, match="aware"):
        store.add_outgoing("m1", "alice", "bob", "hi", datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="aware"):
        store.store_incoming([_incoming("bob", "hi")], datetime(2026, 1, 1))
    assert store.get("m1") is None


def test_store_incoming_stores_received_messages_with_the_sender_as_peer(
    store: MessageStore,
) -> None:
    later = T0 + timedelta(seconds=3)

    stored = store.store_incoming([_incoming("bob", "one", "i1"), _incoming("carol", "two")], later)

    assert [(m.peer, m.body) for m in stored] == [("bob", "one"), ("carol", "two")]
    assert all(m.direction == Direction.IN and m.status == Status.RECEIVED for m in stored)
    assert all(m.received_at == later and m.sent_at == T0 for m in stored)
    assert stored[0].seq < stored[1].seq
    assert store.get("i1") == stored[0]


def test_store_incoming_skips_ids_stored_by_an_earlier_batch(store: MessageStore) -> None:
    store.store_incoming([_incoming("bob", "one", "i1"), _incoming("bob", "two", "i2")], T0)

    again = store.store_incoming(
        [_incoming("bob", "two", "i2"), _incoming("bob", "three", "i3")], T0
    )

    assert [m.id for m in again] == ["i3"]
    assert [m.body for m in store.history("bob")[0]] == ["one", "two", "three"]


def test_store_incoming_keeps_one_row_for_an_id_repeated_in_one_batch(store: MessageStore) -> None:
    batch = [_incoming("bob", "a", "i1"), _incoming("bob", "b", "i2"), _incoming("bob", "a", "i1")]

    stored = store.store_incoming(batch, T0)

    assert [m.id for m in stored] == ["i1", "i2"]
    assert len(store.history("bob")[0]) == 2


def test_store_incoming_of_a_large_batch_is_idempotent(store: MessageStore) -> None:
    batch = [_incoming("bob", f"message {n}") for n in range(1234)]

    assert len(store.store_incoming(batch, T0)) == 1234
    assert store.store_incoming(batch, T0) == []
    assert len(store.history("bob", limit=2000)[0]) == 1234


def test_store_incoming_with_one_invalid_id_writes_nothing(store: MessageStore) -> None:
    with pytest.raises(ValueError, match="invalid message id"):
        store.store_incoming([_incoming("bob", "fine", "i1"), _incoming("bob", "bad", "b d")], T0)

    assert store.get("i1") is None


def test_store_incoming_of_an_empty_batch_returns_nothing(store: MessageStore) -> None:
    assert store.store_incoming([], T0) == []


# -- delivery ----------------------------------------------------------------------------------


def test_mark_delivered_changes_only_pending_outgoing_messages_to_that_peer(
    store: MessageStore,
) -> None:
    out1, out2 = _send(store, "bob", "one"), _send(store, "bob", "two")
    to_carol = _send(store, "carol", "not bob's to acknowledge")
    incoming = _receive(store, "bob", "in")
    at = T0 + timedelta(minutes=1)

    changed = store.mark_delivered(
        "bob", [out2.id, "unknown", incoming.id, to_carol.id, out1.id, out1.id], at
    )

    assert changed == [out1.id, out2.id]
    for message in (out1, out2):
        assert store.get(message.id) == message._replace(status=Status.DELIVERED, delivered_at=at)
    assert store.get(incoming.id) == incoming
    assert store.get(to_carol.id) == to_carol
    assert store.mark_delivered("bob", [out1.id], at + timedelta(minutes=1)) == []
    again = store.get(out1.id)
    assert again is not None and again.delivered_at == at


def test_pending_for_lists_pending_outgoing_to_that_peer_in_order(store: MessageStore) -> None:
    to_bob = [_send(store, "bob", f"b{n}") for n in range(5)]
    _send(store, "carol", "c")
    _receive(store, "bob", "from bob")
    store.mark_delivered("bob", [to_bob[1].id], T0)

    pending = store.pending_for("bob")

    assert [m.id for m in pending] == [to_bob[0].id, to_bob[2].id, to_bob[3].id, to_bob[4].id]
    assert store.pending_for("dave") == []


def test_pending_for_pages_with_after_seq(store: MessageStore) -> None:
    sent = [_send(store, "bob", f"b{n}") for n in range(7)]

    pages: list[list[StoredMessage]] = []
    after = 0
    while page := store.pending_for("bob", after_seq=after, limit=3):
        pages.append(page)
        after = page[-1].seq

    assert [len(p) for p in pages] == [3, 3, 1]
    assert [m for p in pages for m in p] == sent


def test_peers_with_pending_and_count_pending_follow_the_outbox(store: MessageStore) -> None:
    assert (store.peers_with_pending(), store.count_pending()) == ([], 0)
    to_bob = _send(store, "bob", "b")
    _send(store, "carol", "c1")
    _send(store, "carol", "c2")
    _receive(store, "dave", "not pending")

    assert (store.peers_with_pending(), store.count_pending()) == (["bob", "carol"], 3)
    store.mark_delivered("bob", [to_bob.id], T0)
    assert (store.peers_with_pending(), store.count_pending()) == (["carol"], 2)


# -- history -----------------------------------------------------------------------------------


def test_history_returns_the_newest_messages_oldest_first(store: MessageStore) -> None:
    sent = [_send(store, "bob", f"m{n}") for n in range(10)]

    assert store.history("bob", limit=4) == (sent[6:], True)
    assert store.history("bob", limit=10) == (sent, False)
    assert store.history("bob") == (sent, False)
    assert store.history("nobody") == ([], False)


def test_history_pages_back_through_120_messages_with_before_id(store: MessageStore) -> None:
    sent = [_send(store, "bob", f"m{n}") for n in range(120)]

    pages: list[list[StoredMessage]] = []
    flags: list[bool] = []
    before: str | None = None
    while True:
        page, has_more = store.history("bob", limit=50, before_id=before)
        pages.append(page)
        flags.append(has_more)
        if not has_more:
            break
        before = page[0].id

    assert [len(p) for p in pages] == [50, 50, 20]
    assert flags == [True, True, False]
    assert [m for p in reversed(pages) for m in p] == sent


def test_history_has_no_more_when_exactly_limit_messages_are_older(store: MessageStore) -> None:
    sent = [_send(store, "bob", f"m{n}") for n in range(6)]

    assert store.history("bob", limit=5, before_id=sent[5].id) == (sent[:5], False)
    assert store.history("bob", limit=5, before_id=sent[0].id) == ([], False)


def test_history_interleaves_both_directions_and_leaves_out_other_peers(
    store: MessageStore,
) -> None:
    expected = []
    for n in range(5):
        expected.append(_send(store, "bob", f"to bob {n}"))
        _send(store, "carol", f"to carol {n}")
        expected.append(_receive(store, "bob", f"from bob {n}"))
        _receive(store, "carol", f"from carol {n}")

    messages, has_more = store.history("bob")

    assert messages == expected and not has_more
    assert [m.direction for m in messages] == [Direction.OUT, Direction.IN] * 5


def test_history_before_an_unknown_id_raises_not_found(store: MessageStore) -> None:
    other = _send(store, "carol", "not with bob")

    for before in ("nope", other.id):
        with pytest.raises(UnknownMessageError, match="no message") as caught:
            store.history("bob", before_id=before)
        assert isinstance(caught.value, KeyError) and isinstance(caught.value, NotFound)
        assert str(caught.value) == f"no message {before!r} with bob"  # validation.shown


def test_history_refuses_a_limit_below_one(store: MessageStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.history("bob", limit=0)


# -- search ------------------------------------------------------------------------------------


def test_history_search_finds_all_terms_as_prefixes_in_both_directions(
    store: MessageStore,
) -> None:
    hello = _send(store, "bob", "Hello world")
    _send(store, "bob", "goodbye world")
    helping = _receive(store, "bob", "I am helping the World Café")
    _receive(store, "carol", "hello carol")

    assert store.history("bob", query="hel")[0] == [hello, helping]
    assert store.history("bob", query="WOR hel")[0] == [hello, helping]
    assert store.history("bob", query="cafe")[0] == [helping]
    assert store.history("bob", query="helping goodbye") == ([], False)


def test_history_search_pages_with_before_id_and_has_more(store: MessageStore) -> None:
    matching = []
    for n in range(30):
        message = _send(store, "bob", f"match {n}" if n % 3 == 0 else f"other {n}")
        if n % 3 == 0:
            matching.append(message)

    newest, more = store.history("bob", limit=4, query="match")
    older, more_still = store.history("bob", limit=4, before_id=newest[0].id, query="match")
    oldest, none_left = store.history("bob", limit=4, before_id=older[0].id, query="match")

    assert (newest, older, oldest) == (matching[6:], matching[2:6], matching[:2])
    assert (more, more_still, none_left) == (True, True, False)


@pytest.mark.parametrize("blank", [None, "", "   ", "\t\n"])
def test_a_blank_query_does_not_filter(store: MessageStore, blank: str | None) -> None:
    sent = [_send(store, "bob", "one"), _send(store, "bob", "two")]

    assert store.history("bob", query=blank) == (sent, False)


HOSTILE = ['"', 'hello "world', "AND", "OR", "NOT", "AND OR (", "(", ")", "*", "NEAR(", "NEAR(a b"]
HOSTILE += ["a:b", "body:x", "-x", "^x", "{body}: x", "'", "\x00", "x\x00y", "+", "a + b", "\\"]


@pytest.mark.parametrize("query", HOSTILE)
def test_history_search_never_raises_on_fts5_syntax(store: MessageStore, query: str) -> None:
    _send(store, "bob", "hello world")

    messages, _ = store.history("bob", query=query)

    assert all(m.body == "hello world" for m in messages)


def test_history_search_on_random_hostile_text_never_raises(store: MessageStore) -> None:
    _send(store, "bob", 'he said "AND" (or NEAR) the * end')
    alphabet = "aAnNdDoOrR \"()*:^-+{}'\\.,;\x00\t NEAR AND OR NOT é"
    rng = random.Random(1234)

    for _ in range(500):
        store.history("bob", query="".join(rng.choices(alphabet, k=rng.randint(1, 12))))


def test_search_finds_words_that_look_like_fts5_operators(store: MessageStore) -> None:
    message = _send(store, "bob", 'he said "AND" (or NEAR) the end')

    assert store.history("bob", query='AND "and" NEAR( or)')[0] == [message]


def _fts_integrity_check(db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
    conn.close()


def _indexed_seq(db_path: Path) -> int:
    with sqlite3.connect(db_path) as conn:
        (seq,) = conn.execute("SELECT indexed_seq FROM fts_progress").fetchone()
    conn.close()
    return int(seq)


def test_full_text_index_stays_consistent_with_the_messages(
    store: MessageStore, db_path: Path
) -> None:
    for n in range(50):
        message = _send(store, "bob", f"word{n} text")
        store.mark_delivered("bob", [message.id], T0)
        store.store_incoming([_incoming("carol", f"other{n} text")], T0)
        if n % 7 == 0:
            store.index_pending()

    _fts_integrity_check(db_path)
    store.index_pending()
    _fts_integrity_check(db_path)


def test_messages_are_indexed_off_the_commit_and_a_search_still_finds_them_at_once(
    store: MessageStore, db_path: Path
) -> None:
    sent = _send(store, "bob", "freshly committed words")
    received = _receive(store, "bob", "fresh reply")
    assert _indexed_seq(db_path) == 0  # nothing indexed by the commits themselves

    assert store.history("bob", query="fresh")[0] == [sent, received]
    assert _indexed_seq(db_path) == received.seq  # the search caught the index up first


def test_index_pending_adds_the_oldest_first_in_bounded_batches(
    store: MessageStore, db_path: Path
) -> None:
    messages = [_send(store, "bob", f"batch word{n}") for n in range(10)]

    assert [store.index_pending(4) for _ in range(4)] == [4, 4, 2, 0]
    assert _indexed_seq(db_path) == messages[-1].seq
    _fts_integrity_check(db_path)
    assert store.history("bob", query="word9")[0] == [messages[9]]


def test_deleting_or_editing_rows_keeps_the_index_consistent_indexed_or_not(
    store: MessageStore, db_path: Path
) -> None:
    old = [_send(store, "bob", f"old body{n}") for n in range(3)]
    store.index_pending()
    new = [_send(store, "bob", f"new body{n}") for n in range(3)]
    with sqlite3.connect(db_path) as conn:  # what a future feature (delete, edit) would do
        for message in (old[0], new[0]):
            conn.execute("DELETE FROM messages WHERE seq = ?", (message.seq,))
        for message in (old[1], new[1]):
            conn.execute("UPDATE messages SET body = 'edited' WHERE seq = ?", (message.seq,))
    conn.close()

    _fts_integrity_check(db_path)
    store.index_pending()
    _fts_integrity_check(db_path)
    assert [m.id for m in store.history("bob", query="edited")[0]] == [old[1].id, new[1].id]
    assert [m.id for m in store.history("bob", query="body2")[0]] == [old[2].id, new[2].id]


# -- pinned keys -------------------------------------------------------------------------------


def test_pin_and_key_change_round_trip(store: MessageStore) -> None:
    assert store.get_pin("bob") is None
    pinned = store.pin("bob", "aa" * 32, T0)
    assert (pinned.sha256, pinned.pinned_at, pinned.presented_sha256) == ("aa" * 32, T0, None)

    seen = T0 + timedelta(hours=1)
    changed = store.record_key_change("bob", "bb" * 32, seen)
    store.record_key_change("bob", "bb" * 32, seen + timedelta(hours=1))

    assert store.get_pin("bob") == changed
    assert (changed.sha256, changed.presented_sha256, changed.changed_at) == (
        "aa" * 32,
        "bb" * 32,
        seen,
    )


def test_pinning_again_replaces_the_key_and_clears_the_change(store: MessageStore) -> None:
    store.pin("bob", "aa" * 32, T0)
    store.record_key_change("bob", "bb" * 32, T0)
    later = T0 + timedelta(days=1)

    store.pin("bob", "bb" * 32, later)

    pin = store.get_pin("bob")
    assert pin is not None
    assert (pin.sha256, pin.pinned_at, pin.presented_sha256, pin.changed_at) == (
        "bb" * 32,
        later,
        None,
        None,
    )


def test_record_key_change_without_a_pin_raises_not_found(store: MessageStore) -> None:
    with pytest.raises(UnknownPeerKeyError, match="no key pinned for bob"):
        store.record_key_change("bob", "bb" * 32, T0)


# -- the file: reopening, versions, mode -------------------------------------------------------


def test_reopening_keeps_everything_at_the_latest_schema_version(db_path: Path) -> None:
    first = MessageStore.open(db_path)
    try:
        sent = _send(first, "bob", "kept")
        received = _receive(first, "bob", "also kept")
        first.pin("bob", "aa" * 32, T0)
    finally:
        first.close()

    second = MessageStore.open(db_path)
    try:
        assert second.history("bob") == ([sent, received], False)
        assert second.pending_for("bob") == [sent]
        assert second.history("bob", query="kept")[0] == [sent, received]
        pin = second.get_pin("bob")
        assert pin is not None and pin.sha256 == "aa" * 32
        assert _send(second, "bob", "next").seq > received.seq
    finally:
        second.close()
    assert _user_version(db_path) == len(schema_module.MIGRATIONS) == 5


def test_a_db_from_a_newer_agent_is_refused(db_path: Path) -> None:
    MessageStore.open(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version = 6")
    conn.close()

    with pytest.raises(RuntimeError, match="schema version 6 is newer than this agent knows"):
        MessageStore.open(db_path)


def test_missing_migrations_are_applied_on_open(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    MessageStore.open(db_path).close()

    def add_drafts(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE drafts (peer TEXT PRIMARY KEY, body TEXT)")

    monkeypatch.setattr(schema_module, "MIGRATIONS", [*schema_module.MIGRATIONS, add_drafts])
    MessageStore.open(db_path).close()

    assert _user_version(db_path) == 6
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM drafts").fetchone() == (0,)
    conn.close()


def test_a_failing_migration_leaves_the_schema_and_version_unchanged(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    MessageStore.open(db_path).close()

    def half_done(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE drafts (peer TEXT PRIMARY KEY)")
        conn.execute("ALTER TABLE messages ADD COLUMN edited_at DATETIME")
        raise RuntimeError("boom")

    monkeypatch.setattr(schema_module, "MIGRATIONS", [*schema_module.MIGRATIONS, half_done])
    with pytest.raises(RuntimeError, match="boom"):
        MessageStore.open(db_path)

    assert _user_version(db_path) == 5
    with sqlite3.connect(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        columns = {r[1] for r in conn.execute("PRAGMA table_info(messages)")}
    conn.close()
    assert "drafts" not in tables and "edited_at" not in columns


def test_the_declared_columns_match_the_migrated_schema(store: MessageStore, db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        for table, expected in COLUMNS.items():
            info = conn.execute(f"PRAGMA table_info({table})").fetchall()
            # (name, nullable); SQLite reports an INTEGER PRIMARY KEY as nullable: it is the rowid.
            columns = {r[1]: not (r[3] or r[5]) for r in info}
            assert columns == expected, table
    conn.close()


def test_the_db_file_is_created_with_its_directories_and_mode_0600(
    store: MessageStore, db_path: Path
) -> None:
    _send(store, "bob", "private")

    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600


# -- concurrency -------------------------------------------------------------------------------


def test_add_outgoing_from_8_threads_at_once_stores_800_unique_messages(
    store: MessageStore,
) -> None:
    def send_100(worker: int) -> list[StoredMessage]:
        return [_send(store, f"peer{worker}", f"{worker}/{n}") for n in range(100)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send_100, range(8)))

    ids = {m.id for batch in results for m in batch}
    seqs = {m.seq for batch in results for m in batch}
    assert len(ids) == len(seqs) == 800
    assert store.count_pending() == 800
    for worker, batch in enumerate(results):
        assert store.pending_for(f"peer{worker}") == batch


def test_concurrent_receipt_of_the_same_batches_stores_each_message_once(
    store: MessageStore,
) -> None:
    batches = [[_incoming("bob", f"{b}/{n}") for n in range(50)] for b in range(10)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda b: store.store_incoming(b, T0), batches * 4))

    assert sum(len(r) for r in results) == 500
    assert len(store.history("bob", limit=1000)[0]) == 500


def test_checkpoint_moves_committed_messages_into_the_main_file(
    store: MessageStore, db_path: Path, tmp_path: Path
) -> None:
    import shutil
    import sqlite3

    store.checkpoint()  # the schema itself
    for i in range(50):
        store.add_outgoing(new_message_id(), "alice", "bob", f"m{i}", datetime.now(UTC))
    copy = tmp_path / "main-file-only.db"
    shutil.copy(db_path, copy)  # without the -wal file: only what was checkpointed
    with sqlite3.connect(copy) as before:
        assert before.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    store.checkpoint()
    shutil.copy(db_path, copy)
    with sqlite3.connect(copy) as after:
        assert after.execute("SELECT count(*) FROM messages").fetchone()[0] == 50


# -- connections and transactions --------------------------------------------------------------


def test_a_failed_commit_leaves_the_kept_open_connection_usable(tmp_path: Path) -> None:
    conn = schema_module.connect(tmp_path / "scratch.db")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE child (parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)"
    )
    with pytest.raises(sqlite3.IntegrityError):  # the deferred check fails at COMMIT
        with schema_module.transaction(conn, write=True) as cur:
            cur.execute("INSERT INTO child VALUES (42)")

    assert not conn.in_transaction
    with schema_module.transaction(conn, write=True) as cur:
        cur.execute("INSERT INTO parent VALUES (42)")
        cur.execute("INSERT INTO child VALUES (42)")
    assert conn.execute("SELECT count(*) FROM child").fetchone() == (1,)
    conn.close()


def test_closing_waits_for_a_statement_running_in_another_thread_then_refuses_use() -> None:
    import threading

    from p2pchat_common.sqlite import ThreadConnections

    connections = ThreadConnections(
        lambda: sqlite3.connect(":memory:", check_same_thread=False), "the test db"
    )
    in_use, release = threading.Event(), threading.Event()
    results: list[object] = []

    def reader() -> None:
        with connections.use() as conn:
            in_use.set()
            release.wait(5)
            results.append(conn.execute("SELECT 1").fetchone())

    worker = threading.Thread(target=reader)
    worker.start()
    assert in_use.wait(5)
    closer = threading.Thread(target=connections.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # waiting for the reader's statement
    release.set()
    worker.join(5)
    closer.join(5)
    assert results == [(1,)] and not closer.is_alive()
    with pytest.raises(RuntimeError, match="the test db is closed"):
        with connections.use():
            pass


def test_a_closed_store_refuses_every_call(db_path: Path) -> None:
    store = MessageStore.open(db_path)
    _send(store, "bob", "before")
    store.close()

    with pytest.raises(RuntimeError, match="is closed"):
        store.pending_for("bob")


def test_a_delivery_recorded_without_its_time_reads_as_delivered(
    store: MessageStore, db_path: Path
) -> None:
    sent = _send(store, "bob", "delivered long ago")
    with sqlite3.connect(db_path) as conn:  # what a v2 row delivered with no time becomes
        conn.execute("UPDATE deliveries SET status = 'delivered', delivered_at = NULL")
    conn.close()

    (got,) = store.history("bob")[0]
    assert (got.id, got.status, got.delivered_at) == (sent.id, Status.DELIVERED, None)


def test_a_conversation_with_oneself_has_one_member(store: MessageStore, db_path: Path) -> None:
    """Not reachable today (a send to yourself is refused above the store), but the store
    must not fail on it: a second device of the same user will be such a peer."""
    sent = _send(store, "alice", "a note to self")
    assert store.history("alice")[0] == [sent]
    with sqlite3.connect(db_path) as conn:
        members = conn.execute("SELECT member FROM conversation_members").fetchall()
    conn.close()
    assert members == [("alice",)]
