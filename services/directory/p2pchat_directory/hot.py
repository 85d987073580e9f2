"""The reads every authenticated call makes, in plain SQL on kept-open connections: sqlite3 on a
SQLite file (one per thread, or inline on the event loop), psycopg on PostgreSQL with
server-side prepared statements (parsed and planned once per connection, not at every call).

A hot use case is written once, as a *plan*: a generator that yields each `Read` it needs and
gets its rows back (`rows = yield Read(...)`), then returns its answer. Nothing in a plan does
I/O, so the same plan runs on either driver:
- `run_plan`: blocking, on a `HotReader` (SQLite inline on the loop, or in a worker thread);
- `run_plan_async`: on the event loop, on an `AsyncReader` (PostgreSQL).

Why PostgreSQL reads run on the event loop. Measured here (one primary-key SELECT on loopback):
an SQLAlchemy Core checkout and statement cost ~100 us of client CPU (~125 us with pre-ping),
a prepared statement on a kept psycopg connection ~16 us, ~50 us with the hand-off to a worker
thread, ~55 us on psycopg's async connection. Alone, threads and the loop cost the same. Under
load they do not: with the loop busy (5,000 agents on one replica), each worker thread waits for
the GIL at every switch between Python and libpq (the loop lets go of it every 5 ms), and a
Lookup took 0.9 s at the median. On the loop there is no hand-off and nothing to wait for.

Queries are written with `?` placeholders and run with `%s` on PostgreSQL. Times are given as
aware datetimes and converted for the backend (UTCDateTime: text on SQLite, naive UTC
timestamps on PostgreSQL); `to_time` reads them back from either. A list of names is bound as an
array on PostgreSQL and as a JSON array on SQLite (`Read.pg_sql` then differs from `Read.sql`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sqlite3
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import psycopg
from sqlalchemy import Engine

from p2pchat_common.sqlite import ThreadConnections
from p2pchat_common.timestamps import sqlite_text, sqlite_time

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = tuple[Any, ...]
APPLICATION_NAME = "p2pchat-directory hot reads"  # as pg_stat_activity shows it


@dataclass(frozen=True)
class Read:
    """One statement of a plan: on the users or the contacts database; the first row only
    (`one`) or all. `pg_sql`: the PostgreSQL text when it differs (a list of names)."""

    db: Literal["users", "contacts"]
    sql: str
    params: Sequence[object]
    one: bool = True
    pg_sql: str | None = None


Plan = Generator[Read, list[Row], T]


def to_time(value: object) -> datetime | None:
    """A UTCDateTime column's value read in plain SQL (either backend), as an aware UTC time."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value
    return sqlite_time(str(value))


def _bound(value: object, postgres: bool) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC).replace(tzinfo=None) if postgres else sqlite_text(value)
    if isinstance(value, list) and not postgres:
        return json.dumps(value)
    return value


class _Texts:
    """The statement text for a backend, built once per statement."""

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres
        self._texts: dict[str, str] = {}

    def text(self, read: Read) -> str:
        sql = read.pg_sql if self.postgres and read.pg_sql is not None else read.sql
        found = self._texts.get(sql)
        if found is None:
            found = self._texts[sql] = sql.replace("?", "%s") if self.postgres else sql
        return found

    def params(self, read: Read) -> list[object]:
        return [_bound(v, self.postgres) for v in read.params]


class HotReader:
    """Blocking reads outside any transaction (each sees the latest commit)."""

    def __init__(self, connections: ThreadConnections[Any], postgres: bool) -> None:
        self._connections = connections
        self.postgres = postgres
        self._texts = _Texts(postgres)

    def read(self, read: Read) -> list[Row]:
        text, params = self._texts.text(read), self._texts.params(read)
        if not self.postgres:
            with self._connections.use() as db:
                cursor = db.execute(text, params)
                return [r] if read.one and (r := cursor.fetchone()) else cursor.fetchall()
        for attempt in (1, 2):
            try:
                with self._connections.use() as db:
                    cursor = db.execute(text, params, prepare=True)
                    if read.one:
                        row = cursor.fetchone()
                        return [] if row is None else [row]
                    return list(cursor.fetchall())
            except psycopg.OperationalError as exc:
                # A connection the server dropped (a restart, a failover): a read may be tried
                # again on a new one, once.
                self._connections.discard()
                if attempt == 2:
                    raise
                log.info("hot read: PostgreSQL connection lost (%s); reconnecting", exc)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._connections.close()


