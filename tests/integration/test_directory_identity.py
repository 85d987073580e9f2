"""The directory's own identity cannot be confused with a user's: a server holding a certificate
the directory issued to a user named like one of the directory's host names is refused by the
agent (and so by the CLI) before any password is sent; a directory of the first layout (one CA
for both) upgrades itself, and its agents keep working."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_agent.identity import make_csr
from p2pchat_common.tls import private_key_pem, self_signed
from p2pchat_common.validation import normalize_username
from p2pchat_directory import repository as repo
from p2pchat_directory.ca import CertificateAuthority
from p2pchat_directory.config import Settings
from p2pchat_directory.db import Databases
from p2pchat_directory.models import User
from tests.support.agent import InProcessAgent, agent_settings, logged_in
from tests.support.cli import run_cli
from tests.support.directory import PASSWORD, InProcessDirectory, expect_error
from tests.support.loop_thread import LoopThread


@dataclass
class FakeDirectory(directory_pb2_grpc.DirectoryServiceServicer):
    """A directory impostor: counts every password that reaches it."""

    passwords: list[str] = field(default_factory=list)

    def Register(self, request: dpb.RegisterRequest, context: Any) -> dpb.RegisterResponse:
        self.passwords.append(request.password)
        return dpb.RegisterResponse(username=request.username)

    def Login(self, request: dpb.LoginRequest, context: Any) -> dpb.LoginResponse:
        self.passwords.append(request.password)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no")
        raise AssertionError("unreachable")


@pytest.fixture
def impostor() -> Iterator[Callable[[bytes, bytes], tuple[int, FakeDirectory]]]:
    """Serves a FakeDirectory with a given (certificate chain, key) on a loopback port."""
    servers: list[grpc.Server] = []

    def serve(chain_pem: bytes, key_pem: bytes) -> tuple[int, FakeDirectory]:
        fake = FakeDirectory()  # type: ignore[abstract]  # the stubs mark every RPC abstract
        server = grpc.server(ThreadPoolExecutor(2))
        directory_pb2_grpc.add_DirectoryServiceServicer_to_server(fake, server)
        port = server.add_secure_port(
            "127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, chain_pem)])
        )
        server.start()
        servers.append(server)
        return port, fake

    try:
        yield serve
    finally:
        for server in servers:
            server.stop(0)


def user_certificate(ca: CertificateAuthority, name: str) -> tuple[bytes, bytes]:
    """(certificate, key) the directory's CA issues to a user called `name`."""
    key = private_key_pem(ec.generate_private_key(ec.SECP256R1()))
    return ca.sign_agent_csr(make_csr(key, name), name, timedelta(hours=1)).pem, key


def directory_names() -> list[str]:
    """Names a directory is served under that are also valid usernames: what a user would
    register to pose as it."""
    names = ["localhost", "directory"]
    try:
        names.append(normalize_username(socket.gethostname()))
    except Exception:  # a host name that is no valid username cannot be registered anyway
        pass
    return names


def test_a_user_certificate_named_like_the_directory_does_not_pass_as_the_directory(
    agent_directory: InProcessDirectory,
    impostor: Callable[[bytes, bytes], tuple[int, FakeDirectory]],
) -> None:
    ca = CertificateAuthority.load_or_create(agent_directory.settings.data_dir)
    root = grpc.ssl_channel_credentials(agent_directory.ca_pem)
    for name in directory_names():
        port, fake = impostor(*user_certificate(ca, name))
        options = [("grpc.ssl_target_name_override", name)]
        with grpc.secure_channel(f"127.0.0.1:{port}", root, options=options) as channel:
            stub = directory_pb2_grpc.DirectoryServiceStub(channel)
            request = dpb.LoginRequest(username="alice", password=PASSWORD)
            expect_error(grpc.StatusCode.UNAVAILABLE, stub.Login, request, timeout=5)
        assert fake.passwords == [], name


def test_the_agent_and_the_cli_refuse_an_impostor_before_sending_a_password(
    make_agent: Callable[..., InProcessAgent],
    agent_directory: InProcessDirectory,
    impostor: Callable[[bytes, bytes], tuple[int, FakeDirectory]],
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.load_or_create(agent_directory.settings.data_dir)
    port, fake = impostor(*user_certificate(ca, "localhost"))
    agent = make_agent("alice", directory=f"localhost:{port}")
    client = agent.client()
    message = expect_error(grpc.StatusCode.UNAVAILABLE, client.login, "alice")
    assert "directory" in message
    for command in (["login", "alice"], ["register", "alice"]):
        result = run_cli(
            agent.server.control_port, tmp_path, *command, "--password-stdin", stdin=PASSWORD
        )
        assert result.returncode == 2, result.stderr
        assert "directory" in result.stderr
    assert fake.passwords == []
    assert not (agent.settings.data_dir / "alice.key").exists()


@pytest.mark.parametrize("name", ["localhost", "directory", "Admin", "root", "system", "chatdir"])
def test_names_that_read_as_the_system_are_reserved(
    make_directory: Callable[..., InProcessDirectory], name: str
) -> None:
    directory = make_directory(tls_names=("chatdir",))
    stub = directory.stub()
    message = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.Register,
        dpb.RegisterRequest(username=name, password=PASSWORD),
    )
    assert "reserved" in message


