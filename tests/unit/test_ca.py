"""The directory's certificate authority: kept in the data dir, signs server and agent keys."""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pchat_common.errors import InvalidArgument
from p2pchat_common.tls import user_identity
from p2pchat_directory.ca import CA_CERT_FILE, CA_KEY_FILE, MAX_CSR_BYTES, CertificateAuthority

DAY = timedelta(days=1)


def make_csr(key: CertificateIssuerPrivateKeyTypes, common_name: str = "admin") -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    algorithm = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else (hashes.SHA256())
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


def test_load_or_create_twice_in_one_dir_gives_the_same_ca(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "dir")
    second = CertificateAuthority.load_or_create(tmp_path / "dir")
    assert second.cert_pem == first.cert_pem
    assert (tmp_path / "dir" / CA_CERT_FILE).read_bytes() == first.cert_pem
    assert second.users_cert_pem == first.users_cert_pem
    # The reloaded key is the same key: what it signs verifies against the first CA.
    issued = second.sign_agent_csr(make_csr(ec.generate_private_key(ec.SECP256R1())), "amy", DAY)
    x509.load_pem_x509_certificate(issued.pem).verify_directly_issued_by(first.users.cert)


def test_another_data_dir_gets_another_ca(tmp_path: Path) -> None:
    one = CertificateAuthority.load_or_create(tmp_path / "one")
    two = CertificateAuthority.load_or_create(tmp_path / "two")
    assert one.cert_pem != two.cert_pem


def test_the_ca_key_file_is_private_and_the_certificate_public(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / CA_KEY_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / CA_CERT_FILE).st_mode) == 0o644
    assert b"PRIVATE KEY" not in (tmp_path / CA_CERT_FILE).read_bytes()


@pytest.mark.parametrize("which", ["root", "users"])
def test_each_ca_certificate_is_a_self_signed_ca_for_ten_years(
    ca: CertificateAuthority, which: str
) -> None:
    cert = ca.root.cert if which == "root" else ca.users.cert
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert cert.not_valid_after_utc - datetime.now(UTC) > timedelta(days=3640)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key made `cert`'s signature (whatever the names say)."""
    key = issuer.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and cert.signature_hash_algorithm
    try:
        key.verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
    except InvalidSignature:
        return False
    return True


def test_the_directory_root_and_the_users_ca_are_separate_keys(ca: CertificateAuthority) -> None:
    assert ca.root.cert.public_key() != ca.users.cert.public_key()
    issued = ca.sign_agent_csr(make_csr(ec.generate_private_key(ec.SECP256R1())), "localhost", DAY)
    user_cert = x509.load_pem_x509_certificate(issued.pem)
    server_cert = x509.load_pem_x509_certificate(ca.issue_server_certificate([])[0])
    # No user certificate chains to the root; the root signs only the directory's.
    assert _signed_by(user_cert, ca.users.cert) and not _signed_by(user_cert, ca.root.cert)
    assert _signed_by(server_cert, ca.root.cert) and not _signed_by(server_cert, ca.users.cert)
    assert user_cert.issuer != ca.root.cert.subject


def test_server_certificate_names_localhost_loopback_and_the_extra_names(
    ca: CertificateAuthority,
) -> None:
    cert_pem, key_pem = ca.issue_server_certificate(
        ["directory.example", "10.1.2.3", "[fd00::7]", "localhost", " ", ""]
    )
    cert = x509.load_pem_x509_certificate(cert_pem)
    cert.verify_directly_issued_by(ca.root.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert "localhost" in dns and "directory.example" in dns
    assert dns.count("localhost") == 1  # duplicates are dropped
    assert "" not in dns and " " not in dns
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.1.2.3", "fd00::7")} <= set(
        ips
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == cert.public_key()


def test_each_server_certificate_has_a_fresh_key(ca: CertificateAuthority) -> None:
    (_, first), (_, second) = ca.issue_server_certificate([]), ca.issue_server_certificate([])
    assert first != second


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate,
        lambda: rsa.generate_private_key(65537, 2048),
    ],
    ids=["p256", "p384", "ed25519", "rsa2048"],
)
def test_sign_agent_csr_certifies_the_csr_key_for_the_username_not_the_csr_subject(
    ca: CertificateAuthority, make_key: Callable[[], CertificateIssuerPrivateKeyTypes]
) -> None:
    key = make_key()
    issued = ca.sign_agent_csr(make_csr(key, common_name="admin"), "bob_smith", timedelta(hours=2))
    cert = x509.load_pem_x509_certificate(issued.pem)
    cert.verify_directly_issued_by(ca.users.cert)
    # Named as no host is: spaces in the common name, URIs, and one DNS name under .invalid.
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "p2pchat user bob_smith"
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["bob_smith.users.p2pchat.invalid"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "p2pchat:user:bob_smith",
        f"p2pchat:device:bob_smith/{issued.device}",
    ]
    assert user_identity(cert) == ("bob_smith", issued.device)
    assert issued.device == issued.public_key_sha256[:16]
    assert issued.sha256 == cert.fingerprint(hashes.SHA256()).hex()
    eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.public_key() == key.public_key()
    assert issued.expires_at == cert.not_valid_after_utc
    assert abs(issued.expires_at - (datetime.now(UTC) + timedelta(hours=2))) < timedelta(minutes=1)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    assert issued.public_key_sha256 == digest.finalize().hex()


def _tampered_csr() -> bytes:
    csr = x509.load_pem_x509_csr(make_csr(ec.generate_private_key(ec.SECP256R1())))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # a bit of the signature
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)


_PEM = b"-----BEGIN CERTIFICATE REQUEST-----\n%s\n-----END CERTIFICATE REQUEST-----\n"


def _dsa_csr() -> bytes:
    return make_csr(dsa.generate_private_key(2048))


@pytest.mark.parametrize(
    ("make_bad", "fragment"),
    [
        (lambda: b"", "not a valid PEM"),
        (lambda: b"not a csr", "not a valid PEM"),
        (lambda: _PEM % b"MIIBAAAA", "not a valid PEM"),  # PEM armour around bad DER
        (lambda: b"x" * (MAX_CSR_BYTES + 1), "too large"),
        (lambda: make_csr(rsa.generate_private_key(65537, 1024)), "too small"),
        (lambda: make_csr(ec.generate_private_key(ec.SECP256K1())), "P-256 or P-384"),
        (lambda: make_csr(ed448.Ed448PrivateKey.generate()), "must be EC"),
        (_dsa_csr, "must be EC"),
        (_tampered_csr, "signature"),
    ],
    ids=["empty", "garbage", "bad-der", "oversized", "rsa1024", "k256", "ed448", "dsa", "sig"],
)
def test_sign_agent_csr_rejects_bad_csrs_with_invalid_argument(
    ca: CertificateAuthority, make_bad: Callable[[], bytes], fragment: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ca.sign_agent_csr(make_bad(), "carol", DAY)
    assert fragment in str(caught.value)


def test_a_csr_of_exactly_the_size_limit_is_accepted(ca: CertificateAuthority) -> None:
    pem = make_csr(ec.generate_private_key(ec.SECP256R1()))
    padded = pem + b"\n" * (MAX_CSR_BYTES - len(pem))
    assert len(padded) == MAX_CSR_BYTES
    assert ca.sign_agent_csr(padded, "dave", DAY).pem
    with pytest.raises(InvalidArgument, match="too large"):
        ca.sign_agent_csr(padded + b"\n", "dave", DAY)
