"""`p2pchat-directory` as a real child process: signals, restarts, configuration, bad flags."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from p2pchat.v1 import directory_pb2 as pb
from p2pchat.v1 import directory_pb2_grpc
from tests.support.directory import (
    PASSWORD,
    DirectoryProcess,
    auth,
    channel_to,
    data_dir_files,
    expect_error,
)

Code = grpc.StatusCode
Stub = directory_pb2_grpc.DirectoryServiceStub
SERVICE = "p2pchat.v1.DirectoryService"
RPC_TIMEOUT = 10.0  # every call in these tests is bounded
RUN_TIMEOUT = 30.0  # a directory that neither serves nor exits within this is hung
ENTRY_POINT = Path(sys.executable).parent / "p2pchat-directory"
FLAGS = (
    "--listen",
    "--data-dir",
    "--users-db",
    "--contacts-db",
    "--tls-name",
    "--tls-cert",
    "--tls-key",
    "--insecure",
)


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children inherit os.environ: a P2PCHAT_* variable of the developer's shell must not leak."""
    for name in [n for n in os.environ if n.startswith("P2PCHAT_")]:
        monkeypatch.delenv(name)


@contextmanager
def directory_process(
    args: list[str], env: dict[str, str] | None = None
) -> Iterator[DirectoryProcess]:
    """A started, serving `p2pchat-directory` child that is always killed and reaped at the end."""
    proc = DirectoryProcess(args, env)
    try:
        wait_serving(proc, args, env or {})
        yield proc
    finally:
        proc.kill()
        if proc.proc.stderr is not None:
            proc._drain.join(5)
            proc.proc.stderr.close()


def wait_serving(proc: DirectoryProcess, args: list[str], env: dict[str, str]) -> None:
    """Returns once the child answers a health check; a barrier for signals.

    The port line is NOT one: the directory logs it a few statements before it installs its
    SIGTERM handler, so a SIGTERM sent on seeing the line can still kill it outright (-15; seen
    under load). The handler is installed before the event loop next runs, so an RPC answered
    after the line was logged proves it is in place.
    """
    if "--insecure" in args:
        channel = grpc.insecure_channel(f"127.0.0.1:{proc.port}")
    else:
        data_dir = args[args.index("--data-dir") + 1] if "--data-dir" in args else None
        ca_pem = (Path(data_dir or env["P2PCHAT_DATA_DIR"]) / "ca.pem").read_bytes()
        channel = channel_to(proc.port, ca_pem)
    with channel:
        assert health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING


