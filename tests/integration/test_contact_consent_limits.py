"""Contact consent at the directory (issue 14): who may ask (policies, invite codes) and the
request limits (per requester, per recipient). Through real gRPC over TLS to an in-process
directory on SQLite; the tests taking `directory` run on PostgreSQL too."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from p2pchat.v1 import common_pb2 as cpb
from p2pchat.v1 import directory_pb2 as pb
from p2pchat_directory import passwords
from p2pchat_directory.config import Settings, load_settings
from tests.support.consent import (
    ACCEPTED,
    REFUSED,
    REQUESTED,
    Code,
    add,
    answer,
    set_policy,
    sqlite_directories,
    user,
)
from tests.support.directory import PASSWORD, InProcessDirectory, auth, expect_error
from tests.support.loop_thread import LoopThread
from tests.support.mailbox import FakeClock


@pytest.fixture
def make_sqlite_directory(
    loop_thread: LoopThread, tmp_path: Path
) -> Iterator[Callable[..., InProcessDirectory]]:
    with sqlite_directories(loop_thread, tmp_path) as make:
        yield make


@pytest.fixture
def sqlite_directory(
    make_sqlite_directory: Callable[..., InProcessDirectory],
) -> InProcessDirectory:
    return make_sqlite_directory()


@pytest.fixture
def cheap_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    """scrypt at n = 16 for the tests that register a hundred users (the hash records its n)."""
    monkeypatch.setattr(passwords, "LOG2_N", 4)


# -- who may ask ---------------------------------------------------------------------------------


def test_policies_anyone_invite_and_nobody(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    alice, bob, carol = user(stub, "alice"), user(stub, "bob"), user(stub, "carol")
    policy = stub.GetContactPolicy(pb.GetContactPolicyRequest(), metadata=auth(alice)).policy
    assert policy == cpb.CONTACT_POLICY_ANYONE
    expect_error(Code.INVALID_ARGUMENT, set_policy, stub, alice, cpb.CONTACT_POLICY_UNSPECIFIED)

    set_policy(stub, alice, cpb.CONTACT_POLICY_INVITE)
    assert REFUSED in expect_error(Code.PERMISSION_DENIED, add, stub, bob, "alice")
    expect_error(Code.PERMISSION_DENIED, add, stub, bob, "alice", invite_code="guessed")
    code = stub.CreateInvite(pb.CreateInviteRequest(), metadata=auth(alice)).code
    assert add(stub, bob, "alice", invite_code=code).state == REQUESTED

    set_policy(stub, alice, cpb.CONTACT_POLICY_NOBODY)
    assert (
        stub.GetContactPolicy(pb.GetContactPolicyRequest(), metadata=auth(alice)).policy
        == cpb.CONTACT_POLICY_NOBODY
    )
    assert REFUSED in expect_error(Code.PERMISSION_DENIED, add, stub, carol, "alice")
    # Nobody means nobody: a good code of hers does not get through either.
    refused = expect_error(Code.PERMISSION_DENIED, add, stub, carol, "alice", invite_code=code)
    assert REFUSED in refused
    # Nobody may ask her, but those she asks accept by asking back.
    dave = user(stub, "dave")
    add(stub, alice, "dave")
    assert add(stub, dave, "alice").state == ACCEPTED

    set_policy(stub, alice, cpb.CONTACT_POLICY_ANYONE)
    erin = user(stub, "erin")
    assert add(stub, erin, "alice").state == REQUESTED


def test_a_revoked_invite_code_fails_while_another_works(
    sqlite_directory: InProcessDirectory,
) -> None:
    stub = sqlite_directory.stub()
    alice, bob, carol = user(stub, "alice"), user(stub, "bob"), user(stub, "carol")
    set_policy(stub, alice, cpb.CONTACT_POLICY_INVITE)
    first = stub.CreateInvite(pb.CreateInviteRequest(), metadata=auth(alice))
    second = stub.CreateInvite(pb.CreateInviteRequest(), metadata=auth(alice))
    assert first.code != second.code and first.id != second.id and first.unlimited
    revoked = stub.RevokeInvite(pb.RevokeInviteRequest(id=first.id), metadata=auth(alice))
    assert revoked.HasField("revoked_at") and revoked.code == ""
    expect_error(
        Code.NOT_FOUND, stub.RevokeInvite, pb.RevokeInviteRequest(id="nosuch"), metadata=auth(bob)
    )
    expect_error(  # not hers to revoke
        Code.NOT_FOUND, stub.RevokeInvite, pb.RevokeInviteRequest(id=second.id), metadata=auth(bob)
    )
    expect_error(Code.PERMISSION_DENIED, add, stub, bob, "alice", invite_code=first.code)
    assert add(stub, carol, "alice", invite_code=second.code).state == REQUESTED
    assert add(stub, bob, "alice", invite_code=second.code).state == REQUESTED
    invites = stub.ListInvites(pb.ListInvitesRequest(), metadata=auth(alice)).invites
    assert [(i.id, i.code, i.HasField("revoked_at")) for i in invites] == [
        (second.id, "", False),
        (first.id, "", True),
    ]
    assert not stub.ListInvites(pb.ListInvitesRequest(), metadata=auth(bob)).invites


def test_invite_codes_expire_and_run_out_of_uses(
    make_sqlite_directory: Callable[..., InProcessDirectory],
) -> None:
    clock = FakeClock()
    stub = make_sqlite_directory(clock=clock).stub()
    alice = user(stub, "alice")
    others = [user(stub, n) for n in ("bob", "carol", "dave", "erin")]
    set_policy(stub, alice, cpb.CONTACT_POLICY_INVITE)
    timed = stub.CreateInvite(pb.CreateInviteRequest(expires_in_seconds=60), metadata=auth(alice))
    once = stub.CreateInvite(pb.CreateInviteRequest(max_uses=1), metadata=auth(alice))
    assert timed.HasField("expires_at") and (once.uses_left, once.unlimited) == (1, False)
    clock.advance(61)
    expect_error(Code.PERMISSION_DENIED, add, stub, others[0], "alice", invite_code=timed.code)
    assert add(stub, others[1], "alice", invite_code=once.code).state == REQUESTED
    expect_error(Code.PERMISSION_DENIED, add, stub, others[2], "alice", invite_code=once.code)
    left = {
        i.id: i.uses_left
        for i in stub.ListInvites(pb.ListInvitesRequest(), metadata=auth(alice)).invites
    }
    assert left[once.id] == 0
    # A request that accepts one already made to the requester uses no code.
    again = stub.CreateInvite(pb.CreateInviteRequest(max_uses=1), metadata=auth(alice))
    add(stub, alice, "erin")
    assert add(stub, others[3], "alice", invite_code=again.code).state == ACCEPTED
    assert add(stub, others[0], "alice", invite_code=again.code).state == REQUESTED


def test_at_most_100_live_invite_codes(
    sqlite_directory: InProcessDirectory,
) -> None:
    stub = sqlite_directory.stub()
    alice = user(stub, "alice")
    made = [stub.CreateInvite(pb.CreateInviteRequest(), metadata=auth(alice)) for _ in range(100)]
    expect_error(
        Code.RESOURCE_EXHAUSTED, stub.CreateInvite, pb.CreateInviteRequest(), metadata=auth(alice)
    )
    stub.RevokeInvite(pb.RevokeInviteRequest(id=made[0].id), metadata=auth(alice))
    assert stub.CreateInvite(pb.CreateInviteRequest(), metadata=auth(alice)).code


# -- limits --------------------------------------------------------------------------------------


def test_a_thousand_requests_from_one_user_are_cut_after_twenty_an_hour(
    make_sqlite_directory: Callable[..., InProcessDirectory], cheap_passwords: None
) -> None:
    clock = FakeClock()
    stub = make_sqlite_directory(clock=clock).stub()
    spammer = user(stub, "spammer")
    targets = [f"target{i}" for i in range(25)]
    for name in targets:
        stub.Register(pb.RegisterRequest(username=name, password=PASSWORD))
    outcomes: list[Code] = []
    for i in range(1000):  # each a fresh request: withdrawn when it went in
        name = targets[i % len(targets)]
        try:
            add(stub, spammer, name)
        except grpc.RpcError as err:
            outcomes.append(err.code())
            continue
        outcomes.append(Code.OK)
        stub.RemoveContact(pb.RemoveContactRequest(username=name), metadata=auth(spammer))
    assert outcomes[:20] == [Code.OK] * 20
    assert outcomes[20:] == [Code.RESOURCE_EXHAUSTED] * 980
    clock.advance(3601)  # an hour later: 20 more
    assert add(stub, spammer, targets[0]).state == REQUESTED


def test_requests_from_many_users_stop_at_the_recipients_cap_and_the_first_100_stay(
    sqlite_directory: InProcessDirectory, cheap_passwords: None
) -> None:
    stub = sqlite_directory.stub()
    star = user(stub, "star")
    fans = {f"fan{i:03d}": user(stub, f"fan{i:03d}") for i in range(150)}
    outcomes = {}
    for name, token in fans.items():
        try:
            add(stub, token, "star")
            outcomes[name] = Code.OK
        except grpc.RpcError as err:
            outcomes[name] = err.code()
    names = list(fans)
    assert [outcomes[n] for n in names[:100]] == [Code.OK] * 100
    assert [outcomes[n] for n in names[100:]] == [Code.RESOURCE_EXHAUSTED] * 50
    waiting = stub.ListContactRequests(pb.ListContactRequestsRequest(), metadata=auth(star))
    assert [c.username for c in waiting.requests] == names[:100]  # oldest first, none dropped
    # An answer makes room for one more; a code of hers passes a full queue.
    answer(stub.DeclineContact, star, names[0])
    assert add(stub, fans[names[100]], "star").state == REQUESTED
    expect_error(Code.RESOURCE_EXHAUSTED, add, stub, fans[names[101]], "star")
    code = stub.CreateInvite(pb.CreateInviteRequest(), metadata=auth(star)).code
    assert add(stub, fans[names[101]], "star", invite_code=code).state == REQUESTED
    # And asking someone who asked you is an answer, not a request: no cap.
    assert add(stub, star, names[50]).state == ACCEPTED


def test_request_limits_come_from_flags_or_the_environment() -> None:
    assert (load_settings([], {}).contact_request_rate, Settings().contact_request_cap) == (20, 100)
    env = {"P2PCHAT_CONTACT_REQUEST_RATE": "5", "P2PCHAT_CONTACT_REQUEST_CAP": "7"}
    from_env = load_settings([], env)
    assert (from_env.contact_request_rate, from_env.contact_request_cap) == (5, 7)
    flags = load_settings(["--contact-request-rate", "3", "--contact-request-cap", "4"], env)
    assert (flags.contact_request_rate, flags.contact_request_cap) == (3, 4)
    with pytest.raises(SystemExit):
        load_settings(["--contact-request-cap", "0"], {})


def test_a_lower_rate_flag_cuts_requests_sooner(
    make_sqlite_directory: Callable[..., InProcessDirectory],
) -> None:
    stub = make_sqlite_directory(contact_request_rate=2, contact_request_cap=1).stub()
    spammer = user(stub, "spammer")
    tokens = [user(stub, n) for n in ("one", "two", "three")]
    add(stub, spammer, "one")
    add(stub, spammer, "two")
    expect_error(Code.RESOURCE_EXHAUSTED, add, stub, spammer, "three")
    expect_error(Code.RESOURCE_EXHAUSTED, add, stub, tokens[1], "one")  # one awaits one already
