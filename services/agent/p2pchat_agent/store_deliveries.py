"""The delivery state of outgoing messages in `<username>.db` (`deliveries`, schema v3 and v4):
acknowledged (delivered), held by the directory's sealed mailbox (`relayed_until`), why a
pending one is held back (`reason`), and the counts per state that `p2pchat status` shows.
Functions of a cursor: the store runs each in one transaction (MessageStore.in_transaction)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from p2pchat_agent.store_rows import chunks


def _seqs(cur: sqlite3.Cursor, ids: Sequence[str]) -> dict[int, str]:
    by_seq: dict[int, str] = {}
    for chunk in chunks(list(dict.fromkeys(ids))):
        cur.execute(
            f"SELECT seq, id FROM messages WHERE id IN ({','.join('?' * len(chunk))})", chunk
        )
        by_seq.update(cur.fetchall())
    return by_seq


def mark_delivered(
    cur: sqlite3.Cursor, peer: str, ids: Sequence[str], when: str, device: str = ""
) -> list[str]:
    """Records that `peer`'s `device` (the one a transport reached; '' when it cannot tell)
    acknowledged the messages `ids` at `when`. Returns the ids of those whose delivery to `peer`
    was pending (relayed or not), in seq order; unknown ids, messages to anyone else and
    deliveries not pending are left alone (a peer acknowledges only what it was sent)."""
    changed: list[tuple[int, str]] = []
    for chunk in chunks(list(dict.fromkeys(ids))):
        marks = ",".join("?" * len(chunk))
        cur.execute(f"SELECT seq, id FROM messages WHERE id IN ({marks})", chunk)
        by_seq = dict(cur.fetchall())
        if not by_seq:
            continue
        cur.execute(
            "UPDATE deliveries SET status = 'delivered', delivered_at = ?, delivered_to = ?, "
            f"reason = NULL WHERE message IN ({','.join('?' * len(by_seq))}) "
            "AND recipient = ? AND device IN ('', ?) AND status = 'pending' "
            "RETURNING message",
            (when, device or None, *by_seq, peer, device),
        )
        changed.extend((seq, by_seq[seq]) for (seq,) in cur.fetchall())
    changed.sort()
    return [id for _, id in changed]


def mark_relayed(cur: sqlite3.Cursor, peer: str, ids: Sequence[str], until: str) -> list[str]:
    """The mailbox holds the messages `ids` for `peer` until `until`: their pending deliveries
    to `peer` become relayed (and lose any reason). Returns the ids changed, in seq order."""
    by_seq = _seqs(cur, ids)
    changed: list[int] = []
    for chunk in chunks(sorted(by_seq)):
        cur.execute(
            "UPDATE deliveries SET relayed_until = ?, reason = NULL "
            f"WHERE message IN ({','.join('?' * len(chunk))}) AND recipient = ? "
            "AND status = 'pending' RETURNING message",
            (until, *chunk, peer),
        )
        changed.extend(seq for (seq,) in cur.fetchall())
    return [by_seq[seq] for seq in sorted(changed)]


def hold_back(cur: sqlite3.Cursor, peer: str, ids: Sequence[str], reason: str) -> None:
    """Notes why the pending messages `ids` to `peer` did not go further (they stay pending)."""
    by_seq = _seqs(cur, ids)
    for chunk in chunks(sorted(by_seq)):
        cur.execute(
            f"UPDATE deliveries SET reason = ? WHERE message IN ({','.join('?' * len(chunk))}) "
            "AND recipient = ? AND status = 'pending' AND relayed_until IS NULL",
            (reason, *chunk, peer),
        )


def unrelay_expired(cur: sqlite3.Cursor, now: str, reason: str) -> list[str]:
    """Relayed deliveries whose envelope the mailbox has dropped by `now` (never collected)
    become pending again with `reason`; returns the peers concerned."""
    cur.execute(
        "UPDATE deliveries SET relayed_until = NULL, reason = ? "
        "WHERE status = 'pending' AND relayed_until IS NOT NULL AND relayed_until <= ? "
        "RETURNING recipient",
        (reason, now),
    )
    return sorted({peer for (peer,) in cur.fetchall()})


def next_expiry(cur: sqlite3.Cursor) -> str | None:
    """When the first envelope still relayed expires (None: nothing is relayed)."""
    cur.execute(
        "SELECT min(relayed_until) FROM deliveries "
        "WHERE status = 'pending' AND relayed_until IS NOT NULL"
    )
    found = cur.fetchone()[0]
    return None if found is None else str(found)


def counts(cur: sqlite3.Cursor) -> tuple[int, int, int]:
    """Outgoing deliveries (one per message today) pending, relayed and delivered."""
    cur.execute(
        "SELECT count(*) FILTER (WHERE relayed_until IS NULL), "
        "count(*) FILTER (WHERE relayed_until IS NOT NULL) FROM deliveries "
        "WHERE status = 'pending'"
    )
    pending, relayed = cur.fetchone()
    cur.execute("SELECT count(*) FROM deliveries WHERE status = 'delivered'")
    return int(pending), int(relayed), int(cur.fetchone()[0])
