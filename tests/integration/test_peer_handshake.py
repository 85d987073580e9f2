"""The key checked is the key of the connection used: the dialler accepts a link only when the
answering agent proves, on that connection, the key of the certificate that was checked (pin,
revocation); agents of another peer protocol version are refused with a clear message."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import peer_pb2 as ppb
from p2pchat.v1 import peer_pb2_grpc
from p2pchat_agent.handshake import answer_hello, dialler_hello, verify_answer
from p2pchat_agent.identity import make_csr
from p2pchat_common.tls import private_key_pem
from tests.integration.test_agent_security import (
    accepted_peer,
    ask_as,
    certificate_for,
    frames,
    link_call,
)
from tests.support.agent import InProcessAgent, logged_in, wait_until
from tests.support.directory import PASSWORD, InProcessDirectory


class WrongProof(peer_pb2_grpc.PeerServiceServicer):
    """Presents a genuine certificate for bob, but proves another key in its Hello."""

    def __init__(self) -> None:
        self.dials = 0
        self._other = private_key_pem(ec.generate_private_key(ec.SECP256R1()))

    def Link(self, request_iterator: Iterator[ppb.Frame], context: Any) -> Iterator[ppb.Frame]:
        first = next(request_iterator)
        self.dials += 1
        yield answer_hello("bob", self._other, first.hello)
        for _ in request_iterator:  # a dialler that went on would send its messages here
            pass


@pytest.fixture
def wrong_proof(
    agent_directory: InProcessDirectory, tmp_path: Path
) -> Iterator[tuple[int, WrongProof]]:
    key, cert = certificate_for(agent_directory, "bob", tmp_path)
    servicer = WrongProof()
    server = grpc.server(ThreadPoolExecutor(4))
    peer_pb2_grpc.add_PeerServiceServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=agent_directory.users_ca_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(0)


def test_a_peer_that_cannot_prove_the_checked_key_on_the_link_gets_nothing(
    make_agent: Callable[[str], InProcessAgent],
    wrong_proof: tuple[int, WrongProof],
    agent_directory: InProcessDirectory,
) -> None:
    port, impostor = wrong_proof
    agent = make_agent("alice")
    (alice,) = logged_in(lambda _name: agent, "alice", befriend=False)
    alice.add_contact("bob", f"127.0.0.1:{port}")
    ask_as(agent_directory, "bob", "alice")  # accepted contacts: the dial goes ahead
    alice.send("bob", "for bob's eyes only")
    wait_until(lambda: impostor.dials >= 2)  # the first attempt is over: it was refused
    assert list(alice.status().linked_peers) == []
    active = agent.server.agent.active
    assert active is not None and active.store.sync.get_pin("bob") is None  # nothing pinned
    history = alice.history("bob")
    assert [m.status for m in history] == [apb.MESSAGE_STATUS_PENDING]


def test_an_agent_answers_with_a_proof_of_its_certificate_key(
    make_agent: Callable[[str], InProcessAgent],
    agent_directory: InProcessDirectory,
    tmp_path: Path,
) -> None:
    bob_agent = make_agent("bob")
    (bob,) = logged_in(lambda _name: bob_agent, "bob", befriend=False)
    port = int(bob.status().address.rpartition(":")[2])
    key, cert = accepted_peer(agent_directory, bob, "mallory", tmp_path)
    mine = dialler_hello("mallory")
    answer = link_call(port, agent_directory.users_ca_pem, key, cert, frames(mine))[0]
    bob_cert = x509.load_pem_x509_certificate(
        (bob_agent.settings.data_dir / "bob.crt").read_bytes()
    )
    verify_answer(answer.hello, "mallory", "bob", mine.hello.nonce, bob_cert)


def test_an_agent_of_protocol_1_is_refused_with_both_versions_named(
    make_agent: Callable[[str], InProcessAgent],
    agent_directory: InProcessDirectory,
    tmp_path: Path,
) -> None:
    (bob,) = logged_in(make_agent, "bob", befriend=False)
    port = int(bob.status().address.rpartition(":")[2])
    key, cert = accepted_peer(agent_directory, bob, "mallory", tmp_path)
    old = ppb.Frame(hello=ppb.Hello(username="mallory", protocol_version=1))
    with pytest.raises(grpc.RpcError) as err:
        link_call(port, agent_directory.users_ca_pem, key, cert, frames(old))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "mallory speaks peer protocol 1, this agent 2" in (err.value.details() or "")


class OldKey(peer_pb2_grpc.PeerServiceServicer):
    """Presents an older genuine certificate of bob's and proves its key: only the directory's
    word on bob's current key tells it apart."""

    def __init__(self, key_pem: bytes) -> None:
        self.dials = 0
        self._key = key_pem

    def Link(self, request_iterator: Iterator[ppb.Frame], context: Any) -> Iterator[ppb.Frame]:
        first = next(request_iterator)
        self.dials += 1
        yield answer_hello("bob", self._key, first.hello)
        for _ in request_iterator:
            pass


def test_a_peer_presenting_another_key_than_the_directory_knows_is_refused(
    make_agent: Callable[[str], InProcessAgent],
    agent_directory: InProcessDirectory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old_key, old_cert = certificate_for(agent_directory, "bob", tmp_path)
    # bob moves to a new key (another login): the directory's current key for bob changes.
    new_key = private_key_pem(ec.generate_private_key(ec.SECP256R1()))
    stub = agent_directory.stub()
    stub.Login(
        dpb.LoginRequest(username="bob", password=PASSWORD, csr_pem=make_csr(new_key, "bob"))
    )
    servicer = OldKey(old_key)
    server = grpc.server(ThreadPoolExecutor(4))
    peer_pb2_grpc.add_PeerServiceServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [(old_key, old_cert)],
        root_certificates=agent_directory.users_ca_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        with caplog.at_level(logging.INFO, logger="p2pchat_agent.dialer"):
            (alice,) = logged_in(make_agent, "alice", befriend=False)
            alice.add_contact("bob", f"127.0.0.1:{port}")
            ask_as(agent_directory, "bob", "alice")  # accepted contacts: the dial goes ahead
            alice.send("bob", "for the real bob")
            wait_until(lambda: "other than the one the directory knows" in caplog.text)
        assert servicer.dials == 0  # refused on the probe, before any Hello
        assert alice.status().pending_messages == 1
    finally:
        server.stop(0)
