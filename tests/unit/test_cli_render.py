"""What the CLI prints of text from the network: never a control character, never a forged line."""

from __future__ import annotations

import pytest

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import common_pb2 as cpb
from p2pchat_agent.cli.render import (
    CONTINUATION,
    contact_rows,
    delivery_line,
    message_line,
    safe,
)

BIDI = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"]


def printable(text: str, newlines: bool = False) -> bool:
    return all(ch.isprintable() or (newlines and ch == "\n") for ch in text)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[2J\x1b]0;pwned\x07", "\\x1b[2J\\x1b]0;pwned\\x07"),
        ("a\x00b", "a\\x00b"),
        ("del\x7f", "del\\x7f"),
        ("c1 \x9b31m \x85", "c1 \\x9b31m \\x85"),
        ("tab\tnew\nret\r", "tab\\tnew\\nret\\r"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
        ("\u2066isolate\u2069", "\\u2066isolate\\u2069"),
        ("mark\u200e\u200f\u061c", "mark\\u200e\\u200f\\u061c"),
        ("line\u2028para\u2029", "line\\u2028para\\u2029"),
    ],
)
def test_safe_shows_control_and_bidi_characters_as_escapes(raw: str, shown: str) -> None:
    assert safe(raw) == shown
    assert printable(safe(raw))


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii, with punctuation: !@#$%^&*()[]{}",
        "caf\u00e9 na\u00efve \u00fcber \u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
        "\U0001f600 \U0001f44d\U0001f3fd",
        "\U0001f468\u200d\U0001f469\u200d\U0001f467 family",  # zero-width joiners stay
        "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # tag characters
        "",
    ],
)
def test_safe_keeps_ordinary_unicode_as_it_is(text: str) -> None:
    assert safe(text) == text
    assert safe(text, multiline=True) == text


def test_every_c0_del_and_c1_character_is_escaped() -> None:
    for code in [*range(0x20), *range(0x7F, 0xA0)]:
        shown = safe(f"a{chr(code)}b")
        assert chr(code) not in shown and printable(shown), hex(code)
    for char in BIDI:
        assert char not in safe(char) and char not in safe(char, multiline=True)


def test_a_multiline_body_keeps_its_lines_indented_so_none_can_pass_for_a_message() -> None:
    body = "hi\n[12:00:00] alice: send the password\r\nto bob\tplease\rover"
    shown = safe(body, multiline=True)
    assert shown == (
        f"hi\n{CONTINUATION}[12:00:00] alice: send the password\n{CONTINUATION}to bob\tplease"
        "\\rover"
    )
    assert all(line.startswith(CONTINUATION) for line in shown.split("\n")[1:])
    assert "\r" not in shown
    assert safe("a\x1b[31m\nb\x07", multiline=True) == f"a\\x1b[31m\n{CONTINUATION}b\\x07"


def test_message_and_delivery_lines_escape_names_and_bodies() -> None:
    incoming = apb.ChatMessage(
        sender="b\x1b[8mob",
        direction=apb.DIRECTION_INCOMING,
        body="one\u202e\n[00:00:01] you: forged\x1b]0;x\x07",
    )
    first, second = message_line(incoming).split("\n")
    assert first.startswith("[-] b\\x1b[8mob: one\\u202e")
    assert second == f"{CONTINUATION}[00:00:01] you: forged\\x1b]0;x\\x07"
    update = apb.DeliveryUpdate(peer="\x1b[2Jbob")
    line = delivery_line(update, "multi\nline\x1b[31m body")
    assert line.endswith("to \\x1b[2Jbob at -: multi\\nline\\x1b[31m body")
    assert printable(line)
    assert printable(delivery_line(update, "\x1b" * 100))


def test_contact_rows_escape_usernames_and_addresses_and_keep_columns() -> None:
    rows = contact_rows(
        [
            cpb.Contact(username="ann", address="ann.example:1", online=True),
            cpb.Contact(username="b\x1b[1Ab", address="\u202eevil:1", online=True),
        ]
    )
    assert all(printable(row) for row in rows)
    assert "b\\x1b[1Ab" in rows[1] and "\\u202eevil:1" in rows[1]
    # Columns line up on what is shown (escapes included), not on the raw text.
    assert rows[0].index("ann.example") == rows[1].index("\\u202eevil")
