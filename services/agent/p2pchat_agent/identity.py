"""What the agent keeps on disk between runs: the user's key pair, certificate and session.

Files in the data dir (secrets 0600):
- ``<username>.key``: the user's private key, made once and reused, so that a pinned key changes
  only when the user really moves to another agent;
- ``<username>.crt`` and ``peer-ca.pem``: the certificate from the last login and its CA;
- ``session.json``: the directory session, so that a restarted agent resumes without a login.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2pchat_common.files import write_private
from p2pchat_common.tls import (
    certificate_sha256,
    private_key_pem,
    user_identity,
)

SESSION_FILE = "session.json"
PEER_CA_FILE = "peer-ca.pem"


def key_path(data_dir: Path, username: str) -> Path:
    return data_dir / f"{username}.key"


def load_or_make_key(data_dir: Path, username: str) -> tuple[bytes, bool]:
    """The user's private key (PEM) and whether it is new. A new key is not written: the
    caller saves it (`save_key`) only once the directory accepted the login, so a refused
    login leaves no file behind."""
    path = key_path(data_dir, username)
    if path.exists():
        return path.read_bytes(), False
    return private_key_pem(ec.generate_private_key(ec.SECP256R1())), True


def save_key(data_dir: Path, username: str, pem: bytes) -> None:
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(key_path(data_dir, username), pem)


def load_or_create_key(data_dir: Path, username: str) -> bytes:
    """The user's private key (PEM), made and saved on first use."""
    pem, new = load_or_make_key(data_dir, username)
    if new:
        save_key(data_dir, username, pem)
    return pem


def make_csr(key_pem: bytes, username: str) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the agent key must be an EC key")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, username)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_certificate(cert_pem_or_der: bytes) -> x509.Certificate:
    if cert_pem_or_der.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(cert_pem_or_der)
    return x509.load_der_x509_certificate(cert_pem_or_der)


@dataclass(frozen=True)
class Identity:
    """The user's TLS identity for peer links."""

    username: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    @functools.cached_property
    def _certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def cert_expires_at(self) -> datetime:
        return self._certificate.not_valid_after_utc

    @property
    def cert_issued_at(self) -> datetime:
        return self._certificate.not_valid_before_utc

    @property
    def cert_sha256(self) -> str:
        return certificate_sha256(self._certificate)

    @functools.cached_property
    def cert_der(self) -> bytes:
        return self._certificate.public_bytes(serialization.Encoding.DER)

    @functools.cached_property
    def users_ca(self) -> x509.Certificate:
        """The users CA (peer-ca.pem): what peers' certificates are issued by."""
        return x509.load_pem_x509_certificate(self.ca_pem)

    @property
    def names_device(self) -> bool:
        """Whether the certificate names this user and a device (the current format): one
        from before the directory separated its identity names the user as a DNS name only,
        and peers refuse it, so it is renewed at once."""
        found = user_identity(self._certificate)
        return found is not None and found[0] == self.username

    def save(self, data_dir: Path) -> None:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(data_dir / f"{self.username}.crt", self.cert_pem)
        write_private(data_dir / PEER_CA_FILE, self.ca_pem)

    @classmethod
    def load(cls, data_dir: Path, username: str) -> Identity:
        return cls(
            username=username,
            key_pem=(data_dir / f"{username}.key").read_bytes(),
            cert_pem=(data_dir / f"{username}.crt").read_bytes(),
            ca_pem=(data_dir / PEER_CA_FILE).read_bytes(),
        )


@dataclass(frozen=True)
class StoredSession:
    username: str
    token: str
    directory: str
    expires_at: datetime

    def save(self, data_dir: Path) -> None:
        payload = {
            "username": self.username,
            "token": self.token,
            "directory": self.directory,
            "expires_at": self.expires_at.isoformat(),
        }
        write_private(data_dir / SESSION_FILE, json.dumps(payload).encode())

    @classmethod
    def load(cls, data_dir: Path) -> StoredSession | None:
        path = data_dir / SESSION_FILE
        try:
            payload = json.loads(path.read_bytes())
            return cls(
                username=str(payload["username"]),
                token=str(payload["token"]),
                directory=str(payload["directory"]),
                expires_at=datetime.fromisoformat(payload["expires_at"]),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: a fresh login is needed
            return None

    @staticmethod
    def clear(data_dir: Path) -> None:
        (data_dir / SESSION_FILE).unlink(missing_ok=True)
