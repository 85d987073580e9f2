"""The directory's databases for `directory_load`, filled directly (the directory stopped):
registered users sharing one precomputed password hash, one live session each (the bench
keeps the tokens, the database only their SHA-256), a certificate and a mailbox key each (so
that a Lookup answers what it answers for a real agent), and accepted contact pairs (two
'want' rows each). Logging 10,000 users in through Login would cost 80 ms of scrypt apiece.

The schema is made by the directory's own code (`Databases.open`); rows go in through
SQLAlchemy Core executemany, on SQLite and PostgreSQL alike."""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, func, insert, select

from bench.cluster import PASSWORD
from p2pchat_common.tls import self_signed
from p2pchat_directory.db import Databases, make_engine
from p2pchat_directory.models import (
    Contact,
    ContactsChanged,
    MailboxKey,
    User,
    UserSession,
)
from p2pchat_directory.passwords import hash_password

MIN_CONTACTS, MAX_CONTACTS = 20, 50
MAILBOX_KEY_BYTES = 1216  # ML-KEM-768 + X25519 public keys (p2pchat_agent.sealing)
SIGNATURE_BYTES = 72  # an ECDSA P-256 signature, DER
BATCH = 20_000  # rows per executemany


def username(index: int) -> str:
    """u00000, u00001, ...: zero-padded, so that the first n users are `username < u{n}`."""
    return f"u{index:05d}"


@dataclass(frozen=True)
class SimUser:
    name: str
    token: str  # its session's bearer token
    contacts: tuple[str, ...]  # its ACCEPTED contacts


def contact_graph(users: int, rng: random.Random) -> list[set[int]]:
    """Symmetric pairs: every user ends with MIN_CONTACTS to MAX_CONTACTS contacts (each aims
    at a random count in that range and takes partners with room left below their own aim)."""
    if users <= MAX_CONTACTS:
        raise ValueError(f"need more than {MAX_CONTACTS} users for the contact graph")
    target = [rng.randint(MIN_CONTACTS, MAX_CONTACTS) for _ in range(users)]
    adjacent: list[set[int]] = [set() for _ in range(users)]
    order = list(range(users))
    rng.shuffle(order)
    # First partners below their own aim, then (for the few left short) any below the max.
    for room in (target, [MAX_CONTACTS] * users):
        for i in order:
            mine = adjacent[i]
            for _ in range(20 * MAX_CONTACTS):  # bounded: partners with room are plentiful
                if len(mine) >= max(target[i], MIN_CONTACTS):
                    break
                j = rng.randrange(users)
                if j != i and j not in mine and len(adjacent[j]) < room[j]:
                    mine.add(j)
                    adjacent[j].add(i)
    return adjacent


def _batches(rows: Sequence[dict[str, Any]]) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(rows), BATCH):
        yield rows[start : start + BATCH]


def fill(users_url: str, contacts_url: str, users: int, seed: int = 15) -> list[SimUser]:
    """Creates the schema with the directory's code and inserts `users` users, their sessions,
    certificates, mailbox keys and contact pairs. Returns every user with its token."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    password_hash = hash_password(PASSWORD)  # one scrypt for everyone
    cert_pem, _key = self_signed("u00000")
    key_sha256 = hashlib.sha256(cert_pem).hexdigest()
    mailbox_key, signature = os.urandom(MAILBOX_KEY_BYTES), os.urandom(SIGNATURE_BYTES)
    graph = contact_graph(users, rng)
    tokens = [secrets.token_urlsafe(32) for _ in range(users)]
    names = [username(i) for i in range(users)]
    user_rows = [
        {
            "username": name,
            "password_hash": password_hash,
            "address": f"127.0.0.1:{20_000 + i}",
            "created_at": now - timedelta(days=30),
            "last_seen": None,
            "online_until": None,
            "certificate_pem": cert_pem,
            "public_key_sha256": key_sha256,
        }
        for i, name in enumerate(names)
    ]
    session_rows = [
        {
            "token_hash": hashlib.sha256(token.encode()).hexdigest(),
            "username": name,
            "created_at": now,
            "expires_at": now + timedelta(days=7),
        }
        for name, token in zip(names, tokens, strict=True)
    ]
    key_rows = [
        {
            "username": name,
            "mailbox_key": mailbox_key,
            "signature": signature,
            "public_key_sha256": key_sha256,
            "published_at": now,
        }
        for name in names
    ]
    accepted = now - timedelta(days=1)
    contact_rows = [
        {
            "owner": names[i],
            "contact": names[j],
            "pinned_address": "",
            "created_at": accepted,
            "state": "want",  # both rows 'want': ACCEPTED (consent.contact_state)
            "note": "",
            "requested_at": accepted,
        }
        for i in range(users)
        for j in sorted(graph[i])
    ]
    changed_rows = [{"username": name, "changed_at": accepted} for name in names]
    dbs = Databases.open(users_url, contacts_url)
    try:
        for engine, model, rows in (
            (dbs.users_engine, User, user_rows),
            (dbs.users_engine, UserSession, session_rows),
            (dbs.users_engine, MailboxKey, key_rows),
            (dbs.contacts_engine, Contact, contact_rows),
            (dbs.contacts_engine, ContactsChanged, changed_rows),
        ):
            table: Table = model.__table__  # type: ignore[assignment]
            with engine.begin() as conn:
                for batch in _batches(rows):
                    conn.execute(insert(table), batch)
    finally:
        dbs.dispose()
    return [
        SimUser(name, token, tuple(names[j] for j in sorted(graph[i])))
        for i, (name, token) in enumerate(zip(names, tokens, strict=True))
    ]


@dataclass(frozen=True)
class Presence:
    """online_until of the first `agents` users, as the directory wrote it."""

    online: int  # online_until > now
    online_until: dict[str, datetime | None]

    def missing(self, agents: int) -> int:
        return agents - self.online


def read_presence(users_url: str, agents: int) -> Presence:
    """Reads the users table directly (not through the directory)."""
    engine = make_engine(users_url)
    try:
        now = datetime.now(UTC)
        with engine.connect() as conn:
            rows = conn.execute(
                select(User.username, User.online_until).where(User.username < username(agents))
            ).all()
        until = {str(name): value for name, value in rows}
        online = sum(1 for value in until.values() if value is not None and value > now)
        return Presence(online, until)
    finally:
        engine.dispose()


def online_anywhere(users_url: str) -> int:
    """How many users of the whole table are online now."""
    engine = make_engine(users_url)
    try:
        now = datetime.now(UTC)
        with engine.connect() as conn:
            found = conn.execute(
                select(func.count()).select_from(User).where(User.online_until > now)
            ).scalar_one()
        return int(found)
    finally:
        engine.dispose()
