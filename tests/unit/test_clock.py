"""ClockWatch (p2pchat_agent.clock): the directory's clock against ours, a warning past a minute."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from p2pchat_agent.clock import CLOCK_TOLERANCE, ClockWatch
from p2pchat_common.timestamps import to_timestamp


def server_time(offset: timedelta) -> Timestamp:
    return to_timestamp(datetime.now(UTC) + offset)


def test_an_answer_without_a_time_measures_nothing() -> None:
    watch = ClockWatch()
    watch.note(Timestamp(), datetime.now(UTC))
    assert watch.offset is None and watch.warning is None


def test_a_difference_within_the_tolerance_is_no_warning() -> None:
    watch = ClockWatch()
    watch.note(server_time(timedelta(seconds=5)), datetime.now(UTC))
    assert watch.offset is not None and abs(watch.offset) < CLOCK_TOLERANCE
    assert watch.warning is None


@pytest.mark.parametrize(("minutes", "way"), [(10, "behind"), (-10, "ahead of")])
def test_a_clock_off_by_more_than_the_tolerance_is_warned_about_once(
    minutes: int, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    watch = ClockWatch()
    with caplog.at_level(logging.WARNING, logger="p2pchat_agent.clock"):
        for _ in range(3):
            watch.note(server_time(timedelta(minutes=minutes)), datetime.now(UTC))
    assert watch.warning is not None
    assert watch.warning.startswith(f"this agent's clock is 600 s {way} the directory's")
    assert [r.getMessage() for r in caplog.records] == [watch.warning]
