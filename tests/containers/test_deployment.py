"""p2pchat as its users run it: one directory container and one container per user, on a private
Docker network, from the images that `make images` builds.

alice and bob are driven through the CLI inside their containers (`docker exec ... p2pchat`),
carol through her agent's gRPC control API and the directory through its gRPC API from the host
(TLS, trusting the CA read from the directory's volume). The tests run in order on one
deployment: each step builds on the state the previous ones left, as a person's session would.
"""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from typing import TYPE_CHECKING

import grpc
import pexpect
import pytest

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import directory_pb2 as dpb
from tests.containers.harness import PASSWORD, docker, wait_until

if TYPE_CHECKING:
    from tests.containers.harness import Deployment

# Container starts, restarts and a 400-message burst: more than the default 120 s per test;
# the first test also waits for the images (built by scripts/images.sh when missing).
pytestmark = [pytest.mark.containers, pytest.mark.timeout(600)]

BURST = 200


def login_cli(d: Deployment, user: str) -> None:
    out = d.cli(user, "register", user, "--password-stdin", input=PASSWORD + "\n")
    assert f"registered {user}" in out
    out = d.cli(user, "login", user, "--password-stdin", input=PASSWORD + "\n")
    assert f"logged in as {user}; reachable at {user}:50052" in out


def history(d: Deployment, user: str, peer: str) -> list[dict[str, str]]:
    """`p2pchat history PEER --json` inside USER's container: the messages in USER's db."""
    data = d.cli_json(user, "history", peer, "--limit", "1000")
    assert data["has_more"] is False
    messages: list[dict[str, str]] = data["messages"]
    return messages


def bodies(d: Deployment, user: str, peer: str, prefix: str = "") -> list[str]:
    return [m["body"] for m in history(d, user, peer) if m["body"].startswith(prefix)]


def pending(d: Deployment, user: str) -> int:
    if user in d.remote_control:
        return int(d.agent_stub(user).Status(apb.StatusRequest(), timeout=10).pending_messages)
    return int(d.cli_json(user, "status")["pending_messages"])


def directory_session(d: Deployment, user: str) -> tuple[tuple[str, str], ...]:
    response = d.directory_stub().Login(
        dpb.LoginRequest(username=user, password=PASSWORD), timeout=10
    )
    return (("authorization", f"Bearer {response.session_token}"),)


# -- the images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["directory", "alice"])
def test_services_run_as_a_non_root_user_with_data_in_the_data_volume(
    deployment: Deployment, service: str
) -> None:
    d = deployment
    assert d.exec(service, "id", "-u").stdout.strip() != "0"
    mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", d.name_of(service)))
    data = [m for m in mounts if m["Destination"] == "/data"]
    assert data and data[0]["Type"] == "volume" and data[0]["Name"] == d.volume(f"{service}-data")
    config = json.loads(docker("inspect", "-f", "{{json .Config}}", d.name_of(service)))
    assert config["Healthcheck"]["Test"][0] == "CMD"  # the image's gRPC health check
    assert "/data" in config["Volumes"]
    assert d.health(service) == "running/healthy"


def test_the_directory_ca_reaches_the_agents_read_only_and_its_key_does_not(
    deployment: Deployment,
) -> None:
    d = deployment
    ca = d.read_file("directory", "/data/ca.pem")
    assert ca.startswith(b"-----BEGIN CERTIFICATE-----")
    assert d.read_file("alice", "/directory/ca.pem") == ca
    assert d.exec("alice", "ls", "/directory").stdout.split() == ["ca.pem"]
    write = d.exec("alice", "sh", "-c", "echo x > /directory/ca.pem")
    assert write.returncode != 0 and "Read-only file system" in write.stderr


# -- registration, login, contacts --------------------------------------------------------------


def test_register_login_and_contacts_through_the_cli_and_the_grpc_apis(
    deployment: Deployment,
) -> None:
    d = deployment
    login_cli(d, "alice")
    login_cli(d, "bob")
    carol = d.agent_stub("carol")
    carol.Register(apb.AgentRegisterRequest(username="carol", password=PASSWORD), timeout=30)
    login = carol.Login(apb.AgentLoginRequest(username="carol", password=PASSWORD), timeout=30)
    assert login.address == "carol:50052"

    # Contact consent: alice's first add is a request; bob's add back accepts it.
    assert "added bob: request sent" in d.cli("alice", "add-contact", "bob")
    d.cli("alice", "add-contact", "carol")
    d.cli("bob", "add-contact", "alice")
    d.cli("bob", "add-contact", "carol")
    for peer in ("alice", "bob"):
        carol.AddContact(apb.AgentAddContactRequest(username=peer), timeout=30)

    contacts = {c["username"]: c for c in d.cli_json("alice", "contacts")}
    assert set(contacts) == {"bob", "carol"}
    assert contacts["bob"]["address"] == "bob:50052" and contacts["bob"]["online"] is True
    listed = carol.ListContacts(apb.AgentListContactsRequest(), timeout=30).contacts
    assert sorted((c.username, c.address, c.online) for c in listed) == [
        ("alice", "alice:50052", True),
        ("bob", "bob:50052", True),
    ]

    # The directory's own API, from the host: what it stored for alice.
    session = directory_session(d, "alice")
    stored = d.directory_stub().ListContacts(
        dpb.ListContactsRequest(), metadata=session, timeout=10
    )
    assert sorted(c.username for c in stored.contacts) == ["bob", "carol"]


