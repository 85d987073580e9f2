"""Queries of contact consent (contacts, contact_requests_made, contact_policies,
contact_invites, contacts_changed), in SQLAlchemy Core. Each takes the Connection it works in
and the caller owns the transaction (`write_transaction`, then `lock_users`); the hot reads of
Lookup and Deposit (`pair_reads`), ListContacts (`listing_reads`) and Heartbeat (`changed_at`)
are plain SQL on either backend (hot.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import aliased

from p2pchat_directory import repository
from p2pchat_directory.db import Databases
from p2pchat_directory.hot import Plan, Read, to_time
from p2pchat_directory.mailbox_store import write_transaction as write_transaction
from p2pchat_directory.models import (
    Contact,
    ContactPolicyRow,
    ContactRequestMade,
    ContactsChanged,
    InviteRow,
)
from p2pchat_directory.repository import UserSummary

WANT, DECLINED, BLOCK = "want", "declined", "block"
_LOCK_NAMESPACE = 0x7032  # advisory locks (namespace, hashtext(username)) on PostgreSQL

_CONTACTS: Table = Contact.__table__  # type: ignore[assignment]
_C = _CONTACTS.c
_INVITES: Table = InviteRow.__table__  # type: ignore[assignment]
_I = _INVITES.c
_CHANGED: Table = ContactsChanged.__table__  # type: ignore[assignment]
_REQUESTS: Table = ContactRequestMade.__table__  # type: ignore[assignment]
_POLICIES: Table = ContactPolicyRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Side:
    """One user's row toward another."""

    state: str  # WANT, DECLINED or BLOCK
    pinned_address: str
    note: str
    requested_at: datetime | None


@dataclass(frozen=True)
class Pair:
    mine: Side | None  # the owner's row toward the other
    theirs: Side | None  # the other's row toward the owner


@dataclass(frozen=True)
class Invite:
    id: str
    created_at: datetime
    expires_at: datetime | None
    uses_left: int | None
    revoked_at: datetime | None


# Built once: the hot reads only bind values.
_PAIR = select(_C.owner, _C.state, _C.pinned_address, _C.note, _C.requested_at).where(
    or_(
        and_(_C.owner == bindparam("a"), _C.contact == bindparam("b")),
        and_(_C.owner == bindparam("b"), _C.contact == bindparam("a")),
    )
)
_PLAIN_PAIR = (
    "SELECT owner, state, pinned_address, note, requested_at FROM contacts "
    "WHERE (owner = ? AND contact = ?) OR (owner = ? AND contact = ?)"
)
_PLAIN_CHANGED_AT = "SELECT changed_at FROM contacts_changed WHERE username = ?"


def _pair_of(owner: str, rows: Iterable[Sequence[object]]) -> Pair:
    mine = theirs = None
    for row_owner, state, pinned, note, requested_at in rows:
        side = Side(str(state), str(pinned), str(note), requested_at)  # type: ignore[arg-type]
        if row_owner == owner:
            mine = side
        else:
            theirs = side
    return Pair(mine, theirs)


# Lookup and Deposit in one statement when the users and contacts tables are in one database:
# the caller's session, the looked-up user's summary and both contact rows of the pair (none,
# one or two rows joined; no row: no live session).
_OWNER_USER_AND_PAIR = (
    f"SELECT {repository.OWNER_AND_USER_COLUMNS}, "
    "c.owner, c.state, c.pinned_address, c.note, c.requested_at "
    f"{repository.OWNER_AND_USER_JOINS}"
    "LEFT JOIN contacts AS c ON (c.owner = s.username AND c.contact = ?) "
    "OR (c.owner = ? AND c.contact = s.username) "
    f"{repository.LIVE_SESSION}"
)


def owner_user_and_pair_reads(
    token_hash: str, now: datetime, name: str
) -> Plan[tuple[str | None, UserSummary | None, Pair]]:
    """What `owner_and_user_reads` then `pair_reads` find, in one read (one database only)."""
    rows = yield Read("users", _OWNER_USER_AND_PAIR, (name, name, name, token_hash, now), one=False)
    if not rows:
        return None, None, Pair(None, None)
    owner, user = repository.owner_and_user(rows[0])
    sides = ((o, s, p, n, to_time(r)) for *_, o, s, p, n, r in rows if o is not None)
    return owner, user, _pair_of(owner, sides)


def pair_reads(owner: str, other: str) -> Plan[Pair]:
    """Both rows of (owner, other) in one short read outside any transaction (Lookup, Deposit)."""
    rows = yield Read("contacts", _PLAIN_PAIR, (owner, other, other, owner), one=False)
    return _pair_of(owner, ((o, s, p, n, to_time(r)) for o, s, p, n, r in rows))


