"""Sealed envelopes for the mailbox: a recipient opens what was sealed to it and checks it; a
tampered, truncated, re-targeted, forged or mis-keyed envelope is refused; a mailbox key is
bound to its owner's identity. Real keys and certificates from the directory's CA."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from p2pchat_agent.conversations import direct_key
from p2pchat_agent.identity import make_csr
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.messages import IncomingMessage
from p2pchat_agent.sealing import (
    PUBLIC_KEY_BYTES,
    MailboxPrivateKey,
    MailboxPublicKey,
    bind,
    check_binding,
    open_envelope,
    seal,
)
from p2pchat_common.errors import InvalidArgument, PermissionDenied
from p2pchat_directory.ca import CertificateAuthority

T0 = datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC)


@dataclass
class User:
    name: str
    key_pem: bytes
    cert: x509.Certificate
    mailbox: MailboxPrivateKey

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


def _user(ca: CertificateAuthority, name: str) -> User:
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    issued = ca.sign_agent_csr(make_csr(key_pem, name), name, timedelta(hours=12))
    cert = x509.load_pem_x509_certificate(issued.pem)
    return User(name, key_pem, cert, MailboxPrivateKey.generate())


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.fixture
def users_ca(ca: CertificateAuthority) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.users_cert_pem)


def _message(sender: str, recipient: str, body: str = "sealed hello") -> IncomingMessage:
    return IncomingMessage(new_message_id(), sender, recipient, body, T0)


def _sealed(sender: User, recipient: User, message: IncomingMessage | None = None) -> bytes:
    message = message or _message(sender.name, recipient.name)
    conversation = direct_key(sender.name, recipient.name)
    return seal(message, conversation, sender.key_pem, sender.cert_der, recipient.mailbox.public())


def test_the_recipient_opens_what_was_sealed_to_it_with_every_field(
    ca: CertificateAuthority, users_ca: x509.Certificate
) -> None:
    alice, bob = _user(ca, "alice"), _user(ca, "bob")
    message = _message("alice", "bob", "héllo, bob — 👋\nsecond line")

    envelope = _sealed(alice, bob, message)
    opened = open_envelope(envelope, bob.mailbox, "bob", users_ca)

    assert opened.message == message
    assert opened.conversation == "direct:alice:bob"
    assert opened.certificate.public_bytes(serialization.Encoding.DER) == alice.cert_der
    assert message.body.encode() not in envelope  # sealed, not signed in the clear


def test_sealing_twice_gives_different_envelopes(ca: CertificateAuthority) -> None:
    alice, bob = _user(ca, "alice"), _user(ca, "bob")
    message = _message("alice", "bob")
    assert _sealed(alice, bob, message) != _sealed(alice, bob, message)


def test_a_tampered_or_truncated_envelope_does_not_open(
    ca: CertificateAuthority, users_ca: x509.Certificate
) -> None:
    alice, bob = _user(ca, "alice"), _user(ca, "bob")
    envelope = _sealed(alice, bob)
    for bad in (
        envelope[:-1],
        envelope[: len(envelope) // 2],
        b"",
        envelope[:-5] + bytes([envelope[-5] ^ 1]) + envelope[-4:],
        bytes([envelope[0] ^ 0x80]) + envelope[1:],
    ):
        with pytest.raises(PermissionDenied, match="does not open"):
            open_envelope(bad, bob.mailbox, "bob", users_ca)


def test_an_envelope_sealed_to_someone_else_does_not_open(
    ca: CertificateAuthority, users_ca: x509.Certificate
) -> None:
    alice, bob, carol = _user(ca, "alice"), _user(ca, "bob"), _user(ca, "carol")
    with pytest.raises(PermissionDenied, match="does not open"):
        open_envelope(_sealed(alice, bob), carol.mailbox, "carol", users_ca)


def test_a_re_targeted_envelope_is_refused(
    ca: CertificateAuthority, users_ca: x509.Certificate
) -> None:
    """bob opens alice's envelope and seals its signed content again to carol: the content
    names bob and bob's mailbox key, so carol refuses it."""
    from cryptography.hazmat.primitives import hpke  # noqa: F401  (the suite is sealing's)

    from p2pchat_agent.sealing import INFO, SUITE

    alice, bob, carol = _user(ca, "alice"), _user(ca, "bob"), _user(ca, "carol")
    plaintext = SUITE.decrypt(_sealed(alice, bob), bob.mailbox.hpke_key(), info=INFO)
    resealed = SUITE.encrypt(plaintext, carol.mailbox.public().hpke_key(), info=INFO)

    with pytest.raises(PermissionDenied, match="sealed for another recipient"):
        open_envelope(resealed, carol.mailbox, "carol", users_ca)


def test_a_message_for_the_right_name_but_another_mailbox_key_is_refused(
    ca: CertificateAuthority, users_ca: x509.Certificate
) -> None:
    """Sealed to a key the directory substituted for bob's: bob's real key never opens it, and
    re-sealed to the real key by whoever holds the substitute, the content names the wrong key."""
    from p2pchat_agent.sealing import INFO, SUITE

    alice, bob = _user(ca, "alice"), _user(ca, "bob")
    substitute = MailboxPrivateKey.generate()
    message = _message("alice", "bob")
    envelope = seal(message, "direct:alice:bob", alice.key_pem, alice.cert_der, substitute.public())
    with pytest.raises(PermissionDenied, match="does not open"):
        open_envelope(envelope, bob.mailbox, "bob", users_ca)
    plaintext = SUITE.decrypt(envelope, substitute.hpke_key(), info=INFO)
    resealed = SUITE.encrypt(plaintext, bob.mailbox.public().hpke_key(), info=INFO)
    with pytest.raises(PermissionDenied, match="sealed for another recipient"):
        open_envelope(resealed, bob.mailbox, "bob", users_ca)


