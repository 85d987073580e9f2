"""Peer links are mutually authenticated: identities come from certificates, keys are pinned."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import peer_pb2 as ppb
from p2pchat.v1 import peer_pb2_grpc
from p2pchat_agent.config import load_settings
from p2pchat_agent.handshake import dialler_hello
from p2pchat_agent.identity import load_or_create_key, make_csr
from p2pchat_common.timestamps import to_timestamp
from p2pchat_common.tls import user_dns_name
from p2pchat_directory.ca import CertificateAuthority
from tests.support.agent import AgentClient, InProcessAgent, logged_in, wait_until
from tests.support.directory import PASSWORD, InProcessDirectory


def certificate_for(
    directory: InProcessDirectory, name: str, tmp: Path, asks: str = ""
) -> tuple[bytes, bytes]:
    """A genuine directory-signed (key, certificate) for a freshly registered user; with
    `asks`, that user also sends `asks` a contact request (accepted once `asks` adds them)."""
    stub = directory.stub()
    stub.Register(dpb.RegisterRequest(username=name, password=PASSWORD))
    key = load_or_create_key(tmp, name)
    login = stub.Login(
        dpb.LoginRequest(username=name, password=PASSWORD, csr_pem=make_csr(key, name))
    )
    if asks:
        metadata = (("authorization", f"Bearer {login.session_token}"),)
        stub.AddContact(dpb.AddContactRequest(username=asks), metadata=metadata)
    return key, login.certificate_pem


def ask_as(directory: InProcessDirectory, name: str, asks: str) -> None:
    """`name` (registered with PASSWORD) sends `asks` a contact request, or accepts theirs."""
    stub = directory.stub()
    token = stub.Login(dpb.LoginRequest(username=name, password=PASSWORD)).session_token
    stub.AddContact(
        dpb.AddContactRequest(username=asks), metadata=(("authorization", f"Bearer {token}"),)
    )


def accepted_peer(
    directory: InProcessDirectory, agent: AgentClient, name: str, tmp: Path
) -> tuple[bytes, bytes]:
    """certificate_for a user who is an accepted contact of `agent`'s user (both asked), so
    that the agent lets their links through to the checks under test."""
    me = agent.status().username
    key, cert = certificate_for(directory, name, tmp, asks=me)
    agent.add_contact(name)
    return key, cert


def frames(*items: ppb.Frame) -> Iterator[ppb.Frame]:
    yield from items


def message(sender: str, recipient: str, body: str, mid: str = "01TESTID") -> ppb.Frame:
    from datetime import UTC, datetime

    batch = ppb.MessageBatch(
        messages=[
            ppb.PeerMessage(
                id=mid,
                sender=sender,
                recipient=recipient,
                body=body,
                sent_at=to_timestamp(datetime.now(UTC)),
            )
        ]
    )
    return ppb.Frame(messages=batch)


def hello(name: str) -> ppb.Frame:
    """A dialler's Hello (protocol 2: with a fresh nonce)."""
    return dialler_hello(name)


def link_call(
    port: int, ca: bytes, key: bytes | None, cert: bytes | None, sent: Iterator[ppb.Frame]
) -> list[ppb.Frame]:
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    with grpc.secure_channel(
        f"127.0.0.1:{port}",
        creds,
        options=[("grpc.ssl_target_name_override", user_dns_name("bob"))],
    ) as channel:
        return list(peer_pb2_grpc.PeerServiceStub(channel).Link(sent, timeout=10))


def test_impersonation_with_a_valid_certificate_is_refused_and_nothing_stored(
    make_agent: Callable[[str], InProcessAgent], agent_directory: InProcessDirectory, tmp_path: Path
) -> None:
    (bob,) = logged_in(make_agent, "bob", befriend=False)
    bob_agent_port = bob_peer_port(make_agent, bob)
    key, cert = accepted_peer(agent_directory, bob, "mallory", tmp_path)
    ca = agent_directory.users_ca_pem
    # Hello in someone else's name.
    with pytest.raises(grpc.RpcError) as err:
        link_call(bob_agent_port, ca, key, cert, frames(hello("alice")))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Honest Hello, forged sender.
    with pytest.raises(grpc.RpcError) as err:
        link_call(
            bob_agent_port,
            ca,
            key,
            cert,
            frames(hello("mallory"), message("alice", "bob", "send me money")),
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "alice" in (err.value.details() or "")
    bob.register("alice")
    bob.add_contact("alice")
    assert bob.history("alice") == [] and bob.history("mallory") == []


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("", "empty"),
        ("x" * 16_385, "one byte over the 16 KiB limit"),
        ("é" * 8_193, "8,193 characters but 16,386 bytes of UTF-8"),
    ],
)
def test_a_peer_message_outside_the_body_limit_is_refused_and_not_stored(
    make_agent: Callable[[str], InProcessAgent],
    agent_directory: InProcessDirectory,
    tmp_path: Path,
    body: str,
    why: str,
) -> None:
    (bob,) = logged_in(make_agent, "bob", befriend=False)
    key, cert = accepted_peer(agent_directory, bob, "mallory", tmp_path)
    sent = frames(hello("mallory"), message("mallory", "bob", body))
    with pytest.raises(grpc.RpcError) as err:
        link_call(bob_peer_port(make_agent, bob), agent_directory.users_ca_pem, key, cert, sent)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
    assert "1-16384 bytes of UTF-8" in (err.value.details() or "")
    assert bob.history("mallory") == []


