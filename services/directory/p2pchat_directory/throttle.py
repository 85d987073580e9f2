"""How long failed logins hold further logins back: pure policy, no database (the counts come
from repository.login_checks_reads in one SELECT).

Three throttles, each over the failures of the window (`--login-failure-window`; older ones are
forgotten). Past its threshold, a throttle refuses logins, without checking the password or
recording anything, until a wait after its latest failure that doubles with each further
failure: base x 2^(failures - threshold), at most MAX_WAIT and never beyond the window.

- per (username, source), `--login-max-failures`: one client guessing one password;
- per source, `--login-max-failures-per-source`: one client guessing across many usernames;
- per username, `--login-max-failures-per-account`: a distributed attack on one account. With
  the defaults its cap (100) is far above what one source can try in a window (about 25: the
  two throttles above hold it back first), so this is the only lock that reaches every client,
  the owner too, and the only one a single source cannot set off alone.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from p2pchat_directory.config import Settings
from p2pchat_directory.repository import Failures, RecentFailures

WAIT = timedelta(seconds=30)  # per (username, source) and per username
WAIT_PER_SOURCE = timedelta(seconds=60)
MAX_WAIT = timedelta(hours=1)
_MAX_DOUBLINGS = 16  # 2^16 x 30 s is far past MAX_WAIT; keeps the arithmetic small


def throttle_wait(
    failures: Failures, threshold: int, base: timedelta, window: timedelta, now: datetime
) -> float:
    """Seconds one throttle still refuses logins for (0: none)."""
    if failures.latest is None or failures.count < threshold:
        return 0.0
    doubled = base * (1 << min(failures.count - threshold, _MAX_DOUBLINGS))
    until = failures.latest + min(doubled, MAX_WAIT, window)
    return max(0.0, (until - now).total_seconds())


def login_refusal(
    settings: Settings, name: str, recent: RecentFailures, now: datetime
) -> str | None:
    """Why a login of `name` is refused now, with the longest of the waits in whole seconds;
    None when it may be tried."""
    window = settings.login_failure_window
    refusals = (
        (
            throttle_wait(
                recent.account_and_source, settings.login_max_failures, WAIT, window, now
            ),
            f"too many failed logins for {name!r} from your address",
        ),
        (
            throttle_wait(
                recent.source, settings.login_max_failures_per_source, WAIT_PER_SOURCE, window, now
            ),
            "too many failed logins from your address",
        ),
        (
            throttle_wait(
                recent.account, settings.login_max_failures_per_account, WAIT, window, now
            ),
            f"too many failed logins for {name!r}",
        ),
    )
    wait, why = max(refusals, key=lambda refusal: refusal[0])
    return f"{why}; try again in {max(math.ceil(wait), 1)} s" if wait > 0 else None
