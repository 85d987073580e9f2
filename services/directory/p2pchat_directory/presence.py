"""Presence streams: an agent is online while its Presence stream beats, and no beat costs a
database write (issue 15). Event loop only; the statements are in presence_store.

Per replica, `PresenceHub` holds one `Attendance` per open stream, in memory: the session's
token hash, owner and expiry, the last beat, when the owner's contacts last changed. Every
`interval` (a third of the presence TTL) one round goes over every stream, a slice of
TICK_SLICE streams at a time, the slices spread evenly over the interval (all of them back to
back, 2,000 streams took 100-350 ms of database and CPU at once every 10 s, and every call
waited behind them: p99 up to 110 ms while passwords were being hashed); for each slice:
- writes the lease of every stream that beat since the last tick (online until its last beat
  plus the TTL) in one statement;
- extends, in one statement, the sessions past half their lifetime (a session is not written
  at every beat: seven days of sliding expiry need a write every few days, not every 10 s);
- reads, in one statement each, which sessions still live and when contacts changed: a stream
  whose session was revoked (a logout, a login with a new key, through any replica) or expired
  ends with UNAUTHENTICATED, and each answer carries the latest contacts_changed_at.
So a replica with 10,000 streams runs at most 160 statements per interval (10 s), 16 a second,
where unary heartbeats cost 1,000 writes a second.
A stream that ends (client gone, network cut, replica stopping) is simply no longer renewed:
its user is offline within the TTL of its last beat, unless it opens a stream again anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from p2pchat_common.errors import DomainError, Unauthenticated, Unavailable
from p2pchat_directory import presence_store as store
from p2pchat_directory.db import Databases
from p2pchat_directory.service import HeartbeatResult
from p2pchat_directory.tokens import SESSION_ENDED, checked_token_hash
from p2pchat_directory.workers import Workers

log = logging.getLogger(__name__)

SLOW_TICK = 0.05  # s: a tick that takes longer is logged
# Streams per set of statements: each set holds the GIL for a few ms of its arrays and rows (at
# 5,000 streams in one set, ~60 ms of CPU: every call waited behind it, p99 ~250 ms), and the
# loop serves calls in between; the sets of a round are spread over its interval.
TICK_SLICE = 250
OPEN_BATCH = 500  # streams opened by one set of statements at most
_REVOKED = Unauthenticated(SESSION_ENDED)
_STOPPING = Unavailable("the directory is shutting down: open the presence stream again")


@dataclass(eq=False)
class Attendance:
    """One open Presence stream."""

    username: str
    token_hash: str
    session_expires_at: datetime
    last_beat: datetime
    contacts_changed_at: datetime | None
    leased_beat: datetime  # the beat whose lease is in the database
    polled_changed_at: datetime | None = None  # contacts_changed_at as last read
    # What the stream waits on: a beat (None), the client's end (_CLIENT_DONE), or the error
    # that ends the stream.
    inbox: asyncio.Queue[DomainError | None] = field(default_factory=asyncio.Queue)

    def end(self, error: DomainError) -> None:
        self.inbox.put_nowait(error)


_CLIENT_DONE = Unavailable("the client closed the presence stream")  # ends it quietly


class PresenceHub:
    def __init__(
        self,
        dbs: Databases,
        workers: Workers,
        presence_ttl: timedelta,
        session_ttl: timedelta,
        clock: Callable[[], datetime],
    ) -> None:
        self._dbs = dbs
        self._workers = workers
        self._ttl = presence_ttl
        self._session_ttl = session_ttl
        self._now = clock
        self.interval = presence_ttl.total_seconds() / 3
        self._streams: dict[str, Attendance] = {}  # by token hash
        self._of_user: dict[str, set[Attendance]] = {}  # the same streams, by username
        self._ticker: asyncio.Task[None] | None = None
        # Streams waiting to be opened (by token hash), and the task that opens them together.
        self._opening: dict[str, list[asyncio.Future[store.Opened]]] = {}
        self._opener: asyncio.Task[None] | None = None
        self.closed = False
        self.ticks = 0

    def __len__(self) -> int:
        return len(self._streams)

    async def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever(), name="presence")

    async def close(self) -> None:
        """Ends every stream with UNAVAILABLE (the agents open one again, elsewhere) and stops
        ticking. The leases already written run out within the TTL unless renewed elsewhere."""
        self.closed = True
        for attendance in list(self._streams.values()):
            attendance.end(_STOPPING)
        if self._opener is not None:
            self._opener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._opener
            self._opener = None
        self._settle(self._opening, {}, _STOPPING)
        self._opening.clear()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    # -- one stream ------------------------------------------------------------------------

    async def attend(
        self, token: str, beats: AsyncIterator[object]
    ) -> AsyncIterator[HeartbeatResult]:
        """Answers each beat of one stream; ends with UNAUTHENTICATED once the session is gone,
        UNAVAILABLE when the replica stops, quietly when the client closes its side."""
        if self.closed:
            raise _STOPPING
        token_hash = checked_token_hash(token)
        attendance: Attendance | None = None
        reader: asyncio.Task[None] | None = None
        try:
            async for _ in beats:  # the first beat opens the stream
                now = self._now()
                opened = await self._open(token_hash)
                attendance = Attendance(
                    opened.username,
                    token_hash,
                    opened.session_expires_at,
                    now,
                    opened.contacts_changed_at,
                    now,
                    opened.contacts_changed_at,
                )
                replaced = self._streams.get(token_hash)
                if replaced is not None:  # the same session opened a second stream: keep one
                    replaced.end(Unavailable("another presence stream of this session opened"))
                self._streams[token_hash] = attendance
                self._of_user.setdefault(attendance.username, set()).add(attendance)
                yield self._answer(attendance, now)
                break
            else:
                return
            reader = asyncio.get_running_loop().create_task(self._read(beats, attendance))
            while True:
                error = await attendance.inbox.get()
                if error is _CLIENT_DONE:
                    return
                if error is not None:
                    raise error
                now = self._now()
                attendance.last_beat = now
                if attendance.leased_beat + self._ttl < now + timedelta(seconds=self.interval):
                    # A beat after a long silence: the lease written runs out before the next
                    # tick would renew it; this one is written now (a regular agent never is).
                    await self._lease_now(attendance, now)
                yield self._answer(attendance, now)
        finally:
            if reader is not None:
                reader.cancel()
            if attendance is not None:
                self._forget(attendance)

    async def _open(self, token_hash: str) -> store.Opened:
        """Opens one stream together with every other one waiting: a replica restarting, or a
        network coming back, has thousands of agents open their streams at once, and one
        transaction each (~4 ms of CPU under load) held the event loop up for seconds."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[store.Opened] = loop.create_future()
        self._opening.setdefault(token_hash, []).append(waiter)
        if self._opener is None or self._opener.done():
            self._opener = loop.create_task(self._open_waiting(), name="presence-open")
        return await waiter

    async def _open_waiting(self) -> None:
        """Opens the waiting streams, OPEN_BATCH at a time, until none waits; the streams that
        ask meanwhile join the next batch."""
        while self._opening:
            await asyncio.sleep(0)  # the calls already woken join this batch
            batch = dict(itertools.islice(self._opening.items(), OPEN_BATCH))
            for token_hash in batch:
                del self._opening[token_hash]
            try:
                opened = await self._workers.run(
                    store.open_streams, self._dbs, list(batch), self._now(), self._ttl
                )
            except asyncio.CancelledError:  # the replica is stopping (close)
                self._settle(batch, {}, _STOPPING)
                raise
            except Exception as exc:  # each waiting call fails with it, as alone it would
                self._settle(batch, {}, exc)
                continue
            self._settle(batch, opened, _REVOKED)

    @staticmethod
    def _settle(
        batch: dict[str, list[asyncio.Future[store.Opened]]],
        opened: dict[str, store.Opened],
        missing: BaseException,
    ) -> None:
        for token_hash, waiters in batch.items():
            found = opened.get(token_hash)
            for waiter in waiters:
                if waiter.done():  # its call was cancelled meanwhile
                    continue
                if found is None:
                    waiter.set_exception(missing)
                else:
                    waiter.set_result(found)

    def _forget(self, attendance: Attendance) -> None:
        """A stream that ended: no longer renewed nor told of changes."""
        if self._streams.get(attendance.token_hash) is attendance:
            del self._streams[attendance.token_hash]
        mine = self._of_user.get(attendance.username)
        if mine is not None:
            mine.discard(attendance)
            if not mine:
                del self._of_user[attendance.username]

    async def _lease_now(self, attendance: Attendance, now: datetime) -> None:
        lease = store.Lease(attendance.username, attendance.token_hash, now)
        await self._workers.run(store.renew, self._dbs, [lease], self._ttl, now)
        attendance.leased_beat = max(attendance.leased_beat, now)

    @staticmethod
    async def _read(beats: AsyncIterator[object], attendance: Attendance) -> None:
        """Beats into the attendance's inbox; the client's end of the stream ends it too."""
        try:
            async for _ in beats:
                attendance.inbox.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception:  # the call broke: nothing more will come
            pass
        attendance.end(_CLIENT_DONE)

    def _answer(self, attendance: Attendance, now: datetime) -> HeartbeatResult:
        return HeartbeatResult(
            attendance.session_expires_at, now + self._ttl, now, attendance.contacts_changed_at
        )

    # -- what other calls tell the hub -------------------------------------------------------

    def revoke(self, token_hash: str) -> None:
        """The session ended through this replica (a logout): its stream ends now."""
        attendance = self._streams.get(token_hash)
        if attendance is not None:
            attendance.end(_REVOKED)

    def contacts_changed(self, token_hash: str, other: str) -> None:
        """The caller of this session changed its contacts with `other` through this replica:
        both sides' next answers say so, without waiting for a tick. The value only has to
        differ from the last one (agents refresh when it moves), so it is this replica's now."""
        now = self._now()
        caller = self._streams.get(token_hash)
        if caller is not None:
            caller.contacts_changed_at = now
        for attendance in self._of_user.get(other, ()):
            attendance.contacts_changed_at = now

    # -- every interval ------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self.tick(spread=self.interval)
            # The next round an interval after this one began (at once if it took longer).
            await asyncio.sleep(max(0.0, began + self.interval - loop.time()))

    async def tick(self, spread: float = 0.0) -> None:
        """One round: renews leases and due sessions, then ends the streams of dead sessions
        and notes contact changes, at most four statements per TICK_SLICE streams; the slices
        start `spread` / their number apart (0: back to back). A slice that fails is logged
        and retried at the next round; one that takes longer than SLOW_TICK is logged."""
        self.ticks += 1
        loop = asyncio.get_running_loop()
        began = loop.time()
        streams = list(self._streams.values())
        slices = [streams[i : i + TICK_SLICE] for i in range(0, len(streams), TICK_SLICE)]
        for number, part in enumerate(slices):
            delay = began + spread * number / len(slices) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            live = [a for a in part if self._streams.get(a.token_hash) is a]  # not gone since
            started = time.perf_counter()
            try:
                await self._tick_slice(live)
            except Exception as exc:
                log.warning("presence renewal failed (will retry): %s", exc)
            took = time.perf_counter() - started
            if took > SLOW_TICK:
                log.info("presence: a slice of %d streams took %.0f ms", len(live), took * 1000)

    async def _tick_slice(self, streams: list[Attendance]) -> None:
        if not streams:
            return
        now = self._now()
        fresh = [a for a in streams if a.last_beat > a.leased_beat]
        leases = [store.Lease(a.username, a.token_hash, a.last_beat) for a in fresh]
        await self._workers.run(store.renew, self._dbs, leases, self._ttl, now)
        for attendance, lease in zip(fresh, leases, strict=True):
            attendance.leased_beat = lease.beat
        due = [a for a in streams if a.session_expires_at - now < self._session_ttl / 2]
        if due:
            expires = now + self._session_ttl
            await self._workers.run(  # the poll below reads the new expiry
                store.extend_sessions, self._dbs, [a.token_hash for a in due], expires, now
            )
        polled = await self._workers.run(
            store.poll,
            self._dbs,
            [a.token_hash for a in streams],
            sorted({a.username for a in streams}),
            now,
        )
        for attendance in streams:
            expires_at = polled.sessions.get(attendance.token_hash)
            if expires_at is None:
                attendance.end(_REVOKED)
                continue
            attendance.session_expires_at = expires_at
            # Compared with the last value read, not with the one reported: another replica's
            # clock may be behind this one's (contacts_changed above).
            changed = polled.contacts_changed.get(attendance.username)
            if changed != attendance.polled_changed_at:
                attendance.polled_changed_at = changed
                attendance.contacts_changed_at = changed
