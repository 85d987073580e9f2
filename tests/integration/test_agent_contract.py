"""AgentService speaks for itself: the CLI's API has messages of its own, none of directory.proto's,
and they are the same on the wire as the directory messages it used before (same fields, same
numbers, same types), so a CLI built from the older agent.proto still drives a newer agent."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import common_pb2 as cpb
from p2pchat.v1 import directory_pb2 as dpb
from p2pchat_common.timestamps import to_timestamp
from tests.support.agent import AgentClient, InProcessAgent
from tests.support.directory import PASSWORD, expect_error

AGENT_SERVICE = apb.DESCRIPTOR.services_by_name["AgentService"]
DIRECTORY_SERVICE = dpb.DESCRIPTOR.services_by_name["DirectoryService"]
# The calls that took directory.proto's messages until AgentService had its own.
FORMERLY_SHARED = ("Register", "Logout", "ListContacts", "AddContact", "RemoveContact")


def reachable(message: Descriptor, seen: dict[str, Descriptor]) -> None:
    """`message` and every message type its fields hold, transitively, by full name."""
    if message.full_name in seen:
        return
    seen[message.full_name] = message
    for field in message.fields:
        if field.message_type is not None:
            reachable(field.message_type, seen)


def shape(message: Descriptor) -> list[tuple[str, int, int, bool, str]]:
    """What decides a message's bytes: each field's name, number, type, repetition, and the full
    name of the message or enum type it holds."""

    def held(field: FieldDescriptor) -> str:
        nested = field.message_type or field.enum_type
        return nested.full_name if nested is not None else ""

    return [
        (f.name, f.number, f.type, f.is_repeated, held(f))
        for f in sorted(message.fields, key=lambda f: f.number)
    ]


def test_agent_service_uses_no_message_defined_in_directory_proto() -> None:
    assert "p2pchat/v1/directory.proto" not in [d.name for d in apb.DESCRIPTOR.dependencies]
    seen: dict[str, Descriptor] = {}
    for method in AGENT_SERVICE.methods:
        # Every request and response is agent.proto's own ...
        assert method.input_type.file.name == "p2pchat/v1/agent.proto", method.full_name
        assert method.output_type.file.name == "p2pchat/v1/agent.proto", method.full_name
        reachable(method.input_type, seen)
        reachable(method.output_type, seen)
    # ... and what they hold comes from agent.proto, common.proto or protobuf's own types.
    files = {message.file.name for message in seen.values()}
    assert files == {
        "p2pchat/v1/agent.proto",
        "p2pchat/v1/common.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/timestamp.proto",
    }
    assert "p2pchat.v1.Contact" in seen  # shared on purpose: a contact as the directory has it


@pytest.mark.parametrize("name", FORMERLY_SHARED)
def test_each_former_directory_message_has_an_agent_message_of_the_same_shape(name: str) -> None:
    agent = AGENT_SERVICE.methods_by_name[name]
    directory = DIRECTORY_SERVICE.methods_by_name[name]
    assert agent.input_type.name == f"Agent{directory.input_type.name}"
    assert agent.output_type.name == f"Agent{directory.output_type.name}"
    assert shape(agent.input_type) == shape(directory.input_type)
    assert shape(agent.output_type) == shape(directory.output_type)


def contact(name: str, online: bool) -> cpb.Contact:
    return cpb.Contact(
        username=name,
        address=f"{name}.lan:7",
        pinned_address=f"{name}.lan:7",
        online=online,
        last_seen=to_timestamp(datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)),
    )


# One of each message, every field set (non-ASCII text and a repeated field included), with the
# agent message that replaces it.
OLD_AND_NEW: list[tuple[Message, type[Message]]] = [
    (
        dpb.RegisterRequest(username="Zoë", password=PASSWORD, address="[fe80::1%eth0]:50052"),
        apb.AgentRegisterRequest,
    ),
    (dpb.RegisterResponse(username="alice"), apb.AgentRegisterResponse),
    (dpb.LogoutRequest(), apb.AgentLogoutRequest),
    (dpb.LogoutResponse(), apb.AgentLogoutResponse),
    (dpb.ListContactsRequest(), apb.AgentListContactsRequest),
    (
        dpb.ListContactsResponse(contacts=[contact("ann", False), contact("bob", True)]),
        apb.AgentListContactsResponse,
    ),
    (
        dpb.AddContactRequest(
            username="Bob", address="bob.lan:6000", note="hello", invite_code="c0de"
        ),
        apb.AgentAddContactRequest,
    ),
    (dpb.AddContactResponse(contact=contact("bob", True)), apb.AgentAddContactResponse),
    (dpb.RemoveContactRequest(username="bob"), apb.AgentRemoveContactRequest),
    (dpb.RemoveContactResponse(), apb.AgentRemoveContactResponse),
]


def test_the_samples_cover_every_formerly_shared_message() -> None:
    covered = {old.DESCRIPTOR.full_name for old, _ in OLD_AND_NEW}
    for name in FORMERLY_SHARED:
        method = DIRECTORY_SERVICE.methods_by_name[name]
        assert {method.input_type.full_name, method.output_type.full_name} <= covered


@pytest.mark.parametrize(
    ("old", "new_type"), OLD_AND_NEW, ids=[old.DESCRIPTOR.name for old, _ in OLD_AND_NEW]
)
def test_directory_message_bytes_are_read_and_written_the_same_by_the_agent_message(
    old: Message, new_type: type[Message]
) -> None:
    assert len(old.ListFields()) == len(old.DESCRIPTOR.fields)  # every field set
    old_bytes = old.SerializeToString(deterministic=True)
    # An older CLI's request (or an older agent's answer) read by today's code ...
    new = new_type.FromString(old_bytes)
    assert len(UnknownFieldSet(new)) == 0  # every field was understood
    assert MessageToDict(new) == MessageToDict(old)
    assert new.SerializeToString(deterministic=True) == old_bytes
    # ... and today's, built from the same values, is byte for byte what the older one sent.
    rebuilt = new_type()
    for field, value in old.ListFields():
        target = getattr(rebuilt, field.name)
        if field.is_repeated:
            target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(rebuilt, field.name, value)
    assert rebuilt.SerializeToString(deterministic=True) == old_bytes
    assert old.FromString(rebuilt.SerializeToString()) == old


def older_cli(client: AgentClient) -> Callable[[str, Message, type[Message]], Message]:
    """A call as a CLI generated from the older agent.proto made it: directory messages on the
    AgentService method's path."""

    def call(method: str, request: Message, response_type: type[Message]) -> Message:
        rpc: grpc.UnaryUnaryMultiCallable[Message, Message] = client.channel.unary_unary(
            f"/p2pchat.v1.AgentService/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        return rpc(request, timeout=30)

    return call


@pytest.fixture
def pair(make_agent: Callable[[str], InProcessAgent]) -> tuple[AgentClient, AgentClient]:
    return make_agent("alice").client(), make_agent("bob").client()


def test_a_real_agent_answers_the_new_messages_and_an_older_cli_alike(
    pair: tuple[AgentClient, AgentClient],
) -> None:
    alice, bob = pair
    old = older_cli(bob)

    # Register: an empty address means the agent's own advertised address.
    registered = alice.stub.Register(
        apb.AgentRegisterRequest(username="Alice", password=PASSWORD), timeout=30
    )
    assert isinstance(registered, apb.AgentRegisterResponse) and registered.username == "alice"
    answer = old(
        "Register", dpb.RegisterRequest(username="Bob", password=PASSWORD), dpb.RegisterResponse
    )
    assert isinstance(answer, dpb.RegisterResponse) and answer.username == "bob"
    expect_error(
        grpc.StatusCode.ALREADY_EXISTS,
        alice.stub.Register,
        apb.AgentRegisterRequest(username="bob", password=PASSWORD),
        timeout=30,
    )
    alice.login("alice")

    # AddContact and ListContacts: the new messages, and the older CLI's on the same agent.
    # alice's AddContact is a request: nothing of bob is revealed until he accepts.
    bob_address = bob.status().address
    added = alice.stub.AddContact(apb.AgentAddContactRequest(username="Bob"), timeout=30).contact
    requested = cpb.CONTACT_STATE_REQUESTED
    assert (added.username, added.address, added.pinned_address, added.state) == (
        "bob",
        "",
        "",
        requested,
    )
    bob.login("bob")
    listed = alice.stub.ListContacts(apb.AgentListContactsRequest(), timeout=30)
    assert isinstance(listed, apb.AgentListContactsResponse)
    assert [(c.username, c.address, c.state) for c in listed.contacts] == [("bob", "", requested)]
    pinned = old(
        "AddContact",
        dpb.AddContactRequest(username="alice", address="alice.lan:7"),
        dpb.AddContactResponse,
    )
    assert isinstance(pinned, dpb.AddContactResponse)
    assert (pinned.contact.address, pinned.contact.pinned_address) == ("alice.lan:7",) * 2
    seen_by_old = old("ListContacts", dpb.ListContactsRequest(), dpb.ListContactsResponse)
    assert isinstance(seen_by_old, dpb.ListContactsResponse)
    assert [c.username for c in seen_by_old.contacts] == ["alice"]
    # bob asked alice back: accepted, and alice sees where bob is.
    assert [(c.username, c.address) for c in alice.contacts()] == [("bob", bob_address)]

    # RemoveContact, then Logout; a second Logout is refused: nobody is logged in.
    alice.stub.RemoveContact(apb.AgentRemoveContactRequest(username="bob"), timeout=30)
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        alice.stub.RemoveContact,
        apb.AgentRemoveContactRequest(username="bob"),
        timeout=30,
    )
    # bob's side stands: alice sees his request, nothing more.
    assert [(c.username, c.state) for c in alice.contacts()] == [
        ("bob", cpb.CONTACT_STATE_AWAITING)
    ]
    assert isinstance(
        alice.stub.Logout(apb.AgentLogoutRequest(), timeout=30), apb.AgentLogoutResponse
    )
    assert not alice.status().logged_in
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION, alice.stub.Logout, apb.AgentLogoutRequest(), timeout=30
    )
    old("Logout", dpb.LogoutRequest(), dpb.LogoutResponse)
    assert not bob.status().logged_in
