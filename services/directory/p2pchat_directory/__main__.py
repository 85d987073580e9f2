"""`p2pchat-directory`: run the directory service until SIGTERM/SIGINT."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from p2pchat_common.serving import run_service
from p2pchat_directory.config import load_settings
from p2pchat_directory.server import serve


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(argv)
    return run_service("p2pchat_directory", settings.log_level, serve(settings))


if __name__ == "__main__":
    sys.exit(main())
