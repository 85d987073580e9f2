"""The directory's own identity cannot be confused with a user's: a server holding a certificate
the directory issued to a user named like one of the directory's host names is refused by the
agent (and so by the CLI) before any password is sent; a directory of the first layout (one CA
for both) upgrades itself, and its agents keep working and learn the new root at login."""

from __future__ import annotations

import shutil
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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_agent.identity import make_csr
from p2pchat_common.tls import private_key_pem
from p2pchat_common.validation import normalize_username
from p2pchat_directory.ca import CertificateAuthority
from p2pchat_directory.config import Settings
from tests.support.agent import InProcessAgent, agent_settings, logged_in, wait_until
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


def first_layout_user_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, name: str
) -> tuple[bytes, bytes]:
    """What the first version issued to a user: the name as a DNS name, server use allowed."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


def test_a_first_layout_directory_upgrades_and_its_agents_keep_chatting_and_learn_the_root(
    loop_thread: LoopThread,
    tmp_path: Path,
    impostor: Callable[[bytes, bytes], tuple[int, FakeDirectory]],
) -> None:
    data = tmp_path / "directory"
    old_key, old_cert = first_layout(data)
    old_root = tmp_path / "old-ca.pem"  # what the agents were configured with
    shutil.copy(data / "ca.pem", old_root)
    stolen = first_layout_user_certificate(old_key, old_cert, "localhost")

    directory = InProcessDirectory(
        loop_thread, Settings(listen="127.0.0.1:0", data_dir=data, workers=4)
    )
    agents: list[InProcessAgent] = []
    try:
        files = {p.name for p in data.iterdir()}
        assert {"users-ca.pem", "users-ca-key.pem", "ca-bridge.pem", "legacy-ca.pem"} <= files
        assert "legacy-ca-key.pem" not in files  # the retired key is gone
        assert directory.ca_pem != old_root.read_bytes()
        bridge = x509.load_pem_x509_certificate((data / "ca-bridge.pem").read_bytes())
        bridge.verify_directly_issued_by(old_cert)

        def make(name: str) -> InProcessAgent:
            settings = agent_settings(tmp_path / f"agent-{name}", directory.port, old_root)
            agents.append(InProcessAgent(loop_thread, settings))
            return agents[-1]

        alice, bob = logged_in(make, "alice", "bob")
        sent = alice.send("bob", "still here after the upgrade", wait=10)
        assert sent.status == apb.MESSAGE_STATUS_DELIVERED
        learned = agents[0].settings.data_dir / "directory-root.json"
        assert learned.exists()

        # A certificate the old CA issued before the upgrade, named like the directory, no
        # longer passes with an agent that has logged in since.
        port, fake = impostor(*stolen)
        agents[0].stop()
        agents[0].settings = agent_settings(agents[0].settings.data_dir, port, old_root)
        agents[0].start()
        again = agents[0].client()
        wait_until(lambda: not again.status().directory_reachable, timeout=10)
        expect_error(grpc.StatusCode.UNAVAILABLE, again.login, "alice")
        assert fake.passwords == []
        assert bob.history("alice")[0].body == "still here after the upgrade"
    finally:
        for agent in agents:
            agent.stop()
        directory.stop()
