"""Faults get a clear reason: a full disk at the agent is RESOURCE_EXHAUSTED "disk full at the
agent" with nothing committed lost, and an agent whose clock is an hour behind still logs in and
says that its clock is off."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from p2pchat.v1 import agent_pb2 as apb
from p2pchat_directory.config import Settings
from tests.conftest import IN_CI
from tests.support.agent import InProcessAgent, agent_settings, logged_in, wait_until
from tests.support.cli import run_cli
from tests.support.directory import InProcessDirectory, expect_error
from tests.support.loop_thread import LoopThread


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real file system that fills up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        if IN_CI and os.geteuid() == 0:
            pytest.fail(f"cannot mount a tmpfs in CI: {result.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Writes a file until the disk is full; returns it."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_at_the_agent_is_resource_exhausted_and_loses_nothing(
    make_agent: Callable[..., InProcessAgent], small_disk: Path
) -> None:
    big = 1024 * 1024  # bodies of 1 MiB: each needs new room in the WAL
    alice, _bob = logged_in(
        lambda name: (
            make_agent(name, body_limit=2 * big)
            if name == "bob"
            else make_agent(name, data_dir=small_disk / "alice", body_limit=2 * big)
        ),
        "alice",
        "bob",
    )
    first = alice.send("bob", "kept " + "x" * 1000, wait=10)
    filler = fill(small_disk)
    message = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, alice.send, "bob", "y" * big)
    assert "disk full at the agent" in message
    filler.unlink()
    third = alice.send("bob", "after the disk has room again", wait=10)
    assert third.status == apb.MESSAGE_STATUS_DELIVERED
    bodies = [m.body[:5] for m in alice.history("bob")]
    assert bodies == ["kept ", "after"]
    assert alice.history("bob")[0].id == first.id


@pytest.fixture
def directory_an_hour_ahead(
    loop_thread: LoopThread, tmp_path: Path
) -> Iterator[InProcessDirectory]:
    """A directory whose clock is an hour ahead: the agents' clocks are an hour behind it."""
    settings = Settings(listen="127.0.0.1:0", data_dir=tmp_path / "directory", workers=4)
    handle = InProcessDirectory(
        loop_thread, settings, clock=lambda: datetime.now(UTC) + timedelta(hours=1)
    )
    try:
        yield handle
    finally:
        handle.stop()


def test_an_agent_an_hour_behind_logs_in_chats_and_warns_about_its_clock(
    loop_thread: LoopThread, directory_an_hour_ahead: InProcessDirectory, tmp_path: Path
) -> None:
    directory = directory_an_hour_ahead
    agents: list[InProcessAgent] = []

    def make(name: str) -> InProcessAgent:
        settings = agent_settings(
            tmp_path / f"agent-{name}", directory.port, directory.settings.data_dir / "ca.pem"
        )
        agents.append(InProcessAgent(loop_thread, replace(settings, heartbeat_interval=0.5)))
        return agents[-1]

    try:
        alice, bob = logged_in(make, "alice", "bob")
        sent = alice.send("bob", "on time", wait=10)
        assert sent.status == apb.MESSAGE_STATUS_DELIVERED
        status = alice.status()
        offset = status.clock_offset.ToTimedelta()
        assert timedelta(minutes=59) < offset < timedelta(minutes=61)
        assert any("clock is 3600 s behind" in w for w in status.warnings), status.warnings
        cert = x509.load_pem_x509_certificate(
            (agents[0].settings.data_dir / "alice.crt").read_bytes()
        )
        assert cert.not_valid_before_utc <= datetime.now(UTC)  # valid for a clock an hour behind
        shown = run_cli(agents[0].server.control_port, tmp_path, "status")
        assert shown.returncode == 0 and "warning:" in shown.stdout
        assert "behind the directory" in shown.stdout
        wait_until(lambda: bob.status().warnings)
    finally:
        for agent in agents:
            agent.stop()
