"""How a certificate names a p2pchat user (p2pchat_common.tls.user_identity): exactly one user URI
and one device URI of that same user, or no identity at all."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2pchat_common.tls import is_reserved_name, user_dns_name, user_identity, user_sans

KEY = ec.generate_private_key(ec.SECP256R1())


def certificate(sans: list[x509.GeneralName] | None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(KEY, hashes.SHA256())


def uri(value: str) -> x509.GeneralName:
    return x509.UniformResourceIdentifier(value)


def test_a_user_certificate_names_its_user_and_device() -> None:
    assert user_identity(certificate(user_sans("bob", "0123abcd"))) == ("bob", "0123abcd")


@pytest.mark.parametrize(
    "sans",
    [
        None,
        [x509.DNSName(user_dns_name("bob"))],
        [uri("p2pchat:user:bob")],
        [uri("p2pchat:user:bob"), uri("p2pchat:user:eve"), uri("p2pchat:device:bob/01")],
        [uri("p2pchat:user:bob"), uri("p2pchat:device:bob/01"), uri("p2pchat:device:bob/02")],
        [uri("p2pchat:user:bob"), uri("p2pchat:device:eve/01")],
        [uri("p2pchat:user:bob"), uri("p2pchat:device:bob/")],
        [uri("p2pchat:user:bob"), uri("p2pchat:device:bob")],
    ],
    ids=[
        "no-san",
        "dns-only",
        "no-device",
        "two-users",
        "two-devices",
        "device-of-another-user",
        "empty-device",
        "device-without-slash",
    ],
)
def test_a_certificate_without_exactly_one_consistent_user_and_device_names_no_one(
    sans: list[x509.GeneralName] | None,
) -> None:
    assert user_identity(certificate(sans)) is None


@pytest.mark.parametrize(
    ("host", "reserved"),
    [
        ("bob.users.p2pchat.invalid", True),
        ("BOB.USERS.P2PCHAT.INVALID.", True),
        ("invalid", True),
        ("[::1]", False),
        ("directory.example", False),
        ("invalid.example", False),
    ],
)
def test_only_names_under_invalid_are_reserved(host: str, reserved: bool) -> None:
    assert is_reserved_name(host) is reserved
