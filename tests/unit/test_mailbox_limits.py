"""The mailbox's limits as policy: the flags that set them, the per-depositor token bucket and
the reasons a full mailbox gives."""

from __future__ import annotations

from datetime import timedelta

import pytest

from p2pchat_directory.config import load_settings
from p2pchat_directory.mailbox import DepositRate, quota_refusal


def test_mailbox_flags_default_to_10000_envelopes_64_mib_100_per_second_and_14_days() -> None:
    s = load_settings([], environ={})
    assert s.mailbox_max_envelopes == 10_000
    assert s.mailbox_max_bytes == 64 * 1024 * 1024
    assert s.mailbox_deposit_rate == 100.0
    assert s.mailbox_expiry == timedelta(days=14)


def test_mailbox_flags_come_from_the_environment_and_flags_override_it() -> None:
    env = {
        "P2PCHAT_MAILBOX_MAX_ENVELOPES": "50",
        "P2PCHAT_MAILBOX_MAX_BYTES": "1000",
        "P2PCHAT_MAILBOX_DEPOSIT_RATE": "2.5",
        "P2PCHAT_MAILBOX_EXPIRY": "3600",
    }
    s = load_settings([], environ=env)
    assert (s.mailbox_max_envelopes, s.mailbox_max_bytes) == (50, 1000)
    assert (s.mailbox_deposit_rate, s.mailbox_expiry) == (2.5, timedelta(hours=1))
    s = load_settings(
        ["--mailbox-max-envelopes", "7", "--mailbox-deposit-rate", "9", "--mailbox-expiry", "60"],
        environ=env,
    )
    assert (s.mailbox_max_envelopes, s.mailbox_max_bytes) == (7, 1000)
    assert (s.mailbox_deposit_rate, s.mailbox_expiry) == (9.0, timedelta(minutes=1))


@pytest.mark.parametrize(
    "argv",
    [
        ["--mailbox-max-envelopes", "0"],
        ["--mailbox-max-bytes", "-1"],
        ["--mailbox-deposit-rate", "0"],
        ["--mailbox-expiry", "soon"],
    ],
)
def test_a_mailbox_limit_that_is_not_positive_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings(argv, environ={})
    assert caught.value.code == 2
    assert argv[0] in capsys.readouterr().err


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_deposit_rate_allows_a_burst_of_20_seconds_then_the_rate() -> None:
    clock = Clock()
    rate = DepositRate(2.0, clock)  # a bucket of 40
    assert rate.take("alice", 40) == 0
    assert rate.take("alice", 1) == pytest.approx(0.5)
    assert rate.take("bob", 40) == 0  # one bucket per depositor
    clock.now += 0.5
    assert rate.take("alice", 1) == 0
    assert rate.take("alice", 3) == pytest.approx(1.5)  # refused: nothing taken
    clock.now += 1.5
    assert rate.take("alice", 3) == 0
    clock.now += 3600  # refills to the burst, not beyond
    assert rate.take("alice", 40) == 0
    assert rate.take("alice", 1) > 0


def test_a_batch_larger_than_the_burst_passes_once_the_bucket_is_full() -> None:
    clock = Clock()
    rate = DepositRate(1.0, clock)  # a bucket of 20
    assert rate.take("alice", 500) == 0
    assert rate.take("alice", 500) == pytest.approx(20.0)
    clock.now += 20
    assert rate.take("alice", 500) == 0


def test_tokens_given_back_and_idle_depositors_forgotten() -> None:
    clock = Clock()
    rate = DepositRate(1.0, clock)
    assert rate.take("alice", 20) == 0
    rate.give_back("alice", 20)  # the deposit stored nothing
    assert rate.take("alice", 20) == 0
    rate.take("bob", 1)
    clock.now += 20
    rate.forget_idle()
    assert rate._buckets == {}  # full buckets are as good as none


def test_a_full_mailbox_says_what_it_holds_and_its_limit() -> None:
    assert quota_refusal("bob", 9_999, 1, 10_000, "envelopes") is None
    assert quota_refusal("bob", 10_000, 1, 10_000, "envelopes") == (
        "bob's mailbox is full: 10000 envelopes held (the limit is 10000 envelopes); "
        "try again once they collect it"
    )
    assert quota_refusal("bob", 9_999, 2, 10_000, "envelopes") == (
        "bob's mailbox is nearly full: 9999 envelopes held, 2 envelopes more would pass the "
        "limit of 10000 envelopes; try again once they collect it"
    )
    refusal = quota_refusal("bob", 64 * 2**20, 10, 64 * 2**20, "bytes")
    assert refusal is not None and "64.0 MiB held (the limit is 64.0 MiB)" in refusal