def pair(conn: Connection, owner: str, other: str) -> Pair:
    return _pair_of(owner, conn.execute(_PAIR, {"a": owner, "b": other}).all())


def changed_at(dbs: Databases, username: str) -> datetime | None:
    """When `username`'s contacts last changed (None: never)."""
    row = dbs.contacts_reader.read(Read("contacts", _PLAIN_CHANGED_AT, (username,)))
    return to_time(row[0][0]) if row else None


_LOCK_USERS = text(
    "SELECT pg_advisory_xact_lock(:ns, k) FROM (SELECT DISTINCT hashtext(n) AS k "
    "FROM unnest(CAST(:names AS text[])) AS n ORDER BY k) AS keys"
)


def lock_users(conn: Connection, *usernames: str) -> None:
    """Serialises the consent writes that touch these users (their requests sent and received,
    their rows, policy and codes) across replicas. On SQLite the write transaction already
    holds the database's write lock; on PostgreSQL, advisory locks taken in the order of their
    keys (not of the names: two names may hash alike, and then name order is no lock order)."""
    if conn.dialect.name != "postgresql":
        return
    conn.execute(_LOCK_USERS, {"ns": _LOCK_NAMESPACE, "names": sorted(set(usernames))})


# -- rows of the contacts table ----------------------------------------------------------------


def insert_side(conn: Connection, owner: str, other: str, side: Side, created_at: datetime) -> None:
    conn.execute(
        insert(_CONTACTS).values(
            owner=owner,
            contact=other,
            pinned_address=side.pinned_address,
            created_at=created_at,
            state=side.state,
            note=side.note,
            requested_at=side.requested_at,
        )
    )


def set_state(conn: Connection, owner: str, other: str, state: str, note: str = "") -> None:
    conn.execute(
        update(_CONTACTS)
        .where(_C.owner == owner, _C.contact == other)
        .values(state=state, note=note)
    )


def delete_side(conn: Connection, owner: str, other: str) -> None:
    conn.execute(delete(_CONTACTS).where(_C.owner == owner, _C.contact == other))


def _awaiting(recipient: str) -> ColumnElement[bool]:
    """The conditions of a row that awaits `recipient`'s answer: a 'want' toward them that
    they have no row toward."""
    back = aliased(_CONTACTS)
    answered = exists().where(back.c.owner == recipient, back.c.contact == _C.owner)
    return and_(_C.contact == recipient, _C.state == WANT, ~answered)


def awaiting_count(conn: Connection, recipient: str) -> int:
    return int(conn.execute(select(func.count()).where(_awaiting(recipient))).scalar_one())


def awaiting(conn: Connection, recipient: str) -> list[tuple[str, Side]]:
    """(requester, their row) of the requests awaiting `recipient`, oldest first."""
    rows = conn.execute(
        select(_C.owner, _C.state, _C.pinned_address, _C.note, _C.requested_at)
        .where(_awaiting(recipient))
        .order_by(_C.requested_at, _C.owner)
    )
    return [(o, Side(s, p, n, r)) for o, s, p, n, r in rows]


# ListContacts in one statement: the owner's rows with the other side's state, then the
# requests awaiting the owner (a 'want' toward them they have no row toward).
_PLAIN_LISTING = (
    "SELECT 0, c.contact, c.state, c.pinned_address, c.note, c.requested_at, b.state "
    "FROM contacts AS c LEFT JOIN contacts AS b ON b.owner = c.contact AND b.contact = c.owner "
    "WHERE c.owner = ? "
    "UNION ALL "
    "SELECT 1, c.owner, c.state, c.pinned_address, c.note, c.requested_at, NULL "
    "FROM contacts AS c WHERE c.contact = ? AND c.state = 'want' AND NOT EXISTS "
    "(SELECT 1 FROM contacts AS b WHERE b.owner = ? AND b.contact = c.owner)"
)


def listing_reads(
    owner: str,
) -> Plan[tuple[list[tuple[str, Side, str | None]], list[tuple[str, Side]]]]:
    """(contact, the owner's row, the contact's state toward the owner or None) of every row
    the owner has, and `awaiting(owner)` (in no particular order), in one short read."""
    mine: list[tuple[str, Side, str | None]] = []
    waiting: list[tuple[str, Side]] = []
    rows = yield Read("contacts", _PLAIN_LISTING, (owner,) * 3, one=False)
    for kind, name, state, pinned, note, at, back in rows:
        side = Side(state, pinned, note, to_time(at))
        if kind == 0:
            mine.append((name, side, back))
        else:
            waiting.append((name, side))
    return mine, waiting


