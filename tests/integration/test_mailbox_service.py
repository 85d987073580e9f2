"""The directory's sealed mailbox (MailboxService) through real gRPC over TLS, on SQLite."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import mailbox_pb2 as mpb
from p2pchat_agent.identity import load_certificate
from p2pchat_agent.sealing import MailboxPublicKey, bind, check_binding
from p2pchat_common.signatures import MAILBOX_KEY_BYTES
from p2pchat_directory.config import Settings
from p2pchat_directory.mailbox import MAX_ENVELOPE_BYTES
from tests.support.directory import PASSWORD, InProcessDirectory, auth, expect_error
from tests.support.loop_thread import LoopThread
from tests.support.mailbox import (
    RPC_TIMEOUT,
    Account,
    CollectStream,
    DirectoryStub,
    FakeClock,
    MailboxStub,
    deposit,
    enrol,
    log_in,
    mailbox_channel,
    new_key_pem,
    publish,
)

Code = grpc.StatusCode


class Mailbox:
    """An in-process directory on SQLite with stubs of both services."""

    def __init__(self, directory: InProcessDirectory) -> None:
        self.directory = directory
        self._channels: list[grpc.Channel] = []
        channel = self.channel()
        self.dir = DirectoryStub(channel)
        self.box = MailboxStub(channel)

    def channel(self) -> grpc.Channel:
        channel = mailbox_channel(self.directory.port, self.directory.ca_pem)
        self._channels.append(channel)
        return channel

    @property
    def users_db(self) -> Path:
        return self.directory.settings.data_dir / "users.db"

    def rows(self, sql: str = "SELECT count(*) FROM mailbox_envelopes") -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.users_db}?mode=ro", uri=True) as db:
            return db.execute(sql).fetchall()

    def held(self) -> int:
        return int(self.rows()[0][0])

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


@pytest.fixture
def make_mailbox(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Callable[..., Mailbox]]:
    """`make_mailbox(clock=..., mailbox_max_envelopes=...)`: a directory with these settings."""
    made: list[Mailbox] = []

    def make(clock: FakeClock | None = None, **overrides: Any) -> Mailbox:
        settings = Settings(listen="127.0.0.1:0", data_dir=tmp_path / "directory", workers=4)
        directory = InProcessDirectory(
            loop_thread, replace(settings, **overrides), clock or FakeClock()
        )
        made.append(Mailbox(directory))
        return made[-1]

    try:
        yield make
    finally:
        for mailbox in made:
            mailbox.close()
            mailbox.directory.stop()


@pytest.fixture
def mb(make_mailbox: Callable[..., Mailbox]) -> Mailbox:
    return make_mailbox()


def lookup(mb: Mailbox, caller: Account, name: str) -> dpb.LookupResponse:
    reply: dpb.LookupResponse = mb.dir.Lookup(
        dpb.LookupRequest(username=name), metadata=caller.metadata, timeout=RPC_TIMEOUT
    )
    return reply


# -- PublishKey and Lookup -------------------------------------------------------------------


def test_publish_key_refuses_a_key_of_the_wrong_length_or_a_bad_signature_size(
    mb: Mailbox,
) -> None:
    (alice,) = enrol(mb.dir, mb.box, "alice")
    good = alice.mailbox.public()
    signature = bind(alice.key_pem, "alice", good)
    for key, sig in (
        (good.raw[:-1], signature),
        (good.raw + b"\x00", signature),
        (b"", signature),
        (good.raw, b""),
        (good.raw, b"\x30" * 513),
    ):
        expect_error(
            Code.INVALID_ARGUMENT,
            mb.box.PublishKey,
            mpb.PublishKeyRequest(mailbox_key=key, signature=sig),
            metadata=alice.metadata,
        )
    expect_error(
        Code.UNAUTHENTICATED,
        mb.box.PublishKey,
        mpb.PublishKeyRequest(mailbox_key=good.raw, signature=signature),
        metadata=auth("not-a-token"),
    )


def test_publish_key_refuses_a_signature_not_by_the_current_certificates_key(mb: Mailbox) -> None:
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    key = bob.mailbox.public()
    for signature in (
        bind(new_key_pem(), "bob", key),  # another key
        bind(bob.key_pem, "alice", key),  # bob's key, but binding the key to another name
        bind(bob.key_pem, "bob", alice.mailbox.public()),  # another mailbox key
    ):
        message = expect_error(
            Code.PERMISSION_DENIED,
            mb.box.PublishKey,
            mpb.PublishKeyRequest(mailbox_key=key.raw, signature=signature),
            metadata=bob.metadata,
        )
        assert "signature" in message
    # The refused keys replaced nothing: alice still sees the one bob published first.
    assert lookup(mb, alice, "bob").mailbox_key == bob.mailbox.public().raw


def test_publish_key_without_a_certificate_is_a_failed_precondition(mb: Mailbox) -> None:
    mb.dir.Register(dpb.RegisterRequest(username="carol", password=PASSWORD))
    token = mb.dir.Login(dpb.LoginRequest(username="carol", password=PASSWORD)).session_token
    key = Account("carol", token, new_key_pem())
    message = expect_error(
        Code.FAILED_PRECONDITION,
        mb.box.PublishKey,
        mpb.PublishKeyRequest(
            mailbox_key=key.mailbox.public().raw,
            signature=bind(key.key_pem, "carol", key.mailbox.public()),
        ),
        metadata=auth(token),
    )
    assert "log in with a key first" in message
    assert mb.rows("SELECT count(*) FROM mailbox_keys") == [(0,)]


def test_lookup_returns_the_published_key_with_a_binding_that_verifies(mb: Mailbox) -> None:
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    found = lookup(mb, alice, "BOB")
    assert len(found.mailbox_key) == MAILBOX_KEY_BYTES
    assert found.mailbox_key == bob.mailbox.public().raw
    key = MailboxPublicKey.from_bytes(found.mailbox_key)
    check_binding(load_certificate(found.certificate_pem), "bob", key, found.mailbox_key_signature)

    bob.mailbox = type(bob.mailbox).generate()  # publishing again replaces the key
    publish(mb.box, bob)
    assert lookup(mb, alice, "bob").mailbox_key == bob.mailbox.public().raw


def test_a_login_with_a_new_key_makes_the_published_mailbox_key_stale(mb: Mailbox) -> None:
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    same = log_in(mb.dir, "bob", bob.key_pem)  # the same key again: the binding still holds
    assert lookup(mb, alice, "bob").mailbox_key == bob.mailbox.public().raw

    moved = log_in(mb.dir, "bob", new_key_pem())  # another device
    found = lookup(mb, alice, "bob")
    assert found.certificate_pem and found.mailbox_key == b""
    assert found.mailbox_key_signature == b""
    message = expect_error(
        Code.FAILED_PRECONDITION, deposit, mb.box, alice, "bob", b"sealed for the old key"
    )
    assert "mailbox key" in message
    publish(mb.box, moved)  # the new device publishes its own
    assert lookup(mb, alice, "bob").mailbox_key == moved.mailbox.public().raw
    assert same.name == "bob"


# -- Deposit refusals and limits ---------------------------------------------------------------


def test_refused_deposits_store_nothing(mb: Mailbox) -> None:
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    mb.dir.Register(dpb.RegisterRequest(username="dave", password=PASSWORD))  # no key
    dave = mb.dir.Login(dpb.LoginRequest(username="dave", password=PASSWORD)).session_token
    mb.dir.AddContact(dpb.AddContactRequest(username="dave"), metadata=alice.metadata)
    mb.dir.AddContact(dpb.AddContactRequest(username="alice"), metadata=auth(dave))
    (erin, frank) = enrol(mb.dir, mb.box, "erin", "frank")  # keys, not alice's contacts
    mb.dir.AddContact(dpb.AddContactRequest(username="frank"), metadata=alice.metadata)
    cases: list[tuple[Code, str, list[bytes], str]] = [
        (Code.NOT_FOUND, "nobody", [b"x"], "no such user"),
        (Code.FAILED_PRECONDITION, "erin", [b"x"], "not in your contacts"),
        (Code.FAILED_PRECONDITION, "frank", [b"x"], "has not accepted"),  # asked, not accepted
        (Code.FAILED_PRECONDITION, "dave", [b"x"], "mailbox key"),
        (Code.INVALID_ARGUMENT, "bob", [], "1 to 500"),
        (Code.INVALID_ARGUMENT, "bob", [b"x"] * 501, "1 to 500"),
        (Code.INVALID_ARGUMENT, "bob", [b"x", b""], "empty"),
        (Code.INVALID_ARGUMENT, "bob", [b"x", b"y" * (MAX_ENVELOPE_BYTES + 1)], "at most"),
        (Code.INVALID_ARGUMENT, "b\x00b", [b"x"], ""),
    ]
    for code, recipient, envelopes, reason in cases:
        message = expect_error(code, deposit, mb.box, alice, recipient, *envelopes)
        assert reason in message, message
    expect_error(Code.UNAUTHENTICATED, deposit, mb.box, Account("x", "bad", b""), "bob", b"x")
    assert mb.held() == 0
    # The largest envelope allowed is taken.
    assert len(deposit(mb.box, alice, "Bob", b"z" * MAX_ENVELOPE_BYTES).ids) == 1
    assert mb.held() == 1 and erin.name == "erin" and bob.name == "bob" and frank.name == "frank"


def test_a_mailbox_full_by_count_refuses_the_whole_batch_with_a_reason(
    make_mailbox: Callable[..., Mailbox],
) -> None:
    mb = make_mailbox(mailbox_max_envelopes=3)
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    deposit(mb.box, alice, "bob", b"1", b"2")
    message = expect_error(Code.RESOURCE_EXHAUSTED, deposit, mb.box, alice, "bob", b"3", b"4")
    assert message == (
        "bob's mailbox is nearly full: 2 envelopes held, 2 envelopes more would pass the "
        "limit of 3 envelopes; try again once they collect it"
    )
    assert mb.held() == 2
    deposit(mb.box, alice, "bob", b"3")
    message = expect_error(Code.RESOURCE_EXHAUSTED, deposit, mb.box, alice, "bob", b"4")
    assert message == (
        "bob's mailbox is full: 3 envelopes held (the limit is 3 envelopes); "
        "try again once they collect it"
    )
    assert [row[0] for row in mb.rows("SELECT envelope FROM mailbox_envelopes")] == [
        b"1",
        b"2",
        b"3",
    ]
    # Collected and acknowledged: room again.
    stream = CollectStream(mb.box, bob)
    ids = [e.id for e in stream.backlog()]
    stream.cancel()
    mb.box.Acknowledge(mpb.AcknowledgeRequest(ids=ids), metadata=bob.metadata)
    deposit(mb.box, alice, "bob", b"4")


def test_a_mailbox_full_by_bytes_refuses_the_whole_batch_with_a_reason(
    make_mailbox: Callable[..., Mailbox],
) -> None:
    mb = make_mailbox(mailbox_max_bytes=3 * 2**20)  # 3 MiB
    alice, _ = enrol(mb.dir, mb.box, "alice", "bob")
    mib = b"m" * 2**20
    deposit(mb.box, alice, "bob", mib, mib)
    message = expect_error(Code.RESOURCE_EXHAUSTED, deposit, mb.box, alice, "bob", mib, b"!")
    assert "bob's mailbox is nearly full: 2.0 MiB held" in message
    assert "limit of 3.0 MiB" in message and "try again once they collect it" in message
    assert mb.held() == 2
    deposit(mb.box, alice, "bob", mib)
    message = expect_error(Code.RESOURCE_EXHAUSTED, deposit, mb.box, alice, "bob", b"!")
    assert "bob's mailbox is full: 3.0 MiB held (the limit is 3.0 MiB)" in message
    assert mb.rows("SELECT count(*), sum(size), sum(length(envelope)) FROM mailbox_envelopes") == [
        (3, 3 * 2**20, 3 * 2**20)
    ]


def test_depositing_faster_than_the_rate_is_refused_with_the_wait(
    make_mailbox: Callable[..., Mailbox],
) -> None:
    mb = make_mailbox(mailbox_deposit_rate=1.0)  # a burst of 20 envelopes, then 1 a second
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    deposit(mb.box, alice, "bob", *[b"e"] * 19)
    deposit(mb.box, alice, "bob", b"e")
    message = expect_error(Code.RESOURCE_EXHAUSTED, deposit, mb.box, alice, "bob", b"e", b"e")
    assert message.startswith("depositing too fast: retry in ")
    wait = float(message.removeprefix("depositing too fast: retry in ").removesuffix(" s"))
    assert 1.0 < wait <= 2.0
    assert mb.held() == 20
    deposit(mb.box, bob, "alice", b"e")  # the bucket is per depositor
    time.sleep(1.1)
    deposit(mb.box, alice, "bob", b"e")  # one more second, one more envelope


# -- Collect, Acknowledge, expiry ------------------------------------------------------------


def test_collect_sends_the_backlog_oldest_first_then_each_new_envelope(mb: Mailbox) -> None:
    alice, bob, carol = enrol(mb.dir, mb.box, "alice", "bob", "carol")
    first = deposit(mb.box, alice, "bob", b"a1", b"a2").ids
    second = deposit(mb.box, carol, "bob", b"c1").ids
    assert first[0] < first[1] < second[0]
    empty = CollectStream(mb.box, alice)  # nothing held: one empty response ends the backlog
    reply = empty.next().response
    assert reply.backlog_done and not reply.envelopes
    empty.cancel()

    stream = CollectStream(mb.box, bob)
    backlog = stream.backlog()
    assert [(e.id, e.depositor, e.envelope) for e in backlog] == [
        (first[0], "alice", b"a1"),
        (first[1], "alice", b"a2"),
        (second[0], "carol", b"c1"),
    ]
    assert all(abs(e.deposited_at.seconds - time.time()) < 60 for e in backlog)

    live = deposit(mb.box, carol, "bob", b"c2", b"c3").ids
    assert [(e.id, e.envelope) for e in stream.envelopes(2)] == list(
        zip(live, [b"c2", b"c3"], strict=True)
    )
    later = deposit(mb.box, alice, "bob", b"a3").ids
    assert [(e.id, e.depositor) for e in stream.envelopes(1)] == [(later[0], "alice")]
    assert stream.responses.empty()  # nothing twice
    stream.cancel()
    assert stream.status() == Code.CANCELLED
    expect_error(
        Code.UNAUTHENTICATED,
        lambda: next(iter(mb.box.Collect(mpb.CollectRequest(), metadata=auth("bad")))),
    )


def test_a_large_backlog_comes_in_responses_of_at_most_500_envelopes_and_about_4_mib(
    mb: Mailbox,
) -> None:
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    small = [deposit(mb.box, alice, "bob", *[b"s"] * 300).ids for _ in range(2)]
    big = deposit(mb.box, alice, "bob", b"B" * MAX_ENVELOPE_BYTES, b"b" * 2**20, b"b" * 2**20)
    stream = CollectStream(mb.box, bob)
    responses: list[mpb.CollectResponse] = []
    while not responses or not responses[-1].backlog_done:
        responses.append(stream.next().response)
    stream.cancel()
    sizes = [len(r.envelopes) for r in responses]
    assert sizes == [500, 100, 1, 2], sizes  # the 4 MiB envelope goes alone
    assert all(r.ByteSize() <= 4 * 2**20 + 128 * 2**10 for r in responses)
    ids = [e.id for r in responses for e in r.envelopes]
    assert ids == [*small[0], *small[1], *big.ids]


def test_an_unacknowledged_envelope_comes_again_and_acknowledge_deletes_only_the_callers(
    mb: Mailbox,
) -> None:
    alice, bob, carol = enrol(mb.dir, mb.box, "alice", "bob", "carol")
    to_bob = deposit(mb.box, alice, "bob", b"b1", b"b2", b"b3").ids
    to_carol = deposit(mb.box, alice, "carol", b"c1").ids
    for _ in range(2):  # collected, not acknowledged: all again
        stream = CollectStream(mb.box, bob)
        assert [e.id for e in stream.backlog()] == to_bob
        stream.cancel()

    expect_error(
        Code.INVALID_ARGUMENT, mb.box.Acknowledge, mpb.AcknowledgeRequest(), metadata=bob.metadata
    )
    too_many = mpb.AcknowledgeRequest(ids=list(range(1, 4098)))
    expect_error(Code.INVALID_ARGUMENT, mb.box.Acknowledge, too_many, metadata=bob.metadata)
    # Carol's id, an unknown one and the largest uint64 are ignored.
    request = mpb.AcknowledgeRequest(ids=[to_bob[0], to_bob[2], to_carol[0], 999_999, 2**64 - 1])
    assert mb.box.Acknowledge(request, metadata=bob.metadata).deleted == 2
    assert mb.box.Acknowledge(request, metadata=bob.metadata).deleted == 0

    stream = CollectStream(mb.box, bob)
    assert [e.id for e in stream.backlog()] == [to_bob[1]]
    stream.cancel()
    stream = CollectStream(mb.box, carol)
    assert [e.envelope for e in stream.backlog()] == [b"c1"]
    stream.cancel()


def test_an_expired_envelope_is_never_collected_and_is_swept(
    make_mailbox: Callable[..., Mailbox],
) -> None:
    clock = FakeClock()
    mb = make_mailbox(clock, mailbox_expiry=timedelta(seconds=2))  # swept every 0.2 s
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    reply = deposit(mb.box, alice, "bob", b"old")
    assert reply.expires_at.ToDatetime(tzinfo=clock().tzinfo) == clock() + timedelta(seconds=2)
    time.sleep(0.5)  # a few sweeps: not expired yet, kept
    assert mb.held() == 1

    clock.advance(1.5)
    kept = deposit(mb.box, alice, "bob", b"new").ids
    clock.advance(1.0)  # "old" expired, "new" not
    stream = CollectStream(mb.box, bob)
    assert [e.envelope for e in stream.backlog()] == [b"new"]
    stream.cancel()
    deadline = time.monotonic() + 5
    while mb.rows("SELECT envelope FROM mailbox_envelopes") != [(b"new",)]:
        assert time.monotonic() < deadline, "the expired envelope was not swept"
        time.sleep(0.05)
    assert kept


# -- restarts and what the database holds ------------------------------------------------------


def test_a_directory_restarted_under_an_open_collect_loses_no_envelope(mb: Mailbox) -> None:
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    stream = CollectStream(mb.box, bob)
    assert stream.backlog() == []
    ids = list(deposit(mb.box, alice, "bob", b"1", b"2").ids)
    assert [e.id for e in stream.envelopes(2)] == ids

    started = time.monotonic()
    mb.directory.stop()  # the open stream must not hold the stop back
    assert time.monotonic() - started < 2.0
    assert stream.status() == Code.UNAVAILABLE
    mb.directory.start()
    ids += deposit(mb.box, alice, "bob", b"3").ids

    stream = CollectStream(mb.box, bob)
    assert [(e.id, e.envelope) for e in stream.backlog()] == list(
        zip(ids, [b"1", b"2", b"3"], strict=True)
    )
    stream.cancel()


def test_the_database_holds_the_deposited_bytes_exactly_and_nothing_else_of_them(
    mb: Mailbox,
) -> None:
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    sealed = [os.urandom(1000) for _ in range(3)]
    ids = deposit(mb.box, alice, "bob", *sealed).ids

    rows = mb.rows(
        "SELECT id, recipient, depositor, envelope, size FROM mailbox_envelopes ORDER BY id"
    )
    assert rows == [(i, "bob", "alice", e, 1000) for i, e in zip(ids, sealed, strict=True)]
    columns = {
        table: {row[1] for row in mb.rows(f"PRAGMA table_info({table})")}
        for table in ("mailbox_envelopes", "mailbox_keys")
    }
    assert columns == {
        "mailbox_envelopes": {
            "id", "recipient", "depositor", "envelope", "size", "deposited_at", "expires_at"
        },
        "mailbox_keys": {
            "username", "mailbox_key", "signature", "public_key_sha256", "published_at"
        },
    }  # fmt: skip
    # No other column of any table holds any part of an envelope.
    tables = [row[0] for row in mb.rows("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        for column in [row[1] for row in mb.rows(f"PRAGMA table_info({table})")]:
            for (value,) in mb.rows(f'SELECT "{column}" FROM "{table}"'):
                if (table, column) == ("mailbox_envelopes", "envelope"):
                    continue
                raw = value if isinstance(value, bytes) else str(value).encode()
                assert not any(e[:16] in raw or e.hex()[:32].encode() in raw for e in sealed)
    contacts = (mb.directory.settings.data_dir / "contacts.db").read_bytes()
    assert not any(e[:16] in contacts for e in sealed)
    stream = CollectStream(mb.box, bob)
    assert [e.envelope for e in stream.backlog()] == sealed  # the same bytes come back
    stream.cancel()


def test_collect_streams_that_end_leave_no_waiter_behind(mb: Mailbox) -> None:
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    wakeups = mb.directory.server.mailbox.wakeups
    streams = [CollectStream(mb.box, bob) for _ in range(3)] + [CollectStream(mb.box, alice)]
    for stream in streams:
        assert stream.backlog() == []
    assert len(wakeups) == 4
    deposit(mb.box, alice, "bob", b"to every stream of bob")
    for stream in streams[:3]:
        assert [e.envelope for e in stream.envelopes(1)] == [b"to every stream of bob"]
    for stream in streams:
        stream.cancel()
    deadline = time.monotonic() + 5
    while len(wakeups):
        assert time.monotonic() < deadline, f"{len(wakeups)} waiter(s) left"
        time.sleep(0.02)


def test_an_id_is_never_handed_out_again_so_a_live_stream_misses_no_envelope(mb: Mailbox) -> None:
    """The newest envelope acknowledged (its row deleted), the next deposit still gets a higher
    id: a stream that sends "ids after the last one sent" would never send a reused one."""
    alice, bob = enrol(mb.dir, mb.box, "alice", "bob")
    stream = CollectStream(mb.box, bob)
    assert stream.backlog() == []
    for round in range(3):
        (id,) = deposit(mb.box, alice, "bob", b"round %d" % round).ids
        (got,) = stream.envelopes(1)
        assert (got.id, got.envelope) == (id, b"round %d" % round)
        request = mpb.AcknowledgeRequest(ids=[id])
        assert mb.box.Acknowledge(request, metadata=bob.metadata, timeout=RPC_TIMEOUT).deleted == 1
    stream.cancel()
