"""`p2pchat status`: what the agent says of itself, as a value (control.py translates it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from p2pchat_agent.agent import Agent
from p2pchat_agent.agent_store import StoreClosed


@dataclass(frozen=True)
class AgentStatus:
    directory: str
    directory_reachable: bool
    address: str  # where other agents dial this one
    clock_offset: timedelta | None  # the directory's clock minus ours, once measured
    warnings: list[str] = field(default_factory=list)
    username: str | None = None  # None: logged out
    session_expires_at: datetime | None = None
    pending_messages: int = 0  # not yet delivered, relayed ones included
    relayed_messages: int = 0  # of those, held by the mailbox
    delivered_messages: int = 0
    linked_peers: list[str] = field(default_factory=list)
    mailbox_connected: bool = False
    envelopes_refused: int = 0
    link_frames_sent: int = 0  # since this login (peer.LinkManager.frames)
    link_frames_received: int = 0


async def status(agent: Agent) -> AgentStatus:
    reachable = agent.directory.reachable
    if reachable is None:  # no call made yet: ask now rather than guess
        reachable = await agent.directory.probe()
    warning = agent.clock.warning
    active = agent.active
    try:
        pending, relayed, delivered = (0, 0, 0) if active is None else await active.store.counts()
    except StoreClosed:  # logged out while this ran (e.g. the directory ended the session)
        active, (pending, relayed, delivered) = None, (0, 0, 0)
    inbox = None if active is None else active.inbox
    return AgentStatus(
        directory=agent.directory.address,
        directory_reachable=reachable,
        address=agent.address,
        clock_offset=agent.clock.offset,
        warnings=[] if warning is None else [warning],
        username=None if active is None else active.username,
        session_expires_at=None if active is None else active.session.expires_at,
        pending_messages=pending + relayed,
        relayed_messages=relayed,
        delivered_messages=delivered,
        mailbox_connected=inbox is not None and inbox.counts.connected,
        envelopes_refused=0 if inbox is None else inbox.counts.refused,
        linked_peers=[] if active is None else active.links.linked_peers,
        link_frames_sent=0 if active is None else active.links.frames.sent,
        link_frames_received=0 if active is None else active.links.frames.received,
    )
