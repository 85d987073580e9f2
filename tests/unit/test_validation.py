"""The shared input rules: usernames, passwords, host:port addresses, no control characters in
any text of a request, and how an error message shows what it was given."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct, Value

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import common_pb2 as cpb
from p2pchat.v1 import directory_pb2 as dpb
from p2pchat_common.errors import InvalidArgument, from_rpc_error
from p2pchat_common.text import control_refusal
from p2pchat_common.validation import (
    ADDRESS_MAX,
    HostPort,
    normalize_address,
    normalize_username,
    parse_address,
    shown,
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
        ("pass\x00word", "control characters"),
        ("pass\x1bword", "control characters"),
        ("pass\tword", "control characters"),
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


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("[fe80::1%eth0]:80", "fe80::1%eth0"),
        ("[fe80::1%3]:80", "fe80::1%3"),
        ("[fe80::1%wlp2s0.100]:80", "fe80::1%wlp2s0.100"),
        ("[fe80::1%br-lan_1]:80", "fe80::1%br-lan_1"),
        ("[fe80::1%" + "a" * 16 + "]:80", "fe80::1%" + "a" * 16),
    ],
)
def test_parse_address_accepts_a_zone_id_that_is_an_interface_name(raw: str, host: str) -> None:
    assert parse_address(raw).host == host
    assert str(parse_address(raw)) == raw


@pytest.mark.parametrize(
    "zone",
    [
        "",  # "[::1%]"
        "a b",
        "a\x00b",
        "a\x1b[31m",
        "a\nb",
        "a%b",
        "a/b",
        "-eth0",
        ".eth0",
        "a" * 17,
        "\u00e9th0",
        "eth0\u202e",
    ],
)
def test_parse_address_refuses_any_other_zone_id(zone: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_address(f"[::1%{zone}]:80")
    message = str(caught.value)
    assert "zone id" in message
    assert not any(ch in message for ch in "\x00\x1b\n\u202e")  # escaped, not echoed raw


def test_shown_quotes_cuts_and_escapes_what_it_echoes() -> None:
    assert shown("alice") == "'alice'"
    assert shown("x" * 41) == repr("x" * 40 + "…")
    assert len(shown("x" * 1_000_000)) < 50
    escaped = shown("\x1b[2J\x00\x7f\x85\u202e\u2066\n")
    assert escaped == "'\\x1b[2J\\x00\\x7f\\x85\\u202e\\u2066\\n'"
    assert escaped.isprintable()
    assert shown("caf\u00e9 \U0001f600") == "'caf\u00e9 \U0001f600'"  # ordinary text stays


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x7f", "\x85", "\x9b", "\t", "\n", "\r"])
def test_a_control_character_in_any_request_text_is_refused_naming_the_field(char: str) -> None:
    assert control_refusal(dpb.RegisterRequest(username="bob", address=f"h{char}:1")) == (
        "address must not contain control characters"
    )
    assert control_refusal(apb.HistoryRequest(peer="bob", before_id=f"01{char}")) == (
        "before_id must not contain control characters"
    )


def test_a_body_may_hold_tab_and_line_breaks_but_no_other_control_character() -> None:
    assert control_refusal(apb.SendRequest(peer="bob", body="one\ttwo\r\nthree\n")) is None
    for char in ("\x00", "\x08", "\x0b", "\x0c", "\x1b", "\x7f", "\x9f"):
        assert control_refusal(apb.SendRequest(peer="bob", body=f"a{char}b")) == (
            "body must not contain control characters other than tab and line breaks"
        ), repr(char)
    assert control_refusal(apb.SendRequest(peer="bob\n", body="ok")) == (
        "peer must not contain control characters"
    )


def test_the_check_goes_through_nested_repeated_recursive_and_map_fields() -> None:
    fine = apb.ChatInput(text=apb.ChatText(body="line one\nline two \u202e \U0001f600"))
    assert control_refusal(fine) is None
    assert control_refusal(apb.ChatInput(text=apb.ChatText(body="\x1b[2J"))) == (
        "text.body must not contain control characters other than tab and line breaks"
    )
    assert control_refusal(apb.ChatInput(open=apb.ChatOpen(peer="b\x00b"))) == (
        "open.peer must not contain control characters"
    )
    contacts = dpb.ListContactsResponse(
        contacts=[cpb.Contact(username="ann"), cpb.Contact(username="bob", address="h\x1b:1")]
    )
    assert control_refusal(contacts) == "contacts.address must not contain control characters"
    assert control_refusal(apb.StatusResponse(linked_peers=["ann", "b\x07"])) == (
        "linked_peers must not contain control characters"
    )
    assert control_refusal(dpb.LoginRequest(csr_pem=b"\x00\x1b")) is None  # bytes are not text
    assert control_refusal(apb.StatusRequest()) is None
    # google.protobuf.Struct: a map of Values, which hold Structs again.
    nested = Struct()
    nested.update({"outer": {"inner": ["ok", "not\x1bok"]}})
    assert control_refusal(nested) == (
        "fields.struct_value.fields.list_value.values.string_value must not contain control "
        "characters"
    )
    assert control_refusal(Struct(fields={"k\x00": Value(string_value="v")})) == (
        "fields key must not contain control characters"
    )
    clean = Struct()
    clean.update({"outer": {"inner": ["ok", 1, True, None]}})
    assert control_refusal(clean) is None


def test_shown_unquoted_escapes_and_cuts_the_same_way() -> None:
    assert shown("it's \x1b[2J fine", quoted=False) == "it's \\x1b[2J fine"
    assert shown("y" * 100, 10, quoted=False) == "y" * 10 + "…"


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_another_services_error_message_is_passed_on_escaped_and_cut() -> None:
    refused = from_rpc_error(_Failed(grpc.StatusCode.NOT_FOUND, "no \x1b[31muser\n"), "directory")
    assert refused.code == grpc.StatusCode.NOT_FOUND
    assert str(refused) == "no \\x1b[31muser\\n"
    down = from_rpc_error(_Failed(grpc.StatusCode.UNAVAILABLE, "x" * 100_000), "directory")
    assert str(down).startswith("directory unreachable: xxx") and len(str(down)) < 600
