"""`p2pchat-agent`: run one user's agent until SIGTERM/SIGINT."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from p2pchat_agent.config import load_settings
from p2pchat_agent.server import serve
from p2pchat_common.serving import run_service


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    return run_service("p2pchat_agent", settings.log_level, serve(settings))


if __name__ == "__main__":
    sys.exit(main())
