"""Fixtures shared by every test: a private event loop for in-process servers, a throwaway
PostgreSQL server, and directories on each database backend."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from p2pchat_directory.config import Settings
from tests.support.agent import InProcessAgent, agent_settings
from tests.support.directory import InProcessDirectory
from tests.support.loop_thread import LoopThread
from tests.support.postgres import PostgresServer, postgres_server

IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    try:
        ctx = postgres_server()
        server = ctx.__enter__()
    except FileNotFoundError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"PostgreSQL not available: {exc}")
    try:
        yield server
    finally:
        ctx.__exit__(None, None, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
def db_urls(
    db_backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    """(users URL, contacts URL): two SQLite files, or both on one fresh PostgreSQL database."""
    if db_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'users.db'}", f"sqlite:///{tmp_path / 'contacts.db'}"
        return
    pg: PostgresServer = request.getfixturevalue("pg_server")
    with pg.database() as url:
        yield url, url


@pytest.fixture
def make_directory(
    loop_thread: LoopThread, db_urls: tuple[str, str], tmp_path: Path
) -> Iterator[Callable[..., InProcessDirectory]]:
    """Starts in-process directories on the test's backend; `make_directory(presence_ttl=...)`."""
    started: list[InProcessDirectory] = []

    def make(**overrides: Any) -> InProcessDirectory:
        settings = Settings(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "directory",
            users_db=db_urls[0],
            contacts_db=db_urls[1],
            workers=4,
        )
        handle = InProcessDirectory(loop_thread, replace(settings, **overrides))
        started.append(handle)
        return handle

    try:
        yield make
    finally:
        for handle in started:
            handle.stop()


@pytest.fixture
def directory(make_directory: Callable[..., InProcessDirectory]) -> InProcessDirectory:
    return make_directory()


@pytest.fixture
def agent_directory(loop_thread: LoopThread, tmp_path: Path) -> Iterator[InProcessDirectory]:
    """The directory that agent tests use: in-process, on SQLite (the directory's own backends
    are covered by the directory tests)."""
    data = tmp_path / "directory"
    settings = Settings(
        listen="127.0.0.1:0", data_dir=data, presence_ttl=timedelta(seconds=5), workers=4
    )
    handle = InProcessDirectory(loop_thread, settings)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def make_agent(
    loop_thread: LoopThread, agent_directory: InProcessDirectory, tmp_path: Path
) -> Iterator[Callable[..., InProcessAgent]]:
    """Starts in-process agents that use `agent_directory`: `make_agent("alice")`."""
    directory = agent_directory
    started: list[InProcessAgent] = []

    def make(name: str, **overrides: Any) -> InProcessAgent:
        settings = agent_settings(
            tmp_path / f"agent-{name}", directory.port, directory.settings.data_dir / "ca.pem"
        )
        handle = InProcessAgent(loop_thread, replace(settings, **overrides))
        started.append(handle)
        return handle

    try:
        yield make
    finally:
        for handle in started:
            handle.stop()
