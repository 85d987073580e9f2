"""Plain DB-API connections kept open, one per thread (sqlite3; psycopg for the directory on
PostgreSQL): the hot paths of both services use them instead of an SQLAlchemy checkout and
statement, which cost several times a short query."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


class ConnectionsClosed(RuntimeError):
    """`use()` after `close()`: the database was closed under a caller (e.g. at logout)."""


@dataclass
class _Slot(Generic[C]):
    conn: C
    lock: threading.RLock = field(default_factory=threading.RLock)


class ThreadConnections(Generic[C]):
    """One connection per thread to one database, opened by `connect` on first use and kept
    open. `use()` holds the connection's lock while the caller works with it and `close()`
    takes each lock before closing, so no connection is ever closed under a running statement,
    another thread's included; after `close()`, `use()` raises ConnectionsClosed."""

    def __init__(self, connect: Callable[[], C], what: str) -> None:
        self._connect = connect
        self._what = what
        self._local = threading.local()
        self._lock = threading.Lock()
        self._slots: list[_Slot[C]] = []
        self._closed = False

    @contextmanager
    def use(self) -> Iterator[C]:
        """This thread's connection, for the duration of the block."""
        slot: _Slot[C] | None = getattr(self._local, "slot", None)
        if slot is None:
            with self._lock:
                self._check_open()
                slot = _Slot(self._connect())
                self._slots.append(slot)
            self._local.slot = slot
        with slot.lock:
            self._check_open()
            yield slot.conn

    def discard(self) -> None:
        """Closes this thread's connection (one that broke): the next `use()` opens another."""
        slot: _Slot[C] | None = getattr(self._local, "slot", None)
        if slot is None:
            return
        self._local.slot = None
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)
        with slot.lock:
            slot.conn.close()

    def close(self) -> None:
        """Closes every connection, waiting for statements running on them to end."""
        with self._lock:
            self._closed = True
            slots, self._slots = self._slots, []
        for slot in slots:
            with slot.lock:
                slot.conn.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionsClosed(f"{self._what} is closed")
