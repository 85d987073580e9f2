"""The direct transport's frames: what it sends stays within the limits receivers enforce, and a
received frame over a limit is refused whole before anything of it is handed on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from p2pchat.v1 import peer_pb2 as ppb
from p2pchat_agent.direct import FRAME_BODY_BYTES, MAX_FRAME_ACKS, MAX_FRAME_MESSAGES, DirectLink
from p2pchat_agent.messages import Direction, Status, StoredMessage
from p2pchat_agent.transport import BATCH, AcksReceived, MessagesReceived, Received, batches
from p2pchat_common.errors import InvalidArgument, PermissionDenied, TooLarge
from p2pchat_common.timestamps import to_timestamp

NOW = datetime(2030, 1, 2, tzinfo=UTC)


def stored(i: int, body: str = "hi") -> StoredMessage:
    return StoredMessage(
        f"M{i}", "bob", Direction.OUT, "alice", "bob", body, NOW, None, None, Status.PENDING, i + 1
    )


def peer_message(i: int, body: str = "hi", sender: str = "mallory") -> ppb.PeerMessage:
    return ppb.PeerMessage(
        id=f"M{i}", sender=sender, recipient="bob", body=body, sent_at=to_timestamp(NOW)
    )


async def _frames(*items: ppb.Frame) -> AsyncIterator[ppb.Frame]:
    for item in items:
        yield item


def received(*items: ppb.Frame) -> list[Received]:
    """What bob's end of a link with mallory hands on for `items` (raises what it refuses)."""

    async def run() -> list[Received]:
        link = DirectLink("bob", "mallory", "", "mallory", 16_384, _frames(*items))
        return [event async for event in link.received()]

    return asyncio.run(run())


def _batch(*messages: ppb.PeerMessage) -> ppb.Frame:
    return ppb.Frame(messages=ppb.MessageBatch(messages=list(messages)))


def test_the_limits_leave_room_for_what_a_sender_sends() -> None:
    assert BATCH <= MAX_FRAME_MESSAGES <= MAX_FRAME_ACKS


def test_batches_carry_at_most_batch_messages_and_frame_body_bytes() -> None:
    many = [stored(i) for i in range(4 * BATCH + 7)]
    assert [len(c) for c in batches(many)] == [BATCH] * 4 + [7]
    large = [stored(i, "x" * 16_384) for i in range(300)]
    chunks = batches(large)
    assert sum(len(c) for c in chunks) == 300
    assert all(sum(4 * len(m.body) for m in c) <= FRAME_BODY_BYTES for c in chunks)


def test_acks_of_a_large_group_commit_go_in_frames_of_at_most_max_frame_acks() -> None:
    ids = [f"M{i}" for i in range(3 * MAX_FRAME_ACKS + 5)]

    async def run() -> list[list[str]]:
        link = DirectLink("bob", "mallory", "", "mallory", 16_384)
        sending = asyncio.create_task(link.send_acks(ids))
        frames: list[list[str]] = []
        async for frame in link.frames_out():
            frames.append(list(frame.acks.ids))
            if sum(map(len, frames)) == len(ids):
                break
        await sending
        return frames

    frames = asyncio.run(run())
    assert [len(f) for f in frames] == [MAX_FRAME_ACKS] * 3 + [5]
    assert [id for f in frames for id in f] == ids


def test_a_batch_sent_is_one_frame_with_every_field() -> None:
    async def run() -> ppb.Frame:
        link = DirectLink("alice", "bob", "", "alice", 16_384)
        await link.send_messages([stored(1, "one"), stored(2, "two")])
        return await anext(link.frames_out())

    frame = asyncio.run(run())
    assert [(m.id, m.sender, m.recipient, m.body) for m in frame.messages.messages] == [
        ("M1", "alice", "bob", "one"),
        ("M2", "alice", "bob", "two"),
    ]
    assert frame.messages.messages[0].sent_at == to_timestamp(NOW)


@pytest.mark.parametrize(
    ("frame", "error", "fragment"),
    [
        (
            _batch(*(peer_message(i) for i in range(MAX_FRAME_MESSAGES + 1))),
            TooLarge,
            f"at most {MAX_FRAME_MESSAGES} messages",
        ),
        (
            _batch(*(peer_message(i, "\u00e9" * 8_000) for i in range(263))),  # 4,208,000 bytes
            TooLarge,
            f"{FRAME_BODY_BYTES} bytes",
        ),
        (_batch(peer_message(1), peer_message(2, "a\x1bb")), InvalidArgument, "control"),
        (_batch(peer_message(1), peer_message(2, sender="alice")), PermissionDenied, "alice"),
        (ppb.Frame(acks=ppb.AckBatch(ids=["A"] * 4097)), TooLarge, "at most 4096 acks"),
        (ppb.Frame(acks=ppb.AckBatch(ids=["ok", "x" * 65])), InvalidArgument, "1-64"),
        (ppb.Frame(hello=ppb.Hello(username="mallory")), InvalidArgument, "second Hello"),
    ],
)
def test_a_frame_over_a_limit_is_refused_before_any_of_it_is_handed_on(
    frame: ppb.Frame, error: type[Exception], fragment: str
) -> None:
    handed_on: list[Received] = []

    async def run() -> None:
        link = DirectLink("bob", "mallory", "", "mallory", 16_384, _frames(frame))
        async for event in link.received():
            handed_on.append(event)

    with pytest.raises(error, match=fragment):
        asyncio.run(run())
    assert handed_on == []


def test_frames_within_every_limit_are_handed_on_whole_and_decoded() -> None:
    ascii_full = _batch(*(peer_message(i, "x" * 16_384) for i in range(256)))  # exactly 4 MiB
    wide = _batch(*(peer_message(i, "\u00e9" * 8_192) for i in range(256)))  # also 4 MiB
    small = _batch(*(peer_message(i) for i in range(MAX_FRAME_MESSAGES)))
    acks = ppb.Frame(acks=ppb.AckBatch(ids=["M1", "M2"]))
    events = received(ascii_full, wide, small, acks)
    sizes = [len(e.messages) for e in events if isinstance(e, MessagesReceived)]
    assert sizes == [256, 256, MAX_FRAME_MESSAGES]
    assert events[-1] == AcksReceived(["M1", "M2"])
    first = events[0]
    assert isinstance(first, MessagesReceived)
    assert first.messages[0].sender == "mallory" and first.messages[0].sent_at == NOW