# -- upgrading a directory of the first layout -------------------------------------------------


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def first_layout(data_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A data dir as the first version left it: one CA (ca.pem, ca-key.pem) for everything."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("p2pchat directory CA 0ld0"))
        .issuer_name(_name("p2pchat directory CA 0ld0"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    data_dir.mkdir(parents=True)
    (data_dir / "ca-key.pem").write_bytes(private_key_pem(key))
    (data_dir / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def test_a_first_layout_directory_upgrades_and_its_agents_keep_chatting(
    loop_thread: LoopThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "directory"
    first_layout(data)
    old_root = (data / "ca.pem").read_bytes()
    configured = tmp_path / "old-ca.pem"  # what the agents were configured with
    configured.write_bytes(old_root)
    settings = Settings(listen="127.0.0.1:0", data_dir=data, workers=4)
    # An account the first version let someone register under a name the directory has.
    dbs = Databases.open(settings.users_url, settings.contacts_url)
    with dbs.users() as s, s.begin():
        now = datetime.now(UTC)
        repo.add_user(s, User(username="localhost", password_hash="x", created_at=now))
    dbs.dispose()

    with caplog.at_level(logging.WARNING):
        directory = InProcessDirectory(loop_thread, settings)
    agents: list[InProcessAgent] = []
    try:
        assert (data / "ca.pem").read_bytes() == old_root  # every client keeps its ca.pem
        users_ca = x509.load_pem_x509_certificate((data / "users-ca.pem").read_bytes())
        assert users_ca.public_key() != x509.load_pem_x509_certificate(old_root).public_key()
        warned = [r.getMessage() for r in caplog.records if "named like this" in r.getMessage()]
        assert warned and "localhost" in warned[0]

        def make(name: str) -> InProcessAgent:
            agent_dir = tmp_path / f"agent-{name}"
            agents.append(
                InProcessAgent(loop_thread, agent_settings(agent_dir, directory.port, configured))
            )
            return agents[-1]

        alice, bob = logged_in(make, "alice", "bob")
        sent = alice.send("bob", "still here after the upgrade", wait=10)
        assert sent.status == apb.MESSAGE_STATUS_DELIVERED
        peer_ca = (agents[0].settings.data_dir / "peer-ca.pem").read_bytes()
        assert peer_ca == directory.users_ca_pem  # learned at login
        assert bob.history("alice")[0].body == "still here after the upgrade"
    finally:
        for agent in agents:
            agent.stop()
        directory.stop()


def test_with_an_operator_certificate_login_names_no_root_and_agents_keep_working(
    make_directory: Callable[..., InProcessDirectory],
    loop_thread: LoopThread,
    tmp_path: Path,
) -> None:
    cert_pem, key_pem = self_signed("directory.example", ["localhost"])
    (tmp_path / "op.pem").write_bytes(cert_pem)
    (tmp_path / "op-key.pem").write_bytes(key_pem)
    directory = make_directory(tls_cert=tmp_path / "op.pem", tls_key=tmp_path / "op-key.pem")
    stub = directory_pb2_grpc.DirectoryServiceStub(
        grpc.secure_channel(f"localhost:{directory.port}", grpc.ssl_channel_credentials(cert_pem))
    )
    stub.Register(dpb.RegisterRequest(username="zed", password=PASSWORD))
    login = stub.Login(dpb.LoginRequest(username="zed", password=PASSWORD))
    assert login.directory_ca_pem == b""  # the root of this channel is the operator's
    assert login.ca_certificate_pem == directory.users_ca_pem
    agents: list[InProcessAgent] = []

    def make(name: str) -> InProcessAgent:
        settings = agent_settings(tmp_path / f"agent-{name}", directory.port, tmp_path / "op.pem")
        agents.append(InProcessAgent(loop_thread, settings))
        return agents[-1]

    try:
        alice, bob = logged_in(make, "alice", "bob")
        assert alice.send("bob", "hi", wait=10).status == apb.MESSAGE_STATUS_DELIVERED
        assert alice.status().directory_reachable
    finally:
        for agent in agents:
            agent.stop()
