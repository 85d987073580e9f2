"""The directory's security promises through real gRPC: certificates, malformed input, what the
databases keep, TLS, health and reflection, and a restart that keeps the CA; on both backends."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
import sqlalchemy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from p2pchat.v1 import directory_pb2 as pb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_common.tls import user_identity
from p2pchat_directory.ca import CertificateAuthority
from p2pchat_directory.models import Contact, FailedLogin, User, UserSession
from tests.support.directory import (
    PASSWORD,
    InProcessDirectory,
    add_each_other,
    auth,
    expect_error,
)

Stub = directory_pb2_grpc.DirectoryServiceStub
Code = grpc.StatusCode
SERVICE = "p2pchat.v1.DirectoryService"


def make_csr(key: CertificateIssuerPrivateKeyTypes, common_name: str = "admin") -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def spki_sha256(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def register_and_login(stub: Stub, name: str, password: str = PASSWORD) -> str:
    stub.Register(pb.RegisterRequest(username=name, password=password))
    return stub.Login(pb.LoginRequest(username=name, password=password)).session_token


@contextmanager
def engine(url: str) -> Iterator[sqlalchemy.Engine]:
    eng = sqlalchemy.create_engine(url)
    try:
        yield eng
    finally:
        eng.dispose()


def row_counts(directory: InProcessDirectory) -> dict[str, int]:
    counts: dict[str, int] = {}
    with engine(directory.settings.users_url) as users, users.connect() as conn:
        for model in (User, UserSession, FailedLogin):
            query = sqlalchemy.select(sqlalchemy.func.count()).select_from(model)
            counts[model.__tablename__] = int(conn.scalar(query) or 0)
    with engine(directory.settings.contacts_url) as contacts, contacts.connect() as conn:
        query = sqlalchemy.select(sqlalchemy.func.count()).select_from(Contact)
        counts["contacts"] = int(conn.scalar(query) or 0)
    return counts


def users_column(directory: InProcessDirectory, column: str) -> list[str]:
    with engine(directory.settings.users_url) as users, users.connect() as conn:
        return [str(v) for v in conn.scalars(sqlalchemy.select(getattr(User, column)))]


# -- certificates ----------------------------------------------------------------------------


def test_login_csr_gives_a_ca_signed_certificate_naming_the_user_not_the_csr_subject(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    stub.Register(pb.RegisterRequest(username="Alice", password=PASSWORD))
    key = ec.generate_private_key(ec.SECP256R1())
    login = stub.Login(pb.LoginRequest(username="ALICE", password=PASSWORD, csr_pem=make_csr(key)))

    ca = x509.load_pem_x509_certificate(login.ca_certificate_pem)
    cert = x509.load_pem_x509_certificate(login.certificate_pem)
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "p2pchat user alice"
    assert user_identity(cert) == ("alice", spki_sha256(key)[:16])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["alice.users.p2pchat.invalid"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH} <= set(eku)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    expires = login.certificate_expires_at.ToDatetime(tzinfo=UTC)
    assert abs((cert.not_valid_after_utc - expires).total_seconds()) <= 1
    expected_expiry = datetime.now(UTC) + directory.settings.certificate_ttl
    assert abs((expires - expected_expiry).total_seconds()) < 120

    bob = register_and_login(stub, "bob")
    add_each_other(stub, ("bob", bob), ("alice", login.session_token))
    found = stub.Lookup(pb.LookupRequest(username="alice"), metadata=auth(bob))
    assert found.public_key_sha256 == spki_sha256(key)
    assert found.certificate_pem == login.certificate_pem


def test_renew_certificate_for_a_new_key_changes_the_fingerprint_and_rejects_bad_csrs(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    stub.Register(pb.RegisterRequest(username="carol", password=PASSWORD))
    old_key = ec.generate_private_key(ec.SECP256R1())
    login = stub.Login(
        pb.LoginRequest(username="carol", password=PASSWORD, csr_pem=make_csr(old_key))
    )
    dave = register_and_login(stub, "dave")
    add_each_other(stub, ("dave", dave), ("carol", login.session_token))
    before = stub.Lookup(pb.LookupRequest(username="carol"), metadata=auth(dave))
    assert before.public_key_sha256 == spki_sha256(old_key)

    new_key = ec.generate_private_key(ec.SECP384R1())
    renewed = stub.RenewCertificate(
        pb.RenewCertificateRequest(csr_pem=make_csr(new_key)), metadata=auth(login.session_token)
    )
    assert renewed.certificate_pem != login.certificate_pem
    assert renewed.ca_certificate_pem == login.ca_certificate_pem
    cert = x509.load_pem_x509_certificate(renewed.certificate_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(renewed.ca_certificate_pem))
    assert user_identity(cert) == ("carol", spki_sha256(new_key)[:16])
    after = stub.Lookup(pb.LookupRequest(username="carol"), metadata=auth(dave))
    assert after.public_key_sha256 == spki_sha256(new_key) != before.public_key_sha256
    assert after.certificate_pem == renewed.certificate_pem

    msg = expect_error(
        Code.INVALID_ARGUMENT,
        stub.RenewCertificate,
        pb.RenewCertificateRequest(csr_pem=b""),
        metadata=auth(login.session_token),
    )
    assert "csr" in msg.lower()
    small = make_csr(rsa.generate_private_key(65537, 1024))
    md = auth(login.session_token)
    msg = expect_error(
        Code.INVALID_ARGUMENT,
        stub.RenewCertificate,
        pb.RenewCertificateRequest(csr_pem=small),
        metadata=md,
    )
    assert "too small" in msg
    # A refused renewal leaves the current certificate in place.
    assert stub.Lookup(pb.LookupRequest(username="carol"), metadata=auth(dave)) == after


@pytest.mark.parametrize(
    ("make_bad_csr", "fragment"),
    [
        (lambda _: b"not a csr", "not a valid PEM"),
        (lambda _: b"\xff\xfe\x00 binary", "not a valid PEM"),
        (lambda _: make_csr(ec.generate_private_key(ec.SECP256R1())) + b"\n" * 16_384, "too large"),
        (lambda _: make_csr(rsa.generate_private_key(65537, 1024)), "too small"),
        (lambda _: make_csr(ec.generate_private_key(ec.SECP256K1())), "P-256 or P-384"),
        (lambda d: d.ca_pem, "not a valid PEM"),
    ],
    ids=["garbage", "binary", "oversized", "rsa-1024", "secp256k1", "certificate-not-csr"],
)
def test_login_with_a_bad_csr_is_invalid_argument_and_opens_no_session(
    directory: InProcessDirectory,
    make_bad_csr: Callable[[InProcessDirectory], bytes],
    fragment: str,
) -> None:
    stub = directory.stub()
    stub.Register(pb.RegisterRequest(username="erin", password=PASSWORD))
    before = row_counts(directory)
    msg = expect_error(
        Code.INVALID_ARGUMENT,
        stub.Login,
        pb.LoginRequest(username="erin", password=PASSWORD, csr_pem=make_bad_csr(directory)),
    )
    assert fragment in msg and len(msg) < 300
    assert row_counts(directory) == before
    good = stub.Login(
        pb.LoginRequest(
            username="erin",
            password=PASSWORD,
            csr_pem=make_csr(ec.generate_private_key(ec.SECP256R1())),
        )
    )
    assert good.session_token and good.certificate_pem


# -- malformed requests ----------------------------------------------------------------------


def _field(number: int, value: bytes) -> bytes:
    assert len(value) < 128  # one-byte length varint
    return bytes([number << 3 | 2, len(value)]) + value


@pytest.mark.parametrize("method", ["Register", "Login"])
def test_undecodable_requests_are_invalid_argument_not_internal(
    directory: InProcessDirectory, method: str
) -> None:
    channel = directory.channel()
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None
    )
    password = _field(2, PASSWORD.encode())
    bad_utf8 = expect_error(Code.INVALID_ARGUMENT, call, b"\x0a\x02\xff\xfe" + password)
    assert "UTF-8" in bad_utf8
    bad_address = _field(1, b"gina") + password + _field(3, b"host\xc3:80")
    assert "UTF-8" in expect_error(Code.INVALID_ARGUMENT, call, bad_address)
    for corrupt in (b"\x10\xff\xff", b"\x0a\x05ab", password + b"\x0a"):
        expect_error(Code.INVALID_ARGUMENT, call, corrupt)
    # The same raw path works for a well-formed message, so the errors above are about the bytes.
    if method == "Register":
        assert (
            pb.RegisterResponse.FromString(call(_field(1, b"Gina") + password)).username == "gina"
        )
    else:
        directory.stub().Register(pb.RegisterRequest(username="gina", password=PASSWORD))
        assert pb.LoginResponse.FromString(call(_field(1, b"gina") + password)).username == "gina"


ODD_NAMES = [
    "alice'; DROP TABLE users;--",
    "' OR '1'='1",
    "bob\u0000",
    "\uff41\uff4c\uff49\uff43\uff45",  # fullwidth "alice"
    "alice\u200b",  # zero-width space
    "\u0430lice",  # Cyrillic a
    "\u00e5lice",
    "al ice",
    "\U0001f600smile",
    "alice%",
    "ali_ce\n",
]


def test_injection_and_odd_unicode_usernames_are_rejected_and_change_nothing(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    token = register_and_login(stub, "alice")
    md = auth(token)
    before = row_counts(directory)
    for name in ODD_NAMES:
        expect_error(
            Code.INVALID_ARGUMENT,
            stub.Register,
            pb.RegisterRequest(username=name, password=PASSWORD),
        )
        try:
            stub.Login(pb.LoginRequest(username=name, password=PASSWORD))
            raise AssertionError(f"login as {name!r} succeeded")
        except grpc.RpcError as err:
            assert err.code() in (Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED), (name, err)
        calls: list[tuple[Callable[..., object], object]] = [
            (stub.AddContact, pb.AddContactRequest(username=name)),
            (stub.Lookup, pb.LookupRequest(username=name)),
            (stub.RemoveContact, pb.RemoveContactRequest(username=name)),
        ]
        for call, request in calls:
            expect_error(Code.INVALID_ARGUMENT, call, request, metadata=md)
    assert row_counts(directory) == before
    assert users_column(directory, "username") == ["alice"]
    assert stub.Login(pb.LoginRequest(username="alice", password=PASSWORD)).session_token


def test_register_rejects_a_non_ascii_name_that_lower_cases_to_ascii(
    directory: InProcessDirectory,
) -> None:
    stub = directory.stub()
    expect_error(
        Code.INVALID_ARGUMENT,
        stub.Register,
        pb.RegisterRequest(username="\u212aate", password=PASSWORD),
    )


# -- what the databases keep -----------------------------------------------------------------


def test_unicode_password_works_and_only_its_scrypt_hash_is_stored(
    directory: InProcessDirectory,
) -> None:
    password = "p\u00e4ssw\u00f6rd-\u5bc6\u7801-\U0001f511"
    stub = directory.stub()
    assert register_and_login(stub, "hana", password)
    expect_error(
        Code.UNAUTHENTICATED,
        stub.Login,
        pb.LoginRequest(username="hana", password=password.replace("\u00e4", "a")),
    )
    (stored,) = users_column(directory, "password_hash")
    assert stored.startswith("scrypt$")
    assert password not in stored and "p\u00e4ssw\u00f6rd" not in stored


def test_session_tokens_are_stored_only_as_sha256_hashes(directory: InProcessDirectory) -> None:
    stub = directory.stub()
    token = register_and_login(stub, "ivy")
    with engine(directory.settings.users_url) as users, users.connect() as conn:
        hashes_ = list(conn.scalars(sqlalchemy.select(UserSession.token_hash)))
    assert token not in hashes_
    assert hashes_ == [hashlib.sha256(token.encode()).hexdigest()]


# -- health, reflection, TLS -----------------------------------------------------------------


def test_health_reports_serving_for_the_server_and_the_directory_service(
    directory: InProcessDirectory,
) -> None:
    health = health_pb2_grpc.HealthStub(directory.channel())
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_directory_and_health_services(
    directory: InProcessDirectory,
) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(directory.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def _register_through(channel: grpc.Channel) -> None:
    Stub(channel).Register(pb.RegisterRequest(username="tlsuser", password=PASSWORD), timeout=10)


def test_plaintext_and_untrusting_clients_cannot_talk_to_the_directory(
    directory: InProcessDirectory, tmp_path: Path
) -> None:
    target = f"localhost:{directory.port}"
    with grpc.insecure_channel(target) as plain:
        expect_error(Code.UNAVAILABLE, _register_through, plain)
    other_ca_pem = CertificateAuthority.load_or_create(tmp_path / "other-ca").cert_pem
    other_ca = grpc.ssl_channel_credentials(other_ca_pem)
    with grpc.secure_channel(target, other_ca) as untrusting:
        expect_error(Code.UNAVAILABLE, _register_through, untrusting)
    assert users_column(directory, "username") == []


def test_extra_tls_names_are_in_the_server_certificate_and_others_are_not(
    make_directory: Callable[..., InProcessDirectory],
) -> None:
    directory = make_directory(tls_names=("directory.example",))
    creds = grpc.ssl_channel_credentials(directory.ca_pem)
    target = f"127.0.0.1:{directory.port}"
    override = "grpc.ssl_target_name_override"
    with grpc.secure_channel(target, creds, options=[(override, "other.example")]) as wrong:
        expect_error(Code.UNAVAILABLE, _register_through, wrong)
    with grpc.secure_channel(target, creds, options=[(override, "directory.example")]) as right:
        _register_through(right)
    assert users_column(directory, "username") == ["tlsuser"]


# -- the CA on disk and restarts -------------------------------------------------------------


def test_ca_files_are_private_and_survive_a_restart_with_users_and_contacts(
    directory: InProcessDirectory,
) -> None:
    data_dir = directory.settings.data_dir
    key_path, cert_path = data_dir / "users-ca-key.pem", data_dir / "users-ca.pem"
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(data_dir / "ca-key.pem").st_mode) == 0o600
    root_before = directory.ca_pem
    ca_before = cert_path.read_bytes()
    stub = directory.stub()
    stub.Register(pb.RegisterRequest(username="kim", password=PASSWORD))
    lee = register_and_login(stub, "lee")
    stub.AddContact(pb.AddContactRequest(username="kim"), metadata=auth(lee))
    login = stub.Login(pb.LoginRequest(username="lee", password=PASSWORD))
    assert login.ca_certificate_pem == ca_before

    directory.stop()
    directory.start()

    assert cert_path.read_bytes() == ca_before
    assert directory.ca_pem == root_before
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    stub = directory.stub()
    again = stub.Login(
        pb.LoginRequest(
            username="lee",
            password=PASSWORD,
            csr_pem=make_csr(ec.generate_private_key(ec.SECP256R1())),
        )
    )
    assert again.ca_certificate_pem == ca_before
    x509.load_pem_x509_certificate(again.certificate_pem).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca_before)
    )
    listed = stub.ListContacts(pb.ListContactsRequest(), metadata=auth(again.session_token))
    assert [c.username for c in listed.contacts] == ["kim"]
    # A session opened before the restart is still valid (sessions live in the database).
    stub.Heartbeat(pb.HeartbeatRequest(), metadata=auth(login.session_token))
