"""Sealed envelopes for the directory's mailbox: what the directory holds for a recipient and
cannot open (issue 13; the mailbox transport builds on this).

- A user's **mailbox key** is an HPKE key pair (RFC 9180) of the hybrid KEM ML-KEM-768+X25519,
  with HKDF-SHA256 and ChaCha20-Poly1305: post-quantum, so that envelopes stored today stay
  sealed against a future quantum adversary. Its public half is bound to the user's identity
  by a signature of the identity key (`bind`), so that a sender who has pinned the recipient's
  identity key can tell the mailbox key is theirs: the directory cannot substitute its own.
- **Sealing** (`seal`): the sender signs the message *with its recipient and the mailbox key
  it is sealed to* (peer.proto SealedContent), attaches its certificate, and seals all of it to
  the recipient's mailbox key. HPKE's `info` names the protocol and its version.
- **Opening** (`open_envelope`): decrypts, checks that the certificate was issued by the users
  CA and names the sender, the signature, and that the content is for this recipient and this
  mailbox key. The caller then checks the sender's key against its pin (pins.KeyPins) before
  storing anything. Replays are harmless: the store keeps one row per message id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from google.protobuf.message import DecodeError

from p2pchat.v1 import peer_pb2 as pb
from p2pchat_agent.ids import valid_message_id
from p2pchat_agent.messages import IncomingMessage
from p2pchat_common.errors import InvalidArgument, PermissionDenied
from p2pchat_common.signatures import MAILBOX_KEY_BYTES, mailbox_binding, sign, verifies
from p2pchat_common.timestamps import from_timestamp, timestamp_parts, valid_timestamp
from p2pchat_common.tls import user_identity

SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
INFO = b"p2pchat mailbox envelope v1"
_CONTENT = b"p2pchat sealed content v1\x00"

_MLKEM_SEED = 64
_MLKEM_PUBLIC = 1184
_X25519 = 32
PRIVATE_KEY_BYTES = _MLKEM_SEED + _X25519
PUBLIC_KEY_BYTES = MAILBOX_KEY_BYTES  # _MLKEM_PUBLIC + _X25519


@dataclass(frozen=True)
class MailboxPublicKey:
    """The public half: ML-KEM-768 public key then X25519 public key, raw (1,216 bytes)."""

    raw: bytes

    @classmethod
    def from_bytes(cls, raw: bytes) -> MailboxPublicKey:
        if len(raw) != PUBLIC_KEY_BYTES:
            raise InvalidArgument(f"a mailbox key is {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
        key = cls(bytes(raw))
        key.hpke_key()  # refuses bytes that are no key
        return key

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def hpke_key(self) -> hpke.MLKEM768X25519PublicKey:
        try:
            return hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(self.raw[:_MLKEM_PUBLIC]),
                x25519.X25519PublicKey.from_public_bytes(self.raw[_MLKEM_PUBLIC:]),
            )
        except ValueError as exc:
            raise InvalidArgument(f"not a mailbox key: {exc}") from None


@dataclass(frozen=True)
class MailboxPrivateKey:
    """The private half: the ML-KEM-768 seed then the X25519 private key, raw (96 bytes)."""

    mlkem_key: mlkem.MLKEM768PrivateKey
    x25519_key: x25519.X25519PrivateKey

    @classmethod
    def generate(cls) -> MailboxPrivateKey:
        return cls(mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> MailboxPrivateKey:
        if len(raw) != PRIVATE_KEY_BYTES:
            raise ValueError(f"a mailbox private key is {PRIVATE_KEY_BYTES} bytes, not {len(raw)}")
        return cls(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:_MLKEM_SEED]),
            x25519.X25519PrivateKey.from_private_bytes(raw[_MLKEM_SEED:]),
        )

    def to_bytes(self) -> bytes:
        return self.mlkem_key.private_bytes_raw() + self.x25519_key.private_bytes_raw()

    def public(self) -> MailboxPublicKey:
        return MailboxPublicKey(
            self.mlkem_key.public_key().public_bytes_raw()
            + self.x25519_key.public_key().public_bytes_raw()
        )

    def hpke_key(self) -> hpke.MLKEM768X25519PrivateKey:
        return hpke.MLKEM768X25519PrivateKey(self.mlkem_key, self.x25519_key)


# -- the binding of a mailbox key to an identity -------------------------------------------------


def bind(identity_key_pem: bytes, username: str, key: MailboxPublicKey) -> bytes:
    """The identity key's signature that `key` is `username`'s mailbox key (published with it)."""
    return sign(identity_key_pem, mailbox_binding(username, key.raw))


def check_binding(
    cert: x509.Certificate, username: str, key: MailboxPublicKey, signature: bytes
) -> None:
    """PermissionDenied unless `signature` by `cert`'s key binds `key` to `username`."""
    if not verifies(cert, signature, mailbox_binding(username, key.raw)):
        raise PermissionDenied(f"{username}'s mailbox key is not signed by their identity key")


