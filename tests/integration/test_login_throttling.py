"""Failed logins are throttled per (account, source), per source and per account, through real
TLS gRPC on SQLite and PostgreSQL. The directory listens dual stack so that one machine has two
real sources: 127.0.0.1 and [::1] (counted as ::/64)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from p2pchat.v1 import directory_pb2 as pb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_directory import server
from p2pchat_directory.ca import CertificateAuthority
from p2pchat_directory.config import Settings
from p2pchat_directory.db import Databases
from p2pchat_directory.service import DirectoryService
from tests.support.directory import PASSWORD, InProcessDirectory, expect_error

Stub = directory_pb2_grpc.DirectoryServiceStub
Code = grpc.StatusCode
A, B = "127.0.0.1", "[::1]"  # two sources
WRONG = "not the password"
REFUSAL = re.compile(r"(.+); try again in (\d+) s")


class Clock:
    """The directory's clock: real time plus whatever the test skipped ahead."""

    def __init__(self) -> None:
        self.skipped = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.skipped

    def skip(self, seconds: float) -> None:
        self.skipped += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The use cases of directories started after this fixture run on a clock the test may move
    forward (whatever clock the server wiring would give them; TLS keeps real time)."""
    clock = Clock()

    def service(
        settings: Settings, dbs: Databases, ca: CertificateAuthority, *_: Any, **__: Any
    ) -> DirectoryService:
        return DirectoryService(settings, dbs, ca, clock)

    monkeypatch.setattr(server, "DirectoryService", service)
    return clock


@pytest.fixture
def dual_stack(
    make_directory: Callable[..., InProcessDirectory],
) -> Callable[..., InProcessDirectory]:
    def make(**overrides: Any) -> InProcessDirectory:
        return make_directory(listen="[::]:0", **overrides)

    return make


def register(stub: Stub, name: str) -> None:
    stub.Register(pb.RegisterRequest(username=name, password=PASSWORD))


def logs_in(stub: Stub, name: str) -> bool:
    return bool(stub.Login(pb.LoginRequest(username=name, password=PASSWORD)).session_token)


def fail(stub: Stub, name: str) -> None:
    """A wrong guess, checked and counted: the one answer for wrong password and unknown user."""
    request = pb.LoginRequest(username=name, password=WRONG)
    assert expect_error(Code.UNAUTHENTICATED, stub.Login, request) == "wrong username or password"


def refused(stub: Stub, name: str, password: str = PASSWORD) -> tuple[str, int]:
    """(why, wait in s) of a login refused before its password is looked at."""
    request = pb.LoginRequest(username=name, password=password)
    found = REFUSAL.fullmatch(expect_error(Code.RESOURCE_EXHAUSTED, stub.Login, request))
    assert found is not None
    return found[1], int(found[2])


def test_five_wrong_guesses_lock_the_account_for_that_source_only(
    dual_stack: Callable[..., InProcessDirectory],
) -> None:
    directory = dual_stack()  # the defaults: 5 per account and source, 30 s
    a, b = directory.stub(A), directory.stub(B)
    register(a, "alice")
    for _ in range(5):
        fail(a, "alice")
    why, wait = refused(a, "alice")  # even the right password
    assert why == "too many failed logins for 'alice' from your address"
    assert 25 <= wait <= 30
    assert logs_in(b, "alice")  # the owner elsewhere is not locked out
    # B's success clears B's failures only: A is still held back, and no longer than before.
    why, again = refused(a, "alice", WRONG)
    assert why == "too many failed logins for 'alice' from your address" and again <= wait


def test_one_source_guessing_across_accounts_is_refused_for_every_account_others_are_not(
    dual_stack: Callable[..., InProcessDirectory],
) -> None:
    directory = dual_stack(login_max_failures_per_source=4)
    a, b = directory.stub(A), directory.stub(B)
    register(a, "victim")
    register(a, "bob")
    fail(a, "bob")
    for i in range(3):  # names that do not exist count the same
        fail(a, f"nobody{i}")
    why, wait = refused(a, "victim")  # a fifth account, never tried
    assert why == "too many failed logins from your address"
    assert 55 <= wait <= 60
    assert logs_in(b, "victim") and logs_in(b, "bob")
    fail(b, "nobody0")  # B's count is its own


def test_failures_from_many_sources_lock_the_account_for_everyone(
    dual_stack: Callable[..., InProcessDirectory],
) -> None:
    directory = dual_stack(login_max_failures_per_account=3)
    a, b = directory.stub(A), directory.stub(B)
    register(a, "carol")
    register(a, "dave")
    fail(a, "carol")
    fail(a, "carol")
    fail(b, "carol")  # neither source alone is past its own threshold of 5
    for stub in (a, b):
        why, wait = refused(stub, "carol")
        assert why == "too many failed logins for 'carol'"
        assert 25 <= wait <= 30
    assert logs_in(a, "dave") and logs_in(b, "dave")


def test_each_failure_past_the_threshold_doubles_the_wait_up_to_an_hour(
    dual_stack: Callable[..., InProcessDirectory], clock: Clock
) -> None:
    directory = dual_stack(login_max_failures=2, login_failure_window=timedelta(days=1))
    a = directory.stub(A)
    register(a, "erin")
    fail(a, "erin")
    fail(a, "erin")
    waits = []
    for _ in range(8):
        why, wait = refused(a, "erin")
        assert why == "too many failed logins for 'erin' from your address"
        assert refused(a, "erin", WRONG)[1] == wait  # refused attempts are not counted
        waits.append(wait)
        clock.skip(wait)
        fail(a, "erin")
    assert waits == [30, 60, 120, 240, 480, 960, 1920, 3600]
    clock.skip(3600)
    assert logs_in(a, "erin")  # a success forgets this source's failures for the account
    fail(a, "erin")
    assert logs_in(a, "erin")


def test_the_per_source_wait_doubles_too(
    dual_stack: Callable[..., InProcessDirectory], clock: Clock
) -> None:
    directory = dual_stack(login_max_failures_per_source=2)
    a = directory.stub(A)
    fail(a, "nobody0")
    fail(a, "nobody1")
    waits = []
    for i in range(2, 4):
        why, wait = refused(a, f"nobody{i}")
        assert why == "too many failed logins from your address"
        waits.append(wait)
        clock.skip(wait)
        fail(a, f"nobody{i}")
    assert waits == [60, 120]


def test_failures_older_than_the_window_are_forgotten(
    dual_stack: Callable[..., InProcessDirectory], clock: Clock
) -> None:
    directory = dual_stack(login_max_failures=2, login_failure_window=timedelta(seconds=20))
    a = directory.stub(A)
    register(a, "gina")
    fail(a, "gina")
    fail(a, "gina")
    assert refused(a, "gina")[1] == 20  # 30 s, but in 20 s both failures are forgotten
    clock.skip(20)
    fail(a, "gina")  # one failure in the window again: counted, not refused
    assert logs_in(a, "gina")


def test_a_lock_survives_a_directory_restart(
    dual_stack: Callable[..., InProcessDirectory],
) -> None:
    directory = dual_stack(login_max_failures=2)
    a = directory.stub(A)
    register(a, "frank")
    fail(a, "frank")
    fail(a, "frank")
    why, wait = refused(a, "frank")
    directory.stop()
    directory.start()
    a, b = directory.stub(A), directory.stub(B)
    why_after, wait_after = refused(a, "frank")
    assert why_after == why == "too many failed logins for 'frank' from your address"
    assert wait_after <= wait
    assert logs_in(b, "frank")
