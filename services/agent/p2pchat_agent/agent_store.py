"""The agent's message store as one async object that owns its concurrency.

`AgentStore` wraps the blocking `MessageStore` (`<username>.db`) for the event loop: writes go to
one writer thread, reads go to a few reader threads, and two background loops keep the
database in shape off the commit path: WAL checkpoints and full-text indexing. A small write
with nothing queued for the writer commits on the event loop's own thread instead (see
INLINE_ROWS): the shortest path for one message, while bursts still group-commit in the
writer. Open it with `await AgentStore.open(path)`, close it with `await store.close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar, TypeVarTuple

from p2pchat_agent import store_deliveries
from p2pchat_agent.messages import IncomingMessage, OutgoingMessage, PeerKey, StoredMessage
from p2pchat_agent.store import MessageStore, fts_query
from p2pchat_common.errors import FailedPrecondition
from p2pchat_common.sqlite import ConnectionsClosed
from p2pchat_common.timestamps import sqlite_text, sqlite_time

log = logging.getLogger(__name__)

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

READERS = 4  # reader threads
CHECKPOINT_INTERVAL = 1.0  # seconds
INDEX_INTERVAL = 0.5  # seconds between rounds of full-text indexing
# The indexer waits for a lull: while messages are committed it skips rounds (a flood of
# deliveries goes first), but never lets the index fall more than INDEX_MAX_LAG seconds behind.
INDEX_IDLE = 0.25
INDEX_MAX_LAG = 5.0
# Messages indexed per write: ~2.5 ms of the writer thread, so commits on the delivery path never
# wait behind the indexer for longer than that.
INDEX_BATCH = 256
# A delivery write of at most this many rows, with no write queued or running in the writer
# thread, commits on the event loop's thread: ~30-50 us of SQLite (WAL, synchronous=NORMAL: no
# fsync), where handing it to the writer and back costs about as much again in latency. With
# the writer idle there is nothing to wait behind, and the order of writes is kept: one runs
# inline only when none is queued.
INLINE_ROWS = 8


class StoreClosed(FailedPrecondition, RuntimeError):
    """The store was closed (its user logged out) before or while a call ran: the caller sees
    FAILED_PRECONDITION "not logged in", never an INTERNAL error."""

    def __init__(self) -> None:
        super().__init__("not logged in: the session ended and its message store is closed")


@dataclass(frozen=True)
class StoreTiming:
    """How many readers, and the pace of the background work (tests make it faster)."""

    readers: int = READERS
    checkpoint_interval: float = CHECKPOINT_INTERVAL
    index_interval: float = INDEX_INTERVAL
    index_idle: float = INDEX_IDLE
    index_max_lag: float = INDEX_MAX_LAG
    index_batch: int = INDEX_BATCH


class AgentStore:
    """One user's `<username>.db` for async callers. Bound to the event loop that opened it."""

    def __init__(
        self, store: MessageStore, writer: ThreadPoolExecutor, timing: StoreTiming = StoreTiming()
    ) -> None:
        """Use `open`; `store` is open and `writer` the one thread it was opened in."""
        self._sync = store
        # All writes to <username>.db go through one thread: SQLite has one writer anyway, and
        # queueing here is cheaper than its busy-wait between competing connections.
        self._writer = writer
        self._readers = ThreadPoolExecutor(timing.readers, thread_name_prefix="agent-read")
        self._timing = timing
        self._loop = asyncio.get_running_loop()
        self._last_write = self._loop.time()  # loop time of the latest write other than indexing
        self._last_index = 0.0  # loop time of the latest write of the indexer
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._queued = 0  # writes handed to the writer thread and not yet done

    @classmethod
    async def open(cls, path: Path, timing: StoreTiming = StoreTiming()) -> AgentStore:
        """Opens (creating or migrating, see MessageStore.open) the database in the writer
        thread and starts the background checkpoints and indexing."""
        writer = ThreadPoolExecutor(1, thread_name_prefix="agent-write")
        try:
            store = await asyncio.get_running_loop().run_in_executor(
                writer, MessageStore.open, path
            )
        except BaseException:
            writer.shutdown(wait=False)
            raise
        opened = cls(store, writer, timing)
        opened._start()
        return opened

    def _start(self) -> None:
        create = self._loop.create_task
        self._tasks.append(create(self._checkpoints(), name="checkpoints"))
        self._tasks.append(create(self._indexing(), name="indexing"))

    async def close(self) -> None:
        """Stops the background loops, lets the writes already queued finish, closes every
        connection and the threads. Any use after raises StoreClosed; closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            # In the writer thread, after every write queued before: none is cut short.
            await self._loop.run_in_executor(self._writer, self._sync.close)
        finally:
            # The connections are closed (their statements ended): the threads end at once.
            await asyncio.to_thread(self._shutdown_threads)

    def _shutdown_threads(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)

    @property
    def sync(self) -> MessageStore:
        """The blocking store underneath: use it through `read` and `write` (or directly only
        where no other thread can be using it, as tests do)."""
        return self._sync

    # -- running blocking calls -------------------------------------------------------------

    async def _reading(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        if self._closed:
            raise StoreClosed()
        try:
            return await self._loop.run_in_executor(self._readers, fn, *args)
        except ConnectionsClosed as exc:  # closed while it was queued
            raise StoreClosed() from exc

    async def _writing(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        if self._closed:
            raise StoreClosed()
        self._last_write = self._loop.time()
        try:
            return await self._on_writer(fn, *args)
        except ConnectionsClosed as exc:
            raise StoreClosed() from exc

    def _on_writer(self, fn: Callable[[*Ts], T], *args: *Ts) -> asyncio.Future[T]:
        self._queued += 1
        job = self._writer.submit(fn, *args)
        # Counted down when the job has run (or was dropped unstarted), not when an awaiting
        # caller is cancelled: until then an inline write would wait for its lock.
        job.add_done_callback(self._job_done)
        return asyncio.wrap_future(job, loop=self._loop)

    def _job_done(self, _: object) -> None:  # in the writer thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: nothing left to count for
            self._loop.call_soon_threadsafe(self._written)

    def _written(self) -> None:
        self._queued -= 1

    async def _small_write(self, rows: int, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """`fn(*args)` inline when it is small and the writer is idle (INLINE_ROWS), else in
        the writer thread after what is queued."""
        if rows > INLINE_ROWS or self._queued or self._closed:
            return await self._writing(fn, *args)
        self._last_write = self._loop.time()
        return fn(*args)

    async def read(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """Runs any blocking read of `sync` in a reader thread (what the methods below do)."""
        return await self._reading(fn, *args)

    async def write(self, fn: Callable[[*Ts], T], *args: *Ts) -> T:
        """Runs any blocking write of `sync` in the writer thread, after those queued."""
        return await self._writing(fn, *args)

    # -- messages ---------------------------------------------------------------------------

    async def add_outgoing_many(self, messages: Sequence[OutgoingMessage]) -> list[StoredMessage]:
        """See MessageStore.add_outgoing_many (one transaction: group commit)."""
        return await self._small_write(len(messages), self._sync.add_outgoing_many, messages)

    async def store_incoming(
        self, messages: Sequence[IncomingMessage], received_at: datetime
    ) -> list[StoredMessage]:
        """See MessageStore.store_incoming (idempotent, one transaction)."""
        return await self._small_write(
            len(messages), self._sync.store_incoming, messages, received_at
        )

    async def mark_delivered(
        self, peer: str, ids: Sequence[str], delivered_at: datetime, device: str = ""
    ) -> list[str]:
        return await self._small_write(
            len(ids), self._sync.mark_delivered, peer, ids, delivered_at, device
        )

    async def pending_for(
        self,
        peer: str,
        after_seq: int = 0,
        limit: int = 500,
        device: str = "",
        unrelayed: bool = False,
    ) -> list[StoredMessage]:
        return await self._reading(
            self._sync.pending_for, peer, after_seq, limit, device, unrelayed
        )

    # -- the mailbox's part (store_deliveries.py) -------------------------------------------------

    async def mark_relayed(self, peer: str, ids: Sequence[str], until: datetime) -> list[str]:
        when = sqlite_text(until)
        return await self._writing(
            self._sync.in_transaction, True, store_deliveries.mark_relayed, peer, ids, when
        )

    async def hold_back(self, peer: str, ids: Sequence[str], reason: str) -> None:
        await self._writing(
            self._sync.in_transaction, True, store_deliveries.hold_back, peer, ids, reason
        )

    async def unrelay_expired(self, now: datetime, reason: str) -> list[str]:
        return await self._writing(
            self._sync.in_transaction,
            True,
            store_deliveries.unrelay_expired,
            sqlite_text(now),
            reason,
        )

    async def next_relay_expiry(self) -> datetime | None:
        found = await self._reading(self._sync.in_transaction, False, store_deliveries.next_expiry)
        return sqlite_time(found)

    async def counts(self) -> tuple[int, int, int]:
        """Outgoing messages pending, relayed and delivered."""
        return await self._reading(self._sync.in_transaction, False, store_deliveries.counts)

    async def peers_with_pending(self) -> list[str]:
        return await self._reading(self._sync.peers_with_pending)

    async def count_pending(self) -> int:
        return await self._reading(self._sync.count_pending)

    async def history(
        self, peer: str, limit: int = 50, before_id: str | None = None, query: str | None = None
    ) -> tuple[list[StoredMessage], bool]:
        """See MessageStore.history. A search sees every message committed before it: the index
        catches up first, in the writer thread, and the search runs in a reader thread."""
        if fts_query(query) is not None:
            await self._index_all()
        return await self._reading(self._sync.history, peer, limit, before_id, query, False)

    # -- pinned keys ------------------------------------------------------------------------

    async def get_pin(self, peer: str) -> PeerKey | None:
        return await self._reading(self._sync.get_pin, peer)

    async def pin(self, peer: str, sha256: str, at: datetime) -> PeerKey:
        return await self._writing(self._sync.pin, peer, sha256, at)

    async def record_key_change(self, peer: str, presented_sha256: str, at: datetime) -> PeerKey:
        return await self._writing(self._sync.record_key_change, peer, presented_sha256, at)

    # -- background upkeep, off the commit path ---------------------------------------------

    async def _checkpoints(self) -> None:
        """Background WAL checkpoints, off the commit path (see schema.AUTOCHECKPOINT_PAGES);
        a round with nothing written since the last one is skipped."""
        loop = self._loop
        checkpointed_at = loop.time()
        while True:
            await asyncio.sleep(self._timing.checkpoint_interval)
            if max(self._last_write, self._last_index) < checkpointed_at:
                continue
            checkpointed_at = loop.time()
            try:
                await self._reading(self._sync.checkpoint)
            except Exception:  # a busy database: the next round will do
                log.debug("checkpoint skipped", exc_info=True)

    async def _indexing(self) -> None:
        """Background full-text indexing of new messages, off the commit path (schema v2), in
        the lulls between commits (at least every index_max_lag seconds); a round with nothing
        written since the last one is skipped."""
        loop, timing = self._loop, self._timing
        indexed_at = -timing.index_max_lag  # the first round indexes what an earlier run left
        while True:
            await asyncio.sleep(timing.index_interval)
            now = loop.time()
            if self._last_write < indexed_at:
                continue
            busy = now - self._last_write < timing.index_idle
            if busy and now - indexed_at < timing.index_max_lag:
                continue
            try:
                await self._index_all()
                indexed_at = now
            except Exception:  # a busy database: the next round will do
                log.debug("indexing skipped", exc_info=True)

    async def _index_all(self) -> None:
        """Indexes every message committed so far, one bounded batch per write, so that
        deliveries queued for the writer meanwhile go in between."""
        loop, batch = self._loop, self._timing.index_batch
        while True:
            if self._closed:
                raise StoreClosed()
            done = await self._on_writer(self._sync.index_pending, batch)
            if done:
                self._last_index = loop.time()
            if done < batch:
                return
