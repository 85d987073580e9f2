"""AgentStore, the async face of the message store: every write on one thread and one at a time,
reads on reader threads, a search that sees every commit, background checkpoints and indexing
that run (in lulls, skipping idle rounds) and stop on close, and a close that lets queued writes
finish. Each test runs its own event loop (asyncio.run)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from p2pchat_agent.agent_store import AgentStore, StoreClosed, StoreTiming
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.messages import IncomingMessage, OutgoingMessage, StoredMessage
from p2pchat_agent.store import MessageStore
from p2pchat_common.errors import FailedPrecondition

T = TypeVar("T")
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
NEVER = 3600.0  # an interval no test waits for

WRITES = ("add_outgoing_many", "store_incoming", "mark_delivered", "pin", "record_key_change")
READS = ("pending_for", "peers_with_pending", "count_pending", "history", "get_pin")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def outgoing(body: str, to: str = "bob") -> OutgoingMessage:
    return OutgoingMessage(new_message_id(), "alice", to, body, T0)


def incoming(body: str, sender: str = "bob") -> IncomingMessage:
    return IncomingMessage(new_message_id(), sender, "alice", body, T0)


async def eventually(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Calls:
    """Wraps methods of a MessageStore to record the thread of each call and how many of the
    wrapped calls ever ran at once."""

    def __init__(self, store: MessageStore, names: tuple[str, ...], pause: float = 0.0) -> None:
        self.threads: list[str] = []
        self.counts = dict.fromkeys(names, 0)
        self.most_at_once = 0
        self._running = 0
        self._lock = threading.Lock()
        for name in names:
            setattr(store, name, self._wrap(name, getattr(store, name), pause))

    def _wrap(self, name: str, method: Callable[..., T], pause: float) -> Callable[..., T]:
        def wrapped(*args: Any) -> T:
            with self._lock:
                self._running += 1
                self.most_at_once = max(self.most_at_once, self._running)
                self.threads.append(threading.current_thread().name)
                self.counts[name] += 1
            try:
                time.sleep(pause)  # widens the window in which an overlap would show
                return method(*args)
            finally:
                with self._lock:
                    self._running -= 1

        return wrapped


async def open_store(path: Path, **intervals: Any) -> AgentStore:
    timing = {"checkpoint_interval": NEVER, "index_interval": NEVER, **intervals}
    return await AgentStore.open(path, StoreTiming(**timing))


def test_concurrent_writes_run_one_at_a_time_on_one_thread_and_reads_on_readers(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "alice.db")
        try:
            writes = Calls(store.sync, WRITES, pause=0.002)
            reads = Calls(store.sync, READS)
            first = await store.add_outgoing_many([outgoing("first")])
            await store.pin("bob", "a" * 64, T0)
            jobs: list[Awaitable[object]] = []
            for i in range(20):
                jobs.append(store.add_outgoing_many([outgoing(f"out {i}"), outgoing(f"more {i}")]))
                jobs.append(store.store_incoming([incoming(f"in {i}")], T0))
                jobs.append(store.mark_delivered("bob", [first[0].id], T0))
                jobs.append(store.record_key_change("bob", f"{i:064x}", T0))
                jobs.append(store.write(store.sync.pin, "carol", "c" * 64, T0))
                jobs.append(store.pending_for("bob"))
                jobs.append(store.count_pending())
                jobs.append(store.peers_with_pending())
                jobs.append(store.get_pin("bob"))
                jobs.append(store.history("bob", 10))
                jobs.append(store.read(store.sync.pending_for, "bob", 0, 5))
            await asyncio.gather(*jobs)
            assert writes.most_at_once == 1
            assert len(writes.threads) == 2 + 5 * 20
            # The writer thread, or the loop's own for a small write with the writer idle.
            writer = {name for name in writes.threads if name.startswith("agent-write")}
            assert len(writer) == 1
            assert set(writes.threads) <= writer | {threading.current_thread().name}
            assert len(reads.threads) == 6 * 20
            assert all(name.startswith("agent-read") for name in reads.threads)
            assert await store.count_pending() == 2 * 20  # the first one was delivered
        finally:
            await store.close()

    run(main())


def test_a_small_write_with_the_writer_idle_commits_inline_and_bursts_go_to_the_writer(
    tmp_path: Path,
) -> None:
    """The shortest path for one message: no thread hand-off when nothing is queued; group
    commit in the writer for a burst, and behind a queued write (order kept)."""

    async def main() -> None:
        store = await open_store(tmp_path / "alice.db")
        try:
            calls = Calls(store.sync, ("add_outgoing_many", "store_incoming", "mark_delivered"))
            loop_thread = threading.current_thread().name
            (one,) = await store.add_outgoing_many([outgoing("one")])
            await store.store_incoming([incoming("back")], T0)
            await store.mark_delivered("bob", [one.id], T0)
            assert calls.threads == [loop_thread] * 3

            await store.add_outgoing_many([outgoing(f"burst {i}") for i in range(100)])
            assert calls.threads[-1].startswith("agent-write")

            order: list[str] = []
            release = threading.Event()

            def slow() -> None:
                order.append("queued first")
                release.wait(5)

            queued = asyncio.ensure_future(store.write(slow))
            await asyncio.sleep(0.05)  # the writer is inside slow()
            behind = asyncio.ensure_future(store.add_outgoing_many([outgoing("behind")]))
            await asyncio.sleep(0.05)
            assert not behind.done()  # it waits behind the queued write, not beside it
            release.set()
            await queued
            (stored,) = await behind
            assert calls.threads[-1].startswith("agent-write")
            assert order == ["queued first"] and stored.seq > one.seq
        finally:
            await store.close()

    run(main())


def test_a_search_right_after_writes_sees_every_message_written_before_it(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        store = await open_store(tmp_path / "alice.db", index_batch=7)
        try:
            calls = Calls(store.sync, ("index_pending",))
            for i in range(30):
                await store.add_outgoing_many([outgoing(f"needle out {i}")])
                await store.store_incoming([incoming(f"needle in {i}"), incoming("hay")], T0)
            # Not indexed yet: the background indexer never ran.
            unindexed, _ = await store.read(store.sync.history, "bob", 100, None, "needle", False)
            assert unindexed == []
            found, has_more = await store.history("bob", 100, query="needle")
            assert len(found) == 60 and not has_more
            assert [m.body for m in found][:2] == ["needle out 0", "needle in 0"]
            assert calls.counts["index_pending"] == 90 // 7 + 1  # bounded batches, then done
            found, has_more = await store.history("bob", 10, query="needle")
            assert len(found) == 10 and has_more
            # A plain page does not index: the writer is left to the deliveries.
            rounds = calls.counts["index_pending"]
            await store.add_outgoing_many([outgoing("needle late")])
            page, _ = await store.history("bob", 5)
            assert page[-1].body == "needle late"
            assert calls.counts["index_pending"] == rounds
        finally:
            await store.close()

    run(main())


def test_checkpoints_and_indexing_run_in_the_background_skip_idle_rounds_and_stop_on_close(
    tmp_path: Path,
) -> None:
    async def searched(store: AgentStore, word: str) -> list[StoredMessage]:
        found, _ = await store.read(store.sync.history, "bob", 100, None, word, False)
        return found

    async def main() -> None:
        path = tmp_path / "alice.db"
        earlier = MessageStore.open(path)  # an earlier run left a message unindexed
        earlier.add_outgoing_many([outgoing("left behind")])
        earlier.close()
        store = await open_store(
            path, checkpoint_interval=0.01, index_interval=0.01, index_idle=0.0, index_max_lag=0.05
        )
        calls = Calls(store.sync, ("checkpoint", "index_pending"))
        try:
            left: list[StoredMessage] = []

            async def indexed(word: str) -> None:
                deadline = time.monotonic() + 10
                while not await searched(store, word):
                    assert time.monotonic() < deadline, f"{word!r} never indexed"
                    await asyncio.sleep(0.01)

            await indexed("left")  # the first round indexes what the earlier run left
            left = await searched(store, "left")
            assert [m.body for m in left] == ["left behind"]
            await store.add_outgoing_many([outgoing("fresh")])
            await indexed("fresh")
            await eventually(lambda: calls.counts["checkpoint"] >= 1)

            # Nothing written: after a round or two that catch up, every round is skipped.
            await asyncio.sleep(0.3)
            settled = dict(calls.counts)
            await asyncio.sleep(0.3)
            assert calls.counts == settled
            await store.store_incoming([incoming("again")], T0)
            await indexed("again")
            await eventually(lambda: calls.counts["checkpoint"] > settled["checkpoint"])
        finally:
            await store.close()
        # Closed: the loops have ended (no task is left but this one) and run no more rounds.
        assert asyncio.all_tasks() == {asyncio.current_task()}
        closed = dict(calls.counts)
        await asyncio.sleep(0.1)
        assert calls.counts == closed

    run(main())


def test_indexing_waits_for_a_lull_but_falls_at_most_the_max_lag_behind(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store(
            tmp_path / "alice.db", index_interval=0.01, index_idle=0.2, index_max_lag=0.5
        )
        calls = Calls(store.sync, ("index_pending",))
        try:
            await eventually(lambda: calls.counts["index_pending"] == 1)  # the first round
            deadline = time.monotonic() + 1.3
            while time.monotonic() < deadline:  # a steady flow of commits, no lull
                await store.add_outgoing_many([outgoing("busy")])
                await asyncio.sleep(0.005)
            during = calls.counts["index_pending"] - 1
            # Not a round every 10 ms: only once the index is half a second behind.
            assert 1 <= during <= 4
            await eventually(lambda: calls.counts["index_pending"] > during + 1, timeout=2)
            found, _ = await store.read(store.sync.history, "bob", 1000, None, "busy", False)
            assert found  # the lull after the flow: indexed without waiting for the max lag
        finally:
            await store.close()

    run(main())


def test_a_read_queued_when_the_store_closes_fails_as_not_logged_in(tmp_path: Path) -> None:
    """A Status or history call racing a logout: it gets FAILED_PRECONDITION ("not logged
    in"), not the INTERNAL error of a bare RuntimeError."""

    async def main() -> None:
        store = await open_store(tmp_path / "alice.db", readers=1)
        busy, release, shut = threading.Event(), threading.Event(), threading.Event()
        close_connections = store.sync.close

        def close_and_tell() -> None:
            close_connections()
            shut.set()

        setattr(store.sync, "close", close_and_tell)  # noqa: B010 (mypy: no method assignment)

        def occupy() -> None:  # holds the one reader thread, touching no connection
            busy.set()
            release.wait(5)

        holding = asyncio.ensure_future(store.read(occupy))
        await asyncio.to_thread(busy.wait, 5)
        queued = asyncio.ensure_future(store.count_pending())  # waits for the reader thread
        closing = asyncio.ensure_future(store.close())
        await asyncio.to_thread(shut.wait, 5)  # the connections are closed, the read still queued
        release.set()
        await closing
        await holding
        with pytest.raises(StoreClosed) as caught:
            await queued
        assert isinstance(caught.value, FailedPrecondition)
        assert "not logged in" in str(caught.value)

    run(main())


def test_close_lets_queued_writes_finish_and_any_use_after_raises(tmp_path: Path) -> None:
    path = tmp_path / "alice.db"

    async def main() -> None:
        store = await open_store(path)
        started = threading.Event()

        def slow_write(messages: list[OutgoingMessage]) -> list[StoredMessage]:
            started.set()
            time.sleep(0.2)
            return store.sync.add_outgoing_many(messages)

        in_flight = asyncio.ensure_future(store.write(slow_write, [outgoing("in flight")]))
        queued = asyncio.ensure_future(store.add_outgoing_many([outgoing("queued")]))
        await asyncio.to_thread(started.wait, 5)
        await store.close()
        assert in_flight.done() and queued.done()
        assert [m.body for m in in_flight.result() + queued.result()] == ["in flight", "queued"]
        await store.close()  # a second close does nothing
        uses: list[Callable[[], Awaitable[object]]] = [
            store.count_pending,
            lambda: store.add_outgoing_many([outgoing("too late")]),
            lambda: store.history("bob", 10, query="late"),
            lambda: store.read(store.sync.count_pending),
            lambda: store.write(store.sync.pin, "bob", "b" * 64, T0),
        ]
        for use in uses:
            with pytest.raises(RuntimeError, match="closed"):
                await use()
        with pytest.raises(RuntimeError, match="closed"):
            store.sync.count_pending()

    run(main())
    reopened = MessageStore.open(path)
    try:
        assert reopened.count_pending() == 2
    finally:
        reopened.close()
