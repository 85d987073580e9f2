"""The CLI never prints a control character it received: names, addresses, bodies, notices and
error details are shown escaped, and no line of a body passes for a message of its own. Against a
hostile fake agent (which sends what a real one refuses) and real agents alike."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import agent_pb2_grpc, common_pb2
from p2pchat_agent.cli.render import CONTINUATION
from p2pchat_common.timestamps import to_timestamp
from tests.support.agent import InProcessAgent, logged_in, wait_until
from tests.support.cli import run_cli
from tests.support.loop_thread import LoopThread

Context = grpc.aio.ServicerContext[Any, Any]
EVIL_NAME = "mal\x1b[2Jlory\u202e"
EVIL_ADDRESS = "\x1b]0;pwned\x07host:1"
EVIL_BODY = "hi \x1b[31mred\x1b[0m\x9b1A\u2066\n[12:00:00] alice: forged\rover"
EVIL_DETAIL = "refused \x1b[31mbecause\x07 \x00reasons\u202e"


def clean(text: str) -> bool:
    """Only printable characters and line ends."""
    return all(ch.isprintable() or ch == "\n" for ch in text)


def evil_message() -> apb.ChatMessage:
    return apb.ChatMessage(
        id="01EVIL",
        peer="bob",
        direction=apb.DIRECTION_INCOMING,
        sender=EVIL_NAME,
        recipient="me",
        body=EVIL_BODY,
        sent_at=to_timestamp(datetime.now(UTC)),
        status=apb.MESSAGE_STATUS_RECEIVED,
    )


class HostileAgent(agent_pb2_grpc.AgentServiceServicer):
    """Answers with control characters everywhere a real agent would send text."""

    async def Status(self, request: apb.StatusRequest, context: Context) -> apb.StatusResponse:
        return apb.StatusResponse(
            logged_in=True,
            username=EVIL_NAME,
            directory="dir\x1b[1m:1",
            address=EVIL_ADDRESS,
            linked_peers=[EVIL_NAME],
        )

    async def ListContacts(
        self, request: apb.AgentListContactsRequest, context: Context
    ) -> apb.AgentListContactsResponse:
        contact = common_pb2.Contact(username=EVIL_NAME, address=EVIL_ADDRESS, online=True)
        return apb.AgentListContactsResponse(contacts=[contact])

    async def AddContact(
        self, request: apb.AgentAddContactRequest, context: Context
    ) -> apb.AgentAddContactResponse:
        contact = common_pb2.Contact(username=EVIL_NAME, address=EVIL_ADDRESS)
        return apb.AgentAddContactResponse(contact=contact)

    async def History(self, request: apb.HistoryRequest, context: Context) -> apb.HistoryResponse:
        if request.peer == "refuse":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, EVIL_DETAIL)
        return apb.HistoryResponse(messages=[evil_message()])

    async def Chat(
        self, request_iterator: AsyncIterator[apb.ChatInput], context: Context
    ) -> AsyncIterator[apb.ChatEvent]:
        # Live events first, before HistoryEnd: the CLI (with no input) leaves right after it.
        yield apb.ChatEvent(message=evil_message())
        yield apb.ChatEvent(notice=apb.Notice(code="INVALID_ARGUMENT", message=EVIL_DETAIL))
        yield apb.ChatEvent(
            key_changed=apb.PeerKeyChanged(
                peer=EVIL_NAME, pinned_sha256="\x1b[2J" * 8, presented_sha256="ab\x07" * 8
            )
        )
        yield apb.ChatEvent(delivery=apb.DeliveryUpdate(id="01EVIL", peer=EVIL_NAME))
        yield apb.ChatEvent(history_end=apb.HistoryEnd())
        await asyncio.sleep(30)  # open, as a real chat stays, until the CLI leaves


@pytest.fixture
def hostile(loop_thread: LoopThread) -> Iterator[int]:
    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        hostile = HostileAgent()  # type: ignore[abstract]  # only what these commands call
        agent_pb2_grpc.add_AgentServiceServicer_to_server(hostile, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop_thread.run(start())
    try:
        yield port
    finally:
        loop_thread.run(server.stop(0))


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["contacts"],
        ["add-contact", "mallory"],
        ["history", "bob"],
        ["chat", "bob"],
    ],
    ids=" ".join,
)
def test_nothing_the_agent_sends_reaches_the_terminal_unescaped(
    hostile: int, tmp_path: Path, args: list[str]
) -> None:
    result = run_cli(hostile, tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert clean(result.stdout) and clean(result.stderr)
    assert "\\x1b[" in result.stdout
    if args[0] in ("history", "chat"):
        assert "mal\\x1b[2Jlory\\u202e: hi \\x1b[31mred" in result.stdout
        assert f"\n{CONTINUATION}[12:00:00] alice: forged\\rover" in result.stdout
    if args[0] == "chat":
        assert "error: refused \\x1b[31mbecause\\x07 \\x00reasons\\u202e" in result.stdout
        assert "WARNING: mal\\x1b[2Jlory\\u202e's key changed (\\x1b[2J" in result.stdout
        assert "delivered to mal\\x1b[2Jlory\\u202e at -: hi \\x1b[31mred" in result.stdout


def test_an_error_detail_with_control_characters_is_printed_escaped(
    hostile: int, tmp_path: Path
) -> None:
    result = run_cli(hostile, tmp_path, "history", "refuse")
    assert result.returncode == 2
    assert clean(result.stderr) and "Traceback" not in result.stderr
    assert "refused \\x1b[31mbecause\\x07 \\x00reasons\\u202e" in result.stderr


def test_json_output_escapes_control_characters_and_keeps_the_text(
    hostile: int, tmp_path: Path
) -> None:
    result = run_cli(hostile, tmp_path, "history", "bob", "--json")
    assert result.returncode == 0
    assert "\x1b" not in result.stdout and "\\u001b" in result.stdout
    assert json.loads(result.stdout)["messages"][0]["body"] == EVIL_BODY


def test_a_multi_line_body_from_a_real_peer_is_shown_indented_and_bidi_escaped(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    agents: dict[str, InProcessAgent] = {}

    def make(name: str) -> InProcessAgent:
        agents[name] = make_agent(name)
        return agents[name]

    alice, bob = logged_in(make, "alice", "bob")
    body = "see you\n[12:00:00] alice: send me your password\u202e\ttoo"
    alice.send("bob", body, wait=10)
    wait_until(lambda: bob.history("alice"))
    port = agents["bob"].server.control_port
    for args in (["history", "alice"], ["chat", "alice"]):
        result = run_cli(port, tmp_path, *args)
        assert result.returncode == 0, result.stderr
        assert clean(result.stdout.replace("\t", " ")), result.stdout
        lines = result.stdout.splitlines()
        first = next(i for i, line in enumerate(lines) if line.endswith("alice: see you"))
        assert lines[first].startswith("[")
        assert lines[first + 1] == (
            f"{CONTINUATION}[12:00:00] alice: send me your password\\u202e\ttoo"
        )
    stored = json.loads(run_cli(port, tmp_path, "history", "alice", "--json").stdout)
    assert [m["body"] for m in stored["messages"]] == [body]