# -- the per-requester rate ----------------------------------------------------------------------


def requests_since(conn: Connection, requester: str, since: datetime) -> int:
    query = select(func.count()).where(_REQUESTS.c.requester == requester, _REQUESTS.c.at > since)
    return int(conn.execute(query).scalar_one())


def record_request(conn: Connection, requester: str, at: datetime, forget: datetime) -> None:
    """Records a request and deletes every one from before `forget` (out of every window)."""
    conn.execute(insert(_REQUESTS).values(requester=requester, at=at))
    conn.execute(delete(_REQUESTS).where(_REQUESTS.c.at <= forget))


# -- policies ----------------------------------------------------------------------------------


def policy(conn: Connection, username: str) -> str | None:
    query = select(_POLICIES.c.policy).where(_POLICIES.c.username == username)
    found: str | None = conn.execute(query).scalar_one_or_none()
    return found


def set_policy(conn: Connection, username: str, value: str) -> None:
    done = conn.execute(
        update(_POLICIES).where(_POLICIES.c.username == username).values(policy=value)
    )
    if not done.rowcount:
        conn.execute(insert(_POLICIES).values(username=username, policy=value))


# -- invite codes ------------------------------------------------------------------------------


def _live(now: datetime) -> ColumnElement[bool]:
    return and_(
        _I.revoked_at.is_(None),
        or_(_I.expires_at.is_(None), _I.expires_at > now),
        or_(_I.uses_left.is_(None), _I.uses_left > 0),
    )


def live_invites(conn: Connection, owner: str, now: datetime) -> int:
    query = select(func.count()).where(_I.owner == owner, _live(now))
    return int(conn.execute(query).scalar_one())


def add_invite(conn: Connection, owner: str, code_sha256: str, invite: Invite) -> None:
    conn.execute(
        insert(_INVITES).values(
            id=invite.id,
            code_sha256=code_sha256,
            owner=owner,
            created_at=invite.created_at,
            expires_at=invite.expires_at,
            uses_left=invite.uses_left,
            revoked_at=invite.revoked_at,
        )
    )


def forget_dead_invites(conn: Connection, owner: str, now: datetime, keep: int) -> None:
    """Deletes the owner's revoked, expired or used-up codes but the newest `keep`."""
    dead = ~_live(now)
    kept = (
        select(_I.id)
        .where(_I.owner == owner, dead)
        .order_by(_I.created_at.desc(), _I.id)
        .limit(keep)
    )
    conn.execute(delete(_INVITES).where(_I.owner == owner, dead, _I.id.not_in(kept)))


def use_invite(conn: Connection, owner: str, code_sha256: str, now: datetime) -> bool:
    """Takes one use of the owner's live code with this hash; whether there was one."""
    query = select(_I.id, _I.uses_left).where(
        _I.owner == owner, _I.code_sha256 == code_sha256, _live(now)
    )
    found = conn.execute(query).first()
    if found is None:
        return False
    if found.uses_left is not None:
        conn.execute(update(_INVITES).where(_I.id == found.id).values(uses_left=_I.uses_left - 1))
    return True


_INVITE_COLUMNS = (_I.id, _I.created_at, _I.expires_at, _I.uses_left, _I.revoked_at)


def invites(conn: Connection, owner: str) -> list[Invite]:
    rows = conn.execute(
        select(*_INVITE_COLUMNS).where(_I.owner == owner).order_by(_I.created_at.desc(), _I.id)
    )
    return [Invite(*row) for row in rows]


def revoke_invite(conn: Connection, owner: str, invite_id: str, now: datetime) -> Invite | None:
    """Revokes the owner's code (kept revoked if it was); the code, or None: no such code."""
    where = (_I.owner == owner, _I.id == invite_id)
    conn.execute(update(_INVITES).where(*where, _I.revoked_at.is_(None)).values(revoked_at=now))
    row = conn.execute(select(*_INVITE_COLUMNS).where(*where)).first()
    return None if row is None else Invite(*row)


# -- when contacts changed ---------------------------------------------------------------------


def touch(conn: Connection, usernames: Iterable[str], at: datetime) -> None:
    """Records that these users' contacts changed at `at` (the callers hold their locks)."""
    for name in usernames:
        done = conn.execute(
            update(_CHANGED).where(_CHANGED.c.username == name).values(changed_at=at)
        )
        if not done.rowcount:
            conn.execute(insert(_CHANGED).values(username=name, changed_at=at))
