"""A private p2pchat deployment on real containers: the directory and agents started with
testcontainers from the built images, on a Docker network of their own, with named volumes.

Everything it makes carries the labels `p2pchat.test.pid=<pid of pytest>` and
`p2pchat.test.host=<hostname>`; `close()` removes it all (containers, their anonymous volumes,
the named volumes, the network), and `sweep_stale()` removes what a killed test run on this host
left behind (its pid is gone), never another live run's.

The agents serve their control API on /data/control.sock inside their containers, as in
production: the tests drive them with `docker exec <agent> p2pchat ...` (the CLI in the image,
which finds the socket through P2PCHAT_DATA_DIR), except `remote_control=True` agents, which
serve it on TCP port 50053, published on the host's 127.0.0.1 so the tests can use the gRPC API
directly. The directory's port is published on 127.0.0.1 too.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import socket
import struct
import subprocess
import termios
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import grpc
from pexpect.fdpexpect import fdspawn
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network

from p2pchat.v1 import agent_pb2_grpc, directory_pb2_grpc

DIRECTORY_IMAGE = os.environ.get("P2PCHAT_DIRECTORY_IMAGE", "p2pchat-directory:latest")
AGENT_IMAGE = os.environ.get("P2PCHAT_AGENT_IMAGE", "p2pchat-agent:latest")
POSTGRES_IMAGE = os.environ.get("P2PCHAT_POSTGRES_IMAGE", "p2pchat-postgres:latest")
# How directory replicas reach their PostgreSQL (the image trusts its own network: samenet).
REPLICA_DB_URL = "postgresql+psycopg://p2pchat@postgres/p2pchat"
LABEL = "p2pchat.test.pid"
HOST_LABEL = "p2pchat.test.host"  # pids are only meaningful on the host (pid namespace) that ran
PASSWORD = "correct horse battery"
SECOND = 1_000_000_000  # the Docker API counts healthcheck times in nanoseconds

# The images' own HEALTHCHECK command, polled faster so that the tests do not wait 5 s each time.
FAST_HEALTHCHECK = {"interval": SECOND, "timeout": 5 * SECOND, "retries": 3, "start_period": 0}


def docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    """Runs the docker CLI; returns its standard output."""
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def docker_problem() -> str | None:
    """Why the Docker engine cannot be used here, or None when it can."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if result.returncode != 0:
        return f"the Docker engine is not reachable: {result.stderr.strip()[:300]}"
    return None


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def sweep_stale() -> None:
    """Removes containers, networks and volumes of earlier test runs whose pytest is gone."""
    kinds = (
        (["container", "ls", "--all"], "{{.ID}}", ["rm", "-f", "-v"]),
        (["network", "ls"], "{{.ID}}", ["network", "rm"]),
        (["volume", "ls"], "{{.Name}}", ["volume", "rm", "-f"]),
    )
    for listing, ident, remove in kinds:
        out = docker(
            *listing,
            "--filter",
            f"label={HOST_LABEL}={socket.gethostname()}",
            "--format",
            f'{ident} {{{{.Label "{LABEL}"}}}}',
        )
        stale = []
        for line in out.splitlines():
            name, _, pid = line.partition(" ")
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                stale.append(name)
        if stale:
            docker(*remove, *stale, check=False)


