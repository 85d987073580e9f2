"""Key pinning: a contact's key is pinned on first contact, and a different one is refused (and
recorded, and announced) until the user trusts it with `p2pchat trust USER`."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from p2pchat_agent.agent_store import AgentStore
from p2pchat_agent.events import EventHub, KeyChangedEvent
from p2pchat_common.errors import PermissionDenied

log = logging.getLogger(__name__)


class KeyPins:
    def __init__(self, store: AgentStore, events: EventHub) -> None:
        self._store = store
        self._events = events

    async def check(self, peer: str, presented: str) -> None:
        """Pins `presented` (a key's SHA-256) on first contact; PermissionDenied for a key that
        differs from the pinned one. Called only once a link is otherwise accepted (Hellos
        matched, certificate good), so a refused link writes nothing."""
        pin = await self._store.get_pin(peer)
        now = datetime.now(UTC)
        if pin is None:
            await self._store.pin(peer, presented, now)
            log.info("pinned %s's key %s on first contact", peer, presented[:16])
            return
        if pin.sha256 == presented:
            return
        if pin.presented_sha256 != presented:
            await self._store.record_key_change(peer, presented, now)
            log.warning(
                "KEY CHANGE: %s presented key %s but %s is pinned; links refused until the user "
                "trusts the new key",
                peer,
                presented[:16],
                pin.sha256[:16],
            )
            self._events.publish(KeyChangedEvent(peer, pin.sha256, presented))
        raise PermissionDenied(
            f"{peer}'s key has changed since it was pinned; if expected, trust it with "
            f"`p2pchat trust {peer}`"
        )
