"""Test handles for a directory: in-process (fast) or as a real `p2pchat-directory` process."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc

from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_directory.config import Settings
from p2pchat_directory.server import DirectoryServer, create_server
from p2pchat_directory.service import utcnow
from tests.support.loop_thread import LoopThread
from tests.support.process import ServiceProcess

PASSWORD = "correct horse battery"


def channel_to(port: int, ca_pem: bytes, host: str = "localhost") -> grpc.Channel:
    return grpc.secure_channel(f"{host}:{port}", grpc.ssl_channel_credentials(ca_pem))


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class InProcessDirectory:
    """A directory served from this test process on a private loop; stop/start keeps its data."""

    def __init__(
        self, loop: LoopThread, settings: Settings, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.clock = clock
        self.loop = loop
        self.settings = settings
        self._running: DirectoryServer | None = None
        self._channels: list[grpc.Channel] = []
        self.start()

    def start(self) -> None:
        self._running = self.loop.run(create_server(self.settings, self.clock))
        host = self.settings.listen.rpartition(":")[0]  # a restart binds the same host and port
        self.settings = dataclasses.replace(self.settings, listen=f"{host}:{self.port}")

    def stop(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        if self._running is not None:
            self.loop.run(self._running.stop(0.5))
            self._running = None

    @property
    def server(self) -> DirectoryServer:
        assert self._running is not None
        return self._running

    @property
    def port(self) -> int:
        assert self._running is not None
        return self._running.port

    @property
    def ca_pem(self) -> bytes:
        """The directory root: what clients trust for the directory channel."""
        return (self.settings.data_dir / "ca.pem").read_bytes()

    @property
    def users_ca_pem(self) -> bytes:
        """The users CA: what agents trust for peer links."""
        return (self.settings.data_dir / "users-ca.pem").read_bytes()

    def channel(self, host: str = "localhost") -> grpc.Channel:
        ch = channel_to(self.port, self.ca_pem, host)
        self._channels.append(ch)
        return ch

    def stub(self, host: str = "localhost") -> directory_pb2_grpc.DirectoryServiceStub:
        """A stub over a channel to `host` ("127.0.0.1" or "[::1]" to pick a source address)."""
        return directory_pb2_grpc.DirectoryServiceStub(self.channel(host))


class DirectoryProcess(ServiceProcess):
    """`p2pchat-directory` as a child process on a free loopback port read from its log."""

    MODULE = "p2pchat_directory"
    READY = re.compile(r"directory serving on port (\d+)")

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__(["--listen", "127.0.0.1:0", *args], env)

    @property
    def port(self) -> int:
        return self.ports[0]


def add_each_other(
    stub: directory_pb2_grpc.DirectoryServiceStub, *sessions: tuple[str, str]
) -> None:
    """Makes every (username, token) of `sessions` ask every other: ACCEPTED contacts, as two
    users who add each other are (contact consent)."""
    for name, token in sessions:
        for other, _ in sessions:
            if other != name:
                stub.AddContact(dpb.AddContactRequest(username=other), metadata=auth(token))


def expect_error(code: grpc.StatusCode, call: Callable[..., Any], *args: Any, **kw: Any) -> str:
    """Calls and asserts the RPC fails with `code`; returns the status message."""
    try:
        call(*args, **kw)
    except grpc.RpcError as err:
        assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
        return str(err.details())
    raise AssertionError(f"expected {code}, but the call succeeded")


def data_dir_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}
