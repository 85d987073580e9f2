"""What the services keep on disk is private: databases (with their -wal and -shm files), keys
and sessions are 0600 and the data dirs 0700, for the directory and the agents alike; only the
directory's public CA certificates (ca.pem) are 0644. In-process (the helpers alone) and as a
real process (where the umask 0077 is set too)."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p2pchat.v1 import directory_pb2 as pb
from p2pchat.v1 import directory_pb2_grpc
from p2pchat_common.files import private_dir, private_file
from tests.support.agent import InProcessAgent, logged_in, wait_until
from tests.support.cli import run_cli
from tests.support.directory import PASSWORD, DirectoryProcess, InProcessDirectory, channel_to


@pytest.fixture(autouse=True)
def _no_inherited_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children inherit os.environ: a P2PCHAT_* variable of the developer's shell must not leak."""
    for name in [n for n in os.environ if n.startswith("P2PCHAT_")]:
        monkeypatch.delenv(name)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def modes(folder: Path) -> dict[str, str]:
    return {p.name: oct(mode(p)) for p in sorted(folder.iterdir())}


def directory_certificate(name: str) -> bool:
    """ca.pem and the directory's other CA certificates (never a key): public by design."""
    return name.endswith(".pem") and "key" not in name


def assert_private(
    folder: Path,
    expected: set[str],
    *,
    public: Callable[[str], bool] = lambda name: False,
    locks_too: bool = False,
) -> None:
    """`folder` is 0700 and holds `expected`; every file in it is 0600 but the `public` ones
    (0644) and, unless `locks_too`, lock files."""
    assert mode(folder) == 0o700, oct(mode(folder))
    found = modes(folder)
    assert expected <= set(found), found
    for name, shown in found.items():
        if public(name):
            assert shown == oct(0o644), (name, found)
        elif name.endswith(".lock") and not locks_too:
            continue
        else:
            assert shown == oct(0o600), (name, found)


def register_and_login(stub: directory_pb2_grpc.DirectoryServiceStub, name: str) -> None:
    stub.Register(pb.RegisterRequest(username=name, password=PASSWORD), timeout=30)
    stub.Login(pb.LoginRequest(username=name, password=PASSWORD), timeout=30)


DIRECTORY_FILES = {
    "ca.pem",
    "ca-key.pem",
    "users.db",
    "users.db-wal",
    "users.db-shm",
    "contacts.db",
    "contacts.db-wal",
    "contacts.db-shm",
}


# -- the helpers ---------------------------------------------------------------------------------


def test_sqlite_gives_the_wal_and_shm_files_the_mode_of_a_0600_database(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a umask that would make new files 0644
    try:
        db = private_file(private_dir(tmp_path / "data") / "x.db")
        conn = sqlite3.connect(db)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE t (x)")
            conn.execute("INSERT INTO t VALUES (1)")
            conn.commit()
            assert modes(tmp_path / "data") == {
                "x.db": "0o600",
                "x.db-shm": "0o600",
                "x.db-wal": "0o600",
            }
        finally:
            conn.close()
    finally:
        os.umask(old)


def test_existing_folders_and_files_of_ours_are_tightened(tmp_path: Path) -> None:
    folder, file = tmp_path / "open", tmp_path / "open" / "users.db"
    folder.mkdir(mode=0o755)
    file.write_bytes(b"")
    folder.chmod(0o755)
    file.chmod(0o644)
    assert private_file(file) == file and private_dir(folder) == folder
    assert (mode(folder), mode(file)) == (0o700, 0o600)
    assert file.read_bytes() == b""  # never truncated or rewritten
    old = os.umask(0o022)
    try:
        nested = private_dir(tmp_path / "a" / "b")  # the parents it makes are private too
    finally:
        os.umask(old)
    assert nested.is_dir() and (mode(tmp_path / "a"), mode(nested)) == (0o700, 0o700)


# -- the directory -------------------------------------------------------------------------------


@pytest.mark.parametrize("db_backend", ["sqlite"])
def test_the_directory_data_dir_is_0700_and_its_databases_and_keys_0600(
    make_directory: Callable[..., InProcessDirectory], tmp_path: Path
) -> None:
    # A data dir left world-readable by an older version is tightened, and so is its database.
    data = tmp_path / "directory"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "users.db").write_bytes(b"")  # an empty file is an empty SQLite database
    (data / "users.db").chmod(0o644)
    directory = make_directory(users_db="", contacts_db="")  # SQLite files in the data dir
    assert directory.settings.data_dir == data
    stub = directory.stub()
    register_and_login(stub, "alice")
    assert_private(data, DIRECTORY_FILES, public=directory_certificate)


@pytest.fixture
def directory_process(tmp_path: Path) -> Iterator[DirectoryProcess]:
    proc = DirectoryProcess(["--data-dir", str(tmp_path / "directory")])
    try:
        yield proc
    finally:
        proc.close()


def test_a_directory_process_makes_every_file_private_but_ca_pem(
    directory_process: DirectoryProcess, tmp_path: Path
) -> None:
    data = tmp_path / "directory"
    ca_pem = (data / "ca.pem").read_bytes()
    with channel_to(directory_process.port, ca_pem) as channel:
        register_and_login(directory_pb2_grpc.DirectoryServiceStub(channel), "alice")
    # With the process's umask 0077, even the files no helper made (the CA's lock) are 0600.
    assert_private(data, DIRECTORY_FILES, public=directory_certificate, locks_too=True)


# -- the agents ----------------------------------------------------------------------------------


def test_an_agent_data_dir_is_0700_and_its_key_session_and_database_0600(
    make_agent: Callable[..., InProcessAgent], tmp_path: Path
) -> None:
    alice, bob = logged_in(make_agent, "alice", "bob")
    alice.send("bob", "hello bob", wait=10)
    wait_until(lambda: [m.body for m in bob.history("alice")] == ["hello bob"])
    for name in ("alice", "bob"):
        expected = {
            f"{name}.key",
            f"{name}.crt",
            "session.json",
            f"{name}.db",
            f"{name}.db-wal",
            f"{name}.db-shm",
        }
        assert_private(tmp_path / f"agent-{name}", expected)


def test_the_cli_log_is_private(tmp_path: Path) -> None:
    result = run_cli(f"unix:{tmp_path / 'nobody.sock'}", tmp_path, "status")
    assert result.returncode == 3  # no agent there; the CLI logged it
    state = tmp_path / "cli-state"
    assert (mode(state), mode(state / "p2pchat")) == (0o700, 0o700)
    assert mode(state / "p2pchat" / "cli.log") == 0o600
