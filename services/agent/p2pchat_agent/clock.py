"""How far this agent's clock is from the directory's, measured from the directory's answers.

Certificates are valid from an hour before they are issued, so an agent an hour behind still
works; but message times and certificate lifetimes depend on the clock, so a difference of more
than CLOCK_TOLERANCE is logged once and shown in `p2pchat status`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp

from p2pchat_common.timestamps import from_timestamp

log = logging.getLogger(__name__)

CLOCK_TOLERANCE = timedelta(minutes=1)


class ClockWatch:
    def __init__(self) -> None:
        self.offset: timedelta | None = None  # the directory's clock minus ours

    def note(self, server_time: Timestamp, asked: datetime) -> None:
        """Measures from an answer to a call made at `asked` (the directory's time is taken as
        the middle of the round trip)."""
        if not server_time.seconds:
            return  # a directory that does not say its time
        now = datetime.now(UTC)
        was_off = self.warning is not None
        self.offset = from_timestamp(server_time) - (asked + (now - asked) / 2)
        if self.warning is not None and not was_off:
            log.warning("%s", self.warning)

    @property
    def warning(self) -> str | None:
        """Why this agent's clock needs fixing, or None."""
        if self.offset is None or abs(self.offset) <= CLOCK_TOLERANCE:
            return None
        seconds = round(abs(self.offset).total_seconds())
        way = "behind" if self.offset > timedelta(0) else "ahead of"
        return (
            f"this agent's clock is {seconds} s {way} the directory's: set the system clock "
            "(certificates and message times depend on it)"
        )
