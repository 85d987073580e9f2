"""Delivery over an in-memory transport (no sockets): outbox order, group commit, duplicates
stored once, acks for unknown ids, and a transport that fails mid-batch losing nothing. Each
side has a real <username>.db."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from p2pchat_agent.agent_store import AgentStore
from p2pchat_agent.delivery import Delivery, Outflow
from p2pchat_agent.events import DeliveryEvent, EventHub, MessageEvent
from p2pchat_agent.messages import IncomingMessage, OutgoingMessage, Status, StoredMessage
from p2pchat_agent.transport import AcksReceived, MessagesReceived
from p2pchat_common.errors import Unavailable
from tests.support.memory_transport import MemoryTransport, memory_pair

NOW = datetime(2030, 1, 2, tzinfo=UTC)


class CountingStore(AgentStore):
    """The real store, counting the group commits of received messages."""

    commits = 0

    async def store_incoming(
        self, messages: Sequence[IncomingMessage], received_at: datetime
    ) -> list[StoredMessage]:
        self.commits += 1
        return await super().store_incoming(messages, received_at)


@dataclass
class Side:
    """One user's store and delivery."""

    name: str
    store: CountingStore
    events: EventHub = field(default_factory=EventHub)

    def delivery(self) -> Delivery:
        return Delivery(self.store, self.events)

    async def queue(self, peer: str, *bodies: str) -> list[str]:
        sent = await self.store.add_outgoing_many(
            [OutgoingMessage(f"{self.name}-{b}", self.name, peer, b, NOW) for b in bodies]
        )
        return [m.id for m in sent]

    async def bodies(self, peer: str) -> list[tuple[str, str]]:
        messages, more = await self.store.history(peer, 1000)
        assert not more
        return [(m.body, m.status.value) for m in messages]


def with_sides(tmp_path: Path, body: Callable[[Side, Side], Awaitable[None]]) -> None:
    """Runs `body` with alice's and bob's stores open (real <username>.db files)."""

    async def main() -> None:
        alice = Side("alice", cast(CountingStore, await CountingStore.open(tmp_path / "alice.db")))
        bob = Side("bob", cast(CountingStore, await CountingStore.open(tmp_path / "bob.db")))
        try:
            await body(alice, bob)
        finally:
            await alice.store.close()
            await bob.store.close()

    asyncio.run(main())


