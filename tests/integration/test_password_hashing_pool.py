"""Password hashing has bounded threads of its own, through real TLS gRPC on SQLite and
PostgreSQL: logins past the bound are refused at once and write nothing, and the other calls
go on while every hashing thread is busy. Every scrypt call is held at a gate the test opens,
so "while the logins are in flight" is an ordering, not a timing."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import select

from p2pchat.v1 import directory_pb2 as pb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_directory import passwords
from p2pchat_directory.config import load_settings
from p2pchat_directory.models import FailedLogin, UserSession
from tests.support.directory import (
    PASSWORD,
    InProcessDirectory,
    add_each_other,
    auth,
    expect_error,
)

Stub = directory_pb2_grpc.DirectoryServiceStub
Code = grpc.StatusCode
WRONG = "not the password"
RPC_TIMEOUT = 30.0  # a guard against a hang, not a speed target
ENTRY_POINT = Path(sys.executable).parent / "p2pchat-directory"


class ScryptGate:
    """Stands in for passwords._scrypt: holds every call while closed, and notes the thread
    each ran on."""

    def __init__(self, real: Callable[..., bytes]) -> None:
        self._real = real
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self.threads: list[str] = []

    def __call__(self, *args: Any) -> bytes:
        with self._lock:
            self.threads.append(threading.current_thread().name)
        if not self._open.wait(RPC_TIMEOUT):
            raise RuntimeError("the scrypt gate was never opened")
        return self._real(*args)

    @property
    def entered(self) -> int:
        with self._lock:
            return len(self.threads)

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate(
    monkeypatch: pytest.MonkeyPatch, make_directory: Callable[..., InProcessDirectory]
) -> Iterator[ScryptGate]:
    """Cheap scrypt (n = 16, as the tests that register many users do) behind a gate. It
    depends on make_directory so that it is opened before the directories stop (their
    shutdown waits for the hashing threads)."""
    monkeypatch.setattr(passwords, "LOG2_N", 4)
    gate = ScryptGate(passwords._scrypt)
    monkeypatch.setattr(passwords, "_scrypt", gate)
    try:
        yield gate
    finally:
        gate.open()


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + RPC_TIMEOUT  # a guard against a hang, not a speed target
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def login_request(name: str, password: str = PASSWORD) -> pb.LoginRequest:
    return pb.LoginRequest(username=name, password=password)


def register(stub: Stub, name: str) -> None:
    stub.Register(pb.RegisterRequest(username=name, password=PASSWORD), timeout=RPC_TIMEOUT)


def login(stub: Stub, name: str) -> str:
    return stub.Login(login_request(name), timeout=RPC_TIMEOUT).session_token


def written(directory: InProcessDirectory) -> tuple[list[str], list[str]]:
    """(usernames with a session row, usernames with a failed-login row), sorted."""
    with directory.server.databases.users() as s:
        sessions = s.scalars(select(UserSession.username)).all()
        failures = s.scalars(select(FailedLogin.username)).all()
    return sorted(sessions), sorted(failures)


def only_on_hashing_threads(gate: ScryptGate) -> bool:
    return bool(gate.threads) and all(name.startswith("scrypt") for name in gate.threads)


def test_logins_past_the_hashing_bound_are_refused_at_once_and_write_nothing(
    make_directory: Callable[..., InProcessDirectory], gate: ScryptGate
) -> None:
    directory = make_directory(workers=2, hash_workers=1, hash_queue=2)  # 3 hashes at a time
    stub = directory.stub()
    names = [f"user{i}" for i in range(6)]
    for name in names:
        register(stub, name)
    # Even users give their password, odd ones a wrong one: both kinds are refused alike.
    wrong = {name for i, name in enumerate(names) if i % 2}
    gate.close()
    calls = {
        name: stub.Login.future(
            login_request(name, WRONG if name in wrong else PASSWORD), timeout=RPC_TIMEOUT
        )
        for name in names
    }
    # No hash can finish, so exactly the 3 over the bound are answered: refused.
    wait_until(lambda: sum(call.done() for call in calls.values()) == 3, "3 logins answered")
    refused = {name for name, call in calls.items() if call.done()}
    for name in refused:
        error = calls[name].exception()
        assert isinstance(error, grpc.RpcError)
        assert error.code() == Code.RESOURCE_EXHAUSTED
        assert RETRY.fullmatch(error.details() or ""), error.details()
    assert directory.server.hashing.taken == 3
    assert written(directory) == ([], [])  # nothing written while the others hash
    gate.open()
    admitted = set(names) - refused
    for name in admitted:
        call = calls[name]
        if name in wrong:
            assert expect_error(Code.UNAUTHENTICATED, call.result) == "wrong username or password"
        else:
            assert call.result().session_token
    sessions, failures = written(directory)
    assert sessions == sorted(admitted - wrong)
    assert failures == sorted(admitted & wrong)  # a refused wrong guess is not counted
    assert directory.server.hashing.taken == 0
    retried = sorted(refused - wrong)
    for name in retried:  # once the pool drains, the refused may log in
        assert login(stub, name)
    assert written(directory)[0] == sorted((admitted | refused) - wrong)
    assert only_on_hashing_threads(gate), gate.threads


def test_other_calls_complete_while_every_hashing_thread_and_place_is_taken(
    make_directory: Callable[..., InProcessDirectory], gate: ScryptGate
) -> None:
    # More logins held than shared threads: were scrypt on those, they would all be taken.
    directory = make_directory(workers=2, hash_workers=1, hash_queue=3)
    stub = directory.stub()
    for name in ("alice", "bob", "carol"):
        register(stub, name)
    alice, bob = login(stub, "alice"), login(stub, "bob")
    add_each_other(stub, ("alice", alice), ("bob", bob))
    hashed = gate.entered
    gate.close()
    logins = [stub.Login.future(login_request("carol"), timeout=RPC_TIMEOUT) for _ in range(4)]
    wait_until(lambda: directory.server.hashing.taken == 4, "4 logins admitted")
    wait_until(lambda: gate.entered > hashed, "a login hashing")
    beat = stub.Heartbeat(pb.HeartbeatRequest(), metadata=auth(alice), timeout=RPC_TIMEOUT)
    assert beat.session_expires_at.seconds > 0
    listed = stub.ListContacts(pb.ListContactsRequest(), metadata=auth(alice), timeout=RPC_TIMEOUT)
    assert [c.username for c in listed.contacts] == ["bob"]
    found = stub.Lookup(pb.LookupRequest(username="bob"), metadata=auth(alice), timeout=RPC_TIMEOUT)
    assert found.contact.username == "bob"
    stub.Logout(pb.LogoutRequest(), metadata=auth(bob), timeout=RPC_TIMEOUT)
    refusal = expect_error(
        Code.RESOURCE_EXHAUSTED,
        stub.Register,
        pb.RegisterRequest(username="dave", password=PASSWORD),
        timeout=RPC_TIMEOUT,
    )
    assert RETRY.fullmatch(refusal), refusal
    assert not any(call.done() for call in logins)  # all of that while the logins waited
    gate.open()
    assert all(call.result().session_token for call in logins)
    assert only_on_hashing_threads(gate), gate.threads


@pytest.mark.parametrize(
    ("argv", "environ", "fragment"),
    [
        (["--hash-workers", "0"], {}, "argument --hash-workers: must be positive: '0'"),
        (["--hash-workers", "two"], {}, "argument --hash-workers: not a whole number: 'two'"),
        (["--hash-queue", "-1"], {}, "argument --hash-queue: must be 0 or more: '-1'"),
        ([], {"P2PCHAT_HASH_WORKERS": "-3"}, "argument --hash-workers: must be positive: '-3'"),
        ([], {"P2PCHAT_HASH_QUEUE": "lots"}, "argument --hash-queue: not a whole number: 'lots'"),
        (["--hash-share", "0"], {}, "argument --hash-share: must be positive: '0'"),
        ([], {"P2PCHAT_HASH_SHARE": "half"}, "argument --hash-share: not a number: 'half'"),
        (
            ["--hash-workers", "1", "--hash-share", "1.5"],
            {},
            "--hash-share 1.5 is more than --hash-workers 1 can use (one thread hashes on one "
            "core at most)",
        ),
    ],
    ids=[
        "workers-zero",
        "workers-word",
        "queue-negative",
        "env-workers",
        "env-queue",
        "share-zero",
        "env-share",
        "share-over-workers",
    ],
)
def test_a_bad_hash_workers_queue_or_share_value_is_a_usage_error_naming_it(
    argv: list[str], environ: dict[str, str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings(argv, environ=environ)
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(fragment)


def test_the_directory_command_refuses_a_bad_hash_worker_count_without_traceback(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PCHAT_")}
    result = subprocess.run(
        [str(ENTRY_POINT), "--data-dir", str(data), "--hash-workers", "0"],
        capture_output=True,
        text=True,
        timeout=RPC_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "p2pchat-directory: error: argument --hash-workers: must be positive: '0'"
    )
    assert "Traceback" not in result.stderr
    assert not data.exists()


def test_the_hash_queue_is_thirty_two_per_hash_worker_unless_given() -> None:
    assert load_settings(["--hash-workers", "3"], environ={}).hash_queue == 96
    given = load_settings([], environ={"P2PCHAT_HASH_WORKERS": "2", "P2PCHAT_HASH_QUEUE": "0"})
    assert (given.hash_workers, given.hash_queue) == (2, 0)
    default = load_settings([], environ={})
    assert default.hash_queue == 32 * default.hash_workers


def test_hashing_defaults_to_a_quarter_of_the_cores_and_at_least_half_a_core() -> None:
    cores = os.cpu_count() or 1
    default = load_settings([], environ={})
    assert default.hash_share == max(0.5, cores / 4)
    assert default.hash_workers == math.ceil(default.hash_share)  # as many as the share needs
    fewer = load_settings(["--hash-workers", "1"], environ={})  # a share one thread can use
    assert fewer.hash_share == min(max(0.5, cores / 4), 1)
    given = load_settings([], environ={"P2PCHAT_HASH_WORKERS": "2", "P2PCHAT_HASH_SHARE": "1.5"})
    assert (given.hash_workers, given.hash_share) == (2, 1.5)


RETRY = re.compile(r"the directory is busy hashing passwords: retry in ([1-9][0-9]*) s")


def test_refused_callers_are_told_to_come_back_one_hash_apart_once_the_queue_drains() -> None:
    """The hint grows with what is waiting and with the pacing, and each refused caller gets
    a later time than the last: a burst of refused logins comes back spread out at the pace
    the pool hashes, not every second nor all at once."""
    from p2pchat_common.errors import RateLimited
    from p2pchat_directory.hashing import HashingPool

    pool = HashingPool(1, 9, share=0.25)  # 10 hashes out at most, each 4x its CPU apart
    try:
        pool._hash_cpu = 0.1  # as if measured: 0.4 s per hash with its pause
        tickets = [pool.admit() for _ in range(10)]  # 4 s of hashing out
        said = []
        for _ in range(6):
            with pytest.raises(RateLimited) as refused:
                pool.admit()
            found = RETRY.fullmatch(str(refused.value))
            assert found, str(refused.value)
            said.append(int(found.group(1)))
        # 4.0, 4.4, 4.8, 5.2, 5.6, 6.0 s (rounded up): later and later, 2 s apart in all
        assert said[0] == 4 and said == sorted(said), said
        assert said[-1] - said[0] >= 2, said
        for ticket in tickets:
            ticket.__exit__(None, None, None)  # given back unused
    finally:
        pool.shutdown()


def _burn(seconds: float) -> float:
    """Spends `seconds` of this thread's CPU; returns when it started (monotonic)."""
    started, cpu = time.monotonic(), time.thread_time()
    while time.thread_time() - cpu < seconds:
        pass
    return started


