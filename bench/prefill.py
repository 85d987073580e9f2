"""Fast pre-filling of an agent's `<username>.db` while that agent is stopped.

The schema comes from the agent itself (`MessageStore.open` runs its migrations); rows go in with
plain sqlite3 `executemany` in one transaction, then are put in the full-text index as the agent's
background indexer would have done by then. Values use the store's formats (SQLAlchemy's SQLite
DateTime text, naive UTC), and the result is checked through the store's public reading API.
"""

from __future__ import annotations

import gc
import random
import sqlite3
import string
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from p2pchat_agent.ids import new_message_id
from p2pchat_agent.store import MessageStore

_COLUMNS = (
    "id, peer, direction, sender, recipient, body, sent_at, received_at, delivered_at, status"
)
_INSERT = f"INSERT INTO messages ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def sql_time(value: datetime) -> str:
    """How SQLAlchemy's DateTime stores a (naive UTC) datetime in SQLite."""
    return value.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def _create_schema(path: Path) -> None:
    MessageStore.open(path).close()


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def fill_outbox(path: Path, sender: str, recipient: str, count: int, body_len: int = 80) -> float:
    """Adds `count` pending outgoing messages from `sender` to `recipient`, in order, as
    `add_outgoing` would (fresh time-ordered ids). Returns the seconds taken."""
    started = time.perf_counter()
    _create_schema(path)
    now = datetime.now(UTC)
    filler = (string.ascii_lowercase + " ") * (body_len // 27 + 1)
    rows = []
    for i in range(count):
        body = f"outbox {i:06d} {filler}"[:body_len]
        at = sql_time(now + timedelta(microseconds=i))
        rows.append(
            (new_message_id(), recipient, "out", sender, recipient, body, at, None, None, "pending")
        )
    conn = _connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT, rows)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    store = MessageStore.open(path)
    try:
        store.index_pending()  # long since done by the agent's indexer, for messages this old
        pending = store.count_pending()
        first = store.pending_for(recipient, 0, 1)
    finally:
        store.close()
    if pending < count or not first or first[0].sender != sender or first[0].sent_at.tzinfo is None:
        raise RuntimeError(f"outbox pre-fill check failed: {pending} pending, first {first}")
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


def fill_history(path: Path, me: str, peers: list[str], rows: int, seed: int = 6) -> float:
    """`rows` messages spread evenly over `peers`, half sent (delivered) and half received, with
    chat-like bodies; returns the seconds taken.

    A bulk load: no journal while the rows go in, then the full-text index is built in one
    `rebuild` and marked complete (what `MessageStore.index_pending` would reach, much faster).
    """
    started = time.perf_counter()
    _create_schema(path)
    corpus = Corpus(seed)
    rng = random.Random(seed + 1)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")  # a throwaway file until it is complete
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        conn.execute("BEGIN")
        gc.disable()  # a million fresh tuples: the cyclic GC would only slow their making
        for chunk in _history_rows(corpus, rng, me, peers, rows, 10_000):
            conn.executemany(_INSERT, chunk)
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
        conn.execute("UPDATE fts_progress SET indexed_seq = (SELECT max(seq) FROM messages)")
        conn.execute("COMMIT")
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
    finally:
        store.close()
    return time.perf_counter() - started


def _sql_second(epoch: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def _history_rows(
    corpus: Corpus, rng: random.Random, me: str, peers: list[str], rows: int, batch: int
) -> Iterator[list[tuple[object, ...]]]:
    chunk: list[tuple[object, ...]] = []
    start = int(time.time()) - rows  # one message a second, ending now
    for i in range(rows):
        peer = peers[i % len(peers)]
        sent = f"{_sql_second(start + i)}.{(i * 7919) % 1_000_000:06d}"
        later = f"{_sql_second(start + i + 1)}.000000"
        mid = f"H{i:012d}"  # unique and valid; these ids are never sent anywhere
        if rng.random() < 0.5:
            chunk.append(
                (mid, peer, "out", me, peer, corpus.body(), sent, None, later, "delivered")
            )
        else:
            chunk.append((mid, peer, "in", peer, me, corpus.body(), sent, later, None, "received"))
        if len(chunk) == batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