async def until(condition: Callable[[], Awaitable[bool] | bool], timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        met = condition()
        if not isinstance(met, bool):
            met = await met
        if met:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def no_pending(side: Side) -> bool:
    return await side.store.count_pending() == 0


async def run_both(
    alice: Side,
    bob: Side,
    body: Callable[[MemoryTransport, MemoryTransport, Outflow], Awaitable[None]],
    bob_device: str = "",
) -> None:
    """Delivery on both ends of an in-memory pair while `body` runs, then the pair closes;
    alice's end reaches `bob_device`."""
    a_end, b_end = memory_pair("alice", "bob", bob_device)
    a_out = Outflow()
    runs = [
        asyncio.create_task(alice.delivery().run(a_end, a_out)),
        asyncio.create_task(bob.delivery().run(b_end, Outflow())),
    ]
    try:
        await body(a_end, b_end, a_out)
    finally:
        a_end.close()
        await asyncio.gather(*runs, return_exceptions=True)


def test_the_outbox_goes_in_order_and_acks_mark_it_delivered(tmp_path: Path) -> None:
    bodies = [f"m{i:03d}" for i in range(900)]  # more than one batch

    async def test(alice: Side, bob: Side) -> None:
        ids = await alice.queue("bob", *bodies)
        seen = alice.events.subscribe(lambda e: isinstance(e, DeliveryEvent))

        async def body(a: MemoryTransport, b: MemoryTransport, out: Outflow) -> None:
            await until(lambda: no_pending(alice))
            assert [i for batch in a.sent for i in batch] == ids  # in order, each once
            assert max(map(len, a.sent)) <= 500

        await run_both(alice, bob, body)
        assert [b for b, _ in await bob.bodies("alice")] == bodies
        assert {s for _, s in await alice.bodies("bob")} == {Status.DELIVERED.value}
        delivered: list[str] = []
        while (item := seen.get_nowait()) is not None:
            assert isinstance(item, DeliveryEvent)
            delivered.extend(item.ids)
        assert delivered == ids

    with_sides(tmp_path, test)


def test_delivery_state_is_kept_per_device_of_the_recipient(tmp_path: Path) -> None:
    """A message addressed to another of bob's devices stays pending over a transport that
    reaches his first one; what that device acknowledges names it (schema v3 deliveries)."""

    async def test(alice: Side, bob: Side) -> None:
        first, second, third = await alice.queue("bob", "one", "two", "three")
        with sqlite3.connect(tmp_path / "alice.db") as db:  # what fan-out to devices will write
            db.execute(
                "UPDATE deliveries SET device = 'dev2' WHERE message = "
                "(SELECT seq FROM messages WHERE id = ?)",
                (second,),
            )
        db.close()

        async def one_pending() -> bool:
            return await alice.store.count_pending() == 1

        async def body(a: MemoryTransport, b: MemoryTransport, out: Outflow) -> None:
            await until(one_pending)
            assert [i for batch in a.sent for i in batch] == [first, third]

        await run_both(alice, bob, body, bob_device="dev1")
        assert await alice.bodies("bob") == [
            ("one", "delivered"),
            ("two", "pending"),
            ("three", "delivered"),
        ]
        assert [m.id for m in await alice.store.pending_for("bob", device="dev2")] == [second]
        assert await alice.store.pending_for("bob", device="dev1") == []
        with sqlite3.connect(tmp_path / "alice.db") as db:
            rows = db.execute(
                "SELECT m.id, d.device, d.delivered_to FROM deliveries d "
                "JOIN messages m ON m.seq = d.message ORDER BY m.seq"
            ).fetchall()
        db.close()
        assert rows == [(first, "", "dev1"), (second, "dev2", None), (third, "", "dev1")]

    with_sides(tmp_path, test)


def test_fresh_messages_handed_over_in_memory_are_sent_at_once(tmp_path: Path) -> None:
    async def test(alice: Side, bob: Side) -> None:
        async def body(a: MemoryTransport, b: MemoryTransport, out: Outflow) -> None:
            await asyncio.sleep(0.05)  # the sender has read the (empty) outbox and waits
            fresh = await alice.store.add_outgoing_many(
                [OutgoingMessage("F1", "alice", "bob", "hi", NOW)]
            )
            out.push_fresh(fresh)
            await until(lambda: no_pending(alice))
            assert a.sent == [["F1"]]

        await run_both(alice, bob, body)
        assert await bob.bodies("alice") == [("hi", Status.RECEIVED.value)]

    with_sides(tmp_path, test)


def test_what_arrived_together_is_committed_together_and_acked_together(tmp_path: Path) -> None:
    async def test(alice: Side, bob: Side) -> None:
        _, b_end = memory_pair("alice", "bob")
        for start in range(0, 30, 10):  # three batches arrive before bob's delivery runs
            batch = [
                IncomingMessage(f"A{i:02d}", "alice", "bob", f"b{i}", NOW)
                for i in range(start, start + 10)
            ]
            b_end.inbox.put_nowait(MessagesReceived(batch))
        task = asyncio.create_task(bob.delivery().run(b_end, Outflow()))
        await until(lambda: bool(b_end.acked))
        b_end.close()
        await asyncio.gather(task, return_exceptions=True)
        assert bob.store.commits == 1
        assert b_end.acked == [[f"A{i:02d}" for i in range(30)]]

    with_sides(tmp_path, test)


def test_a_message_that_arrives_twice_is_stored_once_and_acked_each_time(tmp_path: Path) -> None:
    async def test(alice: Side, bob: Side) -> None:
        shown = bob.events.subscribe(lambda e: isinstance(e, MessageEvent))
        _, b_end = memory_pair("alice", "bob")
        task = asyncio.create_task(bob.delivery().run(b_end, Outflow()))
        twice = [IncomingMessage("DUP", "alice", "bob", "once", NOW)]
        b_end.inbox.put_nowait(MessagesReceived(twice))
        await until(lambda: len(b_end.acked) == 1)
        b_end.inbox.put_nowait(MessagesReceived(list(twice)))
        await until(lambda: len(b_end.acked) == 2)
        b_end.close()
        await asyncio.gather(task, return_exceptions=True)
        assert b_end.acked == [["DUP"], ["DUP"]]
        assert await bob.bodies("alice") == [("once", Status.RECEIVED.value)]
        assert isinstance(shown.get_nowait(), MessageEvent) and shown.get_nowait() is None

    with_sides(tmp_path, test)


def test_acks_for_unknown_ids_change_nothing(tmp_path: Path) -> None:
    async def test(alice: Side, bob: Side) -> None:
        await alice.queue("bob", "kept")
        seen = alice.events.subscribe(lambda e: True)
        a_end, _ = memory_pair("alice", "bob")
        a_end.fail_after = 0  # sends nothing: only the acks matter here
        a_end.inbox.put_nowait(AcksReceived(["NOT-MINE", "alice-kept-but-other"]))
        await asyncio.gather(alice.delivery().run(a_end, Outflow()), return_exceptions=True)
        assert await alice.bodies("bob") == [("kept", Status.PENDING.value)]
        assert seen.get_nowait() is None

    with_sides(tmp_path, test)


def test_a_transport_that_fails_mid_batch_loses_and_repeats_nothing(tmp_path: Path) -> None:
    bodies = [f"m{i:04d}" for i in range(950)]

    async def test(alice: Side, bob: Side) -> None:
        await alice.queue("bob", *bodies)
        a_end, b_end = memory_pair("alice", "bob")
        a_end.fail_after = 700  # breaks inside the second batch
        results = await asyncio.gather(
            alice.delivery().run(a_end, Outflow()),
            bob.delivery().run(b_end, Outflow()),
            return_exceptions=True,
        )
        assert isinstance(results[0], Unavailable)
        assert await alice.store.count_pending() > 0  # nothing was acknowledged by loss

        async def rest(a: MemoryTransport, b: MemoryTransport, out: Outflow) -> None:
            await until(lambda: no_pending(alice))  # a new transport delivers the rest

        await run_both(alice, bob, rest)
        assert [b for b, _ in await bob.bodies("alice")] == bodies
        assert {s for _, s in await alice.bodies("bob")} == {Status.DELIVERED.value}

    with_sides(tmp_path, test)
