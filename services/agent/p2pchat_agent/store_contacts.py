"""The agent's copy of contact consent in `<username>.db` (schema v5): one row per user with
a state ('accepted', 'requested', 'awaiting', 'blocked'). Functions of a cursor, run by
MessageStore.in_transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping


def states(cur: sqlite3.Cursor) -> dict[str, str]:
    cur.execute("SELECT peer, state FROM contacts")
    return dict(cur.fetchall())


def replace(cur: sqlite3.Cursor, by_peer: Mapping[str, str]) -> None:
    """Makes the copy exactly `by_peer` (what the directory answered last)."""
    cur.execute("DELETE FROM contacts")
    cur.executemany("INSERT INTO contacts (peer, state) VALUES (?, ?)", sorted(by_peer.items()))
