"""p2pchat-agent settings: flags over P2PCHAT_* environment over defaults; bad values exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pchat_agent.cli.app import build_parser as build_cli_parser
from p2pchat_agent.config import (
    Settings,
    default_agent_address,
    default_control_listen,
    load_settings,
)


@pytest.mark.parametrize(
    "environ",
    [
        {"P2PCHAT_LOG_LEVEL": "LOUD"},
        {"P2PCHAT_DIRECTORY_INSECURE": "maybe"},
        {"P2PCHAT_BODY_LIMIT": "-1"},
        {"P2PCHAT_BODY_LIMIT": str(4 * 1024 * 1024 + 1)},  # would not fit a frame
        {"P2PCHAT_PEER_LISTEN": "nowhere"},
    ],
)
def test_a_bad_environment_value_is_a_usage_error(
    environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings([], environ=environ)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_log_level_from_the_environment_is_case_insensitive_and_a_flag_wins() -> None:
    assert load_settings([], environ={"P2PCHAT_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    settings = load_settings(["--log-level", "error"], environ={"P2PCHAT_LOG_LEVEL": "debug"})
    assert settings.log_level == "ERROR"


def test_the_largest_body_limit_is_4_mib() -> None:
    assert load_settings(["--body-limit", str(4 * 1024 * 1024)], environ={}).body_limit == 4194304


# -- the control address -------------------------------------------------------------------------


def test_the_control_api_is_a_socket_in_the_data_dir_by_default() -> None:
    default = load_settings([], environ={})
    assert default == Settings(data_dir=Path("data"))  # nothing given: derived when used
    assert default.control_address == "unix:data/control.sock"
    assert default.control_socket == Path("data/control.sock")
    flag = load_settings(["--data-dir", "/srv/alice"], environ={})
    assert flag.control_address == "unix:/srv/alice/control.sock"
    env = load_settings([], environ={"P2PCHAT_DATA_DIR": "/data"})
    assert env.control_socket == Path("/data/control.sock")
    assert Settings(data_dir=Path("/x")).control_address == default_control_listen(Path("/x"))


@pytest.mark.parametrize(
    ("given", "address", "path"),
    [
        ("unix:/run/p2pchat/alice.sock", "unix:/run/p2pchat/alice.sock", "/run/p2pchat/alice.sock"),
        ("unix:///run/alice.sock", "unix:/run/alice.sock", "/run/alice.sock"),
        ("unix:ctl.sock", "unix:ctl.sock", "ctl.sock"),
        ("/run/alice.sock", "unix:/run/alice.sock", "/run/alice.sock"),
        ("./ctl.sock", "unix:ctl.sock", "ctl.sock"),
    ],
)
def test_control_listen_takes_a_unix_socket_path(given: str, address: str, path: str) -> None:
    for settings in (
        load_settings(["--control-listen", given], environ={}),
        load_settings([], environ={"P2PCHAT_CONTROL_LISTEN": given}),
    ):
        assert settings.control_address == address
        assert settings.control_socket == Path(path)


def test_control_listen_on_tcp_keeps_its_meaning() -> None:
    tcp = load_settings(["--control-listen", "127.0.0.1:0"], environ={})
    assert tcp.control_address == "127.0.0.1:0" and tcp.control_socket is None
    env = load_settings([], environ={"P2PCHAT_CONTROL_LISTEN": "localhost:50053"})
    assert env.control_address == "localhost:50053" and env.control_socket is None
    # A socket never needs --allow-remote-control; a non-loopback port does.
    assert load_settings(["--control-listen", "unix:/x.sock"], environ={}).control_socket
    forced = ["--control-listen", "0.0.0.0:50053", "--allow-remote-control"]
    assert load_settings(forced, environ={}).control_address == "0.0.0.0:50053"


@pytest.mark.parametrize("given", ["unix:", "0.0.0.0:50053", "nowhere", "127.0.0.1:99999"])
def test_a_bad_control_listen_is_a_usage_error(
    given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--control-listen", given], environ={})
    assert exit_info.value.code == 2
    assert "--control-listen" in capsys.readouterr().err


def test_the_cli_default_agent_is_where_an_agent_in_the_same_environment_serves() -> None:
    assert default_agent_address({}) == "unix:data/control.sock"
    data = {"P2PCHAT_DATA_DIR": "/data"}
    assert default_agent_address(data) == "unix:/data/control.sock"
    assert default_agent_address({**data, "P2PCHAT_AGENT": "127.0.0.1:7"}) == "127.0.0.1:7"
    # The agent's own P2PCHAT_CONTROL_LISTEN (a remote-control container), wildcards on loopback.
    tcp = {**data, "P2PCHAT_CONTROL_LISTEN": "0.0.0.0:50053"}
    assert default_agent_address(tcp) == "127.0.0.1:50053"
    assert default_agent_address({"P2PCHAT_CONTROL_LISTEN": "[::]:9"}) == "[::1]:9"
    assert default_agent_address({"P2PCHAT_CONTROL_LISTEN": "[::1]:9"}) == "[::1]:9"
    assert default_agent_address({"P2PCHAT_CONTROL_LISTEN": "unix:/s"}) == "unix:/s"
    assert default_agent_address({**tcp, "P2PCHAT_AGENT": "/a/b.sock"}) == "/a/b.sock"


@pytest.mark.parametrize(
    ("argv", "environ", "agent"),
    [
        ([], {}, "unix:data/control.sock"),
        ([], {"P2PCHAT_DATA_DIR": "/data"}, "unix:/data/control.sock"),
        ([], {"P2PCHAT_AGENT": "/tmp/a/control.sock"}, "unix:/tmp/a/control.sock"),
        (["--agent", "unix:/tmp/b.sock"], {}, "unix:/tmp/b.sock"),
        (["--agent", "/tmp/c.sock"], {}, "unix:/tmp/c.sock"),
        (["--agent", "127.0.0.1:50053"], {"P2PCHAT_DATA_DIR": "/data"}, "127.0.0.1:50053"),
    ],
)
def test_the_cli_agent_flag_takes_a_socket_or_host_port(
    argv: list[str], environ: dict[str, str], agent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("P2PCHAT_AGENT", "P2PCHAT_CONTROL_LISTEN", "P2PCHAT_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert build_cli_parser().parse_args([*argv, "status"]).agent == agent


def test_the_revocation_interval_is_30_s_unless_set() -> None:
    assert load_settings([], environ={}).revocation_interval == 30.0
    env = {"P2PCHAT_REVOCATION_INTERVAL": "5"}
    assert load_settings([], environ=env).revocation_interval == 5.0
    assert load_settings(["--revocation-interval", "2.5"], environ=env).revocation_interval == 2.5
