"""At most one link per pair of agents; when both dial at once, both keep the same one (the link
dialled by the smaller username)."""

from __future__ import annotations

import asyncio

import pytest

from p2pchat_agent.direct import DirectLink
from p2pchat_agent.registry import LinkRegistry, OpenLink
from p2pchat_common.errors import AlreadyExists


def entry(me: str, peer: str, dialed_by: str) -> OpenLink:
    return OpenLink(DirectLink(me, peer, "", dialed_by, 16_384), cert_sha256="0" * 64)


def test_a_second_link_with_the_same_peer_is_refused_while_the_first_is_open() -> None:
    async def run() -> None:
        registry = LinkRegistry(lambda: "alice")
        first = entry("alice", "bob", "alice")
        registry.attach(first)
        with pytest.raises(AlreadyExists):
            registry.attach(entry("alice", "bob", "alice"))
        assert registry.get("bob") is first and registry.peers == ["bob"]
        first.transport.close()  # a closed link is replaced
        second = entry("alice", "bob", "alice")
        registry.attach(second)
        assert registry.get("bob") is second

    asyncio.run(run())


@pytest.mark.parametrize("order", ["alice-first", "bob-first"])
def test_simultaneous_dials_keep_the_link_dialled_by_the_smaller_name_on_both_sides(
    order: str,
) -> None:
    async def run() -> tuple[OpenLink | None, OpenLink | None]:
        at_alice, at_bob = LinkRegistry(lambda: "alice"), LinkRegistry(lambda: "bob")
        # Each agent has its own end of both links: the one alice dialled, the one bob dialled.
        alices = {"alice": entry("alice", "bob", "alice"), "bob": entry("alice", "bob", "bob")}
        bobs = {"alice": entry("bob", "alice", "alice"), "bob": entry("bob", "alice", "bob")}
        dialers = ["alice", "bob"] if order == "alice-first" else ["bob", "alice"]
        for registry, ends in ((at_alice, alices), (at_bob, bobs)):
            for dialer in dialers:
                try:
                    registry.attach(ends[dialer])
                except AlreadyExists:
                    ends[dialer].transport.close()
        return at_alice.get("bob"), at_bob.get("alice")

    at_alice, at_bob = asyncio.run(run())
    assert at_alice is not None and at_bob is not None
    assert isinstance(at_alice.transport, DirectLink) and isinstance(at_bob.transport, DirectLink)
    assert at_alice.transport.dialed_by == at_bob.transport.dialed_by == "alice"
    assert not at_alice.transport.closed and not at_bob.transport.closed


def test_detach_removes_only_the_link_it_is_given() -> None:
    async def run() -> None:
        registry = LinkRegistry(lambda: "alice")
        old, new = entry("alice", "bob", "alice"), entry("alice", "bob", "alice")
        registry.attach(old)
        old.transport.close()
        registry.attach(new)
        registry.detach(old)  # the old link's run ends after it was replaced
        assert registry.get("bob") is new
        registry.detach(new)
        assert registry.get("bob") is None and "bob" not in registry

    asyncio.run(run())
