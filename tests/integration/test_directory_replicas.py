"""Several `p2pchat-directory` processes on one PostgreSQL database behave as one directory.

Each replica is a real child process; they share the database (users and contacts on one URL)
and one data dir (so one CA). Nothing a client sees may depend on which replica it reaches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from p2pchat.v1 import directory_pb2 as pb
from p2pchat.v1 import directory_pb2_grpc
from tests.support.directory import (
    PASSWORD,
    DirectoryProcess,
    auth,
    channel_to,
    data_dir_files,
    expect_error,
)
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.postgres

Code = grpc.StatusCode
Stub = directory_pb2_grpc.DirectoryServiceStub
RPC_TIMEOUT = 10.0
PRESENCE_TTL = 2.0


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children inherit os.environ: a P2PCHAT_* variable of the developer's shell must not leak."""
    for name in [n for n in os.environ if n.startswith("P2PCHAT_")]:
        monkeypatch.delenv(name)


@contextmanager
def replicas(url: str, data_dir: Path, count: int = 2, *extra: str) -> Iterator[list[Stub]]:
    """Starts `count` directories at the same moment on `url`; yields a stub for each.

    The children are always killed and reaped, also when only some of them came up.
    """
    args = ["--data-dir", str(data_dir), "--users-db", url, "--contacts-db", url, *extra]
    started: list[DirectoryProcess] = []
    failures: list[BaseException] = []
    with ThreadPoolExecutor(count) as pool:
        # DirectoryProcess blocks until its child logs its port (and kills it after 30 s).
        for future in [pool.submit(DirectoryProcess, args) for _ in range(count)]:
            try:
                started.append(future.result())
            except Exception as exc:
                failures.append(exc)
    try:
        if failures:
            raise failures[0]
        ca = (data_dir / "ca.pem").read_bytes()
        with ExitStack() as stack:
            channels = [stack.enter_context(channel_to(p.port, ca)) for p in started]
            # A health check answered is the barrier after which SIGTERM is handled gracefully
            # (the port line comes a few statements before the handler is installed).
            for channel in channels:
                health = health_pb2_grpc.HealthStub(channel)
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            yield [Stub(channel) for channel in channels]
        for proc in started:
            assert proc.terminate() == 0, "".join(proc.log)
    finally:
        for proc in started:
            proc.kill()
            if proc.proc.stderr is not None:
                proc._drain.join(5)
                proc.proc.stderr.close()


@pytest.fixture
def database_url(pg_server: PostgresServer) -> Iterator[str]:
    with pg_server.database() as url:
        yield url


@pytest.fixture
def pair(database_url: str, tmp_path: Path) -> Iterator[tuple[Stub, Stub]]:
    """Replicas A and B, started together on one empty database and one data dir."""
    data = tmp_path / "directory"
    with replicas(database_url, data, 2, "--presence-ttl", str(PRESENCE_TTL)) as (a, b):
        yield a, b
    # All state is in PostgreSQL: no SQLite fallback files appeared in the shared data dir.
    assert not {"users.db", "contacts.db"} & data_dir_files(data)


def register(stub: Stub, name: str) -> None:
    stub.Register(
        pb.RegisterRequest(username=name, password=PASSWORD, address=f"{name}.lan:50052"),
        timeout=RPC_TIMEOUT,
    )


def login(stub: Stub, name: str, password: str = PASSWORD) -> str:
    reply = stub.Login(pb.LoginRequest(username=name, password=password), timeout=RPC_TIMEOUT)
    token: str = reply.session_token
    return token


def contact_names(stub: Stub, token: str) -> list[str]:
    reply = stub.ListContacts(pb.ListContactsRequest(), metadata=auth(token), timeout=RPC_TIMEOUT)
    return [c.username for c in reply.contacts]


def is_online(stub: Stub, token: str, name: str) -> bool:
    reply = stub.Lookup(pb.LookupRequest(username=name), metadata=auth(token), timeout=RPC_TIMEOUT)
    online: bool = reply.contact.online
    return online


def test_user_registered_through_one_replica_logs_in_through_the_other(
    pair: tuple[Stub, Stub],
) -> None:
    a, b = pair
    register(a, "alice")
    assert login(b, "alice")
    expect_error(  # the name is taken on B too
        Code.ALREADY_EXISTS,
        b.Register,
        pb.RegisterRequest(username="Alice", password=PASSWORD),
        timeout=RPC_TIMEOUT,
    )