# -- a conversation ------------------------------------------------------------------------------


def test_alice_and_bob_chat_in_real_time(deployment: Deployment) -> None:
    d = deployment
    # bob in the interactive chat screen of the CLI in his container, as a person would be.
    screen = io.StringIO()  # everything bob's terminal showed, for the failure message
    with d.terminal("bob", "p2pchat", "chat", "alice", log=screen) as chat:
        try:
            chat.expect("you are live")
        except pexpect.ExceptionPexpect as exc:
            raise AssertionError(f"bob's chat screen did not open:\n{screen.getvalue()}") from exc
        started = time.monotonic()
        sent = d.cli("alice", "send", "bob", "hi bob, alice here", "--wait", "10")
        assert sent.split()[-1] == "delivered", sent
        chat.expect("alice: hi bob, alice here")
        assert time.monotonic() - started < 10  # delivered live, not on a retry

        chat.sendline("hello alice, bob here")
        wait_until(
            lambda: "hello alice, bob here" in bodies(d, "alice", "bob"),
            15,
            "bob's reply in alice's history",
        )
        chat.sendline("/quit")
        chat.expect(pexpect.EOF)

    # Both sides agree on the conversation, in order, with their own directions.
    alice_side = [(m["direction"], m["body"]) for m in history(d, "alice", "bob")]
    bob_side = [(m["direction"], m["body"]) for m in history(d, "bob", "alice")]
    assert alice_side == [("outgoing", "hi bob, alice here"), ("incoming", "hello alice, bob here")]
    assert bob_side == [("incoming", "hi bob, alice here"), ("outgoing", "hello alice, bob here")]


def test_history_lives_in_each_containers_own_database(deployment: Deployment) -> None:
    d = deployment
    count_sql = (
        "import sqlite3, sys; db = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True); "
        "print(db.execute('SELECT count(*) FROM messages WHERE body = ?', (sys.argv[2],))"
        ".fetchone()[0])"
    )
    for user in ("alice", "bob"):
        files = d.exec(user, "ls", "/data").stdout.split()
        others = {"alice.db", "bob.db", "carol.db"} - {f"{user}.db"}
        assert f"{user}.db" in files and not others & set(files), files
        count = d.exec(user, "python", "-c", count_sql, f"/data/{user}.db", "hi bob, alice here")
        assert count.stdout.strip() == "1", count.stderr


def modes_under(d: Deployment, service: str, folder: str) -> dict[str, str]:
    """The mode of `folder` and of everything under it (dot files and sub-folders too) inside
    `service`, as `stat -c '%a'` shows it; folders get a trailing "/"."""
    listing = d.exec(service, "find", folder, "-printf", "%m %y %p\\n")
    assert listing.returncode == 0, listing.stderr
    modes = {}
    for line in listing.stdout.splitlines():
        mode, kind, path = line.split(" ", 2)
        modes[path + ("/" if kind == "d" else "")] = mode
    return modes


@pytest.mark.parametrize("service", ["directory", "alice", "carol"])
def test_data_volumes_are_0700_with_0600_files_but_the_public_ca_certificate(
    deployment: Deployment, service: str
) -> None:
    d = deployment
    modes = modes_under(d, service, "/data")
    folders = {path: mode for path, mode in modes.items() if path.endswith("/")}
    assert folders.pop("/data/") == "700", modes
    assert {path: mode for path, mode in folders.items() if mode != "700"} == {}  # ~/.local: CLI
    files = {path: mode for path, mode in modes.items() if not path.endswith("/")}
    if service == "directory":
        assert files.pop("/data/ca.pem") == "644", modes
        for name in ("ca-key.pem", "users.db", "users.db-wal", "users.db-shm", "contacts.db"):
            assert f"/data/{name}" in files, modes
        # Other CA certificates the directory keeps are public by design too; never a key.
        public = {n: files.pop(n) for n in list(files) if n.endswith(".pem") and "key" not in n}
        assert set(public.values()) <= {"644"}, modes
        # The folder the healthcheck publishes ca.pem into, for the agents to read.
        published = modes_under(d, "directory", "/ca")
        assert published.pop("/ca/") == "755" and "/ca/ca.pem" in published, published
        assert set(published.values()) == {"644"}, published
    else:
        for name in (".key", ".crt", ".db", ".db-wal", ".db-shm"):
            assert f"/data/{service}{name}" in files, modes
        assert "/data/session.json" in files, modes
        # alice serves her control API on the socket; carol (remote control) on TCP.
        assert ("/data/control.sock" in files) == (service not in d.remote_control), modes
    assert files and {path: mode for path, mode in files.items() if mode != "600"} == {}


# -- failures ------------------------------------------------------------------------------------


