"""Two directory replicas behind one name, as docker-compose.yml's `scale` profile runs them:
PostgreSQL (p2pchat-postgres) on a network of its own with the replicas, which share one data
volume (one CA) and are both `directory` on the deployment's network, where the agents alice and
bob dial `directory:50051` (Docker's DNS gives both addresses; the agents go round-robin).

alice and bob advertise a port where nothing listens, so that every message goes through the
directory's mailbox: a Deposit through one replica and the Collect stream of the other agent,
wherever it is. Then a replica is killed and the conversation goes on through the other.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.containers.conftest import build_images, unavailable
from tests.containers.harness import PASSWORD, wait_until

if TYPE_CHECKING:
    from tests.containers.harness import Deployment

pytestmark = [pytest.mark.containers, pytest.mark.timeout(600)]

REGISTERED = re.compile(r"registered user (\S+)")
# Nothing listens on port 9 in the agents' containers: a dial is refused at once, and what is
# pending goes through the mailbox (after --dial-timeout at most).
MAILBOX_ONLY = {"P2PCHAT_DIAL_TIMEOUT": "1", "P2PCHAT_KEEPALIVE": "2"}


@pytest.fixture(scope="module")
def postgres_image(docker_images: None) -> None:
    """p2pchat-postgres as well: scripts/images.sh with SCALE=1 (only that image is built when
    the others are current; a no-op after .ci/run's `make images OFFLINE=1 SCALE=1`)."""
    problem = build_images(SCALE="1")
    if problem is not None:
        unavailable(f"the PostgreSQL image: {problem}")


@pytest.fixture(scope="module")
def replicas(postgres_image: None) -> Iterator[Deployment]:
    from tests.containers.harness import Deployment

    d = Deployment()
    try:
        db = d.add_network("db")
        d.start_postgres(db)
        d.wait_healthy(["postgres"])
        # Together, on the empty shared volume: one of them makes the CA, the other loads it.
        d.start_directory_replica("directory-a", db)
        d.start_directory_replica("directory-b", db)
        d.wait_healthy(["directory-a", "directory-b"])
        for name in ("alice", "bob"):
            d.start_agent(name, env={**MAILBOX_ONLY, "P2PCHAT_ADVERTISE": f"{name}:9"})
        d.wait_healthy(["alice", "bob"])
        yield d
    finally:
        d.close()


def registered(d: Deployment, replica: str) -> list[str]:
    """The users registered through `replica`, from its log."""
    return REGISTERED.findall(d.logs(replica))


def register(d: Deployment, agent: str, *names: str) -> None:
    for name in names:
        out = d.cli(agent, "register", name, "--password-stdin", input=PASSWORD + "\n")
        assert f"registered {name}" in out


def send_and_wait(d: Deployment, sender: str, receiver: str, body: str) -> None:
    """`sender` sends `body` to `receiver`: it arrives, and the sender sees it delivered."""
    d.cli(sender, "send", receiver, body)

    def arrived() -> bool:
        received = d.cli_json(receiver, "history", sender, "--limit", "100")["messages"]
        return body in [m["body"] for m in received]

    def delivered() -> bool:
        sent = d.cli_json(sender, "history", receiver, "--limit", "100")["messages"]
        return [m["status"] for m in sent if m["body"] == body] == ["delivered"]

    wait_until(arrived, 60, f"{body!r} to reach {receiver}", step=0.5)
    wait_until(delivered, 60, f"{body!r} to be delivered for {sender}", step=0.5)


def test_two_replicas_share_the_ca_and_the_agents_use_both_and_go_on_when_one_is_killed(
    replicas: Deployment,
) -> None:
    d = replicas
    ca = d.read_file("directory-a", "/data/ca.pem")
    assert ca.startswith(b"-----BEGIN CERTIFICATE-----") and ca.count(b"BEGIN CERTIFICATE") == 1
    assert d.read_file("directory-b", "/data/ca.pem") == ca
    assert d.read_file("alice", "/directory/ca.pem") == ca  # published by either replica

    register(d, "alice", "alice")
    register(d, "bob", "bob")
    for user in ("alice", "bob"):
        out = d.cli(user, "login", user, "--password-stdin", input=PASSWORD + "\n")
        assert f"logged in as {user}" in out
    d.cli("alice", "add-contact", "bob")
    d.cli("bob", "add-contact", "alice")
    wait_until(
        lambda: all(d.cli_json(u, "status")["mailbox_connected"] for u in ("alice", "bob")),
        30,
        "both agents to collect from the mailbox",
    )
    send_and_wait(d, "alice", "bob", "through the replicas")

    # One agent's channel spreads its calls over both replicas (round_robin over what Docker's
    # DNS gives for `directory`).
    probes = [f"probe{i}" for i in range(8)]
    register(d, "alice", *probes)
    on_a, on_b = registered(d, "directory-a"), registered(d, "directory-b")
    assert sorted(set(on_a + on_b) & set(probes)) == sorted(probes)
    assert set(on_a) & set(probes) and set(on_b) & set(probes), (on_a, on_b)

    d.kill("directory-a")
    assert d.health("directory-a").startswith("exited")
    # The survivor answers at once: the directory's contact lists, the session of before.
    assert [c["username"] for c in d.cli_json("alice", "contacts")] == ["bob"]
    assert [c["username"] for c in d.cli_json("bob", "contacts")] == ["alice"]
    for user in ("alice", "bob"):
        status = d.cli_json(user, "status")
        assert status["logged_in"] is True and status["username"] == user
    # The mailbox both ways: each Collect stream that was on directory-a opened again on B.
    send_and_wait(d, "alice", "bob", "after directory-a was killed")
    send_and_wait(d, "bob", "alice", "and back")
    survivors = [f"survivor{i}" for i in range(3)]
    register(d, "bob", *survivors)
    assert set(survivors) <= set(registered(d, "directory-b"))

    bodies = [
        m["body"] for m in d.cli_json("bob", "history", "alice", "--limit", "100")["messages"]
    ]
    assert bodies == ["through the replicas", "after directory-a was killed", "and back"]
