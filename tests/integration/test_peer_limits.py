"""A peer's frames are held to every documented limit where they arrive, not only where they are
sent: too much in one frame is RESOURCE_EXHAUSTED, a malformed field INVALID_ARGUMENT; either
way the link closes and nothing of that frame is stored or applied."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import peer_pb2 as ppb
from p2pchat.v1 import peer_pb2_grpc
from p2pchat_agent.direct import FRAME_BODY_BYTES, MAX_FRAME_ACKS, MAX_FRAME_MESSAGES
from p2pchat_common.timestamps import to_timestamp
from p2pchat_common.tls import user_dns_name
from tests.integration.test_agent_security import (
    accepted_peer,
    bob_peer_port,
    frames,
    hello,
    link_call,
)
from tests.support.agent import AgentClient, InProcessAgent, logged_in, wait_until
from tests.support.directory import InProcessDirectory

Code = grpc.StatusCode


def batch(bodies: list[str], sender: str = "mallory", recipient: str = "bob") -> ppb.Frame:
    """One frame of messages from `sender` with these bodies (ids M0, M1, ...)."""
    frame = ppb.Frame()
    sent_at = to_timestamp(datetime.now(UTC))
    for i, body in enumerate(bodies):
        frame.messages.messages.add(
            id=f"M{i}", sender=sender, recipient=recipient, body=body, sent_at=sent_at
        )
    return frame


def acks(*ids: str) -> ppb.Frame:
    return ppb.Frame(acks=ppb.AckBatch(ids=list(ids)))


class Mallory:
    """Bob's agent, and mallory with a genuine certificate who opens raw links to it."""

    def __init__(self, bob: AgentClient, port: int, ca: bytes, key: bytes, cert: bytes) -> None:
        self.bob, self.port, self.ca, self.key, self.cert = bob, port, ca, key, cert

    def refused(self, *sent: ppb.Frame) -> grpc.RpcError:
        """Sends Hello and `sent`; the link must end with an error (returned)."""
        with pytest.raises(grpc.RpcError) as err:
            link_call(self.port, self.ca, self.key, self.cert, frames(hello("mallory"), *sent))
        return err.value

    def converse(
        self, first: list[ppb.Frame], answer: Callable[[ppb.Frame], list[ppb.Frame] | None]
    ) -> tuple[list[ppb.Frame], grpc.RpcError | None]:
        """A link on which mallory sends Hello and `first`, then `answer(frame)` for each frame
        bob sends after his Hello (None: close her side). Returns bob's frames and the error
        that ended the link (None when it ended cleanly)."""
        outgoing: queue.Queue[ppb.Frame | None] = queue.Queue()
        for frame in (hello("mallory"), *first):
            outgoing.put(frame)

        def sent() -> Iterator[ppb.Frame]:
            while (frame := outgoing.get()) is not None:
                yield frame

        creds = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        options = [("grpc.ssl_target_name_override", user_dns_name("bob"))]
        received: list[ppb.Frame] = []
        try:
            with grpc.secure_channel(f"127.0.0.1:{self.port}", creds, options=options) as channel:
                for frame in peer_pb2_grpc.PeerServiceStub(channel).Link(sent(), timeout=20):
                    received.append(frame)
                    if frame.HasField("hello"):
                        continue
                    replies = answer(frame)
                    for reply in replies if replies is not None else [None]:
                        outgoing.put(reply)
        except grpc.RpcError as err:
            return received, err
        finally:
            outgoing.put(None)  # the sending thread never waits forever
        return received, None

    def stored(self) -> list[str]:
        """The bodies bob stored from mallory, once the link is gone."""
        wait_until(lambda: "mallory" not in self.bob.status().linked_peers)
        bodies: list[str] = []
        before = ""
        while True:  # pages of at most 3 MiB (control.HISTORY_PAGE_BYTES)
            request = apb.HistoryRequest(peer="mallory", limit=1000, before_id=before)
            page = self.bob.stub.History(request)
            bodies[:0] = [m.body for m in page.messages if m.sender == "mallory"]
            if not page.has_more:
                return bodies
            before = page.messages[0].id


@pytest.fixture
def mallory(
    make_agent: Callable[[str], InProcessAgent], agent_directory: InProcessDirectory, tmp_path: Path
) -> Mallory:
    (bob,) = logged_in(make_agent, "bob", befriend=False)
    key, cert = accepted_peer(agent_directory, bob, "mallory", tmp_path)
    return Mallory(bob, bob_peer_port(make_agent, bob), agent_directory.users_ca_pem, key, cert)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("x" * 14_000, "ASCII: 300 x 14,000 bytes"),
        ("\u00e9" * 7_000, "7,000 characters but 14,000 bytes each: sized in UTF-8"),
    ],
)
def test_a_frame_with_more_than_4_mib_of_bodies_is_refused_and_nothing_stored(
    mallory: Mallory, body: str, why: str
) -> None:
    assert 300 * 14_000 > FRAME_BODY_BYTES  # each body within the 16 KiB limit, not the frame
    err = mallory.refused(batch([body] * 300))
    assert err.code() == Code.RESOURCE_EXHAUSTED, why
    assert f"{FRAME_BODY_BYTES} bytes of message bodies" in (err.details() or "")
    assert mallory.stored() == []