def test_a_hashing_thread_pauses_after_each_hash_to_keep_to_its_share() -> None:
    """At a quarter of one core, while other hashes wait, a hash that took c of CPU is followed
    by at least 3c of rest before the thread's next one: a burst of logins is spread out, not
    piled on the cores. The first runs at once."""
    import asyncio

    from p2pchat_directory.hashing import HashingPool

    cpu = 0.05
    pool = HashingPool(1, 4, share=0.25)
    try:

        async def burst() -> list[float]:
            tickets = [pool.admit() for _ in range(4)]
            submitted = time.monotonic()
            starts = await asyncio.gather(*(t._run(_burn, cpu) for t in tickets))
            return [submitted, *sorted(starts)]

        submitted, *starts = asyncio.run(burst())
        assert starts[0] - submitted < 1.0  # the first runs at once (loose: a busy machine)
        # The second and third start with others still waiting behind them: paced.
        gaps = [starts[1] - starts[0], starts[2] - starts[1]]
        assert all(gap >= cpu * (1 + 3) * 0.95 for gap in gaps), gaps  # its CPU, then 3x rest
    finally:
        pool.shutdown()


def test_a_hash_with_none_waiting_behind_it_is_not_paced() -> None:
    """Logins one at a time (a user, a test) never wait for a pause."""
    import asyncio

    from p2pchat_directory.hashing import HashingPool

    cpu = 0.05
    pool = HashingPool(1, 4, share=0.05)  # a pause would be 19 x 0.05 s: ~0.95 s

    async def one() -> float:
        with pool.admit() as ticket:
            return await ticket._run(_burn, cpu)

    try:
        asyncio.run(one())
        ended = time.monotonic()
        started = asyncio.run(one())
        assert started - ended < 0.5  # far less than the pause it would have waited
    finally:
        pool.shutdown()


def test_a_hashing_share_over_the_workers_is_refused() -> None:
    from p2pchat_directory.hashing import HashingPool

    with pytest.raises(ValueError, match="hashing share"):
        HashingPool(1, 0, share=1.5)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_hashing_threads_run_at_a_lower_priority_than_the_rest_of_the_directory() -> None:
    import asyncio

    from p2pchat_directory.hashing import HASH_NICE, HashingPool

    pool = HashingPool(2, 0)
    try:
        here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        def priority() -> int:
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

        seen = {pool._executor.submit(priority).result(timeout=10) for _ in range(4)}
        assert seen == {min(here + HASH_NICE, 19)}
        # The caller's thread (the event loop's, in the directory) keeps its own.
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here
        ticket = pool.admit()
        hashed = asyncio.run(ticket.hash("a password of some length"))
        assert passwords.verify_password("a password of some length", hashed)
    finally:
        pool.shutdown()
