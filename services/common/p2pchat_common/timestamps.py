"""Conversions of aware datetimes: to and from google.protobuf.Timestamp, and to and from the
text SQLAlchemy's DateTime stores on SQLite.

Arithmetic on the epoch instead of Timestamp.FromDatetime/ToDatetime: these run for every
message on a link, and the protobuf helpers cost several times more.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the largest a datetime holds


def timestamp_parts(value: datetime) -> tuple[int, int]:
    """The seconds and nanos of the Timestamp for an aware `value`."""
    delta = value - EPOCH
    return delta.days * 86_400 + delta.seconds, delta.microseconds * 1000


def to_timestamp(value: datetime) -> Timestamp:
    seconds, nanos = timestamp_parts(value)
    return Timestamp(seconds=seconds, nanos=nanos)


def valid_timestamp(ts: Timestamp) -> bool:
    """Whether `ts` is a time a datetime can hold (from 1970 to 9999)."""
    return 0 <= ts.seconds <= MAX_SECONDS and 0 <= ts.nanos < 1_000_000_000


def from_timestamp(ts: Timestamp) -> datetime:
    return EPOCH + timedelta(0, ts.seconds, ts.nanos // 1000)  # positional: a third faster


# How SQLAlchemy's DateTime stores a (naive UTC) time on SQLite: "YYYY-MM-DD HH:MM:SS.ffffff".
# Code that reads or writes such columns in plain SQL uses the two below, so that its values
# compare and sort with SQLAlchemy's.


def sqlite_text(value: datetime) -> str:
    """An aware time as SQLAlchemy stores it in a SQLite DateTime column."""
    # isoformat is twice as fast as strftime, and pads years below 1000 as SQLAlchemy does.
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]


def sqlite_time(value: str | None) -> datetime | None:
    """A SQLite DateTime column's text as an aware UTC time (None stays None)."""
    # Parsing with the offset appended is several times faster than parse-then-replace.
    return None if value is None else datetime.fromisoformat(value + "+00:00")
