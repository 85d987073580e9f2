"""Presence over one stream (DirectoryService.Presence) through real gRPC, on SQLite and on
PostgreSQL: online while it beats, no database write per beat, offline within the TTL of the
last beat, ended by a revoked session (through this replica or another one)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import event

from p2pchat.v1 import directory_pb2 as pb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_common.errors import Unauthenticated, Unavailable
from p2pchat_directory.service import HeartbeatResult
from tests.support.directory import PASSWORD, InProcessDirectory, add_each_other, auth

Stub = directory_pb2_grpc.DirectoryServiceStub
TTL = 1.5  # seconds: the directory renews every TTL / 3


def login(stub: Stub, name: str) -> str:
    stub.Register(pb.RegisterRequest(username=name, password=PASSWORD))
    return stub.Login(pb.LoginRequest(username=name, password=PASSWORD)).session_token


@dataclass
class Beating:
    """A client's Presence stream: `beat()` sends one and returns its answer."""

    stub: Stub
    token: str
    _beats: queue.Queue[pb.HeartbeatRequest | None] = field(default_factory=queue.Queue)
    _answers: Iterator[pb.HeartbeatResponse] | None = None

    def __post_init__(self) -> None:
        self._answers = self.stub.Presence(iter(self._beats.get, None), metadata=auth(self.token))

    def beat(self) -> pb.HeartbeatResponse:
        self._beats.put(pb.HeartbeatRequest())
        assert self._answers is not None
        return next(self._answers)

    def wait_end(self) -> grpc.RpcError | None:
        """Reads until the stream ends: the error it ended with, None for a clean end."""
        assert self._answers is not None
        try:
            for _ in self._answers:
                pass
        except grpc.RpcError as err:
            return err
        return None

    def close(self) -> None:
        self._beats.put(None)


@pytest.fixture
def presence_directory(make_directory: Callable[..., InProcessDirectory]) -> InProcessDirectory:
    return make_directory(presence_ttl=timedelta(seconds=TTL))


def online(stub: Stub, token: str, name: str) -> bool:
    found: bool = stub.Lookup(pb.LookupRequest(username=name), metadata=auth(token)).contact.online
    return found


def judy_watching_ken(directory: InProcessDirectory) -> tuple[Stub, str, Beating]:
    """Accepted contacts judy and ken; judy's token, and ken's Presence stream (not beaten yet)."""
    stub = directory.stub()
    judy, ken = login(stub, "judy"), login(stub, "ken")
    add_each_other(stub, ("judy", judy), ("ken", ken))
    return stub, judy, Beating(stub, ken)


