"""What the directory keeps of the user certificates it issues (what CertificateStatus answers
from), and the usernames it will not register because they read as its own."""

from __future__ import annotations

import logging
import socket
from datetime import datetime, timedelta
from enum import Enum

from sqlalchemy.orm import Session

from p2pchat_directory import repository as repo
from p2pchat_directory.ca import IssuedCertificate
from p2pchat_directory.config import Settings
from p2pchat_directory.models import IssuedCertificateRow, User

log = logging.getLogger(__name__)

FIRST_LAYOUT_CERTIFICATE_TTL = timedelta(days=30)  # the first version's default
# Records of expired certificates are kept this long (a certificate past its expiry is refused
# by TLS anyway; the record only turns "unknown" into "revoked").
FORGET_CERTIFICATES_AFTER = timedelta(days=1)


# Names that read as the system's own, refused at registration (a second line of defence: no
# user certificate can pass as the directory's whatever its name, see ca.py).
RESERVED_USERNAMES = frozenset(
    {
        "abuse", "admin", "administrator", "daemon", "directory", "hostmaster", "localhost",
        "mail", "nobody", "noreply", "no-reply", "operator", "p2pchat", "postmaster", "root",
        "security", "server", "support", "system", "webmaster", "www",
    }
)  # fmt: skip


def reserved_usernames(settings: Settings) -> frozenset[str]:
    """RESERVED_USERNAMES and every name this directory is served under (its host name and
    --tls-name values, and their first labels)."""
    names = {socket.gethostname(), *settings.tls_names, settings.listen.rpartition(":")[0]}
    labels = {n.strip("[]").lower() for n in names} | {
        n.strip("[]").lower().split(".")[0] for n in names
    }
    return RESERVED_USERNAMES | {n for n in labels if n}


class CertificateState(Enum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


def record_certificate(
    s: Session, user: User, issued: IssuedCertificate, session_hash: str, now: datetime
) -> None:
    """Makes `issued` the user's current certificate. One device per user today: a certificate
    for another key means the user moved to a new agent, so the old key's certificates are
    revoked and its sessions end (else the old agent could renew, and revoke the new one's)."""
    if user.public_key_sha256 and user.public_key_sha256 != issued.public_key_sha256:
        revoked = repo.revoke_certificates(
            s, now, username=user.username, other_than_key=issued.public_key_sha256
        )
        ended = repo.delete_other_sessions(s, user.username, session_hash)
        log.warning(
            "user %s has a new key: revoked %d old certificate(s), ended %d other session(s)",
            user.username,
            revoked,
            ended,
        )
    repo.forget_certificates(s, user.username, now - FORGET_CERTIFICATES_AFTER)
    repo.add_certificate(
        s,
        IssuedCertificateRow(
            sha256=issued.sha256,
            username=user.username,
            device=issued.device,
            public_key_sha256=issued.public_key_sha256,
            session_hash=session_hash,
            issued_at=now,
            expires_at=issued.expires_at,
        ),
    )
    user.certificate_pem = issued.pem
    user.public_key_sha256 = issued.public_key_sha256
