"""Password hashing: scrypt with a per-password salt, verification that never raises on junk."""

from __future__ import annotations

import base64

import pytest

from p2pchat_directory.passwords import (
    DUMMY_HASH,
    LOG2_N,
    P,
    R,
    hash_password,
    verify_password,
)

PASSWORD = "correct horse battery"


def test_a_hash_verifies_its_own_password_only() -> None:
    stored = hash_password(PASSWORD)
    assert verify_password(PASSWORD, stored)
    assert not verify_password("correct horse batterz", stored)
    assert not verify_password(PASSWORD.upper(), stored)
    assert not verify_password("", stored)


def test_unicode_passwords_roundtrip_and_are_not_normalised() -> None:
    password = "p\u00e4ssw\u00f6rd-\u5bc6\u7801-\U0001f511"
    stored = hash_password(password)
    assert verify_password(password, stored)
    # "a" + combining diaeresis looks the same as "\u00e4" but is a different password.
    assert not verify_password(password.replace("\u00e4", "a\u0308"), stored)


def test_the_stored_form_carries_scheme_parameters_salt_and_no_clear_password() -> None:
    stored = hash_password(PASSWORD)
    scheme, log2_n, r, p, salt, digest = stored.split("$")
    assert (scheme, int(log2_n), int(r), int(p)) == ("scrypt", LOG2_N, R, P)
    assert LOG2_N >= 14  # memory-hard: at least 16 MiB per hash with r = 8
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 32
    assert PASSWORD not in stored


def test_two_hashes_of_one_password_differ_by_their_salt() -> None:
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first != second
    assert first.split("$")[4] != second.split("$")[4]
    assert verify_password(PASSWORD, first) and verify_password(PASSWORD, second)


def test_the_dummy_hash_for_unknown_users_is_a_real_hash_no_guess_matches() -> None:
    assert DUMMY_HASH.startswith(f"scrypt${LOG2_N}$")
    for guess in ("", PASSWORD, "password", "dummy"):
        assert not verify_password(guess, DUMMY_HASH)


_GOOD = hash_password(PASSWORD)


def _tweak(field: int, value: str) -> str:
    parts = _GOOD.split("$")
    parts[field] = value
    return "$".join(parts)


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "scrypt",
        PASSWORD,
        "scrypt$15$8$1$c2FsdA==",  # too few fields
        "scrypt$15$8$1$c2FsdA==$ZGlnZXN0$extra",  # too many fields
        _tweak(0, "bcrypt"),
        _tweak(0, "SCRYPT"),
        _tweak(1, "fifteen"),
        _tweak(1, "-1"),
        _tweak(1, "0"),  # n = 1 is not allowed by scrypt
        _tweak(1, "40"),  # far beyond the memory limit
        _tweak(2, "0"),
        _tweak(3, "0"),
        _tweak(4, "!!not base64!!"),
        _tweak(5, "\u00e9"),
        _tweak(5, ""),
        _tweak(5, base64.b64encode(b"\x00" * 32).decode()),
    ],
    ids=lambda s: repr(s)[:40],
)
def test_malformed_or_foreign_stored_hashes_verify_false_without_raising(stored: str) -> None:
    assert verify_password(PASSWORD, stored) is False


def test_a_stored_hash_with_a_huge_cost_parameter_verifies_false() -> None:
    assert verify_password(PASSWORD, _tweak(1, "64")) is False