class Deployment:
    """The directory and the agents of one test module. Not thread-safe."""

    def __init__(self) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self.prefix = f"p2pchat-test-{self.run_id}"
        self.labels = {LABEL: str(os.getpid()), HOST_LABEL: socket.gethostname()}
        self.network = Network(docker_network_kw={"labels": self.labels})
        self.network.name = self.prefix
        self.network.create()
        self.volumes: list[str] = []
        self.networks: list[str] = []  # more networks than the main one (add_network)
        self.containers: dict[str, DockerContainer] = {}
        self.remote_control: set[str] = set()
        self._channels: list[grpc.Channel] = []

    # -- lifecycle ----------------------------------------------------------------------------
    def volume(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        if name not in self.volumes:
            labels = [f"--label={key}={value}" for key, value in self.labels.items()]
            docker("volume", "create", *labels, name)
            self.volumes.append(name)
        return name

    def add_network(self, role: str) -> Network:
        """Another network of this deployment (removed by `close`)."""
        network = Network(docker_network_kw={"labels": self.labels})
        network.name = f"{self.prefix}-{role}"
        network.create()
        self.networks.append(network.name)
        return network

    def connect(self, service: str, network: Network, alias: str) -> None:
        """Attaches a running container to `network` too, reached there as `alias`."""
        docker("network", "connect", "--alias", alias, network.name, self.name_of(service))

    def _container(
        self, name: str, image: str, alias: str, network: Network | None = None
    ) -> DockerContainer:
        container = (
            DockerContainer(image)
            .with_name(f"{self.prefix}-{name}")
            .with_network(network or self.network)
            .with_network_aliases(alias)
            .with_kwargs(labels=self.labels, healthcheck=FAST_HEALTHCHECK, hostname=alias)
        )
        return container

    @staticmethod
    def _publish_on_loopback(container: DockerContainer, port: int) -> None:
        # Published on the host's 127.0.0.1 only, on a free port.
        cast(dict[str, Any], container.ports)[f"{port}/tcp"] = ("127.0.0.1", None)

    def start_directory(self) -> None:
        """Starts (or starts anew, on the same volumes) the directory, and waits until healthy."""
        container = (
            self._container("directory", DIRECTORY_IMAGE, "directory")
            .with_command(["--tls-name", "directory"])
            .with_volume_mapping(self.volume("directory-data"), "/data", "rw")
            .with_volume_mapping(self.volume("directory-ca"), "/ca", "rw")
        )
        self._publish_on_loopback(container, 50051)
        self.containers["directory"] = container
        container.start()

    def start_postgres(self, network: Network) -> None:
        """Starts PostgreSQL (p2pchat-postgres) on `network`, reached there as `postgres`."""
        container = self._container("postgres", POSTGRES_IMAGE, "postgres", network)
        cluster = "/var/lib/postgresql/data"
        container.with_volume_mapping(self.volume("postgres-data"), cluster, "rw")
        self.containers["postgres"] = container
        container.start()

    def start_directory_replica(self, name: str, db_network: Network) -> None:
        """Starts directory replica `name` on PostgreSQL (start_postgres on `db_network`), with
        the data volumes every replica shares (one CA), then puts it on the deployment's network
        as `directory` too: the name the agents dial resolves to every replica."""
        container = (
            self._container(name, DIRECTORY_IMAGE, name, db_network)
            .with_command(["--tls-name", "directory"])
            .with_env("P2PCHAT_USERS_DB", REPLICA_DB_URL)
            .with_env("P2PCHAT_CONTACTS_DB", REPLICA_DB_URL)
            .with_volume_mapping(self.volume("directory-data"), "/data", "rw")
            .with_volume_mapping(self.volume("directory-ca"), "/ca", "rw")
        )
        self.containers[name] = container
        container.start()
        aliases = ["--alias", "directory", "--alias", name]
        docker("network", "connect", *aliases, self.network.name, self.name_of(name))

    def kill(self, service: str) -> None:
        """SIGKILL (`docker kill`): the container gets no chance to close anything."""
        docker("kill", self.name_of(service))

    def start_agent(
        self,
        name: str,
        remote_control: bool = False,
        network: Network | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Starts the agent container `name` (reached by the others at name:50052), on the
        deployment's network or on `network`."""
        container = (
            self._container(name, AGENT_IMAGE, name, network)
            .with_env("P2PCHAT_DIRECTORY", "directory:50051")
            .with_env("P2PCHAT_DIRECTORY_CA", "/directory/ca.pem")
            .with_env("P2PCHAT_ADVERTISE", f"{name}:50052")
            .with_env("P2PCHAT_HEARTBEAT_INTERVAL", "2")
            .with_env("P2PCHAT_RETRY_MAX", "2")
            .with_volume_mapping(self.volume(f"{name}-data"), "/data", "rw")
            .with_volume_mapping(self.volume("directory-ca"), "/directory", "ro")
        )
        for key, value in (env or {}).items():
            container.with_env(key, value)
        if remote_control:
            # Published on the host's loopback only; inside the container it must bind 0.0.0.0.
            container.with_env("P2PCHAT_CONTROL_LISTEN", "0.0.0.0:50053")
            container.with_env("P2PCHAT_ALLOW_REMOTE_CONTROL", "1")
            self._publish_on_loopback(container, 50053)
            self.remote_control.add(name)
        self.containers[name] = container
        container.start()

    def name_of(self, service: str) -> str:
        return f"{self.prefix}-{service}"

    def health(self, service: str) -> str:
        return docker(
            "inspect", "-f", "{{.State.Status}}/{{.State.Health.Status}}", self.name_of(service)
        ).strip()

    def wait_healthy(self, services: Sequence[str], timeout: float = 90) -> None:
        def healthy() -> bool:
            states = {s: self.health(s) for s in services}
            for service, state in states.items():
                if state.startswith(("exited", "dead")):
                    raise RuntimeError(f"{service} stopped: {self.logs(service)[-3000:]}")
            return all(state == "running/healthy" for state in states.values())

        wait_until(healthy, timeout, f"{', '.join(services)} to be healthy", step=0.5)

    def stop(self, service: str, timeout: int = 10) -> None:
        docker("stop", "--time", str(timeout), self.name_of(service), timeout=timeout + 30)

    def start(self, service: str) -> None:
        docker("start", self.name_of(service))

    def remove(self, service: str) -> None:
        """Stops (SIGTERM) and removes the container; its named volumes stay."""
        self.stop(service)
        docker("rm", "-v", self.name_of(service))
        del self.containers[service]

    def logs(self, service: str) -> str:
        result = subprocess.run(
            ["docker", "logs", "--tail", "200", self.name_of(service)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result.stdout + result.stderr

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        names = [self.name_of(s) for s in self.containers]
        if names:
            docker("rm", "-f", "-v", *names, check=False, timeout=120)
        self.containers.clear()
        for network in self.networks:
            docker("network", "rm", network, check=False)
        docker("network", "rm", self.prefix, check=False)
        if self.volumes:
            docker("volume", "rm", "-f", *self.volumes, check=False)

    # -- driving ------------------------------------------------------------------------------
    def exec(
        self, service: str, *argv: str, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`docker exec -i <service> argv...`, as the image's user."""
        return subprocess.run(
            ["docker", "exec", "-i", self.name_of(service), *argv],
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @contextmanager
    def terminal(self, service: str, *argv: str, log: Any = None) -> Iterator[Any]:
        """`docker exec -it <service> argv...` on a pseudo-terminal of 40x120, as a person at a
        terminal runs it; yields a pexpect handle on the terminal (its output goes to `log`).

        Started with subprocess (fork+exec in C) rather than pexpect.spawn, whose fork runs
        Python's at-fork hooks in a copy of this process: gRPC's, with this process's channels
        open, can break the child before it execs docker."""
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        process = subprocess.Popen(
            ["docker", "exec", "-it", self.name_of(service), *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        term = fdspawn(master, timeout=20, encoding="utf-8")
        term.logfile_read = log
        try:
            yield term
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
            os.close(master)

    def cli(self, service: str, *args: str, input: str | None = None, timeout: float = 60) -> str:
        """Runs `p2pchat ARGS` inside the agent's container; fails the test on a non-zero exit."""
        result = self.exec(service, "p2pchat", *args, input=input, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(
                f"`p2pchat {' '.join(args)}` in {service} exited {result.returncode}: "
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def cli_json(self, service: str, *args: str) -> Any:
        return json.loads(self.cli(service, *args, "--json"))

    def read_file(self, service: str, path: str) -> bytes:
        result = subprocess.run(
            ["docker", "exec", self.name_of(service), "cat", path],
            capture_output=True,
            timeout=30,
            check=True,
        )
        return result.stdout

    def published_port(self, service: str, port: int) -> int:
        mapping = docker("port", self.name_of(service), f"{port}/tcp").split()[0]
        host, _, published = mapping.rpartition(":")
        assert host == "127.0.0.1", mapping
        return int(published)

    def directory_stub(self) -> directory_pb2_grpc.DirectoryServiceStub:
        """The directory's gRPC API from the host, over TLS, trusting the CA in its volume."""
        ca_pem = self.read_file("directory", "/data/ca.pem")
        channel = grpc.secure_channel(
            f"127.0.0.1:{self.published_port('directory', 50051)}",
            grpc.ssl_channel_credentials(ca_pem),
            options=[("grpc.ssl_target_name_override", "directory")],
        )
        self._channels.append(channel)
        return directory_pb2_grpc.DirectoryServiceStub(channel)

    def agent_stub(self, service: str) -> agent_pb2_grpc.AgentServiceStub:
        """The control API of a `remote_control` agent, from the host."""
        assert service in self.remote_control, f"{service} was not started with remote_control"
        channel = grpc.insecure_channel(f"127.0.0.1:{self.published_port(service, 50053)}")
        self._channels.append(channel)
        return agent_pb2_grpc.AgentServiceStub(channel)
