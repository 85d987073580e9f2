"""The scriptable subcommands: output, --json shapes and exit codes (0 ok, 1 usage,
2 refused with the reason, 3 agent unreachable)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.support.agent import AgentClient, InProcessAgent, wait_until
from tests.support.cli import run_cli
from tests.support.process import free_port

PW = "script password 1\n"


def test_a_scripted_session_from_register_to_history(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    a, b = make_agent("alice").server.control_port, make_agent("bob").server.control_port

    def ok(port: int, *args: str, stdin: str = "") -> str:
        result = run_cli(port, tmp_path, *args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        return result.stdout

    assert ok(a, "register", "Alice", "--password-stdin", stdin=PW) == "registered alice\n"
    ok(b, "register", "bob", "--password-stdin", stdin=PW)
    assert ok(a, "login", "alice", "--password-stdin", stdin=PW).startswith("logged in as alice")
    ok(b, "login", "bob", "--password-stdin", stdin=PW)
    assert ok(a, "add-contact", "bob") == (
        "added bob: request sent; messages to them wait until they accept\n"
    )
    assert ok(b, "add-contact", "alice").startswith("added alice (127.0.0.1:")  # both asked

    contacts = json.loads(ok(a, "contacts", "--json"))
    assert [c["username"] for c in contacts] == ["bob"]
    assert set(contacts[0]) == {
        "username",
        "address",
        "pinned_address",
        "online",
        "last_seen",
        "state",
        "note",
        "requested_at",
    }
    assert contacts[0]["online"] is True and contacts[0]["state"] == "accepted"

    sent = ok(a, "send", "bob", "hello from a script", "--wait", "10").split()
    assert len(sent) == 2 and sent[1] == "delivered"
    ok(b, "send", "alice", "reply")
    wait_until(lambda: "reply" in ok(a, "history", "bob"))

    history = json.loads(ok(a, "history", "bob", "--json"))
    assert set(history) == {"peer", "messages", "has_more"}
    assert history["peer"] == "bob" and history["has_more"] is False
    bodies = [(m["direction"], m["body"], m["status"]) for m in history["messages"]]
    assert bodies == [
        ("outgoing", "hello from a script", "delivered"),
        ("incoming", "reply", "received"),
    ]
    first = history["messages"][0]
    assert first["id"] == sent[0] and first["sender"] == "alice" and first["recipient"] == "bob"
    assert first["sent_at"].endswith("Z") and first["delivered_at"].endswith("Z")

    found = json.loads(ok(a, "history", "bob", "--search", "script", "--json"))
    assert [m["body"] for m in found["messages"]] == ["hello from a script"]
    paged = json.loads(ok(a, "history", "bob", "--limit", "1", "--json"))
    assert [m["body"] for m in paged["messages"]] == ["reply"] and paged["has_more"] is True

    status = json.loads(ok(a, "status", "--json"))
    assert status["logged_in"] is True and status["username"] == "alice"
    assert status["pending_messages"] == 0 and status["linked_peers"] == ["bob"]
    assert "alice" in ok(a, "status")

    assert ok(a, "remove-contact", "bob") == "removed bob\n"
    # bob's side stands: alice sees his request awaiting her answer, nothing more of him.
    assert [
        (c["username"], c["state"], c["address"]) for c in json.loads(ok(a, "contacts", "--json"))
    ] == [("bob", "awaiting", "")]
    assert ok(a, "logout") == "logged out\n"
    assert json.loads(ok(a, "status", "--json"))["logged_in"] is False


def test_refusals_exit_2_with_the_reason(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    port = make_agent("carol").server.control_port

    def refused(*args: str, stdin: str = "") -> str:
        result = run_cli(port, tmp_path, *args, stdin=stdin)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result.stderr

    assert "not logged in" in refused("send", "bob", "hi")
    assert "not logged in" in refused("chat", "bob")
    assert (
        run_cli(port, tmp_path, "register", "carol", "--password-stdin", stdin=PW).returncode == 0
    )
    assert "taken" in refused("register", "carol", "--password-stdin", stdin=PW)
    assert "too short" in refused("register", "dave", "--password-stdin", stdin="short\n")
    assert "wrong username or password" in refused(
        "login", "carol", "--password-stdin", stdin="wrong password\n"
    )
    assert run_cli(port, tmp_path, "login", "carol", "--password-stdin", stdin=PW).returncode == 0
    assert "no such user" in refused("add-contact", "nobody")
    assert "invalid username" in refused("history", "b@d")
    assert "no such user" in refused("send", "nobody", "hi")
    assert "limit" in refused("history", "carol", "--limit", "5000")
    assert "nothing to trust" in refused("trust", "carol")


def test_usage_errors_exit_1(make_agent: Callable[[str], InProcessAgent], tmp_path: Path) -> None:
    port = make_agent("erin").server.control_port
    for args in (["send", "bob"], ["frobnicate"], ["history"], ["send", "bob", "x", "--wait", "x"]):
        result = run_cli(port, tmp_path, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert "usage:" in result.stderr
    result = run_cli(port, tmp_path, "login", "erin")  # no terminal to ask the password on
    assert result.returncode == 1 and "--password-stdin" in result.stderr
    result = run_cli(port, tmp_path, "login", "erin", "--password-stdin")  # empty stdin
    assert result.returncode == 1


def test_unreachable_agent_exits_3(tmp_path: Path) -> None:
    result = run_cli(free_port(), tmp_path, "status")
    assert result.returncode == 3
    assert "cannot reach the agent" in result.stderr and "Traceback" not in result.stderr


def test_help_texts_explain_every_command(tmp_path: Path) -> None:
    result = run_cli(free_port(), tmp_path, "--help")
    assert result.returncode == 0
    for word in (
        "register",
        "login",
        "logout",
        "status",
        "contacts",
        "add-contact",
        "remove-contact",
        "send",
        "history",
        "chat",
        "serve",
        "trust",
        "exit codes",
        "1. Register",
        "5. Log out",
    ):
        assert word in result.stdout, word
    send_help = run_cli(free_port(), tmp_path, "send", "--help").stdout
    assert "--wait" in send_help and "TEXT" in send_help.upper()
    history_help = run_cli(free_port(), tmp_path, "history", "--help").stdout
    assert "--json" in history_help and "--search" in history_help


def test_send_dash_sends_every_line_of_stdin_in_order_and_waits_for_delivery(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    port, alice, bob = _two_contacts(make_agent)
    lines = [f"line {i:04d} from a pipe" for i in range(2000)]
    stdin = "\n".join(lines[:1000]) + "\n\n" + "\n".join(lines[1000:]) + "\n"  # a blank line

    result = run_cli(port, tmp_path, "send", "bob", "-", "--wait", "30", stdin=stdin)

    assert result.returncode == 0, result.stderr
    out = [line.split() for line in result.stdout.splitlines()]
    assert len(out) == 2000 and {state for _, state in out} == {"delivered"}
    stored = bob.history("alice", limit=1000)
    assert [m.body for m in stored] == lines[1000:]
    assert [m.id for m in alice.history("bob", limit=1000)] == [id for id, _ in out[1000:]]


def test_send_dash_refuses_lines_with_control_characters_and_sends_the_rest(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    port, alice, bob = _two_contacts(make_agent)

    result = run_cli(port, tmp_path, "send", "bob", "-", stdin="first\nbad \x1b[2J\nlast\n")

    assert result.returncode == 2
    assert "1 line(s) not sent: they hold control characters" in result.stderr
    assert len(result.stdout.splitlines()) == 2
    wait_until(lambda: [m.body for m in bob.history("alice")] == ["first", "last"])


def _two_contacts(
    make_agent: Callable[[str], InProcessAgent],
) -> tuple[int, AgentClient, AgentClient]:
    """alice's control port, and clients of alice and bob, logged in and each other's contact."""
    a, b = make_agent("alice"), make_agent("bob")
    alice, bob = a.client(), b.client()
    for client, name in ((alice, "alice"), (bob, "bob")):
        client.register(name)
        client.login(name)
    alice.add_contact("bob")
    bob.add_contact("alice")
    return a.server.control_port, alice, bob


def test_send_dash_fails_fast_and_clearly_when_the_agent_cannot_take_the_lines(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    import subprocess
    import time

    from tests.support.cli import CLI, agent_flag, cli_env

    port, _, _ = _two_contacts(make_agent)
    many = "".join(f"line {i}\n" for i in range(5000))

    # A chat the agent refuses (no such contact) reports why, even with lines already queued.
    result = run_cli(port, tmp_path, "send", "nobody", "-", "--wait", "5", stdin=many)
    assert result.returncode == 2 and "nobody" in result.stderr, result.stderr
    assert "Internal error" not in result.stderr

    # No agent: exit 3 at once, --wait or not, and without waiting for stdin to close.
    started = time.monotonic()
    with subprocess.Popen(
        [*CLI, *agent_flag(f"unix:{tmp_path / 'none.sock'}"), "send", "bob", "-", "--wait", "30"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(tmp_path),
    ) as proc:
        assert proc.stdin is not None
        proc.stdin.write(b"one line, then stdin stays open\n")
        proc.stdin.flush()
        code = proc.wait(timeout=20)
        proc.stdin.close()
    assert code == 3 and time.monotonic() - started < 15


def test_send_dash_skips_lines_that_are_not_utf8_and_sends_the_rest(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    import subprocess

    from tests.support.cli import CLI, agent_flag, cli_env

    port, _, bob = _two_contacts(make_agent)
    result = subprocess.run(
        [*CLI, *agent_flag(port), "send", "bob", "-"],
        input=b"good one\n\xff\xfe broken\ngood two\n",
        capture_output=True,
        env=cli_env(tmp_path),
        timeout=60,
    )
    assert result.returncode == 2
    assert b"1 line(s) not sent: they are not valid UTF-8" in result.stderr
    assert len(result.stdout.splitlines()) == 2
    wait_until(lambda: [m.body for m in bob.history("alice")] == ["good one", "good two"])