# -- sealing and opening -------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    """An envelope opened and checked: a message, or a receipt for messages we sent (`receipt`,
    their ids). The caller checks `certificate`'s key against its pin before using either."""

    sender: str
    certificate: x509.Certificate
    message: IncomingMessage | None = None
    conversation: str = ""
    receipt: tuple[str, ...] = ()


def _seal(
    content: pb.SealedContent,
    identity_key_pem: bytes,
    certificate_der: bytes,
    to: MailboxPublicKey,
) -> bytes:
    content.recipient_mailbox_sha256 = to.sha256
    signed = content.SerializeToString()
    sealed = pb.Sealed(
        content=signed,
        sender_certificate=certificate_der,
        signature=sign(identity_key_pem, _CONTENT + signed),
    )
    return SUITE.encrypt(sealed.SerializeToString(), to.hpke_key(), info=INFO)


def seal(
    message: IncomingMessage,
    conversation: str,
    identity_key_pem: bytes,
    certificate_der: bytes,
    to: MailboxPublicKey,
) -> bytes:
    """`message` (from its sender, whose key and certificate these are) signed and sealed to
    its recipient's mailbox key `to`."""
    content = pb.SealedContent(sender=message.sender, recipient=message.recipient)
    sealed = content.message
    sealed.id, sealed.conversation, sealed.body = message.id, conversation, message.body
    sealed.sent_at.seconds, sealed.sent_at.nanos = timestamp_parts(message.sent_at)
    return _seal(content, identity_key_pem, certificate_der, to)


def seal_receipt(
    sender: str,
    recipient: str,
    ids: list[str],
    identity_key_pem: bytes,
    certificate_der: bytes,
    to: MailboxPublicKey,
) -> bytes:
    """A receipt from `sender` that it committed the messages `ids` of `recipient`'s, sealed to
    `recipient`'s mailbox key `to`."""
    content = pb.SealedContent(sender=sender, recipient=recipient)
    content.receipt.ids.extend(ids)
    return _seal(content, identity_key_pem, certificate_der, to)


def open_envelope(
    envelope: bytes,
    key: MailboxPrivateKey,
    me: str,
    users_ca: x509.Certificate,
    max_receipt_ids: int = 4096,
) -> Opened:
    """What an envelope holds, checked: PermissionDenied for one that does not open with
    `key`, whose certificate the users CA did not issue or that names someone else, whose
    signature fails, or that was sealed for another recipient or mailbox key; InvalidArgument
    for one that opens but is malformed."""
    try:
        plaintext = SUITE.decrypt(envelope, key.hpke_key(), info=INFO)
    except (InvalidTag, ValueError):
        raise PermissionDenied("the envelope does not open with this mailbox key") from None
    try:
        sealed = pb.Sealed.FromString(plaintext)
        content = pb.SealedContent.FromString(sealed.content)
    except DecodeError:
        raise InvalidArgument("the envelope holds no sealed message") from None
    try:
        cert = x509.load_der_x509_certificate(sealed.sender_certificate)
        cert.verify_directly_issued_by(users_ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PermissionDenied("the envelope's certificate is not from the users CA") from None
    named = user_identity(cert)
    if named is None or named[0] != content.sender:
        raise PermissionDenied("the envelope's certificate does not name its sender")
    if not verifies(cert, sealed.signature, _CONTENT + sealed.content):
        raise PermissionDenied(f"the envelope's signature is not {content.sender}'s")
    if content.recipient != me or content.recipient_mailbox_sha256 != key.public().sha256:
        raise PermissionDenied("the envelope was sealed for another recipient")
    kind = content.WhichOneof("kind")
    if kind == "receipt":
        ids = tuple(content.receipt.ids)
        if not 1 <= len(ids) <= max_receipt_ids or not all(map(valid_message_id, ids)):
            raise InvalidArgument("the envelope's receipt has no, too many or bad ids")
        return Opened(content.sender, cert, receipt=ids)
    m = content.message
    if kind != "message" or not valid_message_id(m.id) or not valid_timestamp(m.sent_at):
        raise InvalidArgument("the envelope's message has a bad id or time")
    message = IncomingMessage(m.id, content.sender, me, m.body, from_timestamp(m.sent_at))
    return Opened(content.sender, cert, message, m.conversation)
