"""Column types shared by the services' databases."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# How SQLAlchemy's DateTime stores a (naive UTC) time on SQLite; code that reads or writes those
# columns in plain SQL uses these two so that its values compare and sort with SQLAlchemy's.
_SQLITE_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def sqlite_text(value: datetime) -> str:
    """An aware time as SQLAlchemy stores it in a SQLite DateTime column."""
    return value.astimezone(UTC).strftime(_SQLITE_FORMAT)


def sqlite_time(value: str | None) -> datetime | None:
    """A SQLite DateTime column's text as an aware UTC time (None stays None)."""
    # Parsing with the offset appended is several times faster than parse-then-replace.
    return None if value is None else datetime.fromisoformat(value + "+00:00")


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC: the same on SQLite (no time zones) and PostgreSQL."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)
