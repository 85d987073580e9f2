"""Fast pre-filling of an agent's `<username>.db` while that agent is stopped.

The schema comes from the agent itself (`MessageStore.open` runs its migrations); rows go in with
plain sqlite3 `executemany` in one transaction, in the tables of the current schema (version 3:
`conversations`, `messages`, `deliveries`), then are put in the full-text index as the agent's
background indexer would have done by then. Values use the store's formats (SQLAlchemy's SQLite
DateTime text, naive UTC), and the result is checked through the store's public reading API.

`fill_history_v2` builds the same history as a version 2 file, as an agent of that version left
it, without the store: the input of the `store_migration` benchmark.
"""

from __future__ import annotations

import gc
import hashlib
import random
import sqlite3
import string
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from p2pchat_agent import schema
from p2pchat_agent.conversations import direct_key
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.store import MessageStore
from p2pchat_common.files import private_file
from p2pchat_common.timestamps import sqlite_text

_INSERT_MESSAGE = (
    "INSERT INTO messages (seq, id, conversation, direction, sender, body, sent_at, received_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (message, recipient, device, status, delivered_at) "
    "VALUES (?, ?, '', ?, ?)"
)
# Version 2 (schema._SCHEMA_V1 + _SCHEMA_V2): the recipient and delivery state on the row.
_INSERT_V2 = (
    "INSERT INTO messages (seq, id, peer, direction, sender, recipient, body, sent_at, "
    "received_at, delivered_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_BATCH = 10_000


def _create_schema(path: Path) -> None:
    MessageStore.open(path).close()


def _conversation(cur: sqlite3.Cursor, owner: str, peer: str) -> int:
    """The id of `owner`'s direct conversation with `peer`, created if missing (as the store's
    Conversations.ensure does)."""
    cur.execute(
        "INSERT OR IGNORE INTO conversations (key, kind, peer) VALUES (?, 'direct', ?)",
        (direct_key(owner, peer), peer),
    )
    cur.execute("SELECT id FROM conversations WHERE kind = 'direct' AND peer = ?", (peer,))
    return int(cur.fetchone()[0])


def _next_seq(cur: sqlite3.Cursor) -> int:
    """The seq the next message gets (AUTOINCREMENT: above every seq ever handed out)."""
    cur.execute(
        "SELECT max((SELECT coalesce(max(seq), 0) FROM messages), coalesce("
        "(SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0))"
    )
    return int(cur.fetchone()[0]) + 1


def fill_outbox(path: Path, sender: str, recipient: str, count: int, body_len: int = 80) -> float:
    """Adds `count` pending outgoing messages from `sender` (the owner of `path`) to `recipient`,
    in order, as `add_outgoing` would (fresh time-ordered ids, the direct conversation, one
    pending delivery each). Returns the seconds taken."""
    started = time.perf_counter()
    _create_schema(path)
    now = datetime.now(UTC)
    filler = (string.ascii_lowercase + " ") * (body_len // 27 + 1)
    conn = schema.connect(path)
    try:
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        conversation = _conversation(cur, sender, recipient)
        first = _next_seq(cur)
        messages = []
        deliveries = []
        for i in range(count):
            body = f"outbox {i:06d} {filler}"[:body_len]
            at = sqlite_text(now + timedelta(microseconds=i))
            messages.append(
                (first + i, new_message_id(), conversation, "out", sender, body, at, None)
            )
            deliveries.append((first + i, recipient, "pending", None))
        cur.executemany(_INSERT_MESSAGE, messages)
        cur.executemany(_INSERT_DELIVERY, deliveries)
        cur.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    store = MessageStore.open(path)
    try:
        store.index_pending()  # long since done by the agent's indexer, for messages this old
        pending = store.count_pending()
        oldest = store.pending_for(recipient, 0, 1)
    finally:
        store.close()
    if (
        pending < count
        or not oldest
        or oldest[0].sender != sender
        or oldest[0].recipient != recipient
        or oldest[0].sent_at.tzinfo is None
    ):
        raise RuntimeError(f"outbox pre-fill check failed: {pending} pending, oldest {oldest}")
    return time.perf_counter() - started


# -- the history corpus ---------------------------------------------------------------------------


class Corpus:
    """Deterministic chat-like text: a vocabulary of made-up words drawn with a Zipf-like law."""

    def __init__(self, seed: int = 6, words: int = 5000) -> None:
        rng = random.Random(seed)
        vocab: set[str] = set()
        while len(vocab) < words:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))))
        self.vocab = sorted(vocab)  # (a set's order changes from process to process)
        rng.shuffle(self.vocab)  # rank 0 = most frequent
        weights = [1.0 / (rank + 1) ** 1.05 for rank in range(words)]
        total = 0.0
        self.cum = []
        for w in weights:
            total += w
            self.cum.append(total)
        self.rng = rng

    def body(self) -> str:
        return " ".join(
            self.rng.choices(self.vocab, cum_weights=self.cum, k=self.rng.randint(3, 14))
        )