def test_a_frame_of_exactly_4_mib_of_bodies_is_stored_and_acked(mallory: Mallory) -> None:
    bodies = ["y" * 16_384] * (FRAME_BODY_BYTES // 16_384)
    acked: list[str] = []

    def answer(frame: ppb.Frame) -> list[ppb.Frame] | None:
        acked.extend(frame.acks.ids)
        return None if len(acked) >= len(bodies) else []

    _, err = mallory.converse([batch(bodies)], answer)
    assert err is None, err
    assert sorted(acked) == sorted(f"M{i}" for i in range(len(bodies)))
    assert len(mallory.stored()) == len(bodies)


def test_a_frame_of_more_than_max_frame_messages_is_refused_and_nothing_stored(
    mallory: Mallory,
) -> None:
    err = mallory.refused(batch(["hi"] * (MAX_FRAME_MESSAGES + 1)))
    assert err.code() == Code.RESOURCE_EXHAUSTED
    assert f"at most {MAX_FRAME_MESSAGES} messages" in (err.details() or "")
    assert mallory.stored() == []


def test_a_frame_of_max_frame_messages_is_stored_and_acked(mallory: Mallory) -> None:
    acked: list[str] = []

    def answer(frame: ppb.Frame) -> list[ppb.Frame] | None:
        acked.extend(frame.acks.ids)
        return None if len(acked) >= MAX_FRAME_MESSAGES else []

    _, err = mallory.converse([batch(["hi"] * MAX_FRAME_MESSAGES)], answer)
    assert err is None, err
    assert len(set(acked)) == MAX_FRAME_MESSAGES
    assert len(mallory.stored()) == MAX_FRAME_MESSAGES


def test_an_ack_frame_with_more_than_max_frame_acks_ids_is_refused(mallory: Mallory) -> None:
    assert MAX_FRAME_ACKS >= MAX_FRAME_MESSAGES  # one frame's messages fit in one ack frame
    err = mallory.refused(acks(*(f"A{i}" for i in range(MAX_FRAME_ACKS + 1))))
    assert err.code() == Code.RESOURCE_EXHAUSTED
    assert f"at most {MAX_FRAME_ACKS} acks" in (err.details() or "")
    wait_until(lambda: "mallory" not in mallory.bob.status().linked_peers)


@pytest.mark.parametrize(
    "bad", ["A" * 65, "01\x1b[2J", "01\x00", "", "01 02", "\u00e901"], ids=repr
)
def test_a_malformed_ack_id_is_refused_and_nothing_of_its_frame_applied(
    mallory: Mallory, bad: str
) -> None:
    """Bob's message to mallory arrives on the link; her ack of it comes with a malformed id in
    the same frame: the frame is refused whole, so bob's message stays pending."""
    sent = mallory.bob.send("mallory", "are you there?")

    def answer(frame: ppb.Frame) -> list[ppb.Frame] | None:
        if frame.HasField("messages"):
            return [acks(*(m.id for m in frame.messages.messages), bad)]
        return []

    received, err = mallory.converse([], answer)
    assert err is not None and err.code() == Code.INVALID_ARGUMENT, err
    assert "acknowledged id must be 1-64 characters" in (err.details() or "")
    assert any(m.id == sent.id for f in received for m in f.messages.messages)
    wait_until(lambda: "mallory" not in mallory.bob.status().linked_peers)
    (mine,) = mallory.bob.history("mallory")
    assert mine.id == sent.id and mine.status == apb.MESSAGE_STATUS_PENDING
    assert mallory.bob.status().pending_messages == 1


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9b"], ids=repr)
def test_a_body_with_a_control_character_is_refused_and_its_frame_not_stored(
    mallory: Mallory, char: str
) -> None:
    err = mallory.refused(batch(["fine", f"red{char}[31m alert"]))
    assert err.code() == Code.INVALID_ARGUMENT
    assert "control characters" in (err.details() or "")
    assert mallory.stored() == []


def test_a_body_with_tabs_and_line_breaks_is_stored_as_it_is(mallory: Mallory) -> None:
    body = "line one\n\tline two\r\nline three"
    acked: list[str] = []

    def answer(frame: ppb.Frame) -> list[ppb.Frame] | None:
        acked.extend(frame.acks.ids)
        return None if acked else []

    _, err = mallory.converse([batch([body])], answer)
    assert err is None, err
    assert mallory.stored() == [body]


def test_a_forged_sender_is_not_echoed_raw(mallory: Mallory) -> None:
    err = mallory.refused(batch(["hi"], sender="\x1b]0;pwned\x07" + "x" * 5_000))
    assert err.code() == Code.PERMISSION_DENIED
    details = err.details() or ""
    assert "\\x1b]0;pwned\\x07" in details and details.isprintable() and len(details) < 200
