"""The open links of one agent: at most one per peer, direct or through the mailbox.

Two direct links between the same pair (both agents dialled at once) resolve the same way on
both sides: the one dialled by the smaller username stays, the other is refused or closed. A
direct link replaces the mailbox transport to its peer (direct first); a mailbox transport is
refused while a direct link is open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from p2pchat_agent.delivery import Outflow
from p2pchat_agent.direct import DirectLink
from p2pchat_agent.transport import Transport
from p2pchat_common.errors import AlreadyExists

log = logging.getLogger(__name__)


@dataclass(eq=False)
class OpenLink:
    """An attached link with what Delivery keeps for it and the certificate it was opened on
    ("" for the mailbox)."""

    transport: Transport
    cert_sha256: str
    outflow: Outflow = field(default_factory=Outflow)

    @property
    def peer(self) -> str:
        return self.transport.peer

    @property
    def direct(self) -> bool:
        return not self.transport.relays


class LinkRegistry:
    def __init__(self, me: Callable[[], str]) -> None:
        self._me = me
        self._open: dict[str, OpenLink] = {}

    def attach(self, entry: OpenLink) -> None:
        """Registers `entry` as the link with its peer; AlreadyExists when the open one stays."""
        link = entry.transport
        current = self._open.get(link.peer)
        if current is not None and not current.transport.closed:
            if not entry.direct:
                raise AlreadyExists(f"a link with {link.peer} is already open")
            if isinstance(link, DirectLink) and isinstance(current.transport, DirectLink):
                keeper = min(self._me(), link.peer)
                if link.dialed_by != keeper or current.transport.dialed_by == keeper:
                    raise AlreadyExists(f"a link with {link.peer} is already open")
            log.info("replacing %r by %r", current.transport, link)
            current.transport.close()
        self._open[link.peer] = entry

    def detach(self, entry: OpenLink) -> None:
        if self._open.get(entry.peer) is entry:
            del self._open[entry.peer]

    def get(self, peer: str) -> OpenLink | None:
        return self._open.get(peer)

    def __contains__(self, peer: str) -> bool:
        return peer in self._open

    def linked(self, peer: str) -> bool:
        """Whether a direct link with `peer` is open."""
        entry = self._open.get(peer)
        return entry is not None and entry.direct and not entry.transport.closed

    @property
    def peers(self) -> list[str]:
        """The peers with an open direct link, sorted."""
        return sorted(peer for peer, entry in self._open.items() if entry.direct)

    @property
    def relayed_peers(self) -> list[str]:
        """The peers reached through the mailbox now, sorted."""
        return sorted(peer for peer, entry in self._open.items() if not entry.direct)

    def entries(self) -> list[OpenLink]:
        return list(self._open.values())

    def close_all(self) -> None:
        for entry in list(self._open.values()):
            entry.transport.close()
