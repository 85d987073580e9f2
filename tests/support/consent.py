"""Helpers of the contact consent tests: users, requests and answers through a directory stub,
and in-process directories on SQLite (with a clock the tests move)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from p2pchat.v1 import common_pb2 as cpb
from p2pchat.v1 import directory_pb2 as pb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_directory.config import Settings
from tests.support.directory import PASSWORD, InProcessDirectory, auth, expect_error
from tests.support.loop_thread import LoopThread

Stub = directory_pb2_grpc.DirectoryServiceStub
Code = grpc.StatusCode
ACCEPTED, REQUESTED = cpb.CONTACT_STATE_ACCEPTED, cpb.CONTACT_STATE_REQUESTED
AWAITING, BLOCKED = cpb.CONTACT_STATE_AWAITING, cpb.CONTACT_STATE_BLOCKED
REFUSED = "does not accept contact requests from you"


@contextmanager
def sqlite_directories(
    loop_thread: LoopThread, tmp_path: Path
) -> Iterator[Callable[..., InProcessDirectory]]:
    """Makes in-process directories on SQLite files, `make(clock=..., **settings)`, and stops
    them at the end."""
    started: list[InProcessDirectory] = []

    def make(clock: Any = None, **overrides: Any) -> InProcessDirectory:
        settings = Settings(listen="127.0.0.1:0", data_dir=tmp_path / "directory", workers=4)
        settings = dataclasses.replace(settings, **overrides)
        handle = (
            InProcessDirectory(loop_thread, settings)
            if clock is None
            else InProcessDirectory(loop_thread, settings, clock)
        )
        started.append(handle)
        return handle

    try:
        yield make
    finally:
        for handle in started:
            handle.stop()


def user(stub: Stub, name: str, address: str = "") -> str:
    """Registers and logs `name` in; the session token."""
    stub.Register(pb.RegisterRequest(username=name, password=PASSWORD, address=address))
    token: str = stub.Login(pb.LoginRequest(username=name, password=PASSWORD)).session_token
    return token


def add(stub: Stub, token: str, name: str, **fields: Any) -> cpb.Contact:
    contact: cpb.Contact = stub.AddContact(
        pb.AddContactRequest(username=name, **fields), metadata=auth(token)
    ).contact
    return contact


def listed(stub: Stub, token: str) -> dict[str, cpb.Contact]:
    reply = stub.ListContacts(pb.ListContactsRequest(), metadata=auth(token))
    return {c.username: c for c in reply.contacts}


def states(stub: Stub, token: str) -> dict[str, int]:
    return {name: c.state for name, c in listed(stub, token).items()}


def lookup_error(stub: Stub, token: str, name: str) -> str:
    request = pb.LookupRequest(username=name)
    return expect_error(Code.FAILED_PRECONDITION, stub.Lookup, request, metadata=auth(token))


def answer(call: Callable[..., Any], token: str, name: str) -> Any:
    return call(pb.ContactAnswerRequest(username=name), metadata=auth(token))


def set_policy(stub: Stub, token: str, policy: cpb.ContactPolicy.ValueType) -> None:
    stub.SetContactPolicy(pb.SetContactPolicyRequest(policy=policy), metadata=auth(token))


def reveals_nothing(contact: cpb.Contact) -> bool:
    return (
        contact.address == ""
        and not contact.online
        and not contact.HasField("last_seen")
        and contact.state in (REQUESTED, AWAITING, BLOCKED)
    )
