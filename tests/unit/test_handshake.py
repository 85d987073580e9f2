"""The Hellos of a peer link, as values: the answer proves the key of the connection used."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2pchat.v1 import peer_pb2 as pb
from p2pchat_agent.handshake import (
    NONCE_BYTES,
    PROTOCOL_VERSION,
    answer_hello,
    check_dialler_hello,
    dialler_hello,
    verify_answer,
)
from p2pchat_common.errors import FailedPrecondition, PermissionDenied
from p2pchat_common.tls import private_key_pem


def key_and_cert() -> tuple[bytes, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pchat user bob")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    return private_key_pem(key), cert


def test_each_dialler_hello_has_a_fresh_nonce_and_the_version() -> None:
    one, two = dialler_hello("alice").hello, dialler_hello("alice").hello
    assert len(one.nonce) == NONCE_BYTES and one.nonce != two.nonce
    assert one.protocol_version == PROTOCOL_VERSION == 2 and one.username == "alice"
    check_dialler_hello(one, "alice")


def test_an_answer_signed_over_our_nonce_with_the_checked_key_is_accepted() -> None:
    key_pem, cert = key_and_cert()
    mine = dialler_hello("alice").hello
    answer = answer_hello("bob", key_pem, mine).hello
    assert answer.username == "bob" and answer.signature and not answer.nonce
    verify_answer(answer, "alice", "bob", mine.nonce, cert)


@pytest.mark.parametrize(
    "tamper",
    ["other-nonce", "other-key", "other-dialler", "replayed-to-other-peer", "no-signature"],
)
def test_an_answer_that_does_not_prove_the_checked_key_for_this_link_is_refused(
    tamper: str,
) -> None:
    key_pem, cert = key_and_cert()
    other_key, other_cert = key_and_cert()
    mine = dialler_hello("alice").hello
    dialler, checked, nonce = "alice", cert, mine.nonce
    signer = other_key if tamper == "other-key" else key_pem
    answer = answer_hello("bob", signer, mine).hello
    if tamper == "other-nonce":
        nonce = dialler_hello("alice").hello.nonce
    elif tamper == "other-dialler":
        dialler = "carol"
    elif tamper == "replayed-to-other-peer":
        checked = other_cert
    elif tamper == "no-signature":
        answer.signature = b""
    with pytest.raises(PermissionDenied, match="not signed with the key"):
        verify_answer(answer, dialler, "bob", nonce, checked)


def test_another_protocol_version_is_refused_naming_both() -> None:
    old = pb.Hello(username="alice", protocol_version=1)
    with pytest.raises(FailedPrecondition, match="alice speaks peer protocol 1, this agent 2"):
        check_dialler_hello(old, "alice")
    key_pem, cert = key_and_cert()
    with pytest.raises(FailedPrecondition, match="protocol 1"):
        verify_answer(pb.Hello(username="bob", protocol_version=1), "alice", "bob", b"n", cert)


def test_a_dialler_hello_without_a_proper_nonce_is_refused() -> None:
    short = pb.Hello(username="alice", protocol_version=PROTOCOL_VERSION, nonce=b"x" * 8)
    with pytest.raises(FailedPrecondition, match="nonce"):
        check_dialler_hello(short, "alice")
