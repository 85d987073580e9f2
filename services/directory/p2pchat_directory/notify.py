"""Waking the Collect streams of this replica when envelopes arrive for their recipient.

- `Wakeups`: the waiting streams by recipient, on the event loop. A Deposit through this replica
  wakes the recipient's streams after it commits.
- `PostgresListener`: on PostgreSQL, one thread per replica with its own connection doing
  `LISTEN p2pchat_mailbox`; every Deposit, through any replica, sends `pg_notify` with the
  recipient in its transaction, so each replica learns of it at commit and wakes its streams.
  The connection is re-made with backoff when it drops, and then every stream is woken
  (notifications sent meanwhile are lost). No listener on SQLite: one file, one replica.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from sqlalchemy import Engine

from p2pchat_directory.mailbox_store import CHANNEL

log = logging.getLogger(__name__)

APPLICATION_NAME = "p2pchat-directory mailbox listener"  # as pg_stat_activity shows it
POLL = 0.25  # seconds between checks for a stop: how long stopping the listener may take
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
_CONNECT = {
    "autocommit": True,
    "connect_timeout": 5,
    "application_name": APPLICATION_NAME,
    # A connection that dies silently (a partition, a failover) is noticed in about 25 s.
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


class Wakeups:
    """The Collect streams waiting on this replica, by recipient. Event loop only."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self.closed = False

    @contextmanager
    def subscribe(self, recipient: str) -> Iterator[asyncio.Event]:
        """An event set whenever envelopes may have arrived for `recipient` (and on close)."""
        event = asyncio.Event()
        self._waiting.setdefault(recipient, set()).add(event)
        try:
            yield event
        finally:
            events = self._waiting.get(recipient)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[recipient]

    def wake(self, recipient: str) -> None:
        for event in self._waiting.get(recipient, ()):
            event.set()

    def wake_all(self) -> None:
        for events in self._waiting.values():
            for event in events:
                event.set()

    def close(self) -> None:
        """Wakes every stream for the last time: they see `closed` and end."""
        self.closed = True
        self.wake_all()

    def __len__(self) -> int:
        return sum(len(events) for events in self._waiting.values())


def conninfo(engine: Engine) -> str:
    """A libpq connection string for psycopg from the engine's SQLAlchemy URL."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresListener:
    """LISTEN on CHANNEL in a thread of its own; each notification's payload (a recipient) goes
    to `on_notify`, and `on_reconnect` is called after every (re)connection. Both are called
    in the listener's thread: hand them to the loop (loop.call_soon_threadsafe)."""

    def __init__(
        self, dsn: str, on_notify: Callable[[str], object], on_reconnect: Callable[[], object]
    ) -> None:
        self._dsn = dsn
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailbox-listener", daemon=True)
        self.backend_pid = 0  # of the current LISTEN connection (0: none)

    def start(self, timeout: float) -> bool:
        """Starts the thread; whether it is listening within `timeout` seconds (if not, it keeps
        trying in the background)."""
        self._thread.start()
        return self._listening.wait(timeout)

    def stop(self) -> None:
        """Stops the thread and closes its connection (within about POLL seconds)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def _run(self) -> None:
        delay = BACKOFF_MIN
        while not self._stopping.is_set():
            try:
                self._listen()
                delay = BACKOFF_MIN
            except Exception as exc:  # psycopg.Error mostly; never let the thread die
                self._listening.clear()
                self.backend_pid = 0
                if self._stopping.is_set():
                    break
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                log.warning(
                    "mailbox listener: PostgreSQL connection lost (%s); retrying in %.1f s",
                    reason,
                    delay,
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _listen(self) -> None:
        with psycopg.connect(self._dsn, **_CONNECT) as conn:  # type: ignore[arg-type]
            conn.execute(f"LISTEN {CHANNEL}")
            self.backend_pid = conn.info.backend_pid
            self._listening.set()
            log.info("mailbox listener: listening on %s", CHANNEL)
            self._on_reconnect()  # whatever was sent while not listening is lost: wake all
            while not self._stopping.is_set():
                for notification in conn.notifies(timeout=POLL):
                    if notification.payload:
                        self._on_notify(notification.payload)
        self._listening.clear()
        self.backend_pid = 0
