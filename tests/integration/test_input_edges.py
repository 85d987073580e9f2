"""Every text field of every request is checked at the edge, on every backend: control characters
(and addresses outside the grammar, e.g. an IPv6 zone id with a space) are INVALID_ARGUMENT with
a message naming the field, never INTERNAL, never echoed raw, and nothing is stored."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import grpc
import pytest

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_directory.models import User
from p2pchat_directory.passwords import hash_password
from tests.support.agent import AgentClient, InProcessAgent, logged_in, wait_until
from tests.support.directory import PASSWORD, InProcessDirectory, auth, expect_error

Code = grpc.StatusCode
Stub = directory_pb2_grpc.DirectoryServiceStub
BODY_RULE = "body must not contain control characters other than tab and line breaks"

# (field, value, what the refusal says)
BAD_TEXT = [
    ("username", "da\x00ve", "username must not contain control characters"),
    ("username", "da\x1bve", "username must not contain control characters"),
    ("password", PASSWORD + "\x00", "password must not contain NUL characters"),
    ("password", "\x1b[2J" + PASSWORD, "password must not contain control characters"),
    ("address", "host\x00.example:80", "address must not contain control characters"),
    ("address", "\x1b[31mhost.example:80", "address must not contain control characters"),
    ("address", "[::1%a\x00b]:80", "address must not contain control characters"),
    ("address", "host.example:80\x85", "address must not contain control characters"),
    ("address", "[::1%a b]:80", "zone id"),
    ("address", "[::1%" + "x" * 17 + "]:80", "zone id"),
]
BAD_IDS = [repr(value) for _, value, _ in BAD_TEXT]


def refused(call: Callable[..., object], request: object, fragment: str, **kw: object) -> str:
    message = expect_error(Code.INVALID_ARGUMENT, call, request, **kw)
    assert fragment in message
    assert message.isprintable() and len(message) < 300  # escaped and cut, never echoed raw
    return message


def session(stub: Stub, name: str, address: str = "") -> str:
    stub.Register(dpb.RegisterRequest(username=name, password=PASSWORD, address=address))
    return stub.Login(dpb.LoginRequest(username=name, password=PASSWORD)).session_token


def address_of(stub: Stub, token: str, name: str, viewer: str = "erin") -> str:
    """`name`'s address as `viewer` (whose session `token` is) sees it, once they are
    accepted contacts: each adds the other first (a login of `name` that gives no address)."""
    stub.AddContact(dpb.AddContactRequest(username=name), metadata=auth(token))
    theirs = stub.Login(dpb.LoginRequest(username=name, password=PASSWORD)).session_token
    stub.AddContact(dpb.AddContactRequest(username=viewer), metadata=auth(theirs))
    return stub.Lookup(dpb.LookupRequest(username=name), metadata=auth(token)).contact.address


# -- the directory, on SQLite and PostgreSQL ---------------------------------------------------


@pytest.mark.parametrize(("field", "value", "fragment"), BAD_TEXT, ids=BAD_IDS)
def test_register_refuses_control_characters_and_bad_zone_ids_and_stores_nothing(
    directory: InProcessDirectory, field: str, value: str, fragment: str
) -> None:
    stub = directory.stub()
    fields = {"username": "dave", "password": PASSWORD, "address": "dave.example:1"}
    refused(stub.Register, dpb.RegisterRequest(**{**fields, field: value}), fragment)
    # Nothing was stored: the name is still free, and dave's address is the one given next.
    stub.Register(dpb.RegisterRequest(**fields))
    assert address_of(stub, session(stub, "erin"), "dave") == "dave.example:1"


# A password is checked only for NUL at login (see the next test); registration holds new ones
# to the whole rule.
LOGIN_BAD_TEXT = [t for t in BAD_TEXT if not (t[0] == "password" and "\x00" not in t[1])]


@pytest.mark.parametrize(("field", "value", "fragment"), LOGIN_BAD_TEXT, ids=repr)
def test_login_refuses_control_characters_and_bad_zone_ids_and_changes_nothing(
    directory: InProcessDirectory, field: str, value: str, fragment: str
) -> None:
    stub = directory.stub()
    stub.Register(dpb.RegisterRequest(username="dave", password=PASSWORD, address="dave.ex:1"))
    fields = {"username": "dave", "password": PASSWORD, "address": "elsewhere.example:2"}
    bad = {**fields, field: value}
    request = dpb.LoginRequest(
        username=bad["username"], password=bad["password"], address=bad["address"]
    )
    for _ in range(7):  # more than the failed logins allowed: none of these counts as one
        refused(stub.Login, request, fragment)
    token = session(stub, "erin")
    assert address_of(stub, token, "dave") == "dave.ex:1"  # not replaced by a refused login
    assert stub.Login(dpb.LoginRequest(username="dave", password=PASSWORD)).session_token


@pytest.mark.parametrize(
    ("username", "address", "fragment"),
    [
        ("dave\x00", "", "username must not contain control characters"),
        ("\x1b[2Jdave", "", "username must not contain control characters"),
        ("dave", "\x1b]0;x\x07:80", "address must not contain control characters"),
        ("dave", "[::1%a\x00b]:80", "address must not contain control characters"),
        ("dave", "[::1%a b]:80", "zone id"),
    ],
    ids=repr,
)
def test_add_contact_refuses_control_characters_and_bad_zone_ids_and_stores_nothing(
    directory: InProcessDirectory, username: str, address: str, fragment: str
) -> None:
    stub = directory.stub()
    session(stub, "dave")
    token = session(stub, "erin")
    request = dpb.AddContactRequest(username=username, address=address)
    refused(stub.AddContact, request, fragment, metadata=auth(token))
    listed = stub.ListContacts(dpb.ListContactsRequest(), metadata=auth(token)).contacts
    assert list(listed) == []
    if username != "dave":
        refused(stub.Lookup, dpb.LookupRequest(username=username), fragment, metadata=auth(token))


def test_a_zone_id_that_is_an_interface_name_is_stored_and_given_back(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    session(stub, "dave", "[fe80::1%eth0]:50052")
    token = session(stub, "erin")
    assert address_of(stub, token, "dave") == "[fe80::1%eth0]:50052"
    request = dpb.AddContactRequest(username="frank", address="[fe80::2%wlp2s0]:7")
    session(stub, "frank")
    pinned = stub.AddContact(request, metadata=auth(token)).contact.pinned_address
    assert pinned == "[fe80::2%wlp2s0]:7"


# -- the agent's control API -------------------------------------------------------------------


@pytest.fixture
def pair(make_agent: Callable[[str], InProcessAgent]) -> list[AgentClient]:
    return logged_in(make_agent, "alice", "bob")


@pytest.mark.parametrize(
    ("peer", "body", "fragment"),
    [
        ("bob\x1b", "hi", "peer must not contain control characters"),
        ("bob\x00", "hi", "peer must not contain control characters"),
        ("bob", "hi\x1b[2J", BODY_RULE),
        ("bob", "\x00", BODY_RULE),
        ("bob", "bell\x07", BODY_RULE),
        ("bob", "c1\x9b31m", BODY_RULE),
        ("bob", "del\x7f", BODY_RULE),
    ],
    ids=repr,
)
def test_send_refuses_control_characters_and_stores_nothing(
    pair: list[AgentClient], peer: str, body: str, fragment: str
) -> None:
    alice, _ = pair
    refused(alice.stub.Send, apb.SendRequest(peer=peer, body=body), fragment)
    assert alice.history("bob") == [] and alice.status().pending_messages == 0


def test_a_body_with_tabs_and_line_breaks_is_sent_stored_and_received(
    pair: list[AgentClient],
) -> None:
    alice, bob = pair
    body = "line one\n\tline two\r\nline three \u202e emoji \U0001f600"
    assert alice.send("bob", body, wait=10).status == apb.MESSAGE_STATUS_DELIVERED
    assert [m.body for m in alice.history("bob")] == [body]
    assert [m.body for m in wait_until(lambda: bob.history("alice"))] == [body]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"query": "hello\x1b[2J"}, "query must not contain control characters"),
        ({"query": "a\nb"}, "query must not contain control characters"),
        ({"before_id": "01\x00"}, "before_id must not contain control characters"),
        ({"before_id": "\x1b]0;pwned\x07"}, "before_id must not contain control characters"),
        ({"before_id": "x" * 5_000}, "before_id is not a message id"),
        ({"before_id": "x" * (1 << 20)}, "before_id is not a message id"),
        ({"before_id": "01\u202eABC"}, "before_id is not a message id"),
        ({"before_id": "01 ABC"}, "before_id is not a message id"),
        ({"peer": "bob\x1b"}, "peer must not contain control characters"),
    ],
    ids=lambda v: repr(v)[:60],
)
def test_history_refuses_control_characters_and_ids_that_are_not_ids_without_echoing_them(
    pair: list[AgentClient], fields: dict[str, str], fragment: str
) -> None:
    alice, _ = pair
    request = apb.HistoryRequest(
        peer=fields.get("peer", "bob"),
        before_id=fields.get("before_id", ""),
        query=fields.get("query", ""),
    )
    refused(alice.stub.History, request, fragment)


def test_history_before_an_unknown_message_id_is_not_found(pair: list[AgentClient]) -> None:
    alice, _ = pair
    alice.send("bob", "hello")
    request = apb.HistoryRequest(peer="bob", before_id="01ABCDEFGHJKMNPQRSTVWXYZ00")
    message = expect_error(Code.NOT_FOUND, alice.stub.History, request)
    assert "no message '01ABCDEFGHJKMNPQRSTVWXYZ00' with bob" in message


@pytest.mark.parametrize(
    ("username", "address", "fragment"),
    [
        ("carol\x1b", "", "username must not contain control characters"),
        ("carol", "\x1b[31mhost:1", "address must not contain control characters"),
        ("carol", "[::1%a b]:80", "zone id"),
    ],
    ids=repr,
)
def test_add_contact_through_the_agent_refuses_control_characters(
    make_agent: Callable[[str], InProcessAgent], username: str, address: str, fragment: str
) -> None:
    alice, _carol = logged_in(make_agent, "alice", "carol", befriend=False)
    request = apb.AgentAddContactRequest(username=username, address=address)
    refused(alice.stub.AddContact, request, fragment)
    assert alice.contacts() == []


def test_register_and_login_through_the_agent_refuse_control_characters(
    make_agent: Callable[[str], InProcessAgent],
) -> None:
    alice = make_agent("alice").client()
    refused(
        alice.stub.Register,
        apb.AgentRegisterRequest(username="alice", password=PASSWORD, address="\x1b:1"),
        "address must not contain control characters",
    )
    refused(
        alice.stub.Login,
        apb.AgentLoginRequest(username="alice\x00", password=PASSWORD),
        "username must not contain control characters",
    )
    assert alice.register("alice") == "alice"  # the refused Register stored nothing


def test_a_chat_refuses_a_control_character_in_its_peer_or_a_text(
    pair: list[AgentClient],
) -> None:
    alice, _ = pair

    def chat(*inputs: apb.ChatInput) -> grpc.RpcError:
        def sent() -> Iterator[apb.ChatInput]:
            yield from inputs

        with pytest.raises(grpc.RpcError) as err:
            for _event in alice.stub.Chat(sent(), timeout=10):
                pass
        return err.value

    err = chat(apb.ChatInput(open=apb.ChatOpen(peer="bob\x1b")))
    assert err.code() == Code.INVALID_ARGUMENT
    assert err.details() == "open.peer must not contain control characters"
    err = chat(
        apb.ChatInput(open=apb.ChatOpen(peer="bob")),
        apb.ChatInput(text=apb.ChatText(body="hi\x1b[2J")),
    )
    assert err.code() == Code.INVALID_ARGUMENT
    assert err.details() == f"text.{BODY_RULE}"
    assert alice.history("bob") == []


def test_an_account_whose_password_predates_the_rule_still_logs_in(
    directory: InProcessDirectory,
) -> None:
    old_password = "tab\tin my old password"
    dbs = directory.server.databases
    with dbs.users() as s, s.begin():
        now = datetime.now(UTC)
        s.add(User(username="olga", password_hash=hash_password(old_password), created_at=now))
    stub = directory.stub()
    assert stub.Login(dpb.LoginRequest(username="olga", password=old_password)).session_token
    refused(
        stub.Register,
        dpb.RegisterRequest(username="newbie", password=old_password),
        "password must not contain control characters",
    )
