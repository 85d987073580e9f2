"""Engines and session factories for the users and contacts databases; schema creation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from p2pchat_common.errors import StartupError
from p2pchat_common.files import private_dir, private_file
from p2pchat_directory.hot import AsyncReader, HotReader, dsn_of, hot_reader
from p2pchat_directory.models import Contact, ContactsBase, UsersBase

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every replica creating the schema.
_SCHEMA_LOCK_ID = 0x70327063


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            # 0600 before SQLite opens it: its -wal and -shm files take the same mode.
            path = Path(parsed.database)
            private_dir(path.parent)
            private_file(path)
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # No pre-ping: it costs a round trip at every checkout. A connection the server dropped
    # fails its statement once and the pool then replaces its connections (and hot.py's reads
    # reconnect by themselves); the long-lived ones are recycled hourly.
    return create_engine(url, pool_size=10, max_overflow=10, pool_recycle=3600)


# Columns added to `contacts` by contact consent (issue 14), with their DDL. An existing row
# becomes 'want': a pair both added is ACCEPTED, a one-sided one a request awaiting the other.
_CONTACT_COLUMNS = (
    ("state", "VARCHAR(8) NOT NULL DEFAULT 'want'"),
    ("note", "VARCHAR(200) NOT NULL DEFAULT ''"),
    ("requested_at", None),  # the dialect's type of the model's column; NULL, then filled
)


def upgrade_contacts(conn: Connection) -> None:
    """Brings a `contacts` table made before contact consent up to the model: adds the missing
    columns (an old request's time is when it was added) and the index. Idempotent."""
    present = {c["name"] for c in inspect(conn).get_columns("contacts")}
    added = False
    for name, ddl in _CONTACT_COLUMNS:
        if name in present:
            continue
        if ddl is None:
            ddl = Contact.__table__.c[name].type.compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE contacts ADD COLUMN {name} {ddl}"))
        added = True
    if added:
        conn.execute(
            text("UPDATE contacts SET requested_at = created_at WHERE requested_at IS NULL")
        )
        log.info("contacts table upgraded for contact consent: existing pairs kept as requests")
    table: Table = Contact.__table__  # type: ignore[assignment]
    for index in table.indexes:
        index.create(conn, checkfirst=True)


_UPGRADES: dict[type[DeclarativeBase], Callable[[Connection], None]] = {
    ContactsBase: upgrade_contacts
}


def create_schema(engine: Engine, base: type[DeclarativeBase]) -> None:
    """Creates missing tables and upgrades old ones; on PostgreSQL under an advisory lock so
    replicas may race."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _SCHEMA_LOCK_ID})
        base.metadata.create_all(conn)
        upgrade = _UPGRADES.get(base)
        if upgrade is not None:
            upgrade(conn)


@dataclass
class Databases:
    users_engine: Engine
    contacts_engine: Engine
    users: sessionmaker[Session]
    contacts: sessionmaker[Session]
    users_reader: HotReader
    contacts_reader: HotReader
    _async: tuple[AsyncReader, AsyncReader] | None = None

    @classmethod
    def open(cls, users_url: str, contacts_url: str) -> Databases:
        """Connects and creates missing tables; StartupError when a database cannot be used.
        Two URLs that are one database share one engine (one pool) and one hot reader."""
        users_engine = make_engine(users_url)
        same = make_url(users_url) == make_url(contacts_url)
        contacts_engine = users_engine if same else make_engine(contacts_url)
        for engine, base, what in (
            (users_engine, UsersBase, "users"),
            (contacts_engine, ContactsBase, "contacts"),
        ):
            try:
                create_schema(engine, base)
            except SQLAlchemyError as exc:
                users_engine.dispose()
                contacts_engine.dispose()
                where = engine.url.render_as_string(hide_password=True)
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                raise StartupError(f"cannot use the {what} database {where}: {reason}") from exc
        log.info(
            "databases ready: users=%s contacts=%s",
            users_engine.url.render_as_string(hide_password=True),
            contacts_engine.url.render_as_string(hide_password=True),
        )
        try:
            users_reader = hot_reader(users_engine)
            contacts_reader = users_reader if same else hot_reader(contacts_engine)
        except ValueError as exc:
            users_engine.dispose()
            contacts_engine.dispose()
            raise StartupError(f"cannot serve from these databases: {exc}") from None
        users = sessionmaker(users_engine, expire_on_commit=False)
        return cls(
            users_engine,
            contacts_engine,
            users,
            users if same else sessionmaker(contacts_engine, expire_on_commit=False),
            users_reader,
            contacts_reader,
        )

    def async_readers(self) -> tuple[AsyncReader, AsyncReader] | None:
        """On PostgreSQL: the readers of the event loop (users, contacts), made on first use
        on the running loop; None on SQLite (its reads run inline)."""
        if self._async is None:
            engines = (self.users_engine, self.contacts_engine)
            if not all(e.dialect.name == "postgresql" for e in engines):
                return None
            users = AsyncReader(dsn_of(self.users_engine))
            contacts = users if self.one_database else AsyncReader(dsn_of(self.contacts_engine))
            self._async = (users, contacts)
        return self._async

    async def aclose(self) -> None:
        """Closes the event loop's readers (before `dispose`)."""
        found, self._async = self._async, None
        if found is not None:
            for reader in {id(r): r for r in found}.values():
                await reader.close()

    @property
    def one_database(self) -> bool:
        """Users and contacts are one database (one statement may join their tables)."""
        return self.users_engine is self.contacts_engine

    @property
    def local_only(self) -> bool:
        """Both databases are SQLite files on this machine (reads never wait on a network)."""
        return all(e.dialect.name == "sqlite" for e in (self.users_engine, self.contacts_engine))

    def dispose(self) -> None:
        for reader in {id(r): r for r in (self.users_reader, self.contacts_reader)}.values():
            reader.close()
        self.users_engine.dispose()
        if not self.one_database:
            self.contacts_engine.dispose()
