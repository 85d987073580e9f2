"""What a message is to the agent, apart from where it is kept: the values the store, delivery
and the transports pass around, and the store's domain errors."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

from p2pchat_common.errors import AlreadyExists, NotFound


class Direction(StrEnum):
    OUT = "out"
    IN = "in"


class Status(StrEnum):
    PENDING = "pending"  # outgoing, not yet acknowledged by the peer
    RELAYED = "relayed"  # outgoing, held sealed by the directory's mailbox for the peer
    DELIVERED = "delivered"  # outgoing, acknowledged
    RECEIVED = "received"  # incoming


class DuplicateMessageError(AlreadyExists, ValueError):
    """A message with this id is already stored."""


class _Missing(NotFound, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownMessageError(_Missing):
    """No message with this id (in the conversation asked about)."""


class UnknownPeerKeyError(_Missing):
    """No key is pinned for this peer."""


class StoredMessage(NamedTuple):
    """One message of `<username>.db`, in the direct conversation (conversations.py) with
    `peer`. A NamedTuple, not a frozen dataclass: thousands are made per second on a busy link,
    and a tuple is made several times faster."""

    id: str
    peer: str  # the other party
    direction: Direction
    sender: str
    recipient: str
    body: str
    sent_at: datetime
    received_at: datetime | None
    delivered_at: datetime | None
    status: Status
    seq: int = 0  # local order of creation or arrival; 0 until stored
    reason: str = ""  # outgoing, not delivered: why it is held back, if anything holds it


class OutgoingMessage(NamedTuple):  # NamedTuples: made for every message, several times faster
    id: str
    sender: str
    recipient: str
    body: str
    sent_at: datetime


class IncomingMessage(NamedTuple):
    id: str
    sender: str
    recipient: str
    body: str
    sent_at: datetime


@dataclass(frozen=True)
class PeerKey:
    sha256: str  # the pinned key
    pinned_at: datetime
    presented_sha256: str | None  # a different key seen since, not (yet) trusted
    changed_at: datetime | None
    device: str = ""  # the pinned key's device (tls.device_id of sha256)
