"""The reads every authenticated call makes, in plain SQL on one kept-open connection per
worker thread: sqlite3 on a SQLite file, psycopg on PostgreSQL with server-side prepared
statements (parsed and planned once per connection, not at every call).

Measured on this machine (one primary-key SELECT, PostgreSQL 15 on loopback): an SQLAlchemy
Core checkout and statement cost ~100 µs of client CPU, ~125 µs with the pool's pre-ping
round trip; a prepared statement on a kept psycopg connection ~16 µs, ~50 µs with the hand-off
to a worker thread; psycopg's async connections on the event loop ~55 µs. Threads it is.

Queries are written once with `?` placeholders; on PostgreSQL they run with `%s`. Times go in
and come out as each backend stores them (UTCDateTime: text on SQLite, naive UTC timestamps
on PostgreSQL): `param` and `time` convert.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Engine

from p2pchat_common.sqlite import ThreadConnections
from p2pchat_common.timestamps import sqlite_text, sqlite_time

log = logging.getLogger(__name__)

Row = tuple[Any, ...]


class HotReader:
    """Short reads outside any transaction (each sees the latest commit)."""

    def __init__(self, connections: ThreadConnections[Any], postgres: bool) -> None:
        self._connections = connections
        self.postgres = postgres
        self._sql: dict[str, str] = {}

    def _text(self, sql: str) -> str:
        found = self._sql.get(sql)
        if found is None:
            found = self._sql[sql] = sql.replace("?", "%s") if self.postgres else sql
        return found

    def one(self, sql: str, params: Sequence[object]) -> Row | None:
        rows = self._run(sql, params, one=True)
        return rows[0] if rows else None

    def all(self, sql: str, params: Sequence[object]) -> list[Row]:
        return self._run(sql, params, one=False)

    def _run(self, sql: str, params: Sequence[object], one: bool) -> list[Row]:
        text = self._text(sql)
        if not self.postgres:
            with self._connections.use() as db:
                cursor = db.execute(text, params)
                return [cursor.fetchone()] if one else cursor.fetchall()
        for attempt in (1, 2):
            try:
                with self._connections.use() as db:
                    cursor = db.execute(text, params, prepare=True)
                    found = cursor.fetchone() if one else cursor.fetchall()
                    if one:
                        return [] if found is None else [found]
                    return list(found)
            except psycopg.OperationalError as exc:
                # A connection the server dropped (a restart, a failover): a read may be tried
                # again on a new one, once.
                self._connections.discard()
                if attempt == 2:
                    raise
                log.info("hot read: PostgreSQL connection lost (%s); reconnecting", exc)
        raise AssertionError("unreachable")

    def param(self, value: datetime) -> object:
        """A time as this backend's UTCDateTime columns hold it."""
        if self.postgres:
            return value.astimezone(UTC).replace(tzinfo=None)
        return sqlite_text(value)

    def time(self, value: object) -> datetime | None:
        """A UTCDateTime column's value read in plain SQL, as an aware UTC time."""
        if value is None:
            return None
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value
        return sqlite_time(str(value))

    def close(self) -> None:
        self._connections.close()


def hot_reader(engine: Engine) -> HotReader | None:
    """The hot reader of the engine's database: a SQLite file or PostgreSQL; None for anything
    else (an in-memory SQLite database: the callers use SQLAlchemy then)."""
    url = engine.url
    if engine.dialect.name == "postgresql":
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)

        def connect_pg() -> psycopg.Connection[Row]:
            return psycopg.connect(
                dsn, autocommit=True, application_name="p2pchat-directory hot reads"
            )

        return HotReader(ThreadConnections(connect_pg, f"the database {url.database}"), True)
    database = url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None

    def connect_sqlite() -> sqlite3.Connection:
        conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA query_only=ON")
        return conn

    return HotReader(ThreadConnections(connect_sqlite, f"the database {database}"), False)
