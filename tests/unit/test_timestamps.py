"""Times on the wire and in SQLite (p2pchat_common.timestamps): protobuf Timestamps and the text
SQLAlchemy's DateTime stores, both ways, the same as the library helpers give."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Column, DateTime, MetaData, Table, create_engine, insert, select, text

from p2pchat_common.timestamps import (
    MAX_SECONDS,
    from_timestamp,
    sqlite_text,
    sqlite_time,
    timestamp_parts,
    to_timestamp,
    valid_timestamp,
)

TIMES = [
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(2026, 12, 1, 9, 30, 15, 123456, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


@pytest.mark.parametrize("moment", TIMES, ids=str)
def test_a_time_goes_to_a_timestamp_and_back_unchanged_as_protobuf_would_convert_it(
    moment: datetime,
) -> None:
    ts = to_timestamp(moment)
    reference = Timestamp()
    reference.FromDatetime(moment)
    assert (ts.seconds, ts.nanos) == (reference.seconds, reference.nanos) == timestamp_parts(moment)
    assert valid_timestamp(ts)
    assert from_timestamp(ts) == moment


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(-1, 0), (MAX_SECONDS + 1, 0), (0, -1), (0, 1_000_000_000)],
)
def test_a_timestamp_a_datetime_cannot_hold_is_not_valid(seconds: int, nanos: int) -> None:
    assert not valid_timestamp(Timestamp(seconds=seconds, nanos=nanos))


def test_sqlite_text_is_what_sqlalchemy_stores_and_reads_back_as_the_same_instant() -> None:
    engine = create_engine("sqlite://")
    table = Table("t", MetaData(), Column("at", DateTime))
    table.create(engine)
    moment = datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(insert(table).values(at=moment.replace(tzinfo=None)))
        stored = conn.execute(text("SELECT at FROM t")).scalar_one()
        assert stored == sqlite_text(moment)
        assert conn.execute(select(table.c.at)).scalar_one() == moment.replace(tzinfo=None)
    engine.dispose()
    assert sqlite_time(stored) == moment


def test_sqlite_text_of_a_time_in_another_zone_is_its_utc_time() -> None:
    paris = timezone(timedelta(hours=1))
    moment = datetime(2026, 1, 1, 0, 30, tzinfo=paris)
    assert sqlite_text(moment) == "2025-12-31 23:30:00.000000"
    assert sqlite_time(sqlite_text(moment)) == moment


def test_sqlite_time_of_none_is_none() -> None:
    assert sqlite_time(None) is None
