"""Contact consent as this agent enforces it: its own copy of where consent stands with each user
(`<username>.db`, store_contacts.py), refreshed from the directory's ListContacts.

The directory enforces consent for what it serves (Lookup, deposits); the agent checks again,
from this copy, before it stores anything: a link from a user not accepted is refused at its
Hello, an envelope from one is discarded, so that a compromised or buggy directory cannot make
it store a stranger's messages. A user not accepted in the copy is looked up again once
(at most every REFRESH_AT_MOST seconds) before being refused: an acceptance may be seconds old.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from p2pchat.v1 import common_pb2
from p2pchat_agent import store_contacts
from p2pchat_agent.agent_store import AgentStore
from p2pchat_agent.directory_client import DirectoryClient

log = logging.getLogger(__name__)

REFRESH_AT_MOST = 0.5  # seconds between refreshes that others' links or envelopes may cause

ACCEPTED, REQUESTED, AWAITING, BLOCKED = "accepted", "requested", "awaiting", "blocked"
_WORDS = {
    common_pb2.CONTACT_STATE_ACCEPTED: ACCEPTED,
    common_pb2.CONTACT_STATE_REQUESTED: REQUESTED,
    common_pb2.CONTACT_STATE_AWAITING: AWAITING,
    common_pb2.CONTACT_STATE_BLOCKED: BLOCKED,
}


@dataclass(frozen=True)
class Changes:
    """What a refresh changed: users newly accepted, and users no longer accepted."""

    accepted: list[str]
    ended: list[str]


def states_of(contacts: Iterable[common_pb2.Contact]) -> dict[str, str]:
    return {c.username: _WORDS[c.state] for c in contacts if c.state in _WORDS}


class ContactBook:
    def __init__(self, store: AgentStore, directory: DirectoryClient) -> None:
        self._store = store
        self._directory = directory
        self._states: dict[str, str] = {}
        self._refreshed_at = -REFRESH_AT_MOST
        self._lock = asyncio.Lock()
        # Told of every change, whichever refresh found it (a Hello's, an envelope's, a
        # listing's): links with users no longer accepted must close (contacts.Contacts).
        self.on_change: Callable[[Changes], Awaitable[None]] | None = None

    async def load(self) -> None:
        """The copy as stored (the directory may be unreachable at start)."""
        self._states = await self._store.read(
            self._store.sync.in_transaction, False, store_contacts.states
        )

    def state(self, peer: str) -> str | None:
        return self._states.get(peer)

    def accepted(self, peer: str) -> bool:
        return self._states.get(peer) == ACCEPTED

    def may_send(self, peer: str) -> bool:
        """Accepted, or asked by us: a message waits, pending, until they accept."""
        return self._states.get(peer) in (ACCEPTED, REQUESTED)

    async def _update(self, contacts: Iterable[common_pb2.Contact]) -> Changes:
        """Replaces the copy by what the directory answered (ListContacts; the caller holds the
        lock, so that an older answer never overwrites a newer one); what changed, also told
        to `on_change`. Nothing is written when nothing changed."""
        states = states_of(contacts)
        before = self._states
        if states == before:
            return Changes([], [])
        self._states = states
        await self._store.write(
            self._store.sync.in_transaction, True, store_contacts.replace, states
        )
        accepted = sorted(
            p for p, s in states.items() if s == ACCEPTED and before.get(p) != ACCEPTED
        )
        ended = sorted(p for p, s in before.items() if s == ACCEPTED and states.get(p) != ACCEPTED)
        for peer in accepted:
            log.info("%s is an accepted contact now", peer)
        for peer in ended:
            log.info("%s is no longer an accepted contact", peer)
        changes = Changes(accepted, ended)
        if self.on_change is not None and (accepted or ended):
            await self.on_change(changes)
        return changes

    async def refresh(self) -> list[common_pb2.Contact]:
        """The directory's ListContacts, and the copy brought up to it; the contacts."""
        async with self._lock:
            self._refreshed_at = asyncio.get_running_loop().time()
            contacts = list((await self._directory.list_contacts()).contacts)
            await self._update(contacts)
            return contacts

    async def verdict(self, peer: str) -> Literal["accepted", "refused", "unknown"]:
        """For an envelope from `peer`, which the directory let through (it checked consent
        at the deposit): accepted from the copy, else after a refresh now. Refused only when
        blocked or when that refresh says they are not accepted; unknown when it failed (the
        envelope then stays at the directory: an acceptance must not lose a message)."""
        if self.accepted(peer):
            return "accepted"
        if self._states.get(peer) == BLOCKED:
            return "refused"
        try:
            await self.refresh()
        except Exception as exc:
            log.info("cannot refresh the contacts (%s): the envelope waits", exc)
            return "unknown"
        return "accepted" if self.accepted(peer) else "refused"

    async def admits(self, peer: str, ours: bool = False) -> bool:
        """Whether `peer` is accepted: from the copy, else after one refresh (at most every
        REFRESH_AT_MOST s, unless `ours`: for a link we dial, bounded by the dial's backoff;
        the copy stands when the directory cannot be asked)."""
        if self.accepted(peer):
            return True
        if self._states.get(peer) == BLOCKED:
            return False
        now = asyncio.get_running_loop().time()
        if ours or now - self._refreshed_at >= REFRESH_AT_MOST:
            try:
                await self.refresh()
            except Exception as exc:  # the directory is unreachable: the copy decides
                log.info("cannot refresh the contacts (%s): deciding from the copy", exc)
        elif self._lock.locked():  # a refresh is under way: decide on what it brings
            async with self._lock:
                pass
        return self.accepted(peer)