class AsyncReader:
    """PostgreSQL reads on the event loop: up to `size` kept connections, opened on demand.

    Eight, not four: when PostgreSQL answers slowly (a burst of 200 logins competing for the
    CPU), four connections could not keep up with 2,000 agents' Lookups (two reads each) and
    they queued for seconds; with eight, their p99 during the burst went from ~0.5-2 s to
    ~0.1-0.2 s (bench directory_load's burst alone). A replica then holds up to 8 of these, one
    per worker thread, its SQLAlchemy pool (10 + 10) and one LISTEN: mind max_connections
    (100 by default) with several replicas."""

    def __init__(self, dsn: str, size: int = 8) -> None:
        self._dsn = dsn
        self._size = size
        self._idle: list[psycopg.AsyncConnection[Row]] = []
        self._opened = 0
        self._waiting: collections.deque[asyncio.Future[psycopg.AsyncConnection[Row]]] = (
            collections.deque()
        )
        self._texts = _Texts(True)
        self._closed = False

    async def _acquire(self) -> psycopg.AsyncConnection[Row]:
        if self._closed:
            raise RuntimeError("the hot reads are closed")
        if self._idle:
            return self._idle.pop()
        if self._opened < self._size:
            self._opened += 1
            try:
                return await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, application_name=APPLICATION_NAME
                )
            except BaseException:
                self._opened -= 1
                raise
        waiter: asyncio.Future[psycopg.AsyncConnection[Row]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting.append(waiter)
        return await waiter

    def _release(self, conn: psycopg.AsyncConnection[Row] | None) -> None:
        """Back to the idle ones or to a waiter; None: it broke (a new one may be opened)."""
        if conn is None:
            self._opened -= 1
            if self._waiting and not self._closed:  # the waiter opens its own
                waiter = self._waiting.popleft()
                if not waiter.done():
                    self._opened += 1
                    task = asyncio.ensure_future(self._connect_for(waiter))
                    task.add_done_callback(lambda _t: None)
            return
        if self._closed:  # a read that ended after close(): its connection goes too
            self._opened -= 1
            task = asyncio.ensure_future(conn.close())
            task.add_done_callback(lambda _t: None)
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    async def _connect_for(self, waiter: asyncio.Future[psycopg.AsyncConnection[Row]]) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, application_name=APPLICATION_NAME
            )
        except Exception as exc:
            self._opened -= 1
            if not waiter.done():
                waiter.set_exception(exc)
            return
        if waiter.done():
            self._release(conn)
        else:
            waiter.set_result(conn)

    async def read(self, read: Read) -> list[Row]:
        text, params = self._texts.text(read), self._texts.params(read)
        for attempt in (1, 2):
            conn = await self._acquire()
            try:
                cursor = await conn.execute(text, params, prepare=True)
                rows = [r] if read.one and (r := await cursor.fetchone()) else []
                if not read.one:
                    rows = list(await cursor.fetchall())
            except psycopg.OperationalError as exc:
                await conn.close()
                self._release(None)
                if attempt == 2:
                    raise
                log.info("hot read: PostgreSQL connection lost (%s); reconnecting", exc)
                continue
            except BaseException:
                await conn.close()  # cancelled mid-statement: its state is unknown
                self._release(None)
                raise
            self._release(conn)
            return rows
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        for waiter in self._waiting:
            if not waiter.done():
                waiter.set_exception(RuntimeError("the hot reads are closed"))
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


def run_plan(plan: Plan[T], users: HotReader, contacts: HotReader) -> T:
    """Runs `plan`, blocking, on these readers."""
    try:
        read = next(plan)
        while True:
            read = plan.send((users if read.db == "users" else contacts).read(read))
    except StopIteration as done:
        result: T = done.value
        return result


async def run_plan_async(plan: Plan[T], users: AsyncReader, contacts: AsyncReader) -> T:
    """Runs `plan` on the event loop, on these readers."""
    try:
        read = next(plan)
        while True:
            read = plan.send(await (users if read.db == "users" else contacts).read(read))
    except StopIteration as done:
        result: T = done.value
        return result


def dsn_of(engine: Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def hot_reader(engine: Engine) -> HotReader:
    """The blocking hot reader of the engine's database: PostgreSQL or a SQLite file;
    ValueError for anything else."""
    url = engine.url
    if engine.dialect.name == "postgresql":
        dsn = dsn_of(engine)

        def connect_pg() -> psycopg.Connection[Row]:
            return psycopg.connect(dsn, autocommit=True, application_name=APPLICATION_NAME)

        return HotReader(ThreadConnections(connect_pg, f"the database {url.database}"), True)
    database = url.database
    if engine.dialect.name != "sqlite":
        raise ValueError(f"{engine.dialect.name} databases are not supported")
    if not database or database == ":memory:":
        raise ValueError("an in-memory SQLite database is not one the threads can share")

    def connect_sqlite() -> sqlite3.Connection:
        conn = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA query_only=ON")
        return conn

    return HotReader(ThreadConnections(connect_sqlite, f"the database {database}"), False)
