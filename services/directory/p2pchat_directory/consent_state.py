"""Where a contact pair stands (pure: no I/O): its state from both users' rows, the view an
owner gets of an ACCEPTED contact, and the refusal of anything else (consent.py's use cases,
Lookup and Deposit use them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from p2pchat_common.errors import FailedPrecondition
from p2pchat_directory.consent_store import BLOCK, WANT, Pair, Side


class ContactState(enum.Enum):
    NONE = "none"
    ACCEPTED = "accepted"
    REQUESTED = "requested"
    AWAITING = "awaiting"
    BLOCKED = "blocked"


class Policy(enum.Enum):
    ANYONE = "anyone"
    INVITE = "invite"
    NOBODY = "nobody"


def contact_state(mine: Side | None, theirs: Side | None) -> ContactState:
    """Where a pair stands for the owner of `mine` (either row may be missing)."""
    if mine is not None and mine.state == BLOCK:
        return ContactState.BLOCKED
    if mine is not None and mine.state == WANT and theirs is not None and theirs.state == WANT:
        return ContactState.ACCEPTED
    if mine is not None:
        return ContactState.REQUESTED
    if theirs is not None and theirs.state == WANT:
        return ContactState.AWAITING
    return ContactState.NONE


@dataclass(frozen=True)
class ContactView:
    username: str
    address: str
    pinned_address: str
    online: bool
    last_seen: datetime | None
    state: ContactState = ContactState.ACCEPTED
    note: str = ""
    requested_at: datetime | None = None


def contact_view(
    username: str,
    pinned_address: str,
    registered_address: str,
    online_until: datetime | None,
    last_seen: datetime | None,
    now: datetime,
) -> ContactView:
    """How an ACCEPTED contact looks to its owner: the pinned address wins over the registered
    one, and online means a heartbeat within the presence TTL (online_until still ahead)."""
    return ContactView(
        username=username,
        address=pinned_address or registered_address,
        pinned_address=pinned_address,
        online=online_until is not None and online_until > now,
        last_seen=last_seen,
    )


def require_accepted(name: str, found: Pair) -> str:
    """The owner's pinned address toward `name` when the pair is ACCEPTED; FailedPrecondition
    otherwise (a user who blocked the owner looks like one who has not accepted yet)."""
    state = contact_state(found.mine, found.theirs)
    if state is ContactState.ACCEPTED and found.mine is not None:
        return found.mine.pinned_address
    if state is ContactState.REQUESTED:
        raise FailedPrecondition(f"{name!r} has not accepted your contact request yet")
    if state is ContactState.BLOCKED:
        raise FailedPrecondition(f"you blocked {name!r}: unblock them first")
    raise FailedPrecondition(f"{name!r} is not in your contacts: add them first")
