"""UTCDateTime (p2pchat_common.sqltypes): aware times in, aware UTC times out, naive refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, Engine, Integer, MetaData, Table, create_engine, insert, select
from sqlalchemy.exc import StatementError

from p2pchat_common.sqltypes import UTCDateTime

TABLE = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("at", UTCDateTime))


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    TABLE.create(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def test_an_aware_time_in_any_zone_reads_back_as_the_same_instant_in_utc(engine: Engine) -> None:
    moment = datetime(2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5)))
    with engine.begin() as conn:
        conn.execute(insert(TABLE).values(id=1, at=moment))
        conn.execute(insert(TABLE).values(id=2, at=None))
        rows = {row.id: row.at for row in conn.execute(select(TABLE.c.id, TABLE.c.at))}
    assert rows[1] == moment and rows[1].tzinfo is UTC
    assert rows[2] is None


def test_a_naive_time_is_refused(engine: Engine) -> None:
    with engine.begin() as conn, pytest.raises(StatementError, match="naive datetime"):
        conn.execute(insert(TABLE).values(id=1, at=datetime(2026, 6, 1, 12, 0)))