def test_a_burst_to_bob_whose_container_stops_midway_is_delivered_exactly_once(
    deployment: Deployment,
) -> None:
    """alice (a script in her container, on her control socket) and carol (from the host) each
    send BURST messages to bob; bob's container is stopped (SIGTERM) while carol's messages are
    flowing, and started again after the burst. bob's database then holds every message once,
    in each sender's order, and the senders hold every message as delivered."""
    d = deployment
    tag = f"burst-{d.run_id}"
    # alice sends half, waits for a line on stdin (bob is down by then), sends the rest.
    alice_script = (
        "import sys, time, grpc\n"
        "from p2pchat.v1 import agent_pb2, agent_pb2_grpc\n"
        "channel = grpc.insecure_channel('unix:/data/control.sock')\n"
        "stub = agent_pb2_grpc.AgentServiceStub(channel)\n"
        "n, prefix = int(sys.argv[1]), sys.argv[2]\n"
        "for i in range(n):\n"
        "    if i == n // 2:\n"
        "        print('half', flush=True)\n"
        "        sys.stdin.readline()\n"
        "    stub.Send(agent_pb2.SendRequest(peer='bob', body=f'{prefix}-{i:03d}'), timeout=30)\n"
        "    time.sleep(0.01)\n"
        "print('done', flush=True)\n"
    )
    alice = subprocess.Popen(
        [
            "docker",
            "exec",
            "-i",
            d.name_of("alice"),
            "python",
            "-c",
            alice_script,
            str(BURST),
            f"{tag}-alice",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert alice.stdin is not None and alice.stdout is not None
    stopper = threading.Thread(target=d.stop, args=("bob",))
    try:
        carol = d.agent_stub("carol")
        for i in range(BURST):
            if i == BURST // 4:
                stopper.start()  # bob goes down while carol's messages are on their way
            if i == 3 * BURST // 4:
                stopper.join(timeout=60)  # the last quarter is sent while bob is down
                assert d.health("bob").startswith("exited")
            carol.Send(apb.SendRequest(peer="bob", body=f"{tag}-carol-{i:03d}"), timeout=30)
            time.sleep(0.01)
        assert alice.stdout.readline().strip() == "half"
        alice.stdin.write("go\n")
        alice.stdin.flush()
        out, err = alice.communicate(timeout=120)
    finally:
        if alice.poll() is None:
            alice.kill()
            alice.wait()
        if stopper.is_alive():
            stopper.join(timeout=60)
    assert alice.returncode == 0 and out.split() == ["done"], err

    assert d.health("bob").startswith("exited")
    # While bob is down, what he has not acknowledged waits in the senders' queues.
    assert pending(d, "carol") >= BURST // 4 and pending(d, "alice") >= BURST // 2

    d.start("bob")
    d.wait_healthy(["bob"])
    wait_until(
        lambda: pending(d, "carol") == 0 and pending(d, "alice") == 0,
        120,
        "alice's and carol's queues to bob to drain",
        step=1.0,
    )
    for sender in ("alice", "carol"):
        expected = [f"{tag}-{sender}-{i:03d}" for i in range(BURST)]
        assert bodies(d, "bob", sender, f"{tag}-{sender}-") == expected  # all, once, in order
        sent = [m for m in history(d, sender, "bob") if m["body"].startswith(tag)]
        assert len(sent) == BURST and {m["status"] for m in sent} == {"delivered"}


def test_the_directory_restarted_from_its_volume_keeps_users_contacts_and_ca(
    deployment: Deployment,
) -> None:
    d = deployment
    ca_before = d.read_file("directory", "/data/ca.pem")
    key_before = d.read_file("directory", "/data/ca-key.pem")

    # A new container on the same volumes: only what the volume holds can survive.
    d.remove("directory")
    d.start_directory()
    d.wait_healthy(["directory"])

    assert d.read_file("directory", "/data/ca.pem") == ca_before
    assert d.read_file("directory", "/data/ca-key.pem") == key_before
    assert d.read_file("alice", "/directory/ca.pem") == ca_before

    # Users and passwords: a fresh login from the host; contacts: the directory's own list.
    session = directory_session(d, "bob")
    stored = d.directory_stub().ListContacts(
        dpb.ListContactsRequest(), metadata=session, timeout=10
    )
    assert sorted(c.username for c in stored.contacts) == ["alice", "carol"]
    with pytest.raises(grpc.RpcError) as bad:
        d.directory_stub().Login(dpb.LoginRequest(username="alice", password="wrong password"))
    assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # The agents go on with the new container, on their stored sessions, trusting the same CA.
    def bob_online_for_alice() -> bool:
        try:
            contacts = d.cli_json("alice", "contacts")
        except AssertionError:  # the CLI's exit 2 while the directory is not reached yet
            return False
        return any(c["online"] for c in contacts if c["username"] == "bob")

    wait_until(bob_online_for_alice, 60, "alice to see bob online again", step=1.0)
    sent = d.cli("alice", "send", "bob", "after the directory restart", "--wait", "20")
    assert sent.split()[-1] == "delivered", sent
    assert "after the directory restart" in bodies(d, "bob", "alice")
