"""The source failed logins are counted by, from gRPC's peer string: IPv4 addresses as they are,
IPv6 by /64, anything else "unknown"."""

from __future__ import annotations

from typing import cast

import pytest

from p2pchat_directory.servicer import Context, client_source


class Peer:
    """Just enough of a servicer context: its peer()."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer


def source(peer: str) -> str:
    return client_source(cast(Context, Peer(peer)))


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv4:127.0.0.1:54321", "127.0.0.1"),
        ("ipv4:203.0.113.7:1", "203.0.113.7"),
        # IPv4 reaching a dual-stack socket, plain or percent-encoded: the IPv4 address.
        ("ipv6:[::ffff:127.0.0.1]:1234", "127.0.0.1"),
        ("ipv6:%5B::ffff:127.0.0.1%5D:1234", "127.0.0.1"),
        ("ipv6:%5B::ffff:c000:0201%5D:1234", "192.0.2.1"),
    ],
)
def test_ipv4_sources_are_the_address_also_when_ipv4_mapped(peer: str, expected: str) -> None:
    assert source(peer) == expected


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("ipv6:[::1]:5555", "::/64"),
        ("ipv6:%5B::1%5D:5555", "::/64"),
        ("ipv6:[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
        ("ipv6:%5B2001:DB8:1:2::ffff%5D:443", "2001:db8:1:2::/64"),
        ("ipv6:%5Bfe80::1%25eth0%5D:80", "fe80::/64"),  # the zone is no part of the source
    ],
)
def test_ipv6_sources_are_the_64_prefix(peer: str, expected: str) -> None:
    assert source(peer) == expected


def test_every_address_of_one_ipv6_64_is_one_source() -> None:
    addresses = ("2001:db8:aa:bb::1", "2001:db8:aa:bb:ffff:ffff:ffff:ffff", "2001:db8:aa:bb:1::9")
    assert {source(f"ipv6:[{a}]:4000") for a in addresses} == {"2001:db8:aa:bb::/64"}
    assert source("ipv6:[2001:db8:aa:bc::1]:4000") != source("ipv6:[2001:db8:aa:bb::1]:4000")


@pytest.mark.parametrize(
    "peer",
    [
        "unix:/run/p2pchat/directory.sock",
        "unix-abstract:p2pchat",
        "",
        "ipv4:",
        "ipv4:127.0.0.1",  # no port
        "ipv4:300.1.1.1:80",
        "ipv6:[not-an-address]:80",
        "ipv6:%5Bzz::1%5D:80",
        "tcp:127.0.0.1:80",
        "127.0.0.1:80",
    ],
)
def test_unix_sockets_and_unparseable_peers_are_unknown(peer: str) -> None:
    assert source(peer) == "unknown"
