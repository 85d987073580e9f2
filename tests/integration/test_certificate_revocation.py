"""Certificates are short-lived and revocable: logout and a new key revoke a user's
certificate at the directory, an agent refuses new links from a revoked certificate and closes
open ones within its revocation interval."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import peer_pb2 as ppb
from p2pchat.v1 import peer_pb2_grpc
from p2pchat_agent.identity import make_csr
from p2pchat_common.tls import private_key_pem, user_dns_name
from p2pchat_directory.config import Settings, load_settings
from tests.integration.test_agent_security import hello
from tests.support.agent import InProcessAgent, logged_in, wait_until
from tests.support.directory import PASSWORD, InProcessDirectory, auth, expect_error

GOOD, REVOKED, UNKNOWN = (
    dpb.CERTIFICATE_STATE_GOOD,
    dpb.CERTIFICATE_STATE_REVOKED,
    dpb.CERTIFICATE_STATE_UNKNOWN,
)


def fingerprint(cert_pem: bytes) -> str:
    return x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256()).hex()


def new_key() -> bytes:
    return private_key_pem(ec.generate_private_key(ec.SECP256R1()))


def login(stub: object, name: str, key: bytes) -> dpb.LoginResponse:
    request = dpb.LoginRequest(username=name, password=PASSWORD, csr_pem=make_csr(key, name))
    response: dpb.LoginResponse = stub.Login(request)  # type: ignore[attr-defined]
    return response


def test_certificates_are_short_lived_by_default() -> None:
    assert Settings().certificate_ttl == timedelta(hours=12)
    assert load_settings([], environ={}).certificate_ttl <= timedelta(days=1)


def test_logout_and_a_new_key_revoke_and_renewal_does_not(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    stub.Register(dpb.RegisterRequest(username="carol", password=PASSWORD))
    stub.Register(dpb.RegisterRequest(username="dave", password=PASSWORD))
    dave = login(stub, "dave", new_key()).session_token

    def states(*pems: bytes) -> list[int]:
        request = dpb.CertificateStatusRequest(certificate_sha256=[fingerprint(p) for p in pems])
        return list(stub.CertificateStatus(request, metadata=auth(dave)).states)

    key = new_key()
    first = login(stub, "carol", key)
    cert_1 = first.certificate_pem
    expires = first.certificate_expires_at.ToDatetime(tzinfo=UTC)
    assert expires - datetime.now(UTC) < timedelta(hours=12, minutes=1)
    renewed = stub.RenewCertificate(
        dpb.RenewCertificateRequest(csr_pem=make_csr(key, "carol")),
        metadata=auth(first.session_token),
    )
    cert_2 = renewed.certificate_pem
    assert states(cert_1, cert_2) == [GOOD, GOOD]  # a renewal keeps the key: both stay good

    # A login with another key (the user moved to a new agent) revokes the old key's and ends
    # the old agent's session: it can renew nothing, and so cannot revoke the new one's.
    moved = login(stub, "carol", new_key())
    assert states(cert_1, cert_2, moved.certificate_pem) == [REVOKED, REVOKED, GOOD]
    expect_error(
        grpc.StatusCode.UNAUTHENTICATED,
        stub.RenewCertificate,
        dpb.RenewCertificateRequest(csr_pem=make_csr(key, "carol")),
        metadata=auth(first.session_token),
    )
    assert states(moved.certificate_pem) == [GOOD]

    # Logout revokes what the session was given.
    stub.Logout(dpb.LogoutRequest(), metadata=auth(moved.session_token))
    assert states(moved.certificate_pem) == [REVOKED]
    assert states(directory.ca_pem) == [UNKNOWN]  # never issued to a user


@pytest.mark.parametrize(
    ("shas", "code"),
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT),
        (["0" * 64] * 257, grpc.StatusCode.INVALID_ARGUMENT),
        (["XYZ"], grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["none", "too-many", "not-hex"],
)
def test_certificate_status_refuses_bad_questions(
    directory: InProcessDirectory, shas: list[str], code: grpc.StatusCode
) -> None:
    stub = directory.stub()
    stub.Register(dpb.RegisterRequest(username="erin", password=PASSWORD))
    token = login(stub, "erin", new_key()).session_token
    request = dpb.CertificateStatusRequest(certificate_sha256=shas)
    expect_error(code, stub.CertificateStatus, request, metadata=auth(token))
    expect_error(
        grpc.StatusCode.UNAUTHENTICATED,
        stub.CertificateStatus,
        dpb.CertificateStatusRequest(certificate_sha256=["0" * 64]),
    )


def test_an_open_link_from_a_revoked_certificate_is_closed_and_cannot_reopen(
    make_agent: Callable[..., InProcessAgent], agent_directory: InProcessDirectory
) -> None:
    (bob,) = logged_in(lambda n: make_agent(n, revocation_interval=0.3), "bob", befriend=False)
    port = int(bob.status().address.rpartition(":")[2])
    stub = agent_directory.stub()
    stub.Register(dpb.RegisterRequest(username="mallory", password=PASSWORD))
    key = new_key()
    session = login(stub, "mallory", key)
    metadata = (("authorization", f"Bearer {session.session_token}"),)
    stub.AddContact(dpb.AddContactRequest(username="bob"), metadata=metadata)
    bob.add_contact("mallory")  # accepted contacts: the link gets as far as revocation
    creds = grpc.ssl_channel_credentials(agent_directory.users_ca_pem, key, session.certificate_pem)
    options = [("grpc.ssl_target_name_override", user_dns_name("bob"))]
    hold = threading.Event()

    def frames() -> Iterator[ppb.Frame]:
        yield hello("mallory")
        hold.wait(20)

    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        link = peer_pb2_grpc.PeerServiceStub(channel)
        call = link.Link(frames(), timeout=20)
        assert next(call).HasField("hello")
        wait_until(lambda: list(bob.status().linked_peers) == ["mallory"])

        stub.Logout(dpb.LogoutRequest(), metadata=auth(session.session_token))
        started = time.monotonic()
        wait_until(lambda: list(bob.status().linked_peers) == [], timeout=10)
        assert time.monotonic() - started < 5  # within the interval, give or take a round trip
        hold.set()

        again = link.Link(iter([hello("mallory")]), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(again)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "revoked" in (err.value.details() or "")


def test_logging_out_an_agent_stops_links_to_it_and_its_peers_deliver_after_it_returns(
    make_agent: Callable[..., InProcessAgent], tmp_path: Path
) -> None:
    alice, bob = logged_in(lambda n: make_agent(n, revocation_interval=0.3), "alice", "bob")
    assert alice.send("bob", "before", wait=10).status != 0
    bob.logout()
    wait_until(lambda: list(alice.status().linked_peers) == [])
    alice.send("bob", "while bob is logged out")
    time.sleep(1.0)  # alice retries: bob's port no longer presents his certificate
    assert alice.status().pending_messages == 1
    bob.login("bob")
    wait_until(lambda: alice.status().pending_messages == 0, timeout=20)
    assert [m.body for m in bob.history("alice")] == ["before", "while bob is logged out"]
