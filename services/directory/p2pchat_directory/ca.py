"""The directory's two certificate authorities, made once and kept in the data dir.

- **The directory root** (``ca.pem``, key ``ca-key.pem``) signs only the directory's own TLS
  certificate. Clients trust it for the directory channel and for nothing else.
- **The users CA** (``users-ca.pem``, key ``users-ca-key.pem``) signs only user certificates,
  which name the user and device as URIs (see p2pchat_common.tls). Agents trust it for peer
  links: Login returns it as ``ca_certificate_pem``.

So no user certificate chains to what a client trusts for the directory, whatever the username.

Upgrade from the first layout (one CA in ``ca.pem`` that signed both kinds): on first start the
directory keeps that CA as its root, so every client keeps its configured ``ca.pem``, and makes
the users CA, which signs every user certificate from then on. Agents learn it at login and renew
their certificates at once. User certificates the old CA issued before the upgrade still chain
to the root until they expire (30 days at most): server.py names, at start, any account whose
name the directory is served under, since only such a certificate could pose as the directory.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pchat_common.errors import InvalidArgument
from p2pchat_common.files import write_private, write_public
from p2pchat_common.tls import (
    certificate_sha256,
    device_id,
    key_sha256,
    private_key_pem,
    public_key_sha256,
    user_sans,
)

log = logging.getLogger(__name__)

CA_KEY_FILE = "ca-key.pem"
CA_CERT_FILE = "ca.pem"
USERS_CA_KEY_FILE = "users-ca-key.pem"
USERS_CA_CERT_FILE = "users-ca.pem"
CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=365)
MAX_CSR_BYTES = 16 * 1024
# Every certificate is valid from an hour before it is made: an agent whose clock is behind by
# up to that much still accepts the directory's certificate and its peers' (RFC 5280 leaves the
# margin to the issuer; an hour is what public CAs commonly use).
NOT_BEFORE_MARGIN = timedelta(hours=1)

Clock = Callable[[], datetime]
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in names:
        name = name.strip().strip("[]")
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _key_usage(*, sign_certs: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=sign_certs,
        crl_sign=sign_certs,
        encipher_only=False,
        decipher_only=False,
    )


class Authority:
    """One CA: its key and self-signed certificate."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, clock: Clock):
        self.key = key
        self.cert = cert
        self.cert_pem = _pem(cert)
        self._now = clock

    @classmethod
    def create(cls, title: str, clock: Clock) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2pchat"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"p2pchat {title} {os.urandom(4).hex()}"),
            ]
        )
        return cls(key, cls._ca_certificate(name, key.public_key(), name, key, clock()), clock)

    @staticmethod
    def _ca_certificate(
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey,
        now: datetime,
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - NOT_BEFORE_MARGIN)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(sign_certs=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(signer, hashes.SHA256())
        )

    @classmethod
    def load(cls, key_path: Path, cert_path: Path, clock: Clock) -> Authority:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise RuntimeError(f"{key_path}: expected an EC private key")
        return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()), clock)

    def save(self, key_path: Path, cert_path: Path) -> None:
        write_private(key_path, private_key_pem(self.key))
        write_public(cert_path, self.cert_pem)

    def issue(
        self,
        subject: str,
        public_key: PublicKey,
        sans: list[x509.GeneralName],
        validity: timedelta,
        usages: list[x509.ObjectIdentifier],
    ) -> x509.Certificate:
        now = self._now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - NOT_BEFORE_MARGIN)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(sign_certs=False), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


@dataclass(frozen=True)
class IssuedCertificate:
    pem: bytes
    expires_at: datetime
    public_key_sha256: str
    sha256: str  # of the whole certificate: what revocation checks name
    device: str


def _checked_csr_key(csr_pem: bytes) -> PublicKey:
    if len(csr_pem) > MAX_CSR_BYTES:
        raise InvalidArgument(f"CSR is too large (at most {MAX_CSR_BYTES} bytes)")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidArgument("CSR is not a valid PEM certificate request") from None
    if not valid:
        raise InvalidArgument("CSR signature does not match its public key")
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise InvalidArgument("CSR RSA key is too small (at least 2048 bits)")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise InvalidArgument("CSR EC key must be on P-256 or P-384")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise InvalidArgument("CSR key must be EC (P-256/P-384), Ed25519 or RSA")
    return public_key


class CertificateAuthority:
    """The directory root and the users CA of one data dir."""

    def __init__(self, root: Authority, users: Authority, upgraded: bool = False):
        self.root = root
        self.users = users
        self.upgraded = upgraded  # the users CA was just added to a first-layout data dir

    @property
    def cert_pem(self) -> bytes:
        """The directory root: what clients trust for the directory channel."""
        return self.root.cert_pem

    @property
    def users_cert_pem(self) -> bytes:
        """The users CA: what agents trust for peer links."""
        return self.users.cert_pem

    @classmethod
    def load_or_create(cls, data_dir: Path, clock: Clock = _utcnow) -> CertificateAuthority:
        """The authorities of this data dir, made on first use (the users CA is added to a
        data dir of the first layout); safe when several processes start at once."""
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(data_dir / ".ca.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return cls._under_lock(data_dir, clock)

    @classmethod
    def _under_lock(cls, d: Path, clock: Clock) -> CertificateAuthority:
        root_files = (d / CA_KEY_FILE, d / CA_CERT_FILE)
        users_files = (d / USERS_CA_KEY_FILE, d / USERS_CA_CERT_FILE)
        upgraded = root_files[0].exists() and not users_files[0].exists()
        if root_files[0].exists():
            root = Authority.load(*root_files, clock)
        else:
            root = Authority.create("directory root", clock)
            root.save(*root_files)
            log.info("created the directory root in %s", d)
        if users_files[0].exists():
            users = Authority.load(*users_files, clock)
            log.info("loaded the directory root and users CA from %s", d)
        else:
            users = Authority.create("users CA", clock)
            users.save(*users_files)
            log.info("created the users CA in %s", d)
        return cls(root, users, upgraded)

    def issue_server_certificate(self, names: Iterable[str]) -> tuple[bytes, bytes]:
        """A fresh (certificate PEM, key PEM) for the directory's own TLS, naming `names`."""
        key = ec.generate_private_key(ec.SECP256R1())
        all_names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *names]
        cert = self.root.issue(
            "p2pchat directory",
            key.public_key(),
            _san_entries(all_names),
            SERVER_VALIDITY,
            [ExtendedKeyUsageOID.SERVER_AUTH],
        )
        return _pem(cert), private_key_pem(key)

    def sign_agent_csr(
        self, csr_pem: bytes, username: str, validity: timedelta
    ) -> IssuedCertificate:
        """Certifies the CSR's key for `username` on the device that key makes (the CSR's own
        subject is ignored). Client and server use: an agent dials links and accepts them."""
        public_key = _checked_csr_key(csr_pem)
        device = device_id(key_sha256(public_key))
        cert = self.users.issue(
            f"p2pchat user {username}",
            public_key,
            user_sans(username, device),
            validity,
            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        )
        return IssuedCertificate(
            pem=_pem(cert),
            expires_at=cert.not_valid_after_utc,
            public_key_sha256=public_key_sha256(cert),
            sha256=certificate_sha256(cert),
            device=device,
        )