def test_a_forged_sender_or_signature_is_refused(
    ca: CertificateAuthority, users_ca: x509.Certificate, tmp_path: Path
) -> None:
    alice, bob, mallory = _user(ca, "alice"), _user(ca, "bob"), _user(ca, "mallory")
    to_bob = bob.mailbox.public()

    # mallory claims to be alice, with her own certificate: it names mallory.
    forged = seal(
        _message("alice", "bob"), "direct:alice:bob", mallory.key_pem, mallory.cert_der, to_bob
    )
    with pytest.raises(PermissionDenied, match="does not name its sender"):
        open_envelope(forged, bob.mailbox, "bob", users_ca)

    # mallory attaches alice's certificate but signs with her own key.
    forged = seal(
        _message("alice", "bob"), "direct:alice:bob", mallory.key_pem, alice.cert_der, to_bob
    )
    with pytest.raises(PermissionDenied, match="signature is not alice's"):
        open_envelope(forged, bob.mailbox, "bob", users_ca)

    # A certificate from another CA, naming alice.
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
    impostor = _user(other, "alice")
    forged = seal(
        _message("alice", "bob"), "direct:alice:bob", impostor.key_pem, impostor.cert_der, to_bob
    )
    with pytest.raises(PermissionDenied, match="not from the users CA"):
        open_envelope(forged, bob.mailbox, "bob", users_ca)


def test_an_envelope_that_opens_but_holds_garbage_is_invalid(
    ca: CertificateAuthority, users_ca: x509.Certificate
) -> None:
    from p2pchat_agent.sealing import INFO, SUITE

    bob = _user(ca, "bob")
    junk = SUITE.encrypt(b"\xff\xff\xff not a message", bob.mailbox.public().hpke_key(), info=INFO)
    with pytest.raises(InvalidArgument, match="holds no sealed message"):
        open_envelope(junk, bob.mailbox, "bob", users_ca)


def test_another_protocol_info_does_not_open(
    ca: CertificateAuthority, users_ca: x509.Certificate
) -> None:
    from p2pchat_agent.sealing import SUITE

    alice, bob = _user(ca, "alice"), _user(ca, "bob")
    from p2pchat_agent.sealing import INFO

    plaintext = SUITE.decrypt(_sealed(alice, bob), bob.mailbox.hpke_key(), info=INFO)
    other = SUITE.encrypt(
        plaintext, bob.mailbox.public().hpke_key(), info=b"p2pchat mailbox envelope v0"
    )
    with pytest.raises(PermissionDenied, match="does not open"):
        open_envelope(other, bob.mailbox, "bob", users_ca)


def test_mailbox_keys_round_trip_and_bad_bytes_are_refused() -> None:
    key = MailboxPrivateKey.generate()
    again = MailboxPrivateKey.from_bytes(key.to_bytes())
    assert again.public() == key.public()
    public = MailboxPublicKey.from_bytes(key.public().raw)
    assert len(public.raw) == PUBLIC_KEY_BYTES and public.sha256 == key.public().sha256
    with pytest.raises(InvalidArgument, match="1216 bytes, not 10"):
        MailboxPublicKey.from_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="96 bytes"):
        MailboxPrivateKey.from_bytes(b"x" * 95)


def test_a_mailbox_key_is_bound_to_its_owner_and_to_no_one_else(ca: CertificateAuthority) -> None:
    alice, bob = _user(ca, "alice"), _user(ca, "bob")
    key = alice.mailbox.public()
    signature = bind(alice.key_pem, "alice", key)

    check_binding(alice.cert, "alice", key, signature)
    with pytest.raises(PermissionDenied, match="bob's mailbox key is not signed"):
        check_binding(alice.cert, "bob", key, signature)  # another name
    with pytest.raises(PermissionDenied):
        check_binding(bob.cert, "alice", key, signature)  # another identity key
    with pytest.raises(PermissionDenied):
        check_binding(alice.cert, "alice", bob.mailbox.public(), signature)  # a substitute key


def test_a_receipt_opens_with_its_ids_and_a_forged_one_is_refused(
    ca: CertificateAuthority, users_ca: x509.Certificate
) -> None:
    from p2pchat_agent.sealing import seal_receipt

    alice, bob, mallory = _user(ca, "alice"), _user(ca, "bob"), _user(ca, "mallory")
    ids = ["01J0000000000000000000000A", "01J0000000000000000000000B"]
    receipt = seal_receipt("bob", "alice", ids, bob.key_pem, bob.cert_der, alice.mailbox.public())
    opened = open_envelope(receipt, alice.mailbox, "alice", users_ca)
    assert (opened.sender, opened.receipt, opened.message) == ("bob", tuple(ids), None)

    forged = seal_receipt(
        "bob", "alice", ids, mallory.key_pem, bob.cert_der, alice.mailbox.public()
    )
    with pytest.raises(PermissionDenied, match="signature is not bob's"):
        open_envelope(forged, alice.mailbox, "alice", users_ca)
    empty = seal_receipt("bob", "alice", [], bob.key_pem, bob.cert_der, alice.mailbox.public())
    with pytest.raises(InvalidArgument, match="receipt"):
        open_envelope(empty, alice.mailbox, "alice", users_ca)
