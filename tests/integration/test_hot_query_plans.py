"""Every query of the directory's hot calls (session check, Lookup, ListContacts, presence
renewals, mailbox deposit, collect and acknowledge) finds its rows through an index, on SQLite
and on PostgreSQL: none scans a table whose size grows with the users, contacts or envelopes.

PostgreSQL: with sequential scans disabled, a plan that still holds a "Seq Scan" has no index
it could use. SQLite: EXPLAIN QUERY PLAN says SEARCH (an index) or SCAN (the whole table).
The plans are printed (pytest -s) as the README's "EXPLAIN" shows them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, delete, event
from sqlalchemy.sql import Executable

from p2pchat_directory import consent_store, mailbox_store, presence_store, repository
from p2pchat_directory.db import Databases
from p2pchat_directory.models import MailboxEnvelope

NOW = datetime(2026, 12, 1, tzinfo=UTC)
TOKEN = "0" * 64


def plain_queries(postgres: bool) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(what, SQL with ? placeholders, parameters) of the plain-SQL hot reads."""
    now: Any = NOW.replace(tzinfo=None) if postgres else "2026-12-01 00:00:00.000000"
    names: Any = ["alice", "bob"] if postgres else json.dumps(["alice", "bob"])
    presence = repository._PG_PRESENCE if postgres else repository._PRESENCE
    live = presence_store._PG_LIVE if postgres else presence_store._LIVE
    changed = presence_store._PG_CHANGED_OF if postgres else presence_store._CHANGED_OF
    a, src = "alice", "10.0.0.1"
    login_checks = (a, a, src, a, src, src, src, a, a, now, src, a)
    return [
        ("session owner", repository._SESSION_OWNER, (TOKEN, now)),
        ("Lookup: owner and user", repository._OWNER_AND_USER, ("bob", TOKEN, now)),
        ("Lookup, Deposit: the pair", consent_store._PLAIN_PAIR, ("a", "b", "b", "a")),
        (
            "Lookup, Deposit in one database: owner, user and pair",
            consent_store._OWNER_USER_AND_PAIR,
            ("bob", "bob", "bob", TOKEN, now),
        ),
        ("Heartbeat: contacts changed", consent_store._PLAIN_CHANGED_AT, ("alice",)),
        ("Login: stored hash and failures", repository._LOGIN_CHECKS, login_checks),
        ("ListContacts: rows", consent_store._PLAIN_LISTING, ("alice",) * 3),
        ("ListContacts: presence", presence, (names,)),
        ("presence: live sessions", live, (names, now)),
        ("presence: contacts changed", changed, (names,)),
    ]


def core_queries() -> list[tuple[str, Executable, dict[str, Any]]]:
    """(what, statement, parameters) of the SQLAlchemy Core statements on hot paths."""
    e = MailboxEnvelope
    page = {"recipient": "bob", "after": 0, "now": NOW}
    return [
        ("Deposit: held for recipient", mailbox_store._HELD, {"recipient": "bob", "now": NOW}),
        ("Collect: sizes of a page", mailbox_store._SIZES, {**page, "limit": 100}),
        ("Collect: a page", mailbox_store._ENVELOPES_UP_TO, {**page, "upto": 9}),
        ("Acknowledge", delete(e).where(e.recipient == "bob", e.id.in_([1, 2])), {}),
        ("expiry sweep", delete(e).where(e.expires_at <= NOW), {}),
    ]


def presence_queries(postgres: bool) -> list[tuple[str, Executable, dict[str, Any]]]:
    now = NOW.replace(tzinfo=None)
    if not postgres:
        lease = {"name": "a", "token": TOKEN, "until": "x", "seen": "x", "now": "x"}
        return [("presence: a lease (each of the batch)", presence_store._SQLITE_RENEW, lease)]
    leases = {"names": ["a"], "tokens": [TOKEN], "untils": [now], "seens": [now], "now": now}
    return [
        ("presence: all leases", presence_store._PG_RENEW, leases),
    ]


def _explain(
    _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool
) -> tuple[str, Any]:
    return "EXPLAIN QUERY PLAN " + statement if _sqlite else "EXPLAIN " + statement, parameters


_sqlite = True


def plans(engine: Engine) -> list[tuple[str, str]]:
    """The plan of every hot query, as the database itself explains it."""
    global _sqlite
    postgres = engine.dialect.name == "postgresql"
    _sqlite = not postgres
    found = []
    with engine.connect() as conn:
        if postgres:
            conn.exec_driver_sql("SET enable_seqscan = off")
        event.listen(conn, "before_cursor_execute", _explain, retval=True)
        for what, sql, params in plain_queries(postgres):
            rows = conn.exec_driver_sql(sql.replace("?", "%s") if postgres else sql, params)
            found.append((what, "\n".join(str(r[-1]) for r in rows)))
        for what, stmt, named in [*presence_queries(postgres), *core_queries()]:
            # The DB-API cursor's rows: the statement's own result processors (a time column's)
            # do not apply to a plan.
            raw = conn.execute(stmt, named).cursor.fetchall()
            found.append((what, "\n".join(str(r[-1]) for r in raw)))
        conn.rollback()  # EXPLAIN of a DELETE or UPDATE runs nothing; nothing to keep anyway
    return found


def test_every_hot_query_finds_its_rows_through_an_index(db_urls: tuple[str, str]) -> None:
    dbs = Databases.open(db_urls[0], db_urls[0])  # one database: the contacts tables too
    try:
        postgres = dbs.users_engine.dialect.name == "postgresql"
        found = plans(dbs.users_engine)
    finally:
        dbs.dispose()
    for what, plan in found:
        print(f"-- {what}\n{plan}\n")
    if postgres:
        scans = [(what, plan) for what, plan in found if "Seq Scan" in plan]
    else:  # SCAN of the JSON array's virtual table is the list of names, not a table
        scans = [
            (what, plan)
            for what, plan in found
            for line in plan.splitlines()
            if line.startswith("SCAN ") and not line.startswith("SCAN json_each")
        ]
    assert not scans, scans
    assert len(found) == 10 + len(presence_queries(postgres)) + 5