def test_contact_added_through_one_replica_is_listed_and_looked_up_through_the_other(
    pair: tuple[Stub, Stub],
) -> None:
    a, b = pair
    register(a, "alice")
    register(b, "bob")
    token = login(a, "alice")
    b.AddContact(pb.AddContactRequest(username="bob"), metadata=auth(token), timeout=RPC_TIMEOUT)
    bob = login(b, "bob")  # bob accepts through the other replica than he was asked through
    a.AcceptContact(pb.ContactAnswerRequest(username="alice"), metadata=auth(bob))
    assert contact_names(a, token) == ["bob"]
    found = a.Lookup(pb.LookupRequest(username="bob"), metadata=auth(token), timeout=RPC_TIMEOUT)
    assert found.contact.address == "bob.lan:50052"
    expect_error(
        Code.ALREADY_EXISTS,
        a.AddContact,
        pb.AddContactRequest(username="bob"),
        metadata=auth(token),
        timeout=RPC_TIMEOUT,
    )


def test_token_from_one_replica_works_on_the_other_and_logout_there_revokes_it_everywhere(
    pair: tuple[Stub, Stub],
) -> None:
    a, b = pair
    register(a, "alice")
    token = login(a, "alice")
    b.Heartbeat(pb.HeartbeatRequest(), metadata=auth(token), timeout=RPC_TIMEOUT)
    assert contact_names(b, token) == []
    b.Logout(pb.LogoutRequest(), metadata=auth(token), timeout=RPC_TIMEOUT)
    for stub in (a, b):
        expect_error(
            Code.UNAUTHENTICATED,
            stub.ListContacts,
            pb.ListContactsRequest(),
            metadata=auth(token),
            timeout=RPC_TIMEOUT,
        )


def test_presence_from_a_heartbeat_on_one_replica_is_seen_and_expires_on_the_other(
    pair: tuple[Stub, Stub],
) -> None:
    a, b = pair
    register(a, "alice")
    register(a, "bob")
    alice = login(b, "alice")
    b.AddContact(pb.AddContactRequest(username="bob"), metadata=auth(alice), timeout=RPC_TIMEOUT)
    bob = login(a, "bob")  # a login counts as a heartbeat
    a.AddContact(pb.AddContactRequest(username="alice"), metadata=auth(bob), timeout=RPC_TIMEOUT)
    assert is_online(b, alice, "bob")

    time.sleep(PRESENCE_TTL + 0.5)  # no heartbeat: offline, as seen by either replica
    assert not is_online(b, alice, "bob")
    assert not is_online(a, alice, "bob")

    beat = a.Heartbeat(pb.HeartbeatRequest(), metadata=auth(bob), timeout=RPC_TIMEOUT)
    beaten_at = time.time()
    assert abs(beat.online_until.seconds - (beaten_at + PRESENCE_TTL)) < 2
    assert is_online(b, alice, "bob")
    listed = b.ListContacts(pb.ListContactsRequest(), metadata=auth(alice), timeout=RPC_TIMEOUT)
    assert [(c.username, c.online) for c in listed.contacts] == [("bob", True)]
    assert listed.contacts[0].last_seen.seconds >= int(beaten_at) - 2

    time.sleep(max(0.0, beaten_at + PRESENCE_TTL + 0.5 - time.time()))
    assert not is_online(b, alice, "bob")


def test_failed_login_counter_is_shared_between_replicas(pair: tuple[Stub, Stub]) -> None:
    a, b = pair  # default --login-max-failures 5
    register(a, "alice")
    bad = pb.LoginRequest(username="alice", password="not the password")
    for stub in (a, a, a, b, b):
        expect_error(Code.UNAUTHENTICATED, stub.Login, bad, timeout=RPC_TIMEOUT)
    good = pb.LoginRequest(username="alice", password=PASSWORD)
    for stub in (a, b):
        expect_error(Code.RESOURCE_EXHAUSTED, stub.Login, good, timeout=RPC_TIMEOUT)
        expect_error(Code.RESOURCE_EXHAUSTED, stub.Login, bad, timeout=RPC_TIMEOUT)


@pytest.mark.parametrize("attempt", range(3))
def test_replicas_started_together_on_an_empty_database_and_data_dir_all_come_up(
    pg_server: PostgresServer, tmp_path: Path, attempt: int
) -> None:
    # Each attempt races schema creation (advisory lock) and CA creation (file lock) afresh.
    data = tmp_path / f"directory-{attempt}"
    with pg_server.database() as url, replicas(url, data, 3) as stubs:
        # Each replica serves a certificate from the one CA in ca.pem (else no TLS channel).
        for i, stub in enumerate(stubs):
            register(stub, f"user{i}")
        for i in range(len(stubs)):  # each user logs in through the next replica
            assert login(stubs[(i + 1) % len(stubs)], f"user{i}")
        assert (data / "ca.pem").read_bytes().count(b"BEGIN CERTIFICATE") == 1
