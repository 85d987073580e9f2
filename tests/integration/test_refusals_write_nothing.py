"""A refused operation changes no file and no row: a refused login leaves no key file behind,
and a refused peer link pins no key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from p2pchat_agent.store import MessageStore
from tests.integration.test_agent_security import (
    accepted_peer,
    frames,
    hello,
    link_call,
    message,
)
from tests.support.agent import InProcessAgent, logged_in
from tests.support.directory import InProcessDirectory, expect_error


def files_under(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() and not p.is_socket() else b""
        for p in sorted(path.rglob("*"))
    }


def test_refused_logins_leave_no_file_behind(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    agent = make_agent("alice")
    client = agent.client()
    client.register("alice")
    before = files_under(agent.settings.data_dir)
    for _ in range(3):
        expect_error(grpc.StatusCode.UNAUTHENTICATED, client.login, "alice", "wrong password!")
        expect_error(grpc.StatusCode.UNAUTHENTICATED, client.login, "nobody12", "wrong password!")
    assert files_under(agent.settings.data_dir) == before
    client.login("alice")  # the right password: now the key is kept
    assert (agent.settings.data_dir / "alice.key").exists()


def _store(agent: InProcessAgent) -> MessageStore:
    active = agent.server.agent.active
    assert active is not None
    return active.store.sync


@pytest.mark.parametrize(
    "sent",
    [
        lambda: frames(hello("alice")),  # a Hello that does not match the certificate
        lambda: frames(message("mallory", "bob", "no hello first")),
        lambda: frames(),  # nothing at all
    ],
    ids=["wrong-hello", "no-hello", "empty"],
)
def test_a_refused_link_pins_no_key(
    make_agent: Callable[[str], InProcessAgent],
    agent_directory: InProcessDirectory,
    tmp_path: Path,
    sent: Callable[[], object],
) -> None:
    agent = make_agent("bob")
    (bob,) = logged_in(lambda _name: agent, "bob", befriend=False)
    port = int(bob.status().address.rpartition(":")[2])
    key, cert = accepted_peer(agent_directory, bob, "mallory", tmp_path)
    with pytest.raises(grpc.RpcError) as err:
        link_call(port, agent_directory.users_ca_pem, key, cert, sent())  # type: ignore[arg-type]
    assert err.value.code() in (
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert _store(agent).get_pin("mallory") is None
    # An honest link is accepted and pins the key on first contact.
    link_call(port, agent_directory.users_ca_pem, key, cert, frames(hello("mallory")))
    assert _store(agent).get_pin("mallory") is not None