def count_user_writes(directory: InProcessDirectory) -> list[str]:
    """Every UPDATE of the users table the directory runs from now on."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE USERS"):
            seen.append(statement)

    event.listen(directory.server.databases.users_engine, "before_cursor_execute", record)
    return seen


def test_a_presence_stream_keeps_its_user_online_with_no_write_per_beat(
    presence_directory: InProcessDirectory,
) -> None:
    stub, judy, stream = judy_watching_ken(presence_directory)  # no beat sent yet
    writes = count_user_writes(presence_directory)
    try:
        first = stream.beat()
        assert first.online_until.ToDatetime() > first.server_time.ToDatetime()
        hub = presence_directory.server.presence
        ticks_before = hub.ticks
        beats = 0
        end = time.monotonic() + 4 * TTL  # well past the TTL of the login's presence
        while time.monotonic() < end:
            answer = stream.beat()
            beats += 1
            assert answer.session_expires_at.seconds > time.time()
            assert online(stub, judy, "ken")
            time.sleep(0.1)
        ticks = hub.ticks - ticks_before
        assert beats >= 20
        # One write to open the stream, then one per tick at most, whatever the beats.
        assert len(writes) <= 1 + ticks + 1, (len(writes), ticks, beats)
        assert len(writes) < beats / 3
    finally:
        stream.close()


def test_a_stream_that_stops_leaves_its_user_offline_within_the_ttl_of_its_last_beat(
    presence_directory: InProcessDirectory,
) -> None:
    stub, judy, stream = judy_watching_ken(presence_directory)
    for _ in range(4):  # past a tick, so that a lease of its own was written
        stream.beat()
        time.sleep(TTL / 4)
    last_beat = time.monotonic()
    stream.close()
    assert stream.wait_end() is None  # the client's end is a clean end
    while online(stub, judy, "ken"):
        assert time.monotonic() - last_beat < TTL + 0.5, "still online past the TTL"
        time.sleep(0.05)
    assert time.monotonic() - last_beat > TTL / 2  # it did count the last beat


def test_a_logout_through_this_replica_ends_the_stream_with_unauthenticated(
    presence_directory: InProcessDirectory,
) -> None:
    stub = presence_directory.stub()
    ken = login(stub, "ken")
    stream = Beating(stub, ken)
    stream.beat()
    started = time.monotonic()
    stub.Logout(pb.LogoutRequest(), metadata=auth(ken))
    err = stream.wait_end()
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "log in again" in (err.details() or "")
    assert time.monotonic() - started < TTL / 3  # at once, not at the next tick
    assert len(presence_directory.server.presence) == 0


def test_a_session_revoked_through_another_replica_ends_the_stream_within_an_interval(
    make_directory: Callable[..., InProcessDirectory],
) -> None:
    a = make_directory(presence_ttl=timedelta(seconds=TTL))
    b = make_directory(presence_ttl=timedelta(seconds=TTL))  # the same databases
    ken = login(a.stub(), "ken")
    stream = Beating(a.stub(), ken)
    stream.beat()
    started = time.monotonic()
    b.stub().Logout(pb.LogoutRequest(), metadata=auth(ken))
    ended: list[grpc.RpcError | None] = []
    reader = threading.Thread(target=lambda: ended.append(stream.wait_end()))
    reader.start()
    reader.join(timeout=TTL * 2)
    assert ended, "the stream outlived its session"
    err = ended[0]
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - started < TTL / 3 + 1.0


async def one_beat_then(end: asyncio.Event) -> AsyncIterator[pb.HeartbeatRequest]:
    """A client's side of a stream, for PresenceHub.attend: one beat, then none until `end`
    (then the client's end)."""
    yield pb.HeartbeatRequest()
    await end.wait()


def sessions_of_four_users(stub: Stub) -> tuple[list[str], str]:
    """Three live sessions each of four users, and one session logged out."""
    live: list[str] = []
    for name in ("amy", "bob", "cyd", "dee"):
        stub.Register(pb.RegisterRequest(username=name, password=PASSWORD))
        for _ in range(3):
            request = pb.LoginRequest(username=name, password=PASSWORD)
            live.append(stub.Login(request).session_token)
    gone = stub.Login(pb.LoginRequest(username="amy", password=PASSWORD)).session_token
    stub.Logout(pb.LogoutRequest(), metadata=auth(gone))
    return live, gone


def test_streams_that_open_together_are_opened_by_one_write_not_one_each(
    presence_directory: InProcessDirectory,
) -> None:
    stub = presence_directory.stub()
    live, gone = sessions_of_four_users(stub)
    hub = presence_directory.server.presence
    writes = count_user_writes(presence_directory)

    async def open_all() -> list[HeartbeatResult | Exception]:
        """Every stream's first beat in the same turn of the loop, as after a restart."""
        release = asyncio.Event()
        streams = [hub.attend(token, one_beat_then(release)) for token in [*live, gone]]

        async def first(stream: AsyncIterator[HeartbeatResult]) -> HeartbeatResult | Exception:
            try:
                return await anext(stream)
            except Unauthenticated as exc:
                return exc

        try:
            return await asyncio.gather(*(first(stream) for stream in streams))
        finally:
            release.set()
            for stream in streams:
                await stream.aclose()  # type: ignore[attr-defined]

    answers = presence_directory.loop.run(open_all())
    assert all(isinstance(a, HeartbeatResult) for a in answers[:-1]), answers
    assert isinstance(answers[-1], Unauthenticated)  # the logged-out one, in the same batch
    assert len(writes) == 1, writes  # one UPDATE of the users for the twelve
    assert len(hub) == 0  # all closed

    # And through gRPC, all at once from threads: each its own answer, the dead one refused.
    barrier = threading.Barrier(len(live) + 1)
    streams = [Beating(stub, token) for token in [*live, gone]]
    results: list[object] = [None] * len(streams)

    def beat(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[i] = streams[i].beat()
        except grpc.RpcError as err:
            results[i] = err.code()

    threads = [threading.Thread(target=beat, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        now = time.time()
        for answer in results[:-1]:
            assert isinstance(answer, pb.HeartbeatResponse), results
            assert answer.online_until.seconds >= now and answer.session_expires_at.seconds > now
        assert results[-1] == grpc.StatusCode.UNAUTHENTICATED
        assert len(hub) == len(live)
    finally:
        for stream in streams:
            stream.close()


def test_a_stream_still_opening_when_the_replica_stops_ends_with_unavailable(
    presence_directory: InProcessDirectory,
) -> None:
    stub = presence_directory.stub()
    ken = login(stub, "ken")
    server = presence_directory.server
    gate = threading.Event()  # every worker thread busy: the open's batch waits for one
    for _ in range(presence_directory.settings.workers):
        server.executor.submit(gate.wait, 30)

    async def open_then_stop() -> BaseException | None:
        stream = server.presence.attend(ken, one_beat_then(asyncio.Event()))
        opening = asyncio.ensure_future(anext(stream))
        try:
            await asyncio.sleep(0.2)
            assert not opening.done()
            await server.presence.close()  # as the replica stops
            gate.set()
            await asyncio.wait_for(opening, 5)
        except (Unavailable, TimeoutError) as exc:
            return exc
        finally:
            gate.set()
            await stream.aclose()  # type: ignore[attr-defined]
        return None

    try:
        ended = presence_directory.loop.run(open_then_stop())
    finally:
        gate.set()
    assert isinstance(ended, Unavailable), ended  # not left waiting for ever


def test_a_stream_without_a_session_is_refused(presence_directory: InProcessDirectory) -> None:
    stub = presence_directory.stub()
    stream = Beating(stub, "not-a-token")
    with pytest.raises(grpc.RpcError) as raised:
        stream.beat()
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_answers_say_when_contacts_changed_through_either_replica(
    make_directory: Callable[..., InProcessDirectory],
) -> None:
    a = make_directory(presence_ttl=timedelta(seconds=TTL))
    b = make_directory(presence_ttl=timedelta(seconds=TTL))
    judy, ken = login(a.stub(), "judy"), login(a.stub(), "ken")
    stream = Beating(a.stub(), ken)
    try:
        assert not stream.beat().HasField("contacts_changed_at")
        a.stub().AddContact(pb.AddContactRequest(username="ken"), metadata=auth(judy))
        moved = stream.beat()  # through this replica: at once
        assert moved.HasField("contacts_changed_at")
        b.stub().DeclineContact(pb.ContactAnswerRequest(username="judy"), metadata=auth(ken))
        deadline = time.monotonic() + TTL  # through another one: by the next tick
        while stream.beat().contacts_changed_at == moved.contacts_changed_at:
            assert time.monotonic() < deadline, "the change through b never showed"
            time.sleep(0.05)
    finally:
        stream.close()


def test_a_session_is_extended_once_half_its_lifetime_is_used_not_at_every_beat(
    make_directory: Callable[..., InProcessDirectory],
) -> None:
    session_ttl = 3.0
    directory = make_directory(
        presence_ttl=timedelta(seconds=TTL), session_ttl=timedelta(seconds=session_ttl)
    )
    stub = directory.stub()
    ken = login(stub, "ken")
    stream = Beating(stub, ken)
    try:
        expiries = set()
        end = time.monotonic() + 2.5 * session_ttl  # outlives the session it logged in with
        while time.monotonic() < end:
            expiries.add(stream.beat().session_expires_at.ToDatetime())
            time.sleep(0.1)
        # Extended a few times (every tick past half of 3 s), not at each of ~70 beats.
        assert 2 <= len(expiries) <= 2.5 * session_ttl / (TTL / 3) + 2
        stub.ListContacts(pb.ListContactsRequest(), metadata=auth(ken))  # the session lives
    finally:
        stream.close()


def test_presence_through_one_replica_is_seen_on_the_other_and_ends_on_both(
    make_directory: Callable[..., InProcessDirectory],
) -> None:
    a = make_directory(presence_ttl=timedelta(seconds=TTL))
    b = make_directory(presence_ttl=timedelta(seconds=TTL))  # the same databases
    judy, ken = login(a.stub(), "judy"), login(a.stub(), "ken")
    add_each_other(a.stub(), ("judy", judy), ("ken", ken))
    stream = Beating(a.stub(), ken)
    end = time.monotonic() + 3 * TTL
    while time.monotonic() < end:
        stream.beat()
        assert online(b.stub(), judy, "ken") and online(a.stub(), judy, "ken")
        time.sleep(0.1)
    last_beat = time.monotonic()
    stream.close()
    while online(b.stub(), judy, "ken") or online(a.stub(), judy, "ken"):
        assert time.monotonic() - last_beat < TTL + 0.5, "still online past the TTL"
        time.sleep(0.05)


def test_an_agent_whose_session_the_directory_ended_logs_out_and_forgets_it(
    make_agent: Callable[..., Any], agent_directory: InProcessDirectory
) -> None:
    agent = make_agent("ken")
    client = agent.client()
    client.register("ken")
    client.login("ken")
    hub = agent_directory.server.presence
    wait_for = time.monotonic() + 10
    while len(hub) != 1:  # the agent beats on a Presence stream, not with unary heartbeats
        assert time.monotonic() < wait_for, "no presence stream opened"
        time.sleep(0.05)
    token = agent.server.agent.active.session.token
    agent_directory.stub().Logout(pb.LogoutRequest(), metadata=auth(token))  # e.g. elsewhere
    wait_for = time.monotonic() + 10
    while client.status().logged_in:
        assert time.monotonic() < wait_for, "still logged in with a session that ended"
        time.sleep(0.05)
    assert not (agent.settings.data_dir / "session.json").exists()


def test_a_beat_after_a_long_silence_is_leased_at_once_not_at_the_next_tick(
    presence_directory: InProcessDirectory,
) -> None:
    stub, judy, stream = judy_watching_ken(presence_directory)
    try:
        stream.beat()
        time.sleep(TTL * 0.9)  # silent: the lease of that beat runs out in TTL / 10
        stream.beat()
        end = time.monotonic() + TTL / 2  # past the end of the old lease and the next tick
        while time.monotonic() < end:
            assert online(stub, judy, "ken"), "offline although it just beat"
            time.sleep(0.02)
    finally:
        stream.close()
