"""The directory's certificate authority: made once, kept in the data dir, signs agents' keys.

Files in the data dir: ``ca-key.pem`` (mode 0600) and ``ca.pem`` (the public CA certificate that
agents and other clients trust).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pchat_common.errors import InvalidArgument
from p2pchat_common.tls import private_key_pem, public_key_sha256

log = logging.getLogger(__name__)

CA_KEY_FILE = "ca-key.pem"
CA_CERT_FILE = "ca.pem"
CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=365)
MAX_CSR_BYTES = 16 * 1024
_CLOCK_SKEW = timedelta(minutes=5)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


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


@dataclass(frozen=True)
class IssuedCertificate:
    pem: bytes
    expires_at: datetime
    public_key_sha256: str


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, data_dir: Path) -> CertificateAuthority:
        """The CA of this data dir, made on first use; safe when several processes start at once."""
        data_dir.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = data_dir / CA_KEY_FILE, data_dir / CA_CERT_FILE
        with open(data_dir / ".ca.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if key_path.exists() and cert_path.exists():
                key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise RuntimeError(f"{key_path}: expected an EC private key")
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                log.info("loaded CA %s from %s", cert.subject.rfc4514_string(), data_dir)
                return cls(key, cert)
            ca = cls._create()
            _write_private(key_path, private_key_pem(ca._key))
            _write_public(cert_path, ca.cert_pem)
            log.info("created a new CA in %s", data_dir)
            return ca

    @classmethod
    def _create(cls) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "p2pchat"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"p2pchat directory CA {os.urandom(4).hex()}"
                ),
            ]
        )
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def _leaf(
        self,
        subject: str,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
        sans: list[x509.GeneralName],
        validity: timedelta,
        usages: list[x509.ObjectIdentifier],
    ) -> x509.Certificate:
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )

    def issue_server_certificate(self, names: Iterable[str]) -> tuple[bytes, bytes]:
        """A fresh (certificate PEM, key PEM) for the directory's own TLS, naming `names`."""
        key = ec.generate_private_key(ec.SECP256R1())
        all_names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *names]
        cert = self._leaf(
            "p2pchat directory",
            key.public_key(),
            _san_entries(all_names),
            SERVER_VALIDITY,
            [ExtendedKeyUsageOID.SERVER_AUTH],
        )
        return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)

    def sign_agent_csr(
        self, csr_pem: bytes, username: str, validity: timedelta
    ) -> IssuedCertificate:
        """Certifies the CSR's key for `username` (the CSR's own subject is ignored)."""
        if len(csr_pem) > MAX_CSR_BYTES:
            raise InvalidArgument(f"CSR is too large (at most {MAX_CSR_BYTES} bytes)")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            valid = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise InvalidArgument(f"CSR is not a valid PEM certificate request: {exc}") from None
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
        cert = self._leaf(
            username,
            public_key,
            [x509.DNSName(username)],
            validity,
            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        )
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM),
            expires_at=cert.not_valid_after_utc,
            public_key_sha256=public_key_sha256(cert),
        )
