"""Contact consent through the agents and the CLI: nothing from a user you did not accept is
stored (checked in the SQLite file), acceptance lets what waited flow exactly once, a block
stops everything and survives restarts, and the subcommands for scripts."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import common_pb2
from p2pchat_directory import service as service_module
from tests.support.agent import AgentClient, InProcessAgent, users_with, wait_until
from tests.support.cli import run_cli

PW = "script password 1\n"
FAST: dict[str, Any] = {"dial_timeout": 1.0, "keepalive": 1.0}


def rows(agent: InProcessAgent, name: str) -> int:
    """Messages in `name`'s own database file, read with sqlite3, not through the agent."""
    with sqlite3.connect(agent.settings.data_dir / f"{name}.db") as db:
        return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])


def state_of(client: AgentClient, name: str) -> int:
    for c in client.contacts():
        if c.username == name:
            return int(c.state)
    return common_pb2.CONTACT_STATE_UNSPECIFIED


def answer(client: AgentClient, how: str, name: str) -> None:
    request = apb.AgentContactAnswerRequest(username=name)
    getattr(client.stub, how)(request, timeout=10)


def strangers(
    make_agent: Callable[..., InProcessAgent],
) -> tuple[dict[str, InProcessAgent], AgentClient, AgentClient]:
    agents, (a, b) = users_with(make_agent, "alice", "bob", befriend=False, **FAST)
    return agents, a, b


def test_a_request_not_accepted_stores_nothing_at_the_recipient_then_acceptance_delivers_once(
    make_agent: Callable[..., InProcessAgent],
) -> None:
    agents, a, b = strangers(make_agent)
    a.add_contact("bob")
    assert state_of(a, "bob") == common_pb2.CONTACT_STATE_REQUESTED
    assert state_of(b, "alice") == common_pb2.CONTACT_STATE_AWAITING
    (bob_view,) = [c for c in b.contacts() if c.username == "alice"]
    assert (bob_view.address, bob_view.online) == ("", False)  # nothing revealed yet

    sent = [a.send("bob", f"before you accept {i}") for i in range(3)]
    assert {m.status for m in sent} == {apb.MESSAGE_STATUS_PENDING}
    time.sleep(2.5)  # dial attempts and relays are refused meanwhile
    assert rows(agents["bob"], "bob") == 0
    assert {m.status for m in a.history("bob")} == {apb.MESSAGE_STATUS_PENDING}

    answer(b, "AcceptContact", "alice")
    wait_until(lambda: len(b.history("alice")) == 3, 30)
    assert [m.body for m in b.history("alice")] == [m.body for m in sent]
    wait_until(lambda: a.status().pending_messages == 0, 30)
    assert rows(agents["bob"], "bob") == 3  # exactly once
    assert state_of(a, "bob") == state_of(b, "alice") == common_pb2.CONTACT_STATE_ACCEPTED


def test_a_block_stops_everything_and_survives_a_restart_of_the_blocker(
    make_agent: Callable[..., InProcessAgent],
) -> None:
    agents, a, b = strangers(make_agent)
    a.add_contact("bob")
    b.add_contact("alice")  # accepted at once: they asked each other
    assert a.send("bob", "hi", wait=20).status == apb.MESSAGE_STATUS_DELIVERED

    answer(b, "BlockContact", "alice")
    wait_until(lambda: "alice" not in b.status().linked_peers, 20)
    assert state_of(b, "alice") == common_pb2.CONTACT_STATE_BLOCKED
    agents["bob"].stop()
    agents["bob"].start()
    b = agents["bob"].client()
    wait_until(lambda: b.status().logged_in, 20)
    assert state_of(b, "alice") == common_pb2.CONTACT_STATE_BLOCKED
    for i in range(3):
        a.send("bob", f"after the block {i}")
    time.sleep(2.5)
    assert [m.body for m in b.history("alice")] == ["hi"]
    assert rows(agents["bob"], "bob") == 1
    try:
        a.add_contact("bob")  # asking again is refused
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.ALREADY_EXISTS)
    else:
        raise AssertionError("a blocked user could ask again")


def test_the_consent_subcommands_for_scripts(
    make_agent: Callable[..., InProcessAgent], tmp_path: Path
) -> None:
    ports = {n: make_agent(n, **FAST).server.control_port for n in ("alice", "bob", "carol")}

    def cli(user: str, *args: str, stdin: str = "", code: int = 0) -> str:
        result = run_cli(ports[user], tmp_path, *args, stdin=stdin)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        return result.stdout + result.stderr

    for user in ports:
        cli(user, "register", user, "--password-stdin", stdin=PW)
        cli(user, "login", user, "--password-stdin", stdin=PW)

    assert "request sent" in cli("alice", "add-contact", "bob", "--note", "from the meetup")
    requests = json.loads(cli("bob", "requests", "--json"))
    assert [(r["username"], r["note"], r["state"]) for r in requests] == [
        ("alice", "from the meetup", "awaiting")
    ]
    assert "accepted contact now" in cli("bob", "accept", "alice")
    contacts = json.loads(cli("alice", "contacts", "--json"))
    assert [(c["username"], c["state"]) for c in contacts] == [("bob", "accepted")]

    assert "invite" in cli("bob", "policy", "invite")
    out = cli("carol", "add-contact", "bob", code=2)  # no code: refused, a block not disclosed
    assert "does not accept contact requests" in out
    first = json.loads(cli("bob", "invite", "create", "--uses", "1", "--json"))
    second = json.loads(cli("bob", "invite", "create", "--json"))
    assert "revoked" in cli("bob", "invite", "revoke", first["id"])
    cli("carol", "add-contact", "bob", "--invite", first["code"], code=2)
    assert "request sent" in cli("carol", "add-contact", "bob", "--invite", second["code"])
    listed = json.loads(cli("bob", "invite", "list", "--json"))
    assert {i["id"] for i in listed} == {first["id"], second["id"]}
    assert all(i["code"] is None for i in listed)  # shown once, at creation

    assert "blocked carol" in cli("bob", "block", "carol")
    assert [r["username"] for r in json.loads(cli("bob", "requests", "--json"))] == []
    assert "unblocked carol" in cli("bob", "unblock", "carol")
    assert "nobody" in cli("bob", "policy", "nobody")
    assert "nobody" in cli("bob", "policy")


def test_a_directory_that_lets_a_stranger_through_still_gets_nothing_stored(
    make_agent: Callable[..., InProcessAgent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buggy or compromised directory answers Lookup and takes deposits for a pair that is
    not accepted: bob's agent refuses mallory's link at its Hello and discards her envelopes,
    from its own copy of its contacts. Nothing of hers is in bob's database file."""
    monkeypatch.setattr(service_module, "require_accepted", lambda _name, _pair: "")
    agents, (mallory, bob) = users_with(make_agent, "mallory", "bob", befriend=False, **FAST)
    mallory.add_contact("bob")  # a request bob never answers
    wait_until(lambda: mallory.status().mailbox_connected and bob.status().mailbox_connected)
    for i in range(3):
        mallory.send("bob", f"spam {i}")
    wait_until(lambda: bob.status().envelopes_refused >= 3, 30)  # the mailbox path, refused
    assert rows(agents["bob"], "bob") == 0
    assert bob.history("mallory") == []
    assert list(bob.status().linked_peers) == []  # and no link was let in
