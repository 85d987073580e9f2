"""The mailbox on the event loop: what the servicer calls. It runs the blocking use cases
(mailbox.MailboxService) in the server's threads, streams Collect (the backlog, then each new
envelope as a Deposit through any replica wakes it), and sweeps expired envelopes.

A Collect stream holds no thread while it waits: it awaits its recipient's wake-up
(notify.Wakeups), or SAFETY_NET seconds at most, then reads what came after the last id it sent.
It ends with UNAVAILABLE when the server stops, with UNAUTHENTICATED when its session ended
(checked at each wake-up), and when the client cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from sqlalchemy import Engine

from p2pchat_common.errors import Unavailable
from p2pchat_directory.mailbox import Deposited, HeldEnvelope, MailboxService
from p2pchat_directory.notify import PostgresListener, Wakeups, conninfo
from p2pchat_directory.workers import Workers

log = logging.getLogger(__name__)

SAFETY_NET = 30.0  # seconds a stream waits at most without a wake-up before reading anyway
LISTEN_TIMEOUT = 10.0  # seconds start() waits for the PostgreSQL listener

Batch = tuple[list[HeldEnvelope], bool]  # envelopes, and whether this ends the backlog


class MailboxRelay:
    def __init__(
        self,
        service: MailboxService,
        workers: Workers,
        listener_dsn: str | None,
    ) -> None:
        self._svc = service
        self._workers = workers
        self.wakeups = Wakeups()
        self.listener: PostgresListener | None = None
        self._listener_dsn = listener_dsn
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    def for_engine(
        cls,
        service: MailboxService,
        workers: Workers,
        engine: Engine,
    ) -> MailboxRelay:
        """A relay that listens on PostgreSQL when `engine` is PostgreSQL."""
        dsn = conninfo(engine) if engine.dialect.name == "postgresql" else None
        return cls(service, workers, dsn)

    async def start(self) -> None:
        """Starts the sweeper and, on PostgreSQL, the listener (waiting for it to listen)."""
        loop = asyncio.get_running_loop()
        if self._listener_dsn is not None:
            wakeups = self.wakeups
            self.listener = PostgresListener(
                self._listener_dsn,
                lambda name: loop.call_soon_threadsafe(wakeups.wake, name),
                lambda: loop.call_soon_threadsafe(wakeups.wake_all),
            )
            if not await asyncio.to_thread(self.listener.start, LISTEN_TIMEOUT):
                log.warning(
                    "mailbox listener not listening after %.0f s: envelopes deposited through "
                    "other replicas reach streams here late until it is",
                    LISTEN_TIMEOUT,
                )
        self._sweeper = loop.create_task(self._sweep_forever(), name="mailbox-sweeper")

    async def close(self) -> None:
        """Ends every Collect stream (UNAVAILABLE), stops the sweeper and the listener."""
        self.wakeups.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self.listener is not None:
            await asyncio.to_thread(self.listener.stop)
            self.listener = None

    async def publish_key(self, token: str, key: bytes, signature: bytes) -> None:
        await self._workers.run(self._svc.publish_key, token, key, signature)

    async def deposit(self, token: str, recipient: str, envelopes: Sequence[bytes]) -> Deposited:
        deposited = await self._workers.run(self._svc.deposit, token, recipient, envelopes)
        self.wakeups.wake(deposited.recipient)  # this replica's streams; others by NOTIFY
        return deposited

    async def acknowledge(self, token: str, ids: Sequence[int]) -> int:
        return await self._workers.run(self._svc.acknowledge, token, ids)

    async def collect(self, token: str) -> AsyncIterator[Batch]:
        """The backlog in pages (the last with True, also when empty), then new envelopes."""
        self._check_open()
        name = await self._workers.read(self._svc.authenticate, token)
        # Subscribed before the first read: nothing committed after it goes unnoticed.
        with self.wakeups.subscribe(name) as woken:
            after = 0
            while True:
                page = await self._workers.run(self._svc.page, name, after)
                after = page.last_id
                if not page.more:
                    yield page.envelopes, True
                    break
                if page.envelopes:
                    yield page.envelopes, False
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), SAFETY_NET)
                self._check_open()
                woken.clear()  # before reading: a deposit committed from now on sets it again
                await self._workers.read(self._svc.authenticate, token)  # the session still lives
                more = True
                while more:
                    page = await self._workers.run(self._svc.page, name, after)
                    after, more = page.last_id, page.more
                    if page.envelopes:
                        yield page.envelopes, False

    def _check_open(self) -> None:
        if self.wakeups.closed:
            raise Unavailable("the directory is shutting down: collect again in a moment")

    async def _sweep_forever(self) -> None:
        every = self._svc.sweep_interval
        while True:
            await asyncio.sleep(every)
            try:
                swept = await self._workers.run(self._svc.sweep)
            except Exception as exc:
                log.warning("mailbox sweep failed (will retry): %s", exc)
                continue
            if swept:
                log.info("deleted %d expired mailbox envelope(s)", swept)
