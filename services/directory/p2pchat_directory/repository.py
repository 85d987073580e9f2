"""Queries of the directory databases. Most functions take the SQLAlchemy session it works in (the
caller owns the transaction); the hot reads every authenticated call makes take the Databases and
run in plain SQL on a SQLite file, through SQLAlchemy Core elsewhere."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from p2pchat_common.errors import AlreadyExists
from p2pchat_common.timestamps import sqlite_text, sqlite_time
from p2pchat_directory.db import Databases
from p2pchat_directory.models import Contact, LoginFailure, User, UserSession


@dataclass(frozen=True)
class UserSummary:
    address: str
    last_seen: datetime | None
    online_until: datetime | None
    public_key_sha256: str
    certificate_pem: bytes | None


# Built once: the hot calls only bind values (building expressions cost more than the query).
_SESSION_OWNER = select(UserSession.username).where(
    UserSession.token_hash == bindparam("token_hash"), UserSession.expires_at > bindparam("now")
)
_USER_SUMMARY = select(
    User.address, User.last_seen, User.online_until, User.public_key_sha256, User.certificate_pem
).where(User.username == bindparam("username"))
_PINNED_ADDRESS = select(Contact.pinned_address).where(
    Contact.owner == bindparam("owner"), Contact.contact == bindparam("contact")
)


# The same reads in plain SQL for a SQLite file (times as SQLAlchemy stores them there).
_SQLITE_SESSION_OWNER = "SELECT username FROM sessions WHERE token_hash = ? AND expires_at > ?"
_SQLITE_OWNER_AND_USER = (
    "SELECT s.username, u.username, u.address, u.last_seen, u.online_until, "
    "u.public_key_sha256, u.certificate_pem FROM sessions AS s "
    "LEFT JOIN users AS u ON u.username = ? WHERE s.token_hash = ? AND s.expires_at > ?"
)
_SQLITE_PINNED_ADDRESS = "SELECT pinned_address FROM contacts WHERE owner = ? AND contact = ?"


def session_owner(dbs: Databases, token_hash: str, now: datetime) -> str | None:
    """The user of a live session."""
    if dbs.users_reader is not None:
        with dbs.users_reader.use() as db:
            row = db.execute(_SQLITE_SESSION_OWNER, (token_hash, sqlite_text(now))).fetchone()
        return None if row is None else str(row[0])
    with dbs.users_engine.connect() as conn:
        return _session_owner(conn, token_hash, now)


def owner_and_user(
    dbs: Databases, token_hash: str, now: datetime, username: str
) -> tuple[str | None, UserSummary | None]:
    """The user of a live session (None: no such session) and the summary of `username` (None:
    no such user), in one read."""
    if dbs.users_reader is not None:
        with dbs.users_reader.use() as db:
            params = (username, token_hash, sqlite_text(now))
            row = db.execute(_SQLITE_OWNER_AND_USER, params).fetchone()
        if row is None:
            return None, None
        owner, found, address, last_seen, online_until, key_sha256, cert = row
        if found is None:
            return owner, None
        return owner, UserSummary(
            address, sqlite_time(last_seen), sqlite_time(online_until), key_sha256, cert
        )
    with dbs.users_engine.connect() as conn:
        owner = _session_owner(conn, token_hash, now)
        if owner is None:
            return None, None
        row = conn.execute(_USER_SUMMARY, {"username": username}).one_or_none()
        return owner, None if row is None else UserSummary(*row)


def pinned_address(dbs: Databases, owner: str, contact: str) -> str | None:
    """The contact's pinned address ("" when none), or None when not a contact."""
    if dbs.contacts_reader is not None:
        with dbs.contacts_reader.use() as db:
            row = db.execute(_SQLITE_PINNED_ADDRESS, (owner, contact)).fetchone()
        return None if row is None else str(row[0])
    with dbs.contacts_engine.connect() as conn:
        params = {"owner": owner, "contact": contact}
        return conn.execute(_PINNED_ADDRESS, params).scalar_one_or_none()


def _session_owner(conn: Connection, token_hash: str, now: datetime) -> str | None:
    return conn.execute(_SESSION_OWNER, {"token_hash": token_hash, "now": now}).scalar_one_or_none()


def add_user(s: Session, user: User) -> None:
    s.add(user)
    try:
        s.flush()
    except IntegrityError:
        raise AlreadyExists(f"username {user.username!r} is taken") from None


def get_user(s: Session, username: str) -> User | None:
    return s.get(User, username)


def users_by_name(s: Session, usernames: Iterable[str]) -> dict[str, User]:
    names = list(usernames)
    if not names:
        return {}
    return {u.username: u for u in s.scalars(select(User).where(User.username.in_(names)))}


def recent_failures(s: Session, username: str, since: datetime) -> tuple[int, datetime | None]:
    """How many failed logins `username` has since `since`, and the oldest of them."""
    count, oldest = s.execute(
        select(func.count(), func.min(LoginFailure.at)).where(
            LoginFailure.username == username, LoginFailure.at > since
        )
    ).one()
    return int(count), oldest


def record_failure(s: Session, username: str, at: datetime) -> None:
    s.add(LoginFailure(username=username, at=at))


def clear_failures(s: Session, username: str, before: datetime | None = None) -> None:
    stmt = delete(LoginFailure).where(LoginFailure.username == username)
    if before is not None:
        stmt = stmt.where(LoginFailure.at <= before)
    s.execute(stmt)


def add_session(s: Session, session: UserSession) -> None:
    s.add(session)


def get_session(s: Session, token_hash: str) -> UserSession | None:
    return s.get(UserSession, token_hash)


def delete_session(s: Session, token_hash: str) -> None:
    s.execute(delete(UserSession).where(UserSession.token_hash == token_hash))


def delete_expired_sessions(s: Session, username: str, now: datetime) -> None:
    s.execute(
        delete(UserSession).where(UserSession.username == username, UserSession.expires_at <= now)
    )


def count_live_sessions(s: Session, username: str, now: datetime) -> int:
    return int(
        s.scalar(
            select(func.count()).where(
                UserSession.username == username, UserSession.expires_at > now
            )
        )
        or 0
    )


def add_contact(s: Session, row: Contact) -> None:
    s.add(row)
    try:
        s.flush()
    except IntegrityError:
        raise AlreadyExists(f"{row.contact!r} is already in your contacts") from None


def delete_contact(s: Session, owner: str, contact: str) -> bool:
    result = s.execute(delete(Contact).where(Contact.owner == owner, Contact.contact == contact))
    return bool(getattr(result, "rowcount", 0))


def list_contacts(s: Session, owner: str) -> Sequence[Contact]:
    return s.scalars(select(Contact).where(Contact.owner == owner).order_by(Contact.contact)).all()
