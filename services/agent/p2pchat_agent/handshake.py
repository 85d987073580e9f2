"""The Hellos that open a peer link (protocol version 2), as values in and out: no sockets.

The dialler sends a fresh nonce; the answerer signs (dialler, answerer, nonce) with the key of
the certificate it presents on this connection, and the dialler verifies that signature with
the certificate it checked (chain, name, revocation, pin). The answerer needs no proof of its
own: it reads the dialler's certificate from this very connection.
"""

from __future__ import annotations

import os

from cryptography import x509

from p2pchat.v1 import peer_pb2 as pb
from p2pchat_common.errors import FailedPrecondition, PermissionDenied
from p2pchat_common.signatures import sign, verifies

PROTOCOL_VERSION = 2
NONCE_BYTES = 32
_CONTEXT = b"p2pchat link v2\0"


def _signed_bytes(dialler: str, answerer: str, nonce: bytes) -> bytes:
    return _CONTEXT + dialler.encode() + b"\0" + answerer.encode() + b"\0" + nonce


def dialler_hello(me: str) -> pb.Frame:
    """The first frame of a link this agent dials (a new nonce each time)."""
    hello = pb.Hello(username=me, protocol_version=PROTOCOL_VERSION, nonce=os.urandom(NONCE_BYTES))
    return pb.Frame(hello=hello)


def answer_hello(me: str, key_pem: bytes, dialler: pb.Hello) -> pb.Frame:
    """This agent's answer to a dialler's (already checked) Hello, with its proof."""
    signature = sign(key_pem, _signed_bytes(dialler.username, me, dialler.nonce))
    hello = pb.Hello(username=me, protocol_version=PROTOCOL_VERSION, signature=signature)
    return pb.Frame(hello=hello)


def check_version(hello: pb.Hello, peer: str) -> None:
    if hello.protocol_version != PROTOCOL_VERSION:
        raise FailedPrecondition(
            f"{peer} speaks peer protocol {hello.protocol_version}, this agent "
            f"{PROTOCOL_VERSION}: upgrade the older agent"
        )


def check_dialler_hello(hello: pb.Hello, peer: str) -> None:
    check_version(hello, peer)
    if len(hello.nonce) != NONCE_BYTES:
        raise FailedPrecondition(f"a dialler's Hello carries a {NONCE_BYTES}-byte nonce")


def verify_answer(
    hello: pb.Hello, me: str, peer: str, nonce: bytes, cert: x509.Certificate
) -> None:
    """PermissionDenied unless the answer was signed with `cert`'s key over our nonce."""
    check_version(hello, peer)
    if not verifies(cert, hello.signature, _signed_bytes(me, peer, nonce)):
        raise PermissionDenied(
            f"{peer}'s Hello is not signed with the key of the certificate checked for it"
        )
