"""Directory settings: flags over P2PCHAT_* environment over defaults; bad values exit with 2."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from p2pchat_directory.config import Settings, load_settings


def expect_usage_error(
    argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> str:
    with pytest.raises(SystemExit) as caught:
        load_settings(argv, environ=environ)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_defaults_serve_tls_on_50051_with_sqlite_files_in_the_data_dir() -> None:
    settings = load_settings([], environ={})
    assert settings == Settings(data_dir=Path("data"))
    assert settings.listen == "0.0.0.0:50051"
    assert not settings.insecure and settings.tls_cert is None and settings.tls_names == ()
    assert settings.users_url == "sqlite:///data/users.db"
    assert settings.contacts_url == "sqlite:///data/contacts.db"


def test_default_database_urls_follow_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(["--data-dir", str(tmp_path)], environ={})
    assert settings.users_url == f"sqlite:///{tmp_path}/users.db"
    assert settings.contacts_url == f"sqlite:///{tmp_path}/contacts.db"
    pg = "postgresql+psycopg://u@db/p2pchat"
    explicit = load_settings(["--users-db", pg, "--contacts-db", pg], environ={})
    assert explicit.users_url == explicit.contacts_url == pg


ENV = {
    "P2PCHAT_LISTEN": "127.0.0.1:6000",
    "P2PCHAT_DATA_DIR": "/srv/env-dir",
    "P2PCHAT_USERS_DB": "sqlite:////srv/env-users.db",
    "P2PCHAT_CONTACTS_DB": "sqlite:////srv/env-contacts.db",
    "P2PCHAT_TLS_NAMES": "dir.example,10.0.0.1",
    "P2PCHAT_INSECURE": "1",
    "P2PCHAT_SESSION_TTL": "60",
    "P2PCHAT_PRESENCE_TTL": "12.5",
    "P2PCHAT_CERTIFICATE_TTL": "3600",
    "P2PCHAT_LOGIN_MAX_FAILURES": "3",
    "P2PCHAT_LOGIN_MAX_FAILURES_PER_SOURCE": "30",
    "P2PCHAT_LOGIN_MAX_FAILURES_PER_ACCOUNT": "300",
    "P2PCHAT_LOGIN_FAILURE_WINDOW": "90",
    "P2PCHAT_GRACE_PERIOD": "2",
    "P2PCHAT_WORKERS": "16",
    "P2PCHAT_LOG_LEVEL": "DEBUG",
}


def test_environment_is_used_when_no_flag_is_given() -> None:
    s = load_settings([], environ=ENV)
    assert s.listen == "127.0.0.1:6000"
    assert s.data_dir == Path("/srv/env-dir")
    assert s.users_url == "sqlite:////srv/env-users.db"
    assert s.contacts_url == "sqlite:////srv/env-contacts.db"
    assert s.tls_names == ("dir.example", "10.0.0.1")
    assert s.insecure
    assert s.session_ttl == timedelta(seconds=60)
    assert s.presence_ttl == timedelta(seconds=12.5)
    assert s.certificate_ttl == timedelta(hours=1)
    assert s.login_max_failures == 3
    assert s.login_max_failures_per_source == 30
    assert s.login_max_failures_per_account == 300
    assert s.login_failure_window == timedelta(seconds=90)
    assert s.grace_period == 2.0
    assert s.workers == 16
    assert s.log_level == "DEBUG"


def test_flags_override_the_environment() -> None:
    argv = [
        "--listen",
        "[::1]:7000",
        "--data-dir",
        "/srv/flag-dir",
        "--users-db",
        "sqlite:////srv/flag-users.db",
        "--session-ttl",
        "30",
        "--presence-ttl",
        "5",
        "--certificate-ttl",
        "7200",
        "--login-max-failures",
        "9",
        "--login-failure-window",
        "10",
        "--login-max-failures-per-source",
        "40",
        "--login-max-failures-per-account",
        "400",
        "--grace-period",
        "0.5",
        "--workers",
        "2",
        "--log-level",
        "WARNING",
    ]
    s = load_settings(argv, environ=ENV)
    assert s.listen == "[::1]:7000"
    assert s.data_dir == Path("/srv/flag-dir")
    assert s.users_url == "sqlite:////srv/flag-users.db"
    assert s.contacts_url == "sqlite:////srv/env-contacts.db"  # no flag: still the environment
    assert s.session_ttl == timedelta(seconds=30)
    assert s.presence_ttl == timedelta(seconds=5)
    assert s.certificate_ttl == timedelta(hours=2)
    assert (s.login_max_failures, s.login_failure_window) == (9, timedelta(seconds=10))
    assert (s.login_max_failures_per_source, s.login_max_failures_per_account) == (40, 400)
    assert (s.grace_period, s.workers, s.log_level) == (0.5, 2, "WARNING")


def test_tls_name_flags_replace_the_environment_names() -> None:
    s = load_settings(["--tls-name", "flag.example"], environ=ENV)
    assert s.tls_names == ("flag.example",)


def test_tls_name_flag_repeats_and_listen_is_canonicalised() -> None:
    s = load_settings(
        ["--tls-name", "a.example", "--tls-name", "b.example", "--listen", "LOCALHOST:0"],
        environ={},
    )
    assert s.tls_names == ("a.example", "b.example")
    assert s.listen == "localhost:0"  # port 0 (any free port) is fine for a listen address


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_insecure_is_switched_on_by_flag_or_by_a_true_environment_value(value: str) -> None:
    assert load_settings(["--insecure"], environ={}).insecure
    assert load_settings([], environ={"P2PCHAT_INSECURE": value}).insecure
    assert not load_settings([], environ={"P2PCHAT_INSECURE": ""}).insecure


@pytest.mark.parametrize(
    ("argv", "environ", "fragment"),
    [
        (["--workers", "0"], {}, "must be positive"),
        (["--workers", "many"], {}, "not a whole number"),
        (["--login-max-failures", "-1"], {}, "must be positive"),
        (["--login-max-failures-per-source", "0"], {}, "must be positive"),
        ([], {"P2PCHAT_LOGIN_MAX_FAILURES_PER_ACCOUNT": "lots"}, "not a whole number"),
        (["--session-ttl", "0"], {}, "must be positive"),
        (["--presence-ttl", "soon"], {}, "not a number"),
        (["--grace-period", "-5"], {}, "must be positive"),
        (["--listen", "nohost"], {}, "listen address"),
        (["--listen", "host:99999"], {}, "port must be 0-65535"),
        (["--listen", "::1:80"], {}, "brackets"),
        (["--log-level", "LOUD"], {}, "is not one of"),
        (["--no-such-flag"], {}, "unrecognized arguments"),
        ([], {"P2PCHAT_WORKERS": "abc"}, "not a whole number"),
        ([], {"P2PCHAT_SESSION_TTL": "-1"}, "must be positive"),
        ([], {"P2PCHAT_LISTEN": "nohost"}, "listen address"),
    ],
)
def test_invalid_values_exit_with_usage_error_code_2(
    argv: list[str], environ: dict[str, str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fragment in expect_usage_error(argv, environ, capsys)


def test_an_invalid_log_level_in_the_environment_exits_with_code_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    expect_usage_error([], {"P2PCHAT_LOG_LEVEL": "LOUD"}, capsys)


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--tls-cert", "/x/cert.pem"], {}),
        (["--tls-key", "/x/key.pem"], {}),
        ([], {"P2PCHAT_TLS_CERT": "/x/cert.pem"}),
        (["--tls-key", "/x/key.pem"], {"P2PCHAT_TLS_KEY": ""}),
    ],
)
def test_tls_cert_and_key_must_be_given_together(
    argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert "--tls-cert and --tls-key go together" in expect_usage_error(argv, environ, capsys)


def test_tls_cert_and_key_from_flags_or_environment(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    s = load_settings(["--tls-cert", str(cert), "--tls-key", str(key)], environ={})
    assert (s.tls_cert, s.tls_key) == (cert, key)
    env = {"P2PCHAT_TLS_CERT": str(cert), "P2PCHAT_TLS_KEY": str(key)}
    assert load_settings([], environ=env).tls_cert == cert
    mixed = load_settings(["--tls-key", str(key)], environ={"P2PCHAT_TLS_CERT": str(cert)})
    assert (mixed.tls_cert, mixed.tls_key) == (cert, key)


def test_settings_are_frozen() -> None:
    s = load_settings([], environ={})
    with pytest.raises(AttributeError):
        s.workers = 1  # type: ignore[misc]


@pytest.mark.parametrize("name", ["bob.users.p2pchat.invalid", "invalid", "X.INVALID."])
def test_a_tls_name_under_invalid_is_refused_where_users_are_named(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ".invalid" in expect_usage_error(["--tls-name", name], {}, capsys)
    assert ".invalid" in expect_usage_error([], {"P2PCHAT_TLS_NAMES": f"ok.example,{name}"}, capsys)


def test_certificates_live_hours_by_default() -> None:
    assert load_settings([], environ={}).certificate_ttl == timedelta(hours=12)