class HistoryRow(NamedTuple):
    """One message of the generated history, whatever the schema it goes into."""

    n: int  # 0-based: its seq is the first seq + n
    id: str
    peer: str  # the other user
    outgoing: bool
    body: str
    sent_at: str
    later: str  # received_at of an incoming one, delivered_at of a delivered outgoing one
    pending: bool  # an outgoing one not delivered yet


def history_rows(
    corpus: Corpus, rng: random.Random, peers: list[str], rows: int, pending: int = 0
) -> Iterator[list[HistoryRow]]:
    """`rows` messages in batches, one a second ending now, spread evenly over `peers`, half sent
    (delivered) and half received; the last `pending` of them are sent and not delivered yet
    (the outbox, spread over the peers too)."""
    chunk: list[HistoryRow] = []
    start = int(time.time()) - rows
    for i in range(rows):
        peer = peers[i % len(peers)]
        sent = f"{_sql_second(start + i)}.{(i * 7919) % 1_000_000:06d}"
        later = f"{_sql_second(start + i + 1)}.000000"
        mid = f"H{i:012d}"  # unique and valid; these ids are never sent anywhere
        waiting = i >= rows - pending
        outgoing = rng.random() < 0.5 or waiting
        chunk.append(HistoryRow(i, mid, peer, outgoing, corpus.body(), sent, later, waiting))
        if len(chunk) == _BATCH:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _sql_second(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def _bulk_connect(path: Path) -> sqlite3.Connection:
    """A connection for a bulk load of a throwaway file: no journal until it is complete."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    return conn


def _finish_index(conn: sqlite3.Connection) -> None:
    """Builds the full-text index in one `rebuild` and marks it complete (what
    `MessageStore.index_pending` would reach, much faster)."""
    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
    conn.execute(
        "UPDATE fts_progress SET indexed_seq = (SELECT coalesce(max(seq), 0) FROM messages)"
    )


def fill_history(path: Path, me: str, peers: list[str], rows: int, seed: int = 6) -> float:
    """`rows` messages of `me` (the owner of `path`) spread evenly over `peers`, half sent
    (delivered) and half received, with chat-like bodies; returns the seconds taken.

    A bulk load: no journal while the rows go in, then the full-text index is built in one
    `rebuild` and marked complete.
    """
    started = time.perf_counter()
    _create_schema(path)
    corpus = Corpus(seed)
    rng = random.Random(seed + 1)
    conn = _bulk_connect(path)
    try:
        cur = conn.cursor()
        cur.execute("BEGIN")
        ids = {peer: _conversation(cur, me, peer) for peer in peers}
        first = _next_seq(cur)
        gc.disable()  # a million fresh tuples: the cyclic GC would only slow their making
        for chunk in history_rows(corpus, rng, peers, rows):
            cur.executemany(_INSERT_MESSAGE, [_v3_row(first, ids, me, r) for r in chunk])
            cur.executemany(
                _INSERT_DELIVERY,
                [(first + r.n, r.peer, "delivered", r.later) for r in chunk if r.outgoing],
            )
        _finish_index(conn)
        cur.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        gc.enable()
        conn.close()
    store = MessageStore.open(path)
    try:
        word = corpus.vocab[0]
        found, _ = store.history(peers[0], 1, query=word)
        if not found or word not in found[0].body.split():
            raise RuntimeError("history pre-fill check failed: the full-text index finds nothing")
        if store.count_pending():
            raise RuntimeError("history pre-fill check failed: messages pending")
    finally:
        store.close()
    return time.perf_counter() - started


def _v3_row(first: int, ids: dict[str, int], me: str, r: HistoryRow) -> tuple[object, ...]:
    seq, conversation = first + r.n, ids[r.peer]
    if r.outgoing:
        return (seq, r.id, conversation, "out", me, r.body, r.sent_at, None)
    return (seq, r.id, conversation, "in", r.peer, r.body, r.sent_at, r.later)


# -- a version 2 file, as an agent of that version left it ---------------------------------------

V2_STATEMENTS = [*schema._SCHEMA_V1, *schema._SCHEMA_V2]


def v2_schema_hash() -> str:
    """A hash of the SQL of schema versions 1 and 2 (what a cached version 2 file was made of)."""
    return hashlib.sha256("\n;\n".join(V2_STATEMENTS).encode()).hexdigest()[:12]


def fill_history_v2(
    path: Path, me: str, peers: list[str], rows: int, pending: int, seed: int = 6
) -> float:
    """A new version 2 `<me>.db` at `path` holding the history of `fill_history` (`rows`
    messages over `peers`, the last `pending` of them outgoing and still pending), its full-text
    index complete, and one pinned key per peer (a key change seen for the first one), built
    with plain sqlite3 and the shipped SQL of versions 1 and 2. Returns the seconds taken."""
    started = time.perf_counter()
    if path.exists():
        raise FileExistsError(path)
    private_file(path)  # 0600 like the agent's, before SQLite first opens it
    corpus = Corpus(seed)
    rng = random.Random(seed + 1)
    conn = _bulk_connect(path)
    try:
        cur = conn.cursor()
        cur.execute("BEGIN")
        for statement in V2_STATEMENTS:
            cur.execute(statement)
        cur.execute("PRAGMA user_version = 2")
        gc.disable()
        for chunk in history_rows(corpus, rng, peers, rows, pending):
            cur.executemany(_INSERT_V2, [_v2_row(me, r) for r in chunk])
        _finish_index(conn)
        pinned = sqlite_text(datetime.now(UTC) - timedelta(days=30))
        keys = []
        for n, peer in enumerate(peers):
            sha = hashlib.sha256(f"key of {peer}".encode()).hexdigest()
            change = hashlib.sha256(f"new key of {peer}".encode()).hexdigest() if n == 0 else None
            keys.append((peer, sha, pinned, change, pinned if change else None))
        cur.executemany(
            "INSERT INTO peer_keys (peer, sha256, pinned_at, presented_sha256, changed_at) "
            "VALUES (?, ?, ?, ?, ?)",
            keys,
        )
        cur.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")  # as the agent's connections left it
    finally:
        gc.enable()
        conn.close()
    return time.perf_counter() - started


def _v2_row(me: str, r: HistoryRow) -> tuple[object, ...]:
    seq = r.n + 1
    if not r.outgoing:
        return (seq, r.id, r.peer, "in", r.peer, me, r.body, r.sent_at, r.later, None, "received")
    if r.pending:
        return (seq, r.id, r.peer, "out", me, r.peer, r.body, r.sent_at, None, None, "pending")
    return (seq, r.id, r.peer, "out", me, r.peer, r.body, r.sent_at, None, r.later, "delivered")