def run_directory(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the installed `p2pchat-directory` command to completion (bounded: never hangs)."""
    return subprocess.run(
        [str(ENTRY_POINT), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def login(stub: Stub, name: str, password: str = PASSWORD) -> str:
    reply = stub.Login(pb.LoginRequest(username=name, password=password), timeout=RPC_TIMEOUT)
    token: str = reply.session_token
    return token


def health_status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = stub.Check(
        health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT
    ).status
    return status


def log_text(proc: DirectoryProcess) -> str:
    return "".join(proc.log)


# -- signals ---------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_calls_finish_exits_zero_within_grace_then_refuses_calls(
    tmp_path: Path,
) -> None:
    grace = 5.0
    # One worker thread: the logins queue behind each other (~0.1-0.2 s of scrypt each), so
    # when the first has answered the others are certainly inside the server, not on the wire.
    args = ["--data-dir", str(tmp_path), "--workers", "1", "--grace-period", str(grace)]
    with directory_process(args) as directory:
        ca = (tmp_path / "ca.pem").read_bytes()
        with channel_to(directory.port, ca) as channel:
            serving = health_pb2.HealthCheckResponse.SERVING
            assert health_status(channel, "") == serving
            assert health_status(channel, SERVICE) == serving
            stub = Stub(channel)
            stub.Register(
                pb.RegisterRequest(username="alice", password=PASSWORD), timeout=RPC_TIMEOUT
            )

            request = pb.LoginRequest(username="alice", password=PASSWORD)
            logins = [stub.Login.future(request, timeout=RUN_TIMEOUT) for _ in range(5)]
            wait_until(lambda: any(f.done() for f in logins), RUN_TIMEOUT, "the first login")
            in_flight = sum(not f.done() for f in logins)

            started = time.monotonic()
            exit_code = directory.terminate(timeout=grace + 10)
            took = time.monotonic() - started

            assert in_flight >= 2, "the logins finished before SIGTERM: nothing was in flight"
            tokens = [f.result(timeout=RPC_TIMEOUT).session_token for f in logins]
            assert len(set(tokens)) == len(logins)  # every in-flight login completed OK
            assert exit_code == 0, log_text(directory)
            assert took < grace, f"stopping took {took:.1f} s, more than the grace period"
            log = log_text(directory)
            assert "shutting down" in log
            assert "directory stopped" in log
            assert "Traceback" not in log

            # Stopped: the old connection and a new one are both refused.
            expect_error(
                Code.UNAVAILABLE,
                stub.Heartbeat,
                pb.HeartbeatRequest(),
                metadata=auth(tokens[0]),
                timeout=RPC_TIMEOUT,
            )
        with channel_to(directory.port, ca) as fresh:
            expect_error(Code.UNAVAILABLE, Stub(fresh).Login, request, timeout=RPC_TIMEOUT)


def test_sigint_stops_the_directory_gracefully_like_sigterm(tmp_path: Path) -> None:
    with directory_process(["--data-dir", str(tmp_path)]) as directory:
        with channel_to(directory.port, (tmp_path / "ca.pem").read_bytes()) as channel:
            assert health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING
        directory.proc.send_signal(signal.SIGINT)
        assert directory.proc.wait(RUN_TIMEOUT) == 0
        directory._drain.join(5)
        assert "directory stopped" in log_text(directory)
        assert "Traceback" not in log_text(directory)


# -- restart ---------------------------------------------------------------------------------


def test_restart_on_the_same_data_dir_keeps_ca_users_contacts_and_sessions(
    tmp_path: Path,
) -> None:
    data = tmp_path / "directory"
    args = ["--data-dir", str(data)]
    with directory_process(args) as first:
        ca_before = (data / "ca.pem").read_bytes()
        with channel_to(first.port, ca_before) as channel:
            stub = Stub(channel)
            for name in ("alice", "bob"):
                stub.Register(
                    pb.RegisterRequest(username=name, password=PASSWORD, address=f"{name}.lan:7"),
                    timeout=RPC_TIMEOUT,
                )
            token = login(stub, "alice")
            for owner, other in ((token, "bob"), (login(stub, "bob"), "alice")):
                stub.AddContact(
                    pb.AddContactRequest(username=other), metadata=auth(owner), timeout=RPC_TIMEOUT
                )
        assert first.terminate() == 0
        assert "created the directory root in" in log_text(first)
        assert "created the users CA in" in log_text(first)
    assert {"ca.pem", "users.db", "contacts.db"} <= data_dir_files(data)

    with directory_process(args) as second:
        assert (data / "ca.pem").read_bytes() == ca_before
        assert "loaded the directory root and users CA" in log_text(second)
        # The new process's server certificate still chains to the CA clients already trust.
        with channel_to(second.port, ca_before) as channel:
            stub = Stub(channel)

            def contacts(session: str) -> list[tuple[str, str]]:
                reply = stub.ListContacts(
                    pb.ListContactsRequest(), metadata=auth(session), timeout=RPC_TIMEOUT
                )
                return [(c.username, c.address) for c in reply.contacts]

            assert contacts(token) == [("bob", "bob.lan:7")]  # the session survived the restart
            again = login(stub, "alice")  # same password still works
            assert again != token
            assert contacts(again) == [("bob", "bob.lan:7")]
            expect_error(
                Code.ALREADY_EXISTS,
                stub.Register,
                pb.RegisterRequest(username="bob", password=PASSWORD),
                timeout=RPC_TIMEOUT,
            )
        assert second.terminate() == 0


# -- configuration -----------------------------------------------------------------------------


def test_data_dir_and_login_max_failures_are_taken_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # were the env ignored, the default ./data would land here
    data = tmp_path / "from-env"
    env = {"P2PCHAT_DATA_DIR": str(data), "P2PCHAT_LOGIN_MAX_FAILURES": "2"}
    with directory_process([], env) as directory:
        assert {"ca.pem", "users.db", "contacts.db"} <= data_dir_files(data)
        assert not (tmp_path / "data").exists()
        with channel_to(directory.port, (data / "ca.pem").read_bytes()) as channel:
            stub = Stub(channel)
            stub.Register(
                pb.RegisterRequest(username="alice", password=PASSWORD), timeout=RPC_TIMEOUT
            )
            for _ in range(2):
                expect_error(
                    Code.UNAUTHENTICATED,
                    stub.Login,
                    pb.LoginRequest(username="alice", password="wrong password"),
                    timeout=RPC_TIMEOUT,
                )
            expect_error(
                Code.RESOURCE_EXHAUSTED,
                stub.Login,
                pb.LoginRequest(username="alice", password=PASSWORD),
                timeout=RPC_TIMEOUT,
            )
        assert directory.terminate() == 0


def test_flags_override_the_environment(tmp_path: Path) -> None:
    from_env, from_flag = tmp_path / "from-env", tmp_path / "from-flag"
    env = {"P2PCHAT_DATA_DIR": str(from_env), "P2PCHAT_LOGIN_MAX_FAILURES": "2"}
    args = ["--data-dir", str(from_flag), "--login-max-failures", "3"]
    with directory_process(args, env) as directory:
        assert (from_flag / "ca.pem").exists()
        assert not from_env.exists()
        with channel_to(directory.port, (from_flag / "ca.pem").read_bytes()) as channel:
            stub = Stub(channel)
            stub.Register(
                pb.RegisterRequest(username="alice", password=PASSWORD), timeout=RPC_TIMEOUT
            )
            bad = pb.LoginRequest(username="alice", password="wrong password")
            for _ in range(3):
                expect_error(Code.UNAUTHENTICATED, stub.Login, bad, timeout=RPC_TIMEOUT)
            expect_error(Code.RESOURCE_EXHAUSTED, stub.Login, bad, timeout=RPC_TIMEOUT)
        assert directory.terminate() == 0


def test_insecure_mode_logs_an_insecure_warning_and_serves_plaintext(tmp_path: Path) -> None:
    with directory_process(["--data-dir", str(tmp_path), "--insecure"]) as directory:
        warnings = [line for line in directory.log if "WARNING" in line and "INSECURE" in line]
        assert warnings, log_text(directory)
        with grpc.insecure_channel(f"127.0.0.1:{directory.port}") as channel:
            assert health_status(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert directory.terminate() == 0


def test_tls_mode_does_not_log_the_insecure_warning(tmp_path: Path) -> None:
    with directory_process(["--data-dir", str(tmp_path)]) as directory:
        assert "INSECURE" not in log_text(directory)
        assert "(TLS)" in log_text(directory)
        assert directory.terminate() == 0


# -- bad command lines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "fragments"),
    [
        (["--listen", "nonsense"], {}, ("argument --listen", "'nonsense'")),
        (["--listen", "127.0.0.1:99999"], {}, ("argument --listen", "99999")),
        (["--login-max-failures", "0"], {}, ("argument --login-max-failures", "'0'")),
        (["--presence-ttl", "soon"], {}, ("argument --presence-ttl", "'soon'")),
        ([], {"P2PCHAT_LOGIN_MAX_FAILURES": "many"}, ("--login-max-failures", "'many'")),
        (["--tls-cert", "server.pem"], {}, ("--tls-cert and --tls-key",)),
        (["--no-such-flag"], {}, ("unrecognized arguments: --no-such-flag",)),
    ],
    ids=["listen", "listen-port", "max-failures", "presence-ttl", "env", "tls-pair", "unknown"],
)
def test_bad_flags_are_a_usage_error_without_traceback_and_nothing_is_written(
    tmp_path: Path, args: list[str], env: dict[str, str], fragments: tuple[str, ...]
) -> None:
    data = tmp_path / "data"
    result = run_directory(["--data-dir", str(data), *args], env)
    assert result.returncode == 2, result.stderr
    assert "usage: p2pchat-directory" in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("p2pchat-directory: error: ")
    for fragment in fragments:
        assert fragment in error
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not data.exists()


@pytest.fixture(params=["unreachable-database", "busy-port"])
def startup_failure(request: pytest.FixtureRequest) -> Iterator[tuple[list[str], str]]:
    """(extra args that make startup fail, a fragment the error must name)."""
    if request.param == "unreachable-database":
        url = "postgresql+psycopg://u@127.0.0.1:1/db"
        yield ["--users-db", url, "--contacts-db", url], "127.0.0.1"
        return
    with socket.socket() as holder:  # a port someone else listens on
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        yield ["--listen", f"127.0.0.1:{port}"], str(port)


def test_startup_failure_exits_nonzero_promptly_and_names_the_cause(
    tmp_path: Path, startup_failure: tuple[list[str], str]
) -> None:
    args, fragment = startup_failure
    started = time.monotonic()
    result = run_directory(["--data-dir", str(tmp_path), *args])  # TimeoutExpired = hung
    assert result.returncode != 0
    assert time.monotonic() - started < RUN_TIMEOUT
    assert fragment in result.stderr
    assert "directory serving" not in result.stderr


def test_startup_failure_is_reported_as_one_error_line_without_traceback(
    tmp_path: Path, startup_failure: tuple[list[str], str]
) -> None:
    args, fragment = startup_failure
    result = run_directory(["--data-dir", str(tmp_path), *args])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert errors and fragment in errors[-1]


def test_help_exits_zero_and_mentions_every_flag_and_its_environment_variable() -> None:
    result = run_directory(["--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: p2pchat-directory")
    for flag in FLAGS:
        assert flag in result.stdout, flag
        env = "P2PCHAT_" + flag.removeprefix("--").replace("-", "_").upper()
        if flag == "--tls-name":
            env = "P2PCHAT_TLS_NAMES"
        assert env in result.stdout, env
