"""`p2pchat` entry point: the seed's menu with no arguments, or one subcommand for scripts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from p2pchat_agent.cli.client import AgentConnection, CliError, Exit
from p2pchat_agent.cli.commands import COMMANDS, cmd_menu
from p2pchat_agent.cli.console import Console
from p2pchat_agent.config import control_address, default_agent_address
from p2pchat_common.files import private_dir, private_file

EPILOG = """\
exit codes: 0 ok, 1 usage error, 2 refused by the agent or the directory (reason printed),
3 agent unreachable.

examples:
  p2pchat                                  the interactive menu
  p2pchat register alice                   asks the password twice, without echo
  echo "$PW" | p2pchat login alice --password-stdin
  p2pchat add-contact bob
  p2pchat send bob "hello" --wait
  p2pchat history bob --search hello --json
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(Exit.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="p2pchat",
        description="Chat with your contacts through your p2pchat agent. Without a command, "
        "shows the menu: 1. Register 2. Log in 3. Exit, and once logged in 1. View contacts "
        "2. Add contact 3. Connect to user 4. Set up as server 5. Log out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--agent",
        metavar="unix:PATH|HOST:PORT",
        type=control_address("agent address"),
        default=default_agent_address(os.environ),
        help="the agent's control socket (unix:PATH, or any PATH with a /), or HOST:PORT for "
        "an agent run with --control-listen HOST:PORT [P2PCHAT_AGENT] (default %(default)s: "
        "where an agent with this environment serves, P2PCHAT_CONTROL_LISTEN, else "
        "P2PCHAT_DATA_DIR/control.sock, else data/control.sock)",
    )
    parser.set_defaults(handler=cmd_menu)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        command.arguments(p)
        p.set_defaults(handler=command.handler)
    return parser


def _log_to_file() -> None:
    """The CLI logs to a file so that the terminal stays clean; a private one (0600 in 0700)."""
    state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
    try:
        log_file = private_file(private_dir(state / "p2pchat") / "cli.log")
        logging.basicConfig(
            filename=log_file,
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    except OSError:
        logging.basicConfig(handlers=[logging.NullHandler()])


async def _run(args: argparse.Namespace) -> int:
    conn = AgentConnection(args.agent)
    try:
        return int(await args.handler(conn, Console(), args))
    finally:
        await conn.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_file()
    try:
        return asyncio.run(_run(args))
    except CliError as exc:
        print(f"p2pchat: {exc}", file=sys.stderr)
        return int(exc.code)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