def test_a_peer_message_of_exactly_the_limit_in_multibyte_text_is_stored(
    make_agent: Callable[[str], InProcessAgent], agent_directory: InProcessDirectory, tmp_path: Path
) -> None:
    (bob,) = logged_in(make_agent, "bob", befriend=False)
    key, cert = accepted_peer(agent_directory, bob, "mallory", tmp_path)
    body = "é" * 8_192  # 16,384 bytes: at the limit
    acked = threading.Event()

    def sent() -> Iterator[ppb.Frame]:
        yield hello("mallory")
        yield message("mallory", "bob", body)
        acked.wait(10)  # the link stays open until bob acknowledges

    creds = grpc.ssl_channel_credentials(agent_directory.users_ca_pem, key, cert)
    target = f"127.0.0.1:{bob_peer_port(make_agent, bob)}"
    options = [("grpc.ssl_target_name_override", user_dns_name("bob"))]
    with grpc.secure_channel(target, creds, options=options) as channel:
        for frame in peer_pb2_grpc.PeerServiceStub(channel).Link(sent(), timeout=10):
            if frame.HasField("acks"):
                assert list(frame.acks.ids) == ["01TESTID"]
                acked.set()
                break
    assert acked.is_set()
    assert [m.body for m in bob.history("mallory")] == [body]


def bob_peer_port(make_agent: Callable[[str], InProcessAgent], bob: AgentClient) -> int:
    address = bob.status().address
    return int(address.rpartition(":")[2])


def test_links_without_a_certificate_or_from_another_ca_are_refused(
    make_agent: Callable[[str], InProcessAgent], agent_directory: InProcessDirectory, tmp_path: Path
) -> None:
    (bob,) = logged_in(make_agent, "bob", befriend=False)
    port = bob_peer_port(make_agent, bob)
    with pytest.raises(grpc.RpcError) as err:
        link_call(port, agent_directory.users_ca_pem, None, None, frames(hello("alice")))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    rogue = CertificateAuthority.load_or_create(tmp_path / "rogue-ca")
    key = load_or_create_key(tmp_path, "alice")
    forged = rogue.sign_agent_csr(make_csr(key, "alice"), "alice", timedelta(days=1))
    with pytest.raises(grpc.RpcError) as err:
        link_call(
            port,
            agent_directory.users_ca_pem,
            key,
            forged.pem,
            frames(hello("alice"), message("alice", "bob", "forged")),
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    bob.register("alice")
    bob.add_contact("alice")
    assert bob.history("alice") == []


def test_a_changed_key_is_refused_until_trusted(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    agents: dict[str, InProcessAgent] = {}

    def make(name: str) -> InProcessAgent:
        agents[name] = make_agent(name)
        return agents[name]

    alice, bob = logged_in(make, "alice", "bob")
    bob_agent = agents["bob"]
    assert alice.send("bob", "first", wait=10).status == apb.MESSAGE_STATUS_DELIVERED

    # bob moves to a new key (as if to a new machine): his agent loses its key file.
    bob_agent.stop()
    (bob_agent.settings.data_dir / "bob.key").unlink()
    (bob_agent.settings.data_dir / "session.json").unlink()
    bob_agent.start()
    bob = bob_agent.client()
    bob.login("bob")

    events = alice.stub.Serve(apb.ServeRequest(), timeout=30)
    second = alice.send("bob", "second")
    changed = next(e for e in events if e.WhichOneof("kind") == "key_changed")
    events.cancel()
    assert changed.key_changed.peer == "bob"
    assert changed.key_changed.pinned_sha256 != changed.key_changed.presented_sha256
    assert alice.status().pending_messages == 1
    # bob's messages to alice are refused too (alice checks the key of inbound links).
    bob.send("alice", "it's really me")
    wait_until(lambda: bob.status().pending_messages == 1)
    assert [m.body for m in alice.history("bob")] == ["first", "second"]

    trusted = alice.stub.TrustPeerKey(apb.TrustPeerKeyRequest(username="bob"))
    assert trusted.public_key_sha256 == changed.key_changed.presented_sha256
    wait_until(lambda: alice.status().pending_messages == 0, timeout=20)
    wait_until(lambda: bob.status().pending_messages == 0, timeout=20)
    # bob's history is in his local order: his own message was written before "second" arrived.
    assert [m.body for m in bob.history("alice")] == ["first", "it's really me", "second"]
    assert second.id in {m.id for m in bob.history("alice")}


def test_trust_without_a_key_change_is_a_failed_precondition(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    (alice,) = logged_in(make_agent, "alice", befriend=False)
    with pytest.raises(grpc.RpcError) as err:
        alice.stub.TrustPeerKey(apb.TrustPeerKeyRequest(username="bob"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_control_port_is_loopback_only_unless_forced() -> None:
    with tempfile.TemporaryDirectory() as tmp, pytest.raises(SystemExit) as exit_info:
        load_settings(["--data-dir", tmp, "--control-listen", "0.0.0.0:50053"], environ={})
    assert exit_info.value.code == 2
    forced = load_settings(
        ["--control-listen", "0.0.0.0:50053", "--allow-remote-control"], environ={}
    )
    assert forced.control_listen == "0.0.0.0:50053"
    assert load_settings([], environ={}).control_address == "unix:data/control.sock"
    assert load_settings(["--control-listen", "[::1]:7"], environ={}).control_listen == "[::1]:7"
