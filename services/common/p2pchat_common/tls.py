"""Certificates that need no authority, and how a certificate names a p2pchat user.

A user certificate names its holder in forms no TLS host-name check of a real host can match:
- URI SANs ``p2pchat:user:<user>`` and ``p2pchat:device:<user>/<device>``: the identity that peers
  read and verify;
- one DNS SAN ``<user>.users.p2pchat.invalid``, only because gRPC Python verifies a server by a DNS
  or IP name and offers no other check: the ``.invalid`` top-level domain is reserved never to
  resolve (RFC 6761), and neither service accepts a name under it as the directory's;
- the common name ``p2pchat user <user>``, which has spaces and so is no host name either.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

USER_URI_PREFIX = "p2pchat:user:"
DEVICE_URI_PREFIX = "p2pchat:device:"
USER_DNS_SUFFIX = ".users.p2pchat.invalid"
RESERVED_DNS_SUFFIX = ".invalid"
DEVICE_ID_HEX = 16  # a device is named by the first 64 bits of its key's SHA-256


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def key_sha256(public_key: CertificatePublicKeyTypes) -> str:
    """Hex SHA-256 of a public key's DER SubjectPublicKeyInfo."""
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize().hex()


def public_key_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the certificate's DER SubjectPublicKeyInfo: what agents pin and what the
    directory reports in Lookup."""
    return key_sha256(cert.public_key())


def certificate_sha256(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the whole DER certificate: how the directory and agents name one
    certificate when asking whether it was revoked."""
    return cert.fingerprint(hashes.SHA256()).hex()


def device_id(key_sha256: str) -> str:
    """The device a key belongs to (one key per agent: a new agent is a new device)."""
    return key_sha256[:DEVICE_ID_HEX]


def user_dns_name(username: str) -> str:
    """The DNS name a user certificate carries for gRPC's server check on peer links."""
    return username + USER_DNS_SUFFIX


def user_sans(username: str, device: str) -> list[x509.GeneralName]:
    return [
        x509.UniformResourceIdentifier(USER_URI_PREFIX + username),
        x509.UniformResourceIdentifier(f"{DEVICE_URI_PREFIX}{username}/{device}"),
        x509.DNSName(user_dns_name(username)),
    ]


def user_identity(cert: x509.Certificate) -> tuple[str, str] | None:
    """(user, device) named by a user certificate's URI SANs; None when it names none (a
    certificate of the old format, or no user certificate at all)."""
    try:
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        return None
    users = [u.removeprefix(USER_URI_PREFIX) for u in uris if u.startswith(USER_URI_PREFIX)]
    devices = [u.removeprefix(DEVICE_URI_PREFIX) for u in uris if u.startswith(DEVICE_URI_PREFIX)]
    if len(users) != 1 or len(devices) != 1:
        return None
    owner, _, device = devices[0].partition("/")
    if owner != users[0] or not device:
        return None
    return users[0], device


def is_reserved_name(host: str) -> bool:
    """Whether a host name lies under `.invalid`, where user certificates are named: never the
    directory's name."""
    host = host.strip("[]").rstrip(".").lower()
    return host == RESERVED_DNS_SUFFIX[1:] or host.endswith(RESERVED_DNS_SUFFIX)


def self_signed(
    common_name: str, dns_names: Sequence[str] = (), validity: timedelta = timedelta(days=1)
) -> tuple[bytes, bytes]:
    """A fresh (certificate PEM, key PEM), self-signed, that can also serve as its own root."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if dns_names:
        sans = x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names])
        builder = builder.add_extension(sans, critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)
