"""SQLAlchemy models of the two directory databases: users (with sessions and login failures)
and contacts. They are separate metadata so that each may live at its own URL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from p2pchat_common.sqltypes import UTCDateTime


class UsersBase(DeclarativeBase):
    pass


class ContactsBase(DeclarativeBase):
    pass


class User(UsersBase):
    __tablename__ = "users"

    # Canonical lower-case username: case-insensitive uniqueness by construction.
    username: Mapped[str] = mapped_column(String(32), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    address: Mapped[str] = mapped_column(String(261), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Online while now < online_until (set by login and heartbeats, cleared by the last logout).
    online_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The user's current agent certificate and the SHA-256 of its public key.
    certificate_pem: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    public_key_sha256: Mapped[str] = mapped_column(String(64), default="")


class UserSession(UsersBase):
    __tablename__ = "sessions"

    # SHA-256 hex of the bearer token: the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class LoginFailure(UsersBase):
    """Unused since failures are counted per source too (FailedLogin). Kept so that existing
    databases keep the table create_all made for them; nothing reads or writes it any more."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_username_at", "username", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Canonical form of whatever name was tried, existing or not (no user enumeration).
    username: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class FailedLogin(UsersBase):
    """One failed login, with where it came from: counted per (username, source), per source
    and per username over a sliding window (shared by all replicas, kept across restarts).
    A new table rather than a column on login_failures: create_all adds no columns."""

    __tablename__ = "failed_logins"
    __table_args__ = (
        Index("ix_failed_logins_username_source_at", "username", "source", "at"),
        Index("ix_failed_logins_source_at", "source", "at"),
        Index("ix_failed_logins_username_at", "username", "at"),
        Index("ix_failed_logins_at", "at"),  # forgetting old failures
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Canonical form of whatever name was tried, existing or not (no user enumeration).
    username: Mapped[str] = mapped_column(String(32))
    # The client's IPv4 address, the /64 of its IPv6 address, or "unknown" (servicer.client_source).
    source: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class Contact(ContactsBase):
    """The owner's side of a pair: the owner wants the contact ('want'), wanted them but was
    declined ('declined': still REQUESTED to its owner, no longer AWAITING to the other), or
    blocked them ('block'). ACCEPTED is both rows 'want' (consent.contact_state)."""

    __tablename__ = "contacts"
    # The requests awaiting one user's answer (the per-recipient cap, ListContactRequests).
    __table_args__ = (Index("ix_contacts_contact_state", "contact", "state"),)

    owner: Mapped[str] = mapped_column(String(32), primary_key=True)
    contact: Mapped[str] = mapped_column(String(32), primary_key=True)
    pinned_address: Mapped[str] = mapped_column(String(261), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Added to existing databases by db.upgrade_contacts (create_all adds no columns).
    state: Mapped[str] = mapped_column(String(8), default="want", server_default="want")
    note: Mapped[str] = mapped_column(String(200), default="", server_default="")
    requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ContactRequestMade(ContactsBase):
    """One contact request a user sent: counted per requester over the last hour (shared by
    replicas); older ones are deleted as new ones are recorded."""

    __tablename__ = "contact_requests_made"
    __table_args__ = (
        Index("ix_contact_requests_made_requester_at", "requester", "at"),
        Index("ix_contact_requests_made_at", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    requester: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(UTCDateTime())


class ContactPolicyRow(ContactsBase):
    """Who may send a user requests: 'anyone' (also when absent), 'invite' or 'nobody'."""

    __tablename__ = "contact_policies"

    username: Mapped[str] = mapped_column(String(32), primary_key=True)
    policy: Mapped[str] = mapped_column(String(8))


class InviteRow(ContactsBase):
    """An invite code: the directory keeps its SHA-256, never the code."""

    __tablename__ = "contact_invites"
    __table_args__ = (Index("ix_contact_invites_owner_created_at", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # the public handle
    code_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    uses_left: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: unlimited
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ContactsChanged(ContactsBase):
    """When a user's contacts last changed, on either side (HeartbeatResponse)."""

    __tablename__ = "contacts_changed"

    username: Mapped[str] = mapped_column(String(32), primary_key=True)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime())


class IssuedCertificateRow(UsersBase):
    """A user certificate this directory issued: what CertificateStatus answers from. Revoked by
    the logout of its session or by a login with another key (another device replaces it)."""

    __tablename__ = "certificates"

    # Hex SHA-256 of the DER certificate.
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(32), index=True)
    device: Mapped[str] = mapped_column(String(64))
    public_key_sha256: Mapped[str] = mapped_column(String(64))
    # The session it was issued to (hash of its token), so that logout revokes it.
    session_hash: Mapped[str] = mapped_column(String(64), index=True)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class MailboxKey(UsersBase):
    """A user's published mailbox key and its binding signature by their identity key. Current
    only while `public_key_sha256` is the user's (users.public_key_sha256): a login with a new
    key makes it stale, and Lookup then returns none."""

    __tablename__ = "mailbox_keys"

    username: Mapped[str] = mapped_column(String(32), primary_key=True)
    mailbox_key: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    # The identity key the signature was verified with at PublishKey.
    public_key_sha256: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(UTCDateTime())


class MailboxEnvelope(UsersBase):
    """A sealed envelope held for its recipient until acknowledged or expired. The directory
    cannot open it: `envelope` is opaque bytes (HPKE-sealed to the recipient's mailbox key)."""

    __tablename__ = "mailbox_envelopes"
    __table_args__ = (
        Index("ix_mailbox_envelopes_recipient_id", "recipient", "id"),  # collect, quota, ack
        Index("ix_mailbox_envelopes_expires_at", "expires_at"),  # the expiry sweep
        # AUTOINCREMENT: an id is never handed out again, even once its row is deleted. A
        # Collect stream sends "ids after the last one sent": a reused id would never be sent.
        {"sqlite_autoincrement": True},
    )

    # BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    recipient: Mapped[str] = mapped_column(String(32))
    depositor: Mapped[str] = mapped_column(String(32))
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    deposited_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
