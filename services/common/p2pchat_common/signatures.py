"""Signatures by a user's identity key (the key of their certificate): what the link Hello
(p2pchat_agent.handshake), sealed envelopes (p2pchat_agent.sealing) and the binding of a mailbox
key (checked by the directory too) prove with. The agent's own key is EC P-256 (ECDSA with
SHA-256); a peer's may also be Ed25519."""

from __future__ import annotations

import functools

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519


@functools.lru_cache(maxsize=4)  # the identity in use, and the one before a renewal
def _private_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the agent key must be an EC key")
    return key


def sign(key_pem: bytes, data: bytes) -> bytes:
    """`data` signed with the agent's key (PEM; parsed once per key)."""
    return _private_key(key_pem).sign(data, ec.ECDSA(hashes.SHA256()))


def verifies(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    """Whether `signature` over `data` was made with `cert`'s key."""
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


MAILBOX_KEY_BYTES = 1184 + 32  # ML-KEM-768 public key, then X25519 public key
_MAILBOX_BINDING = b"p2pchat mailbox key v1\x00"


def mailbox_binding(username: str, mailbox_key: bytes) -> bytes:
    """What a user's identity key signs to bind `mailbox_key` (raw) to `username`: the
    agent signs it (sealing.bind), the directory checks it at PublishKey, a sender checks it
    again with the key it pinned (sealing.check_binding)."""
    return _MAILBOX_BINDING + username.encode() + b"\x00" + mailbox_key
