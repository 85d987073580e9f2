"""Contact consent at the directory (issue 14): requests, answers, blocks, removal,
contacts_changed_at and the upgrade of an old contacts database. Through real gRPC over TLS to an
in-process directory on SQLite; the tests taking `directory` or `db_backend` run on PostgreSQL
too. Who may ask and the request limits: test_contact_consent_limits.py."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from p2pchat.v1 import common_pb2 as cpb
from p2pchat.v1 import directory_pb2 as pb
from p2pchat.v1 import mailbox_pb2_grpc
from p2pchat_directory.config import Settings
from tests.support.consent import (
    ACCEPTED,
    AWAITING,
    BLOCKED,
    REQUESTED,
    Code,
    add,
    answer,
    listed,
    lookup_error,
    reveals_nothing,
    set_policy,
    sqlite_directories,
    states,
    user,
)
from tests.support.directory import PASSWORD, InProcessDirectory, auth, expect_error
from tests.support.loop_thread import LoopThread
from tests.support.mailbox import deposit, log_in, publish


@pytest.fixture
def sqlite_directory(loop_thread: LoopThread, tmp_path: Path) -> Iterator[InProcessDirectory]:
    with sqlite_directories(loop_thread, tmp_path) as make:
        yield make()


# -- requests and answers ------------------------------------------------------------------------


def test_lookup_and_list_reveal_nothing_before_acceptance_on_either_side(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    box = mailbox_pb2_grpc.MailboxServiceStub(directory.channel())
    for name in ("alice", "bob"):
        stub.Register(pb.RegisterRequest(username=name, password=PASSWORD, address=f"{name}.lan:1"))
    alice, bob = log_in(stub, "alice"), log_in(stub, "bob")  # keys, online
    publish(box, alice)
    publish(box, bob)

    sent = add(stub, alice.token, "bob", note="hi, it's alice from the climbing club")
    assert reveals_nothing(sent) and sent.state == REQUESTED
    mine, theirs = listed(stub, alice.token)["bob"], listed(stub, bob.token)["alice"]
    assert reveals_nothing(mine) and mine.state == REQUESTED
    assert reveals_nothing(theirs) and theirs.state == AWAITING
    assert mine.note == theirs.note == "hi, it's alice from the climbing club"
    assert mine.requested_at == theirs.requested_at and mine.HasField("requested_at")
    assert "has not accepted" in lookup_error(stub, alice.token, "bob")
    assert "not in your contacts" in lookup_error(stub, bob.token, "alice")
    waiting = stub.ListContactRequests(pb.ListContactRequestsRequest(), metadata=bob.metadata)
    assert [(c.username, c.state) for c in waiting.requests] == [("alice", AWAITING)]

    accepted = answer(stub.AcceptContact, bob.token, "alice").contact
    assert (accepted.state, accepted.address, accepted.online) == (ACCEPTED, "alice.lan:1", True)
    found = stub.Lookup(pb.LookupRequest(username="bob"), metadata=alice.metadata)
    assert found.contact.state == ACCEPTED and found.contact.address == "bob.lan:1"
    assert found.public_key_sha256 and found.certificate_pem and found.mailbox_key
    assert listed(stub, alice.token)["bob"].note == ""  # a note shows only while pending
    assert not stub.ListContactRequests(
        pb.ListContactRequestsRequest(), metadata=bob.metadata
    ).requests


def test_two_users_who_add_each_other_are_accepted_at_once(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    alice, bob = user(stub, "alice", "alice.lan:1"), user(stub, "bob", "bob.lan:2")
    assert add(stub, alice, "bob").state == REQUESTED
    second = add(stub, bob, "alice")
    assert (second.state, second.address) == (ACCEPTED, "alice.lan:1")
    assert states(stub, alice) == {"bob": ACCEPTED} and states(stub, bob) == {"alice": ACCEPTED}
    assert stub.Lookup(pb.LookupRequest(username="alice"), metadata=auth(bob)).contact.online
    expect_error(Code.ALREADY_EXISTS, add, stub, alice, "bob")


def test_accept_answers_only_a_request_awaiting_you(sqlite_directory: InProcessDirectory) -> None:
    stub = sqlite_directory.stub()
    alice, bob = user(stub, "alice"), user(stub, "bob")
    expect_error(Code.NOT_FOUND, answer, stub.AcceptContact, bob, "alice")
    add(stub, alice, "bob")
    expect_error(Code.NOT_FOUND, answer, stub.AcceptContact, alice, "bob")  # her own request
    assert answer(stub.AcceptContact, bob, "alice").contact.state == ACCEPTED
    expect_error(Code.NOT_FOUND, answer, stub.AcceptContact, bob, "alice")  # answered already


def test_decline_leaves_the_requester_requested_and_the_decliner_without_it(
    sqlite_directory: InProcessDirectory,
) -> None:
    stub = sqlite_directory.stub()
    alice, bob = user(stub, "alice"), user(stub, "bob")
    add(stub, alice, "bob", note="hello")
    answer(stub.DeclineContact, bob, "alice")
    assert states(stub, alice) == {"bob": REQUESTED}  # not told
    assert states(stub, bob) == {}
    assert not stub.ListContactRequests(
        pb.ListContactRequestsRequest(), metadata=auth(bob)
    ).requests
    expect_error(Code.NOT_FOUND, answer, stub.DeclineContact, bob, "alice")
    expect_error(Code.ALREADY_EXISTS, add, stub, alice, "bob")  # it stands, declined
    assert "has not accepted" in lookup_error(stub, alice, "bob")
    # Bob changes his mind: asking her accepts her declined request.
    assert add(stub, bob, "alice").state == ACCEPTED
    assert states(stub, alice) == {"bob": ACCEPTED}


def test_block_refuses_requests_lookup_and_deposit_and_survives_a_restart(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    box = mailbox_pb2_grpc.MailboxServiceStub(directory.channel())
    for name in ("alice", "bob", "carol"):
        stub.Register(pb.RegisterRequest(username=name, password=PASSWORD))
    alice, bob, carol = (log_in(stub, n) for n in ("alice", "bob", "carol"))
    for account in (alice, bob, carol):
        publish(box, account)
    add(stub, alice.token, "bob")
    add(stub, bob.token, "alice")
    assert len(deposit(box, bob, "alice", b"sealed").ids) == 1  # accepted: it goes in

    blocked = answer(stub.BlockContact, alice.token, "bob").contact
    assert blocked.state == BLOCKED and reveals_nothing(blocked)
    assert states(stub, bob.token) == {"alice": REQUESTED}  # the block is not disclosed
    assert "has not accepted" in lookup_error(stub, bob.token, "alice")
    refusal = expect_error(Code.FAILED_PRECONDITION, deposit, box, bob, "alice", b"sealed")
    assert "has not accepted" in refusal
    assert "you blocked" in lookup_error(stub, alice.token, "bob")
    expect_error(Code.FAILED_PRECONDITION, add, stub, alice.token, "bob")  # unblock first
    # Bob withdraws and asks again: refused with what a NOBODY policy answers.
    stub.RemoveContact(pb.RemoveContactRequest(username="alice"), metadata=bob.metadata)
    blocked_text = expect_error(Code.PERMISSION_DENIED, add, stub, bob.token, "alice")
    set_policy(stub, carol.token, cpb.CONTACT_POLICY_NOBODY)
    nobody_text = expect_error(Code.PERMISSION_DENIED, add, stub, bob.token, "carol")
    assert blocked_text.replace("'alice'", "X") == nobody_text.replace("'carol'", "X")

    directory.stop()
    directory.start()
    stub = directory.stub()
    box = mailbox_pb2_grpc.MailboxServiceStub(directory.channel())
    assert states(stub, alice.token) == {"bob": BLOCKED}
    expect_error(Code.PERMISSION_DENIED, add, stub, bob.token, "alice")
    expect_error(Code.FAILED_PRECONDITION, deposit, box, bob, "alice", b"sealed")
    expect_error(
        Code.NOT_FOUND,
        stub.RemoveContact,
        pb.RemoveContactRequest(username="bob"),
        metadata=alice.metadata,
    )  # a block is lifted by UnblockContact only


def test_unblock_ends_the_block_without_bringing_back_the_request(
    sqlite_directory: InProcessDirectory,
) -> None:
    stub = sqlite_directory.stub()
    alice, bob = user(stub, "alice"), user(stub, "bob")
    expect_error(Code.NOT_FOUND, answer, stub.UnblockContact, alice, "bob")
    expect_error(Code.NOT_FOUND, answer, stub.BlockContact, alice, "nosuch")
    add(stub, bob, "alice")
    assert answer(stub.BlockContact, alice, "bob").contact.state == BLOCKED
    assert not stub.ListContactRequests(
        pb.ListContactRequestsRequest(), metadata=auth(alice)
    ).requests
    answer(stub.UnblockContact, alice, "bob")
    assert states(stub, alice) == {}  # his old request does not come back
    assert states(stub, bob) == {"alice": REQUESTED}
    stub.RemoveContact(pb.RemoveContactRequest(username="alice"), metadata=auth(bob))
    assert add(stub, bob, "alice").state == REQUESTED  # he may ask again
    assert states(stub, alice) == {"bob": AWAITING}


def test_remove_contact_revokes_lookup_for_the_other_side(
    sqlite_directory: InProcessDirectory,
) -> None:
    stub = sqlite_directory.stub()
    alice, bob = user(stub, "alice"), user(stub, "bob")
    add(stub, alice, "bob")
    add(stub, bob, "alice")
    assert stub.Lookup(pb.LookupRequest(username="alice"), metadata=auth(bob))
    stub.RemoveContact(pb.RemoveContactRequest(username="bob"), metadata=auth(alice))
    assert "has not accepted" in lookup_error(stub, bob, "alice")
    assert "not in your contacts" in lookup_error(stub, alice, "bob")
    assert states(stub, alice) == {"bob": AWAITING}  # his request stands
    assert states(stub, bob) == {"alice": REQUESTED}


def test_a_note_is_at_most_200_characters_without_control_characters(
    sqlite_directory: InProcessDirectory,
) -> None:
    stub = sqlite_directory.stub()
    alice, _ = user(stub, "alice"), user(stub, "bob")
    assert "200" in expect_error(Code.INVALID_ARGUMENT, add, stub, alice, "bob", note="x" * 201)
    expect_error(Code.INVALID_ARGUMENT, add, stub, alice, "bob", note="ring\x1b[2Jme")
    assert states(stub, alice) == {}
    assert add(stub, alice, "bob", note="é" * 200).note == "é" * 200


# -- contacts_changed_at -------------------------------------------------------------------------


def test_contacts_changed_at_moves_on_both_sides(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    alice, bob, carol = user(stub, "alice"), user(stub, "bob"), user(stub, "carol")

    def changed(token: str) -> datetime | None:
        beat = stub.Heartbeat(pb.HeartbeatRequest(), metadata=auth(token))
        return (
            beat.contacts_changed_at.ToDatetime(UTC)
            if beat.HasField("contacts_changed_at")
            else None
        )

    assert changed(alice) is None and changed(bob) is None
    seen = {"alice": changed(alice), "bob": changed(bob)}
    for step in (
        lambda: add(stub, alice, "bob"),
        lambda: answer(stub.AcceptContact, bob, "alice"),
        lambda: stub.RemoveContact(pb.RemoveContactRequest(username="bob"), metadata=auth(alice)),
        lambda: answer(stub.DeclineContact, alice, "bob"),
        lambda: answer(stub.BlockContact, bob, "alice"),
        lambda: answer(stub.UnblockContact, bob, "alice"),
    ):
        time.sleep(0.002)
        step()
        now = {"alice": changed(alice), "bob": changed(bob)}
        for name, at in now.items():
            before = seen[name]
            assert at is not None and (before is None or at > before), name
        assert now["alice"] == now["bob"]
        seen = now
    assert changed(carol) is None  # nothing of hers changed


# -- upgrade -------------------------------------------------------------------------------------

_OLD_CONTACTS = (
    "CREATE TABLE contacts (owner VARCHAR(32) NOT NULL, contact VARCHAR(32) NOT NULL, "
    "pinned_address VARCHAR(261) NOT NULL, created_at {time} NOT NULL, "
    "PRIMARY KEY (owner, contact))"
)
_OLD_ROWS = [  # alice and bob added each other; carol added alice only
    ("alice", "bob", "bob.pinned:9", "2024-01-02 03:04:05.000000"),
    ("bob", "alice", "", "2024-01-02 03:05:00.000000"),
    ("carol", "alice", "", "2024-01-03 00:00:00.000000"),
]


def test_an_old_contacts_database_upgrades_mutual_pairs_to_accepted_and_others_to_requests(
    db_backend: str, db_urls: tuple[str, str], loop_thread: LoopThread, tmp_path: Path
) -> None:
    contacts_url = db_urls[1]
    if db_backend == "sqlite":
        path = tmp_path / "contacts.db"
        with sqlite3.connect(path) as db:
            db.execute(_OLD_CONTACTS.format(time="DATETIME"))
            db.executemany("INSERT INTO contacts VALUES (?, ?, ?, ?)", _OLD_ROWS)
        db.close()
    else:
        engine = create_engine(contacts_url)
        with engine.begin() as conn:
            conn.execute(text(_OLD_CONTACTS.format(time="TIMESTAMP WITHOUT TIME ZONE")))
            for row in _OLD_ROWS:
                conn.execute(
                    text("INSERT INTO contacts VALUES (:o, :c, :p, :t)"),
                    dict(zip("ocpt", row, strict=True)),
                )
        engine.dispose()
    settings = Settings(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "directory",
        users_db=db_urls[0],
        contacts_db=contacts_url,
        workers=4,
    )
    directory = InProcessDirectory(loop_thread, settings)
    try:
        stub = directory.stub()
        alice, bob, carol = (user(stub, n, f"{n}.lan:1") for n in ("alice", "bob", "carol"))
        assert states(stub, alice) == {"bob": ACCEPTED, "carol": AWAITING}
        assert states(stub, bob) == {"alice": ACCEPTED}
        assert states(stub, carol) == {"alice": REQUESTED}
        request = listed(stub, carol)["alice"]
        assert request.requested_at.ToDatetime(UTC) == datetime(2024, 1, 3, tzinfo=UTC)
        found = stub.Lookup(pb.LookupRequest(username="bob"), metadata=auth(alice)).contact
        assert (found.address, found.pinned_address) == ("bob.pinned:9", "bob.pinned:9")
        assert "has not accepted" in lookup_error(stub, carol, "alice")
        assert answer(stub.AcceptContact, alice, "carol").contact.state == ACCEPTED
        directory.stop()  # a second start finds the schema upgraded already
        directory.start()
        assert states(directory.stub(), alice) == {"bob": ACCEPTED, "carol": ACCEPTED}
    finally:
        directory.stop()
