"""Conversations: a message belongs to one. Every conversation is a direct one between two users
today; its key is derived from the two usernames, so both users' databases name it alike.

`<username>.db` keeps each conversation once, in `conversations` (schema v3), with its members
in `conversation_members` (a direct conversation has two: the owner and the peer); rows refer
to it by a local integer id. `Conversations` finds and creates a store's direct conversations
by peer and caches their ids once the transaction that made them has committed.
"""

from __future__ import annotations

import sqlite3

DIRECT = "direct"


def direct_key(a: str, b: str) -> str:
    """The key of the direct conversation of users `a` and `b`: "direct:" and both usernames in
    code point order, joined by ":" (which no username holds). The same for (a, b) and (b, a)."""
    first, second = sorted((a, b))
    return f"{DIRECT}:{first}:{second}"


class Conversations:
    """The direct conversations of one user's store, by peer. Thread-safe: the cache holds
    only committed ids, and rows are never removed."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._ids: dict[str, int] = {}

    def find(self, cur: sqlite3.Cursor, peer: str) -> int | None:
        """The id of the direct conversation with `peer`, None if there is none yet."""
        found = self._ids.get(peer)
        if found is not None:
            return found
        cur.execute("SELECT id FROM conversations WHERE kind = 'direct' AND peer = ?", (peer,))
        row = cur.fetchone()
        if row is None:
            return None
        self._ids[peer] = int(row[0])  # committed: it was there before this transaction
        return int(row[0])

    def ensure(self, cur: sqlite3.Cursor, peer: str, fresh: dict[str, int]) -> int:
        """The id of the direct conversation with `peer`, created in this transaction if
        needed; a created one goes into `fresh`, for `remember` once the transaction commits."""
        found = fresh.get(peer)
        if found is None:
            found = self.find(cur, peer)
        if found is None:
            cur.execute(
                "INSERT INTO conversations (key, kind, peer) VALUES (?, 'direct', ?) RETURNING id",
                (direct_key(self.owner, peer), peer),
            )
            found = int(cur.fetchone()[0])
            cur.executemany(
                "INSERT INTO conversation_members (conversation, member) VALUES (?, ?)",
                [(found, member) for member in dict.fromkeys((self.owner, peer))],
            )
            fresh[peer] = found
        return found

    def remember(self, fresh: dict[str, int]) -> None:
        """Caches the conversations created by a transaction that has committed."""
        self._ids.update(fresh)
