"""The seam between Delivery and the ways a message travels to one peer.

A transport is one open way to one peer: the direct mutual-TLS link (direct.py) or the
directory's sealed mailbox (mailbox.py), which the peer collects from whenever it is online.
Delivery (delivery.py) runs over any of them and knows no wire: it hands a transport batches
of committed messages and ids to acknowledge, and reads from it what arrived, already checked
(sender, ids, sizes) and decoded into domain values (or, from the mailbox, what it now holds).
A transport cuts what it is given into its own frames and keeps its own limits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from p2pchat_agent.messages import IncomingMessage, StoredMessage

# What Delivery hands a transport in one call at most: a batch of messages it can send as one
# unit (the direct link makes it one frame; bodies are counted at 4 bytes a character, a bound).
BATCH = 500
BATCH_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class MessagesReceived:
    """Messages that arrived together from the peer (checked: they are the peer's, for us)."""

    messages: list[IncomingMessage]


@dataclass(frozen=True, slots=True)
class AcksReceived:
    """Ids of our messages that the peer has committed."""

    ids: list[str]


@dataclass(frozen=True, slots=True)
class HeldByMailbox:
    """Ids of our messages that the directory's sealed mailbox now holds for the peer, until
    `until` (then it drops what was never collected): relayed, not yet delivered."""

    ids: list[str]
    until: datetime


Received = MessagesReceived | AcksReceived | HeldByMailbox


class Transport(Protocol):
    """One open way to `peer`. Sending may wait (flow control); `received()` ends when the peer
    ends its side and raises a DomainError for what it refuses (which ends the run)."""

    @property
    def peer(self) -> str: ...

    @property
    def device(self) -> str:
        """The peer's device this transport reaches (tls.device_id), '' when it cannot tell
        (a mailbox reaches whichever device collects): delivery state is kept per device."""
        ...

    @property
    def relays(self) -> bool:
        """Whether this is the mailbox: it sends only what the mailbox does not hold yet (a
        direct link sends whatever is not delivered, relayed or not)."""
        ...

    @property
    def closed(self) -> bool: ...

    def received(self) -> AsyncIterator[Received]: ...

    async def send_messages(self, messages: list[StoredMessage]) -> None: ...

    async def send_acks(self, ids: list[str]) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


def batches(messages: list[StoredMessage]) -> list[list[StoredMessage]]:
    """`messages` cut into batches of at most BATCH messages and BATCH_BODY_BYTES of bodies
    (4 bytes per character at most in UTF-8: a bound, no encoding), at least one message each."""
    out: list[list[StoredMessage]] = []
    chunk: list[StoredMessage] = []
    size = 0
    for m in messages:
        bound = 4 * len(m.body)
        if chunk and (size + bound > BATCH_BODY_BYTES or len(chunk) == BATCH):
            out.append(chunk)
            chunk, size = [], 0
        chunk.append(m)
        size += bound
    if chunk:
        out.append(chunk)
    return out
