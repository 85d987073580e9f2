"""Test handles for agents: in-process on the shared test loop, or as `p2pchat-agent` processes."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import agent_pb2_grpc, common_pb2
from p2pchat_agent.config import MAX_CONTROL_MESSAGE, Settings
from p2pchat_agent.server import AgentServer, create_agent
from tests.support.directory import PASSWORD
from tests.support.loop_thread import LoopThread
from tests.support.process import ServiceProcess

T = TypeVar("T")


def agent_settings(data_dir: Path, directory_port: int, directory_ca: Path) -> Settings:
    return Settings(
        directory=f"localhost:{directory_port}",
        directory_ca=directory_ca,
        data_dir=data_dir,
        peer_listen="127.0.0.1:0",
        control_listen="127.0.0.1:0",
        heartbeat_interval=1.0,
        retry_max=1.0,
        grace_period=1.0,
    )


class AgentClient:
    """A control API client: what the CLI does, as plain calls. `control`: a loopback port, or
    an address to dial ("unix:PATH" or HOST:PORT)."""

    def __init__(self, control: int | str) -> None:
        options = [("grpc.max_receive_message_length", MAX_CONTROL_MESSAGE)]  # as the CLI
        target = f"127.0.0.1:{control}" if isinstance(control, int) else control
        self.channel = grpc.insecure_channel(target, options=options)
        self.stub = agent_pb2_grpc.AgentServiceStub(self.channel)

    def register(self, name: str, password: str = PASSWORD) -> str:
        request = apb.AgentRegisterRequest(username=name, password=password)
        return self.stub.Register(request).username

    def login(self, name: str, password: str = PASSWORD) -> apb.AgentLoginResponse:
        return self.stub.Login(apb.AgentLoginRequest(username=name, password=password))

    def logout(self) -> None:
        self.stub.Logout(apb.AgentLogoutRequest())

    def add_contact(self, name: str, address: str = "") -> None:
        self.stub.AddContact(apb.AgentAddContactRequest(username=name, address=address))

    def contacts(self) -> list[common_pb2.Contact]:
        return list(self.stub.ListContacts(apb.AgentListContactsRequest()).contacts)

    def send(self, peer: str, body: str, wait: float | None = None) -> apb.ChatMessage:
        request = apb.SendRequest(peer=peer, body=body)
        if wait is not None:
            request.wait.FromMilliseconds(int(wait * 1000))
        return self.stub.Send(request).message

    def history(self, peer: str, limit: int = 1000, **kw: str) -> list[apb.ChatMessage]:
        request = apb.HistoryRequest(peer=peer, limit=limit, **kw)
        return list(self.stub.History(request).messages)

    def status(self) -> apb.StatusResponse:
        return self.stub.Status(apb.StatusRequest())

    def close(self) -> None:
        self.channel.close()


class InProcessAgent:
    def __init__(self, loop: LoopThread, settings: Settings) -> None:
        self.loop = loop
        self.settings = settings
        self._running: AgentServer | None = None
        self._clients: list[AgentClient] = []
        self.start()

    def start(self) -> None:
        self._running = self.loop.run(create_agent(self.settings))
        # Keep the ports across restarts so that addresses stay valid (a socket path stays).
        control = self._running.control_port
        self.settings = dataclasses.replace(
            self.settings,
            peer_listen=f"127.0.0.1:{self._running.peer_port}",
            control_listen=f"127.0.0.1:{control}" if control else self.settings.control_listen,
        )

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self._running is not None:
            self.loop.run(self._running.stop(0.5))
            self._running = None

    @property
    def server(self) -> AgentServer:
        assert self._running is not None
        return self._running

    @property
    def control(self) -> str:
        """The address to dial for the control API: "unix:PATH" or 127.0.0.1:PORT."""
        socket = self.server.control_socket
        return f"unix:{socket}" if socket is not None else f"127.0.0.1:{self.server.control_port}"

    def client(self) -> AgentClient:
        client = AgentClient(self.control)
        self._clients.append(client)
        return client


class AgentProcess(ServiceProcess):
    """`p2pchat-agent` as a child process; its control address and peer port are read from its
    log ("control port N" for TCP, "control socket PATH" for a Unix socket)."""

    MODULE = "p2pchat_agent"
    READY = re.compile(
        r"agent serving: control (?:port (?P<control_port>\d+)|socket (?P<control_socket>.+?)), "
        r"peer port (?P<peer_port>\d+)"
    )

    @property
    def control_port(self) -> int:
        """The control port; 0 when the control API is on a Unix socket."""
        return int(self.ready["control_port"] or 0)

    @property
    def control_socket(self) -> Path | None:
        found = self.ready["control_socket"]
        return Path(found) if found is not None else None

    @property
    def control(self) -> str:
        """The address to dial for the control API: "unix:PATH" or 127.0.0.1:PORT."""
        socket = self.control_socket
        return f"unix:{socket}" if socket is not None else f"127.0.0.1:{self.control_port}"

    @property
    def peer_port(self) -> int:
        return int(self.ready["peer_port"])


def wait_until(predicate: Callable[[], T], timeout: float = 20, interval: float = 0.05) -> T:
    """Polls until `predicate()` is truthy; returns it or fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def logged_in(
    make_agent: Callable[[str], InProcessAgent], *names: str, befriend: bool = True
) -> list[AgentClient]:
    """Agents for `names`, registered and logged in; with `befriend`, everyone's contacts."""
    clients = [make_agent(name).client() for name in names]
    for client, name in zip(clients, names, strict=True):
        client.register(name)
    for client, name in zip(clients, names, strict=True):
        client.login(name)
        if befriend:
            for other in names:
                if other != name:
                    client.add_contact(other)
    return clients


def users_with(
    make_agent: Callable[..., InProcessAgent], *names: str, befriend: bool = True, **settings: Any
) -> tuple[dict[str, InProcessAgent], list[AgentClient]]:
    """`logged_in` for agents started with these `settings` overrides: the agents by name (for
    their data dirs and sessions) and their clients."""
    agents: dict[str, InProcessAgent] = {}

    def make(name: str) -> InProcessAgent:
        agents[name] = make_agent(name, **settings)
        return agents[name]

    return agents, logged_in(make, *names, befriend=befriend)
