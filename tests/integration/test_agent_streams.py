"""The live streams the CLI uses: Chat ("Connect to user") and Serve ("Set up as server")."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from p2pchat.v1 import agent_pb2 as apb
from tests.support.agent import AgentClient, InProcessAgent, logged_in, wait_until


class ChatSession:
    """Drives AgentService.Chat from a test: inputs through a queue, events into a queue."""

    def __init__(self, client: AgentClient, peer: str, history_limit: int = 0) -> None:
        self._inputs: queue.Queue[apb.ChatInput | None] = queue.Queue()
        self.events: queue.Queue[apb.ChatEvent | grpc.RpcError] = queue.Queue()
        self._inputs.put(apb.ChatInput(open=apb.ChatOpen(peer=peer, history_limit=history_limit)))
        self.call = client.stub.Chat(self._requests(), timeout=60)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[apb.ChatInput]:
        while (item := self._inputs.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.put(event)
        except grpc.RpcError as err:
            self.events.put(err)

    def say(self, text: str) -> None:
        self._inputs.put(apb.ChatInput(text=apb.ChatText(body=text)))

    def next(self, kind: str, timeout: float = 10) -> apb.ChatEvent:
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, grpc.RpcError):
                raise event
            if event.WhichOneof("kind") == kind:
                return event

    def close(self) -> None:
        self._inputs.put(None)
        self.call.cancel()


def test_chat_prints_history_first_then_live_messages_and_delivery(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    for i in range(3):
        bob.send("alice", f"earlier {i}", wait=10)
    chat = ChatSession(alice, "bob")
    try:
        history = [chat.next("message").message.body for _ in range(3)]
        assert history == ["earlier 0", "earlier 1", "earlier 2"]
        chat.next("history_end")
        bob.send("alice", "live one")
        live = chat.next("message").message
        assert (live.body, live.direction) == ("live one", apb.DIRECTION_INCOMING)
        chat.say("typed by alice")
        mine = chat.next("message").message
        assert mine.body == "typed by alice"
        assert mine.status == apb.MESSAGE_STATUS_PENDING
        delivered = chat.next("delivery").delivery
        assert delivered.id == mine.id and delivered.status == apb.MESSAGE_STATUS_DELIVERED
        wait_until(lambda: [m.body for m in bob.history("alice")][-1:] == ["typed by alice"])
        chat.say("")  # refused, but the chat goes on
        notice = chat.next("notice").notice
        assert notice.code == "INVALID_ARGUMENT" and "empty" in notice.message
        chat.say("still here")
        assert chat.next("message").message.body == "still here"
    finally:
        chat.close()


def test_a_chat_whose_input_ends_shows_what_it_sent_then_ends_cleanly(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    chat = ChatSession(alice, "bob")
    chat.next("history_end")
    for i in range(20):  # a script piping lines, then closing its side at once
        chat.say(f"piped {i}")
    chat.say("")
    chat._inputs.put(None)
    chat._reader.join(15)
    events = list(chat.events.queue)
    assert not any(isinstance(e, grpc.RpcError) for e in events)  # ended with OK
    kinds = [e.WhichOneof("kind") for e in events if not isinstance(e, grpc.RpcError)]
    echoed = [
        e.message.body for e in events if not isinstance(e, grpc.RpcError) and e.HasField("message")
    ]
    assert echoed == [f"piped {i}" for i in range(20)]
    assert "notice" in kinds  # the empty line's refusal, shown before the end
    wait_until(lambda: len(bob.history("alice")) == 20)


def test_chat_history_limit_and_non_contact(make_agent: Callable[[str], InProcessAgent]) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    for i in range(5):
        bob.send("alice", f"m{i}")
    wait_until(lambda: bob.status().pending_messages == 0)
    chat = ChatSession(alice, "bob", history_limit=2)
    try:
        assert [chat.next("message").message.body for _ in range(2)] == ["m3", "m4"]
        chat.next("history_end")
    finally:
        chat.close()
    bob.register("carol")
    stranger = ChatSession(alice, "carol")
    try:
        event = stranger.events.get(timeout=10)
        assert isinstance(event, grpc.RpcError)
        assert event.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stranger.close()


def test_serve_streams_every_incoming_message_live(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    carol = make_agent("carol").client()
    carol.register("carol")
    carol.login("carol")
    carol.add_contact("bob")
    bob.add_contact("carol")  # accepted: nothing of a stranger's would be stored
    stream = bob.stub.Serve(apb.ServeRequest(), timeout=30)
    got: queue.Queue[apb.ChatEvent] = queue.Queue()

    def read() -> None:
        try:
            for event in stream:
                got.put(event)
        except grpc.RpcError:
            pass

    threading.Thread(target=read, daemon=True).start()
    try:
        alice.send("bob", "from alice")
        carol.send("bob", "from carol")
        seen: set[tuple[str, str]] = set()
        while len(seen) < 2:
            event = got.get(timeout=10)
            if event.WhichOneof("kind") == "message":
                seen.add((event.message.sender, event.message.body))
        assert seen == {("alice", "from alice"), ("carol", "from carol")}
    finally:
        stream.cancel()


def test_serve_needs_a_login(make_agent: Callable[[str], InProcessAgent]) -> None:
    client = make_agent("alice").client()
    stream = client.stub.Serve(apb.ServeRequest(), timeout=10)
    try:
        next(iter(stream))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    else:
        raise AssertionError("Serve worked without a login")
