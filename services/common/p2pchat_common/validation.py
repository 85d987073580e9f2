"""Input rules shared by every p2pchat service, enforced at the edge before anything is stored.

Usernames become file names (`<username>.db`) and certificate names, so their alphabet is strict:
3 to 32 characters, a lower-case ASCII letter first, then lower-case letters, digits, '_' or '-'.
Input is case-insensitive and normalised to lower case. Addresses are "host:port" with a DNS name,
an IPv4 address or a bracketed IPv6 address (a zone id only as a short interface name: "%eth0").
No text anywhere may hold control characters (p2pchat_common.text, checked for every request),
and an error message shows a client's text only through `shown`: cut short and escaped.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from p2pchat_common.errors import InvalidArgument
from p2pchat_common.text import CONTROL, control_message
from p2pchat_common.text import shown as shown  # the one way to echo a value: see there

USERNAME_MIN = 3
USERNAME_MAX = 32
PASSWORD_MIN = 8
PASSWORD_MAX = 1024
ADDRESS_MAX = 261  # 253-character DNS name, ':' and a 5-digit port, with room for brackets
USERNAME_RULE = (
    f"{USERNAME_MIN}-{USERNAME_MAX} characters: a letter first, then letters, digits, '_' or '-'"
)

_USERNAME = re.compile(r"[a-z][a-z0-9_-]*")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_ZONE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}")  # an interface name ("eth0") or index


def normalize_username(raw: str) -> str:
    """The canonical form of a username, or InvalidArgument saying which rule it breaks."""
    if not raw:
        raise InvalidArgument("username is required")
    if len(raw) > USERNAME_MAX:
        raise InvalidArgument(f"username is too long (at most {USERNAME_MAX} characters)")
    # Check ASCII before lower-casing: some characters (the Kelvin sign) lower-case to ASCII.
    name = raw.lower() if raw.isascii() else ""
    if len(name) < USERNAME_MIN or not _USERNAME.fullmatch(name):
        raise InvalidArgument(f"invalid username {shown(raw)}: {USERNAME_RULE}")
    return name


def validate_password(password: str) -> str:
    if not password:
        raise InvalidArgument("password is required")
    if len(password) < PASSWORD_MIN:
        raise InvalidArgument(f"password is too short (at least {PASSWORD_MIN} characters)")
    if len(password) > PASSWORD_MAX:
        raise InvalidArgument(f"password is too long (at most {PASSWORD_MAX} characters)")
    if CONTROL.search(password):
        raise InvalidArgument(control_message("password"))
    return password


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(raw: str, *, what: str = "address", allow_port_zero: bool = False) -> HostPort:
    """Parses "host:port" (DNS name, IPv4, or [IPv6]); InvalidArgument when malformed.

    Port 0 ("any free port") is accepted only for listen addresses (`allow_port_zero`).
    """
    if not raw:
        raise InvalidArgument(f"{what} is required (host:port)")
    if len(raw) > ADDRESS_MAX:
        raise InvalidArgument(f"{what} is too long (at most {ADDRESS_MAX} characters)")
    host, sep, port_text = raw.rpartition(":")
    if not sep or not host:
        raise InvalidArgument(f"invalid {what} {shown(raw)}: expected host:port")
    lowest = 0 if allow_port_zero else 1
    if not (port_text.isascii() and port_text.isdigit()) or not lowest <= int(port_text) <= 65535:
        raise InvalidArgument(f"invalid {what} {shown(raw)}: port must be {lowest}-65535")
    if host.startswith("[") and host.endswith("]"):
        ip, percent, zone = host[1:-1].partition("%")
        if percent and not _ZONE_ID.fullmatch(zone):
            raise InvalidArgument(
                f"invalid {what} {shown(raw)}: an IPv6 zone id is an interface name "
                "(a letter or digit, then up to 15 letters, digits, '_', '.' or '-')"
            )
        try:
            return HostPort(str(ipaddress.IPv6Address(ip)) + percent + zone, int(port_text))
        except ValueError:
            raise InvalidArgument(f"invalid {what} {shown(raw)}: bad IPv6 address") from None
    if ":" in host:
        raise InvalidArgument(f"invalid {what} {shown(raw)}: put an IPv6 address in [brackets]")
    try:
        return HostPort(str(ipaddress.IPv4Address(host)), int(port_text))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise InvalidArgument(f"invalid {what} {shown(raw)}: bad host name")
    return HostPort(host.lower(), int(port_text))


def normalize_address(raw: str, *, what: str = "address") -> str:
    """The canonical "host:port" text of an address; empty input stays empty (no address)."""
    return str(parse_address(raw, what=what)) if raw else ""


def utf8_size_over(text: str, limit: int) -> int | None:
    """The size of `text` in UTF-8 when it is over `limit` bytes, else None. A character takes
    1 to 4 bytes, so the text is encoded only when its length says it could be over."""
    if 4 * len(text) <= limit:
        return None
    size = len(text.encode())
    return size if size > limit else None


def is_wildcard(host: str) -> bool:
    """Whether a listen host (brackets allowed) means every interface: no one dials it."""
    return host.strip("[]") in ("", "0.0.0.0", "::")
