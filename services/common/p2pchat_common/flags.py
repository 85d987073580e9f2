"""Helpers for the services' command-line flags and their P2PCHAT_* environment equivalents.

argparse runs `type` on string defaults too, so a bad environment value fails exactly like a bad
flag: a usage error with exit code 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence

from p2pchat_common.errors import InvalidArgument
from p2pchat_common.validation import parse_address, shown

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def env(environ: Mapping[str, str], name: str, default: str) -> str:
    return environ.get(f"P2PCHAT_{name}", default)


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    """A boolean from P2PCHAT_<name>; anything but a clear yes/no is a ValueError, never a
    silent no."""
    value = env(environ, name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    choices = ", ".join(_TRUE + _FALSE[1:])
    raise ValueError(f"P2PCHAT_{name}={shown(value)} is not a boolean (use one of {choices})")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {shown(text)}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {shown(text)}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {shown(text)}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {shown(text)}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {shown(text)}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {shown(text)}")
    return value


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not one of {', '.join(LOG_LEVELS)}")
    return level


def address(what: str, *, allow_port_zero: bool = False) -> Callable[[str], str]:
    """An argparse type for HOST:PORT flags, giving the canonical form."""

    def parse(text: str) -> str:
        try:
            return str(parse_address(text, what=what, allow_port_zero=allow_port_zero))
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def add_lifecycle_flags(
    parser: argparse.ArgumentParser,
    environ: Mapping[str, str],
    grace_period: float,
    level: str,
) -> None:
    """The flags every service has: --grace-period and --log-level (with their P2PCHAT_* vars)."""
    parser.add_argument(
        "--grace-period",
        type=positive_float,
        default=env(environ, "GRACE_PERIOD", str(grace_period)),
        help="seconds in-flight work gets to finish on SIGTERM [P2PCHAT_GRACE_PERIOD] "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        type=log_level,
        default=env(environ, "LOG_LEVEL", level),
        help=f"one of {', '.join(LOG_LEVELS)} [P2PCHAT_LOG_LEVEL] (default %(default)s)",
    )


def parse(
    build: Callable[[Mapping[str, str]], argparse.ArgumentParser],
    prog: str,
    argv: Sequence[str] | None,
    environ: Mapping[str, str],
) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Builds a service's parser from the environment and parses `argv`; a bad environment
    value is a usage error (exit 2) like a bad flag."""
    try:
        parser = build(environ)
    except ValueError as exc:
        argparse.ArgumentParser(prog=prog).error(str(exc))
    return parser, parser.parse_args(argv)
