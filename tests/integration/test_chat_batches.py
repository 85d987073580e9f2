"""Batched client streams and backpressure (issue 12), through real gRPC: ChatTexts in,
ChatEventBatch and DeliveryUpdates out for a client that asks for them, and a writer faster
than its reader held back by flow control instead of being dropped."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from p2pchat.v1 import agent_pb2 as apb
from tests.support.agent import AgentClient, InProcessAgent, logged_in, wait_until


def flat(event: apb.ChatEvent) -> list[apb.ChatEvent]:
    """A batch's events in order (a batch never holds a batch), or the event itself."""
    if event.WhichOneof("kind") == "batch":
        inner = list(event.batch.events)
        assert all(e.WhichOneof("kind") != "batch" for e in inner)
        return inner
    return [event]


class Stream:
    """A Chat or Serve call read in a thread; `paused` holds the reading back."""

    def __init__(self, call: Iterator[apb.ChatEvent]) -> None:
        self.call = call
        self.top: queue.Queue[apb.ChatEvent | grpc.RpcError] = queue.Queue()
        self.reading = threading.Event()
        self.reading.set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.reading.wait()
                self.top.put(event)
        except grpc.RpcError as err:
            self.top.put(err)

    def take(
        self, counts: Callable[[list[apb.ChatEvent]], int], target: int = 1, timeout: float = 30
    ) -> tuple[list[apb.ChatEvent], int]:
        """Events (flattened) until `counts` summed over them reaches `target`, and how many
        ChatEvents carried them."""
        events: list[apb.ChatEvent] = []
        carriers = seen = 0
        deadline = time.monotonic() + timeout
        while seen < target:
            got = self.top.get(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(got, grpc.RpcError):
                raise got
            carriers += 1
            new = flat(got)
            events.extend(new)
            seen += counts(new)
        return events, carriers


def _inputs(
    first: apb.ChatInput, more: queue.Queue[apb.ChatInput | None]
) -> Iterator[apb.ChatInput]:
    yield first
    while (item := more.get()) is not None:
        yield item


def _open_chat(
    client: AgentClient, peer: str, batches: bool
) -> tuple[Stream, queue.Queue[apb.ChatInput | None], list[int]]:
    """A Chat with `peer`; returns its reader, its input queue, and a one-item list counting
    the inputs gRPC has taken from the queue (what the agent let in, give or take buffers)."""
    inputs: queue.Queue[apb.ChatInput | None] = queue.Queue()
    taken = [0]
    open_ = apb.ChatInput(open=apb.ChatOpen(peer=peer, batches=batches))

    def counted() -> Iterator[apb.ChatInput]:
        for item in _inputs(open_, inputs):
            taken[0] += 1
            yield item

    stream = Stream(client.stub.Chat(counted(), timeout=120))
    return stream, inputs, taken


def _kinds(events: list[apb.ChatEvent], kind: str) -> list[apb.ChatEvent]:
    return [e for e in events if e.WhichOneof("kind") == kind]


def _delivered_ids(events: list[apb.ChatEvent]) -> list[str]:
    ids: list[str] = []
    for e in events:
        if e.WhichOneof("kind") == "deliveries":
            assert e.deliveries.status == apb.MESSAGE_STATUS_DELIVERED
            assert e.deliveries.peer == "bob" and e.deliveries.delivered_at.seconds > 0
            ids.extend(e.deliveries.ids)
        elif e.WhichOneof("kind") == "delivery":
            ids.append(e.delivery.id)
    return ids


def test_many_texts_in_one_input_come_back_batched_with_every_state_in_order(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    chat, inputs, _ = _open_chat(alice, "bob", batches=True)
    try:
        chat.take(lambda ev: len(_kinds(ev, "history_end")))
        bodies = [f"batched {i:03d}" for i in range(300)]
        inputs.put(apb.ChatInput(texts=apb.ChatTexts(texts=[apb.ChatText(body=b) for b in bodies])))

        events, carriers = chat.take(lambda ev: len(_delivered_ids(ev)), 300)

        echoes = [e.message for e in _kinds(events, "message")]
        assert [m.body for m in echoes] == bodies  # in the order written, each once
        assert {m.status for m in echoes} == {apb.MESSAGE_STATUS_PENDING}
        assert sorted(_delivered_ids(events)) == sorted(m.id for m in echoes)
        assert not _kinds(events, "delivery")  # a batching client gets DeliveryUpdates
        position = {id(e): i for i, e in enumerate(events)}
        first_delivery = min(
            position[id(e)] for e in events if e.WhichOneof("kind") == "deliveries"
        )
        first_echo = position[id(_kinds(events, "message")[0])]
        assert first_echo < first_delivery
        # 600 events unbatched (an echo and an update per text); batched, a handful.
        assert carriers <= 30, carriers
        wait_until(lambda: [m.body for m in bob.history("alice")] == bodies)
        # The link batches too: a handful of frames (the Hello, message frames, acks) for 300.
        sent, received = alice.status(), bob.status()
        assert 1 < sent.link_frames_sent <= 30, sent.link_frames_sent
        assert received.link_frames_received == sent.link_frames_sent
        assert sent.link_frames_received == received.link_frames_sent >= 2  # Hello and acks
    finally:
        inputs.put(None)
        chat.call.cancel()  # type: ignore[attr-defined]


def test_serve_with_batches_sends_what_arrived_together_as_one_event(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    serve = Stream(bob.stub.Serve(apb.ServeRequest(batches=True), timeout=120))
    chat, inputs, _ = _open_chat(alice, "bob", batches=True)
    try:
        chat.take(lambda ev: len(_kinds(ev, "history_end")))
        time.sleep(0.2)  # bob's Serve subscribed
        bodies = [f"to serve {i:03d}" for i in range(200)]
        inputs.put(apb.ChatInput(texts=apb.ChatTexts(texts=[apb.ChatText(body=b) for b in bodies])))

        events, carriers = serve.take(lambda ev: len(_kinds(ev, "message")), 200)

        incoming = [e.message for e in _kinds(events, "message")]
        assert [m.body for m in incoming] == bodies
        assert {(m.sender, m.direction) for m in incoming} == {("alice", apb.DIRECTION_INCOMING)}
        assert carriers < 50, carriers
    finally:
        inputs.put(None)
        chat.call.cancel()  # type: ignore[attr-defined]
        serve.call.cancel()  # type: ignore[attr-defined]


def test_a_writer_faster_than_its_reader_is_held_back_not_dropped(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    """20,000 texts written back to back while the client reads nothing: the first contract
    (two events a text, unbatched) used to drop the stream at 10,000 unread events. Now the
    agent stops taking input; once the client reads again, every text is stored and
    delivered, in order, on the same stream."""
    alice, bob = logged_in(make_agent, "alice", "bob")
    chat, inputs, taken = _open_chat(alice, "bob", batches=False)
    try:
        chat.take(lambda ev: len(_kinds(ev, "history_end")))
        chat.reading.clear()  # the client stops reading its events
        total, per_input = 20_000, 100
        body = "x" * 1000
        for start in range(0, total, per_input):
            texts = [apb.ChatText(body=f"{start + i:05d} {body}") for i in range(per_input)]
            inputs.put(apb.ChatInput(texts=apb.ChatTexts(texts=texts)))
        # While nobody reads, the agent holds the input back: what it took stops growing well
        # short of everything written (20 MB of texts; flow-control windows hold a few MB).
        # Waits until it has stopped for a second (a slow machine takes longer to fill the
        # windows: 3 s once was not enough), at most 30 s.
        deadline, held_at = time.monotonic() + 30, -1
        while taken[0] != held_at:
            assert time.monotonic() < deadline, f"input never held back: {taken[0]} taken"
            held_at = taken[0]
            time.sleep(1)
        assert held_at < total // per_input, held_at
        assert alice.status().pending_messages < total

        chat.reading.set()
        events, _ = chat.take(lambda ev: len(_delivered_ids(ev)), total, timeout=120)

        echoes = [e.message.body[:5] for e in _kinds(events, "message")]
        assert echoes == [f"{i:05d}" for i in range(total)]
        assert not _kinds(events, "notice")
        wait_until(lambda: len(bob.history("alice", limit=1)) == 1)
        assert bob.status().logged_in and alice.status().pending_messages == 0
    finally:
        inputs.put(None)
        chat.reading.set()
        chat.call.cancel()  # type: ignore[attr-defined]


def test_one_input_of_15000_texts_is_taken_in_slices_and_never_overflows_the_chat(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    chat, inputs, _ = _open_chat(alice, "bob", batches=True)
    try:
        (end,) = _kinds(chat.take(lambda ev: len(_kinds(ev, "history_end")))[0], "history_end")
        assert end.history_end.batches  # this agent takes ChatTexts
        total = 15_000
        texts = [apb.ChatText(body=f"{i:05d}") for i in range(total)]
        inputs.put(apb.ChatInput(texts=apb.ChatTexts(texts=texts)))

        events, _ = chat.take(lambda ev: len(_delivered_ids(ev)), total, timeout=120)

        assert [e.message.body for e in _kinds(events, "message")] == [
            f"{i:05d}" for i in range(total)
        ]
    finally:
        inputs.put(None)
        chat.call.cancel()  # type: ignore[attr-defined]


def test_a_burst_larger_than_a_grpc_message_goes_in_several_batches(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    """1,500 texts of 16 KiB (24 MB) echoed while the client pauses: one burst, which no single
    ChatEvent may carry (16 MiB at most); it arrives whole, in order, in batches."""
    alice, bob = logged_in(make_agent, "alice", "bob")
    chat, inputs, _ = _open_chat(alice, "bob", batches=True)
    try:
        chat.take(lambda ev: len(_kinds(ev, "history_end")))
        chat.reading.clear()
        body = "z" * (16 * 1024 - 6)
        for start in range(0, 1500, 500):
            texts = [apb.ChatText(body=f"{start + i:05d}{body}") for i in range(500)]
            inputs.put(apb.ChatInput(texts=apb.ChatTexts(texts=texts)))
        time.sleep(3)
        chat.reading.set()

        events, carriers = chat.take(lambda ev: len(_kinds(ev, "message")), 1500, timeout=60)

        assert [e.message.body[:5] for e in _kinds(events, "message")] == [
            f"{i:05d}" for i in range(1500)
        ]
        assert carriers >= 6  # 24 MB in batches of at most 4 MiB
    finally:
        inputs.put(None)
        chat.reading.set()
        chat.call.cancel()  # type: ignore[attr-defined]
