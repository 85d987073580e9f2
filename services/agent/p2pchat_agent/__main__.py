"""`p2pchat-agent`: run one user's agent until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from p2pchat_agent.config import load_settings
from p2pchat_agent.server import serve
from p2pchat_common.errors import StartupError


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(settings))
    except (StartupError, OSError) as exc:
        logging.getLogger("p2pchat_agent").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
