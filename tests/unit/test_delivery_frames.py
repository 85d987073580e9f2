"""Delivery over an in-memory link: frames sent stay within the limits receivers enforce, and a
received frame over a limit is refused whole before anything of it is queued for storing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from p2pchat.v1 import peer_pb2 as ppb
from p2pchat_agent.delivery import BATCH, Delivery, frame_chunks
from p2pchat_agent.events import EventHub
from p2pchat_agent.link import (
    FRAME_BODY_BYTES,
    MAX_FRAME_ACKS,
    MAX_FRAME_MESSAGES,
    RECEIVE_QUEUE_BATCHES,
    PeerLink,
)
from p2pchat_agent.store import (
    Direction,
    IncomingMessage,
    MessageStore,
    Status,
    StoredMessage,
)
from p2pchat_common.errors import InvalidArgument, TooLarge
from p2pchat_common.timestamps import to_timestamp

NOW = datetime(2030, 1, 2, tzinfo=UTC)


class _Store:
    """Stores nothing: what Delivery asks of a MessageStore here."""

    def store_incoming(
        self, messages: Sequence[IncomingMessage], received_at: datetime
    ) -> list[StoredMessage]:
        return []

    def mark_delivered(self, peer: str, ids: list[str], when: datetime) -> list[str]:
        return []


async def _call(fn: Any, *args: Any) -> Any:
    return fn(*args)


def delivery() -> Delivery:
    return Delivery(cast(MessageStore, _Store()), EventHub(), 16_384, _call, _call)


def stored(i: int, body: str = "hi") -> StoredMessage:
    return StoredMessage(
        f"M{i}", "bob", Direction.OUT, "alice", "bob", body, NOW, None, None, Status.PENDING, i + 1
    )


def peer_message(i: int, body: str = "hi") -> ppb.PeerMessage:
    return ppb.PeerMessage(
        id=f"M{i}", sender="mallory", recipient="bob", body=body, sent_at=to_timestamp(NOW)
    )


def test_the_limits_leave_room_for_what_a_sender_sends() -> None:
    assert BATCH <= MAX_FRAME_MESSAGES <= MAX_FRAME_ACKS


def test_frames_sent_carry_at_most_batch_messages_and_frame_body_bytes() -> None:
    many = [stored(i) for i in range(4 * BATCH + 7)]
    assert [len(c) for c in frame_chunks(many)] == [BATCH] * 4 + [7]
    large = [stored(i, "x" * 16_384) for i in range(300)]
    chunks = list(frame_chunks(large))
    assert sum(len(c) for c in chunks) == 300
    assert all(sum(4 * len(m.body) for m in c) <= FRAME_BODY_BYTES for c in chunks)


def test_acks_of_a_large_group_commit_go_in_frames_of_at_most_max_frame_acks() -> None:
    async def run() -> list[list[str]]:
        link = PeerLink("bob", "mallory", dialed_by="mallory")
        for start in range(0, RECEIVE_QUEUE_BATCHES * MAX_FRAME_MESSAGES, MAX_FRAME_MESSAGES):
            link.received.put_nowait(
                [peer_message(i) for i in range(start, start + MAX_FRAME_MESSAGES)]
            )
        committing = asyncio.create_task(delivery()._commit_received(link))
        frames: list[list[str]] = []
        async for frame in link.frames_out():
            frames.append(list(frame.acks.ids))
            if sum(map(len, frames)) == RECEIVE_QUEUE_BATCHES * MAX_FRAME_MESSAGES:
                break
        committing.cancel()
        return frames

    frames = asyncio.run(run())
    assert len(frames) > 1 and all(len(ids) <= MAX_FRAME_ACKS for ids in frames)
    expected = [f"M{i}" for i in range(RECEIVE_QUEUE_BATCHES * MAX_FRAME_MESSAGES)]
    assert [id for ids in frames for id in ids] == expected


async def _frames(*items: ppb.Frame) -> AsyncIterator[ppb.Frame]:
    for item in items:
        yield item


def _read(*items: ppb.Frame) -> PeerLink:
    link = PeerLink("bob", "mallory", dialed_by="mallory")
    asyncio.run(delivery()._read(link, _frames(*items)))
    return link


def _batch(*messages: ppb.PeerMessage) -> ppb.Frame:
    return ppb.Frame(messages=ppb.MessageBatch(messages=list(messages)))


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
        (ppb.Frame(acks=ppb.AckBatch(ids=["A"] * 4097)), TooLarge, "at most 4096 acks"),
        (ppb.Frame(acks=ppb.AckBatch(ids=["ok", "x" * 65])), InvalidArgument, "1-64"),
    ],
)
def test_a_frame_over_a_limit_is_refused_before_any_of_it_is_queued(
    frame: ppb.Frame, error: type[Exception], fragment: str
) -> None:
    link = PeerLink("bob", "mallory", dialed_by="mallory")
    with pytest.raises(error, match=fragment):
        asyncio.run(delivery()._read(link, _frames(frame)))
    assert link.received.empty()


def test_frames_within_every_limit_are_queued_whole() -> None:
    ascii_full = _batch(*(peer_message(i, "x" * 16_384) for i in range(256)))  # exactly 4 MiB
    wide = _batch(*(peer_message(i, "\u00e9" * 8_192) for i in range(256)))  # also 4 MiB
    link = _read(ascii_full, wide, _batch(*(peer_message(i) for i in range(MAX_FRAME_MESSAGES))))
    assert [len(link.received.get_nowait()) for _ in range(3)] == [256, 256, MAX_FRAME_MESSAGES]
