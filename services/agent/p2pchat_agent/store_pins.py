"""The pinned keys of `<username>.db` (schema v3): per (user, device), a device being named by its
key (tls.device_id); a key presented but not trusted is kept per user. One device per user
today: pinning a user's key replaces the devices pinned for them. A second device later is a
second row, pinned beside the first."""

from __future__ import annotations

import sqlite3

from p2pchat_agent.messages import PeerKey, UnknownPeerKeyError
from p2pchat_common.timestamps import sqlite_time
from p2pchat_common.tls import device_id


def get_pin(cur: sqlite3.Cursor, peer: str) -> PeerKey | None:
    """The key pinned for `peer` (the latest pinned device), with the change seen since, if any."""
    cur.execute(
        "SELECT k.device, k.sha256, k.pinned_at, x.presented_sha256, x.changed_at "
        "FROM peer_keys k LEFT JOIN key_changes x ON x.peer = k.peer WHERE k.peer = ? "
        "ORDER BY k.pinned_at DESC, k.device LIMIT 1",
        (peer,),
    )
    row = cur.fetchone()
    if row is None:
        return None
    pinned_at = sqlite_time(row[2])
    assert pinned_at is not None
    return PeerKey(row[1], pinned_at, row[3], sqlite_time(row[4]), row[0])


def pin(cur: sqlite3.Cursor, peer: str, sha256: str, when: str) -> PeerKey:
    """Trusts `sha256` as the key of `peer`'s device (its only one, today) and forgets any
    change recorded."""
    cur.execute("DELETE FROM peer_keys WHERE peer = ?", (peer,))
    cur.execute("DELETE FROM key_changes WHERE peer = ?", (peer,))
    cur.execute(
        "INSERT INTO peer_keys (peer, device, sha256, pinned_at) VALUES (?, ?, ?, ?)",
        (peer, device_id(sha256), sha256, when),
    )
    pinned = get_pin(cur, peer)
    assert pinned is not None
    return pinned


def record_key_change(cur: sqlite3.Cursor, peer: str, presented_sha256: str, when: str) -> PeerKey:
    """Notes that `peer` presented a key not pinned; the first time a given key was seen is kept.
    UnknownPeerKeyError if nothing is pinned for `peer`."""
    if get_pin(cur, peer) is None:
        raise UnknownPeerKeyError(f"no key pinned for {peer}")
    cur.execute(
        "INSERT INTO key_changes (peer, presented_sha256, changed_at) VALUES (?, ?, ?) "
        "ON CONFLICT (peer) DO UPDATE SET presented_sha256 = excluded.presented_sha256, "
        "changed_at = excluded.changed_at "
        "WHERE key_changes.presented_sha256 != excluded.presented_sha256",
        (peer, presented_sha256, when),
    )
    changed = get_pin(cur, peer)
    assert changed is not None
    return changed
