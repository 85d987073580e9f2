"""The shared input rules: usernames, passwords and host:port addresses."""

from __future__ import annotations

import pytest

from p2pchat_common.errors import InvalidArgument
from p2pchat_common.validation import (
    ADDRESS_MAX,
    HostPort,
    normalize_address,
    normalize_username,
    parse_address,
    validate_password,
)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("abc", "abc"),  # shortest allowed
        ("a" * 32, "a" * 32),  # longest allowed
        ("Alice", "alice"),
        ("BOB_SMITH-99", "bob_smith-99"),
        ("a1_", "a1_"),
        ("z--", "z--"),
    ],
)
def test_normalize_username_accepts_the_alphabet_and_folds_case(raw: str, canonical: str) -> None:
    assert normalize_username(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "required"),
        ("ab", "3-32 characters"),
        ("a" * 33, "too long"),
        ("A" * 33, "too long"),
        ("1abc", "a letter first"),
        ("_abc", "a letter first"),
        ("-abc", "a letter first"),
        ("al ice", "invalid username"),
        ("al.ice", "invalid username"),
        ("al@ice", "invalid username"),
        ("alice'; DROP TABLE users;--", "invalid username"),
        ("bob\x00", "invalid username"),
        ("alice\n", "invalid username"),
        ("\uff41\uff4c\uff49\uff43\uff45", "invalid username"),  # fullwidth
        ("alice\u200b", "invalid username"),  # zero-width space
        ("\u0430lice", "invalid username"),  # Cyrillic a
        ("\u00e5lice", "invalid username"),
        ("\u0130ab", "invalid username"),  # dotted capital I lower-cases to two characters
        ("\U0001f600smile", "invalid username"),
    ],
)
def test_normalize_username_rejects_names_outside_the_rule(raw: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        normalize_username(raw)
    assert fragment in str(caught.value)


def test_normalize_username_does_not_echo_a_huge_name_whole() -> None:
    with pytest.raises(InvalidArgument) as caught:
        normalize_username("x" * 100_000)
    assert len(str(caught.value)) < 200
    with pytest.raises(InvalidArgument) as caught:
        normalize_username("\u00e5" * 30)
    assert len(str(caught.value)) < 200


def test_normalize_username_rejects_non_ascii_input_that_lower_cases_to_ascii() -> None:
    with pytest.raises(InvalidArgument):
        normalize_username("\u212aate")


@pytest.mark.parametrize(
    "password", ["p" * 8, "p" * 1024, "p\u00e4ssw\u00f6rd-\u5bc6\u7801-\U0001f511"]
)
def test_validate_password_accepts_8_to_1024_characters(password: str) -> None:
    assert validate_password(password) == password


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("", "required"),
        ("p" * 7, "too short"),
        ("p" * 1025, "too long"),
        ("pass\x00word", "NUL"),
    ],
)
def test_validate_password_rejects_bad_passwords(password: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        validate_password(password)


@pytest.mark.parametrize(
    ("raw", "host", "port", "text"),
    [
        ("192.168.1.20:50052", "192.168.1.20", 50052, "192.168.1.20:50052"),
        ("[::1]:50052", "::1", 50052, "[::1]:50052"),
        ("[2001:DB8:0:0::1]:1", "2001:db8::1", 1, "[2001:db8::1]:1"),
        (
            "Bob-Laptop.Example.ORG:7000",
            "bob-laptop.example.org",
            7000,
            "bob-laptop.example.org:7000",
        ),
        ("localhost:65535", "localhost", 65535, "localhost:65535"),
        ("host.example.:80", "host.example.", 80, "host.example.:80"),
        ("a" * 63 + ".example:1", "a" * 63 + ".example", 1, "a" * 63 + ".example:1"),
    ],
)
def test_parse_address_accepts_ipv4_bracketed_ipv6_and_dns_names(
    raw: str, host: str, port: int, text: str
) -> None:
    parsed = parse_address(raw)
    assert parsed == HostPort(host, port)
    assert str(parsed) == text


def test_parse_address_accepts_a_253_character_host_name() -> None:
    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(host) == 253
    assert parse_address(f"{host}:443").host == host
    with pytest.raises(InvalidArgument, match="bad host name"):
        parse_address(f"{host}e:443")


def test_parse_address_accepts_port_zero_only_for_listen_addresses() -> None:
    with pytest.raises(InvalidArgument, match="port must be 1-65535"):
        parse_address("127.0.0.1:0")
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == HostPort("127.0.0.1", 0)
    assert str(parse_address("[::]:0", allow_port_zero=True)) == "[::]:0"
    with pytest.raises(InvalidArgument, match="port must be 0-65535"):
        parse_address("127.0.0.1:65536", allow_port_zero=True)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "required"),
        ("nohost", "expected host:port"),
        (":80", "expected host:port"),
        ("host:", "port must be"),
        ("host:65536", "port must be"),
        ("host:-1", "port must be"),
        ("host:http", "port must be"),
        ("host:\uff18\uff10", "port must be"),  # fullwidth digits
        ("::1:80", "brackets"),
        ("[not-ipv6]:80", "bad IPv6"),
        ("[1.2.3.4]:80", "bad IPv6"),
        ("bad_host!:80", "bad host name"),
        ("-leading.example:80", "bad host name"),
        ("trailing-.example:80", "bad host name"),
        ("a..b:80", "bad host name"),
        ("a" * 64 + ".example:80", "bad host name"),
        ("h\u00f6st.example:80", "bad host name"),
        ("host name:80", "bad host name"),
    ],
)
def test_parse_address_rejects_malformed_addresses(raw: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_address(raw)
    assert fragment in str(caught.value)


def test_parse_address_rejects_addresses_longer_than_the_limit_without_echoing_them() -> None:
    raw = "a" * (ADDRESS_MAX - 2) + ":80"
    assert len(raw) == ADDRESS_MAX + 1
    with pytest.raises(InvalidArgument) as caught:
        parse_address(raw)
    assert "too long" in str(caught.value) and len(str(caught.value)) < 100


def test_parse_address_names_what_was_being_parsed_in_errors() -> None:
    with pytest.raises(InvalidArgument, match="listen address"):
        parse_address("nohost", what="listen address")


def test_normalize_address_keeps_empty_as_no_address_and_canonicalises_others() -> None:
    assert normalize_address("") == ""
    assert normalize_address("[0:0::1]:9") == "[::1]:9"
    assert normalize_address("EXAMPLE.com:9") == "example.com:9"
    with pytest.raises(InvalidArgument, match="pinned"):
        normalize_address("x", what="pinned address")
