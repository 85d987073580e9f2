"""The directory's RPCs through real gRPC over TLS, on SQLite and on PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from p2pchat.v1 import common_pb2, directory_pb2_grpc
from p2pchat.v1 import directory_pb2 as pb
from tests.support.directory import (
    PASSWORD,
    InProcessDirectory,
    add_each_other,
    auth,
    expect_error,
)

Stub = directory_pb2_grpc.DirectoryServiceStub
Code = grpc.StatusCode


def register_and_login(stub: Stub, name: str, address: str = "") -> str:
    stub.Register(pb.RegisterRequest(username=name, password=PASSWORD, address=address))
    return stub.Login(pb.LoginRequest(username=name, password=PASSWORD)).session_token


def test_register_login_contacts_lookup_logout_flow(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    assert (
        stub.Register(
            pb.RegisterRequest(username="Alice", password=PASSWORD, address="alice.local:50052")
        ).username
        == "alice"
    )
    stub.Register(pb.RegisterRequest(username="bob", password=PASSWORD, address="10.0.0.2:50052"))

    login = stub.Login(pb.LoginRequest(username="ALICE", password=PASSWORD))
    assert login.username == "alice"
    assert len(login.session_token) >= 32
    assert login.session_expires_at.seconds > time.time()
    assert login.ca_certificate_pem == directory.users_ca_pem
    assert login.directory_ca_pem == directory.ca_pem
    token = login.session_token

    bob = stub.Login(pb.LoginRequest(username="bob", password=PASSWORD)).session_token
    stub.AddContact(pb.AddContactRequest(username="alice"), metadata=auth(bob))
    stub.Logout(pb.LogoutRequest(), metadata=auth(bob))
    added = stub.AddContact(pb.AddContactRequest(username="Bob"), metadata=auth(token))
    assert added.contact.username == "bob"
    assert added.contact.address == "10.0.0.2:50052"  # bob asked first: accepted at once

    listed = stub.ListContacts(pb.ListContactsRequest(), metadata=auth(token)).contacts
    assert [(c.username, c.address, c.online) for c in listed] == [("bob", "10.0.0.2:50052", False)]
    assert listed[0].HasField("last_seen")  # bob's logout

    found = stub.Lookup(pb.LookupRequest(username="bob"), metadata=auth(token))
    assert found.contact.username == "bob"
    assert found.contact.address == "10.0.0.2:50052"
    assert found.public_key_sha256 == ""  # bob has no certificate yet

    stub.Logout(pb.LogoutRequest(), metadata=auth(token))
    expect_error(
        Code.UNAUTHENTICATED, stub.ListContacts, pb.ListContactsRequest(), metadata=auth(token)
    )


def test_register_duplicate_name_is_already_exists_case_insensitively(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    stub.Register(pb.RegisterRequest(username="carol", password=PASSWORD))
    for name in ("carol", "Carol", "CAROL"):
        msg = expect_error(
            Code.ALREADY_EXISTS, stub.Register, pb.RegisterRequest(username=name, password=PASSWORD)
        )
        assert "taken" in msg


@pytest.mark.parametrize(
    ("username", "password", "address", "fragment"),
    [
        ("", PASSWORD, "", "username is required"),
        ("ab", PASSWORD, "", "3-32 characters"),
        ("a" * 33, PASSWORD, "", "too long"),
        ("x" * 100_000, PASSWORD, "", "too long"),
        ("1alice", PASSWORD, "", "a letter first"),
        ("dave", "", "", "password is required"),
        ("dave", "short", "", "too short"),
        ("dave", "p" * 1025, "", "too long"),
        ("dave", PASSWORD, "nohost", "host:port"),
        ("dave", PASSWORD, "host:0", "port"),
        ("dave", PASSWORD, "host:99999", "port"),
        ("dave", PASSWORD, "bad_host!:80", "host name"),
        ("dave", PASSWORD, "::1:80", "brackets"),
    ],
)
def test_register_rejects_bad_input_with_invalid_argument(
    directory: InProcessDirectory, username: str, password: str, address: str, fragment: str
) -> None:
    stub = directory.stub()
    msg = expect_error(
        Code.INVALID_ARGUMENT,
        stub.Register,
        pb.RegisterRequest(username=username, password=password, address=address),
    )
    assert fragment in msg
    assert len(msg) < 300  # a huge input is not echoed back whole


def test_register_accepts_ipv4_ipv6_and_dns_addresses(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    for name, address, canonical in [
        ("ipfour", "192.168.1.20:50052", "192.168.1.20:50052"),
        ("ipsix", "[::1]:50052", "[::1]:50052"),
        ("dnsname", "Bob-Laptop.example.org:7000", "bob-laptop.example.org:7000"),
    ]:
        stub.Register(pb.RegisterRequest(username=name, password=PASSWORD, address=address))
        token = stub.Login(pb.LoginRequest(username=name, password=PASSWORD)).session_token
        other = "lookerup" + name
        stub.Register(pb.RegisterRequest(username=other, password=PASSWORD))
        t2 = stub.Login(pb.LoginRequest(username=other, password=PASSWORD)).session_token
        add_each_other(stub, (other, t2), (name, token))
        assert stub.Lookup(pb.LookupRequest(username=name), metadata=auth(t2)).contact.address == (
            canonical
        )
        assert token


def test_wrong_password_and_unknown_user_give_the_same_unauthenticated(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    stub.Register(pb.RegisterRequest(username="erin", password=PASSWORD))
    wrong = expect_error(
        Code.UNAUTHENTICATED,
        stub.Login,
        pb.LoginRequest(username="erin", password="not the password"),
    )
    unknown = expect_error(
        Code.UNAUTHENTICATED,
        stub.Login,
        pb.LoginRequest(username="nobody", password="not the password"),
    )
    assert wrong == unknown == "wrong username or password"


def test_repeated_failed_logins_are_rate_limited_with_the_wait_in_the_message(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    stub.Register(pb.RegisterRequest(username="frank", password=PASSWORD))
    for _ in range(5):
        expect_error(
            Code.UNAUTHENTICATED,
            stub.Login,
            pb.LoginRequest(username="frank", password="guess guess"),
        )
    msg = expect_error(
        Code.RESOURCE_EXHAUSTED, stub.Login, pb.LoginRequest(username="frank", password=PASSWORD)
    )
    assert "try again in" in msg and " s" in msg
    # The same counter guards names that do not exist (no enumeration by rate limit).
    for _ in range(5):
        expect_error(
            Code.UNAUTHENTICATED,
            stub.Login,
            pb.LoginRequest(username="ghost", password="guess guess"),
        )
    expect_error(
        Code.RESOURCE_EXHAUSTED,
        stub.Login,
        pb.LoginRequest(username="ghost", password="guess guess"),
    )
    # Other users are not affected.
    stub.Register(pb.RegisterRequest(username="grace", password=PASSWORD))
    assert stub.Login(pb.LoginRequest(username="grace", password=PASSWORD)).session_token


def test_rate_limit_window_passes_and_success_resets_the_counter(
    make_directory: Callable[..., InProcessDirectory],
) -> None:
    from datetime import timedelta

    directory = make_directory(login_failure_window=timedelta(seconds=1.5), login_max_failures=2)
    stub = directory.stub()
    stub.Register(pb.RegisterRequest(username="heidi", password=PASSWORD))
    for _ in range(2):
        expect_error(
            Code.UNAUTHENTICATED,
            stub.Login,
            pb.LoginRequest(username="heidi", password="guess guess"),
        )
    expect_error(
        Code.RESOURCE_EXHAUSTED, stub.Login, pb.LoginRequest(username="heidi", password=PASSWORD)
    )
    time.sleep(1.6)
    assert stub.Login(pb.LoginRequest(username="heidi", password=PASSWORD)).session_token
    expect_error(
        Code.UNAUTHENTICATED, stub.Login, pb.LoginRequest(username="heidi", password="guess guess")
    )
    assert stub.Login(pb.LoginRequest(username="heidi", password=PASSWORD)).session_token


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer "),),
        (("authorization", "Bearer not-a-real-token"),),
        (("authorization", "Basic dXNlcjpwYXNz"),),
        (("authorization", "Bearer " + "x" * 5000),),
    ],
)
def test_calls_without_a_valid_token_are_unauthenticated(
    directory: InProcessDirectory, metadata: tuple[tuple[str, str], ...]
) -> None:
    stub = directory.stub()
    calls: list[tuple[Callable[..., object], object]] = [
        (stub.ListContacts, pb.ListContactsRequest()),
        (stub.AddContact, pb.AddContactRequest(username="someone")),
        (stub.RemoveContact, pb.RemoveContactRequest(username="someone")),
        (stub.Lookup, pb.LookupRequest(username="someone")),
        (stub.Heartbeat, pb.HeartbeatRequest()),
        (stub.Logout, pb.LogoutRequest()),
        (stub.RenewCertificate, pb.RenewCertificateRequest(csr_pem=b"x")),
    ]
    for call, request in calls:
        expect_error(Code.UNAUTHENTICATED, call, request, metadata=metadata)


def test_expired_session_is_refused_and_heartbeat_slides_it(
    make_directory: Callable[..., InProcessDirectory],
) -> None:
    from datetime import timedelta

    directory = make_directory(session_ttl=timedelta(seconds=3))
    stub = directory.stub()
    token = register_and_login(stub, "ivan")
    for _ in range(3):  # 3 x 1.2 s > 3 s: only the heartbeats keep it alive (1.8 s of slack each)
        time.sleep(1.2)
        stub.Heartbeat(pb.HeartbeatRequest(), metadata=auth(token))
    time.sleep(3.3)
    msg = expect_error(
        Code.UNAUTHENTICATED, stub.Heartbeat, pb.HeartbeatRequest(), metadata=auth(token)
    )
    assert "log in again" in msg
    lookup = pb.LookupRequest(username="ivan")
    msg = expect_error(Code.UNAUTHENTICATED, stub.Lookup, lookup, metadata=auth(token))
    assert "log in again" in msg


def test_presence_follows_heartbeats_and_logout(
    make_directory: Callable[..., InProcessDirectory],
) -> None:
    from datetime import timedelta

    directory = make_directory(presence_ttl=timedelta(seconds=1))
    stub = directory.stub()
    judy = register_and_login(stub, "judy")
    ken = register_and_login(stub, "ken")
    add_each_other(stub, ("judy", judy), ("ken", ken))

    def ken_online() -> bool:
        return stub.Lookup(pb.LookupRequest(username="ken"), metadata=auth(judy)).contact.online

    assert ken_online()  # login counts as a heartbeat
    time.sleep(1.2)
    assert not ken_online()
    beat = stub.Heartbeat(pb.HeartbeatRequest(), metadata=auth(ken))
    assert beat.online_until.seconds >= int(time.time())
    assert ken_online()
    listed = stub.ListContacts(pb.ListContactsRequest(), metadata=auth(judy)).contacts
    assert listed[0].online and listed[0].last_seen.seconds >= int(time.time()) - 5
    looked_up = stub.Lookup(pb.LookupRequest(username="ken"), metadata=auth(judy)).contact
    assert looked_up.last_seen == listed[0].last_seen  # Lookup's plain-SQL read agrees, to the µs
    stub.Logout(pb.LogoutRequest(), metadata=auth(ken))
    assert not ken_online()


def test_contact_errors(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    token = register_and_login(stub, "leo")
    mia = register_and_login(stub, "mia")
    md = auth(token)
    expect_error(
        Code.NOT_FOUND, stub.AddContact, pb.AddContactRequest(username="nosuch"), metadata=md
    )
    expect_error(
        Code.INVALID_ARGUMENT, stub.AddContact, pb.AddContactRequest(username="leo"), metadata=md
    )
    expect_error(
        Code.INVALID_ARGUMENT,
        stub.AddContact,
        pb.AddContactRequest(username="mia", address="mia:notaport"),
        metadata=md,
    )
    expect_error(
        Code.INVALID_ARGUMENT, stub.AddContact, pb.AddContactRequest(username="m!a"), metadata=md
    )
    stub.AddContact(pb.AddContactRequest(username="mia", address="mia.lan:6000"), metadata=md)
    stub.AddContact(pb.AddContactRequest(username="leo"), metadata=auth(mia))
    expect_error(
        Code.ALREADY_EXISTS, stub.AddContact, pb.AddContactRequest(username="MIA"), metadata=md
    )
    contact = stub.Lookup(pb.LookupRequest(username="mia"), metadata=md).contact
    assert (contact.address, contact.pinned_address) == ("mia.lan:6000", "mia.lan:6000")
    stub.RemoveContact(pb.RemoveContactRequest(username="mia"), metadata=md)
    expect_error(
        Code.NOT_FOUND, stub.RemoveContact, pb.RemoveContactRequest(username="mia"), metadata=md
    )
    # mia's acceptance stands (she may withdraw it): leo sees her request awaiting him.
    (left,) = stub.ListContacts(pb.ListContactsRequest(), metadata=md).contacts
    assert (left.username, left.state, left.address) == (
        "mia",
        common_pb2.CONTACT_STATE_AWAITING,
        "",
    )
    stub.RemoveContact(pb.RemoveContactRequest(username="leo"), metadata=auth(mia))
    assert list(stub.ListContacts(pb.ListContactsRequest(), metadata=md).contacts) == []


def test_lookup_is_only_for_contacts(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    nick = register_and_login(stub, "nick")
    register_and_login(
        stub,
        "olga",
    )
    msg = expect_error(
        Code.FAILED_PRECONDITION,
        stub.Lookup,
        pb.LookupRequest(username="olga"),
        metadata=auth(nick),
    )
    assert "not in your contacts" in msg
    expect_error(
        Code.NOT_FOUND, stub.Lookup, pb.LookupRequest(username="nobody"), metadata=auth(nick)
    )
    # Contacts are one-way: olga adding nick does not let nick look olga up.
    olga = stub.Login(pb.LoginRequest(username="olga", password=PASSWORD)).session_token
    stub.AddContact(pb.AddContactRequest(username="nick"), metadata=auth(olga))
    expect_error(
        Code.FAILED_PRECONDITION,
        stub.Lookup,
        pb.LookupRequest(username="olga"),
        metadata=auth(nick),
    )


def test_contacts_are_listed_sorted_with_addresses(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    owner = register_and_login(stub, "pat")
    for name in ("zed", "amy", "quinn"):
        token = register_and_login(stub, name, f"{name}.lan:50052")
        add_each_other(stub, ("pat", owner), (name, token))
    listed = stub.ListContacts(pb.ListContactsRequest(), metadata=auth(owner)).contacts
    assert [(c.username, c.address) for c in listed] == [
        ("amy", "amy.lan:50052"),
        ("quinn", "quinn.lan:50052"),
        ("zed", "zed.lan:50052"),
    ]


def test_login_address_replaces_the_registered_one(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    rose = register_and_login(stub, "rose")
    stub.Register(pb.RegisterRequest(username="sam", password=PASSWORD, address="old.lan:1"))
    stub.AddContact(pb.AddContactRequest(username="sam"), metadata=auth(rose))
    sam = stub.Login(pb.LoginRequest(username="sam", password=PASSWORD, address="new.lan:2"))
    stub.AddContact(pb.AddContactRequest(username="rose"), metadata=auth(sam.session_token))
    found = stub.Lookup(pb.LookupRequest(username="sam"), metadata=auth(rose))
    assert found.contact.address == "new.lan:2"
    expect_error(
        Code.INVALID_ARGUMENT,
        stub.Login,
        pb.LoginRequest(username="sam", password=PASSWORD, address="bad address"),
    )


def test_logout_revokes_only_that_session(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    first = register_and_login(stub, "tom")
    second = stub.Login(pb.LoginRequest(username="tom", password=PASSWORD)).session_token
    stub.Logout(pb.LogoutRequest(), metadata=auth(first))
    expect_error(Code.UNAUTHENTICATED, stub.Logout, pb.LogoutRequest(), metadata=auth(first))
    stub.Heartbeat(pb.HeartbeatRequest(), metadata=auth(second))


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)
def test_a_dropped_database_connection_costs_the_hot_reads_nothing(
    make_directory: Callable[..., InProcessDirectory], db_urls: tuple[str, str]
) -> None:
    """PostgreSQL drops the kept connections of the hot reads (a restart, a failover): the
    next Lookup and ListContacts reconnect and answer; no pre-ping round trip needed for it."""
    import psycopg

    directory = make_directory()
    stub = directory.stub()
    judy, ken = register_and_login(stub, "judy"), register_and_login(stub, "ken")
    add_each_other(stub, ("judy", judy), ("ken", ken))
    lookup = pb.LookupRequest(username="ken")
    assert stub.Lookup(lookup, metadata=auth(judy)).contact.username == "ken"
    dsn = db_urls[0].replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn, autocommit=True) as admin:
        dropped = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'p2pchat-directory hot reads'"
        ).fetchone()
    assert dropped is not None and dropped[0] >= 1
    for _ in range(8):  # every worker thread's connection, whichever thread answers
        assert stub.Lookup(lookup, metadata=auth(judy)).contact.username == "ken"
        listed = stub.ListContacts(pb.ListContactsRequest(), metadata=auth(judy)).contacts
        assert [c.username for c in listed] == ["ken"]
