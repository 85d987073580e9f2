"""Queries of the directory databases. Each function takes the SQLAlchemy session it works in;
the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, bindparam, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from p2pchat_common.errors import AlreadyExists
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


def session_owner(conn: Connection, token_hash: str, now: datetime) -> str | None:
    """The user of a live session (Core, not ORM: every authenticated call runs this)."""
    return conn.execute(_SESSION_OWNER, {"token_hash": token_hash, "now": now}).scalar_one_or_none()


def user_summary(conn: Connection, username: str) -> UserSummary | None:
    row = conn.execute(_USER_SUMMARY, {"username": username}).one_or_none()
    return None if row is None else UserSummary(*row)


def pinned_address(conn: Connection, owner: str, contact: str) -> str | None:
    """The contact's pinned address ("" when none), or None when not a contact."""
    return conn.execute(_PINNED_ADDRESS, {"owner": owner, "contact": contact}).scalar_one_or_none()


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
