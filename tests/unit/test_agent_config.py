"""p2pchat-agent settings: flags over P2PCHAT_* environment over defaults; bad values exit 2."""

from __future__ import annotations

import pytest

from p2pchat_agent.config import load_settings


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
