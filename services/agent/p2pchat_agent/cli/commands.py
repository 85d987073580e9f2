"""The subcommands, declared as data: name, arguments, help and handler.

Every handler returns an exit code: 0 ok, 1 usage, 2 refused by the agent or directory (the
reason is printed), 3 agent unreachable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from p2pchat_agent.cli import chat, consent, menu
from p2pchat_agent.cli.client import AgentConnection, CliError, Exit
from p2pchat_agent.cli.console import Console
from p2pchat_agent.cli.render import (
    STATUS_NAMES,
    added_line,
    contact_json,
    contact_rows,
    local_time,
    message_json,
    message_line,
    print_json,
    safe,
)
from p2pchat_agent.cli.send_lines import send_lines

Handler = Callable[[AgentConnection, Console, argparse.Namespace], Awaitable[int]]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: Handler
    arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    description: str = ""


async def read_password(console: Console, args: argparse.Namespace, confirm: bool) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise CliError("--password-stdin: no password on standard input", Exit.USAGE)
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise CliError(
            "no terminal to ask the password on: pipe it in with --password-stdin", Exit.USAGE
        )
    if confirm:
        password = await menu.ask_new_password(console)
        if password is None:
            raise CliError("the passwords do not match", Exit.USAGE)
        return password
    return await console.ask_secret("Password: ")


async def _logged_in_user(conn: AgentConnection) -> str:
    status = await conn.status()
    if not status.logged_in:
        raise CliError("not logged in: run `p2pchat login USER` first", Exit.REFUSED)
    return status.username


async def cmd_menu(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    return await menu.run_menu(conn, console)


async def cmd_register(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    password = await read_password(console, args, confirm=True)
    name = await conn.register(args.user, password, args.address or "")
    console.say(f"registered {safe(name)}")
    return Exit.OK


async def cmd_login(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    password = await read_password(console, args, confirm=False)
    response = await conn.login(args.user, password)
    console.say(f"logged in as {safe(response.username)}; reachable at {safe(response.address)}")
    return Exit.OK


async def cmd_logout(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    await conn.logout()
    console.say("logged out")
    return Exit.OK


async def cmd_status(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    s = await conn.status()
    if args.json:
        print_json(
            {
                "logged_in": s.logged_in,
                "username": s.username or None,
                "address": s.address,
                "directory": s.directory,
                "directory_reachable": s.directory_reachable,
                "pending_messages": s.pending_messages,
                "relayed_messages": s.relayed_messages,
                "delivered_messages": s.delivered_messages,
                "linked_peers": list(s.linked_peers),
                "mailbox_connected": s.mailbox_connected,
                "envelopes_refused": s.envelopes_refused,
                "clock_offset_s": (
                    s.clock_offset.ToTimedelta().total_seconds()
                    if s.HasField("clock_offset")
                    else None
                ),
                "warnings": list(s.warnings),
            }
        )
        return Exit.OK
    console.say(f"agent:     {conn.address}")
    console.say(f"user:      {safe(s.username) if s.logged_in else '(not logged in)'}")
    console.say(f"reachable: {safe(s.address)}")
    reach = "reachable" if s.directory_reachable else "not reachable"
    console.say(f"directory: {safe(s.directory)} ({reach})")
    if s.logged_in:
        console.say(
            f"pending:   {s.pending_messages} message(s) not yet delivered, "
            f"{s.relayed_messages} of them relayed (held by the mailbox); "
            f"{s.delivered_messages} delivered"
        )
        mailbox = "collecting" if s.mailbox_connected else "not connected"
        refused = f", {s.envelopes_refused} envelope(s) refused" if s.envelopes_refused else ""
        console.say(f"mailbox:   {mailbox}{refused}")
        console.say(f"links:     {safe(', '.join(s.linked_peers)) or '(none open)'}")
        console.say(f"session:   until {local_time(s.session_expires_at, with_date=True)}")
    for warning in s.warnings:
        console.say(f"warning:   {safe(warning)}")
    return Exit.OK


async def cmd_contacts(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    contacts = await conn.contacts()
    if args.json:
        print_json([contact_json(c) for c in contacts])
    else:
        for row in contact_rows(contacts):
            console.say(row)
    return Exit.OK


async def cmd_add_contact(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    contact = await conn.add_contact(
        args.user, args.address or "", args.note or "", args.invite or ""
    )
    console.say(added_line(contact))
    return Exit.OK


async def cmd_remove_contact(
    conn: AgentConnection, console: Console, args: argparse.Namespace
) -> int:
    await conn.remove_contact(args.user)
    console.say(f"removed {args.user.lower()}")
    return Exit.OK


async def cmd_trust(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    sha = await conn.trust(args.user)
    console.say(f"now trusting {args.user.lower()}'s key {safe(sha)}")
    return Exit.OK


async def cmd_send(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    if args.text == "-":
        return await send_lines(conn, console, args.user, args.wait)
    message = await conn.send(args.user, args.text, args.wait)
    state = STATUS_NAMES.get(message.status, "unknown")
    if args.wait is not None and state in ("pending", "relayed"):
        state += f" (not delivered within {args.wait:g} s; it stays queued)"
    console.say(f"{safe(message.id)} {state}")
    return Exit.OK


async def cmd_history(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    response = await conn.history(args.user, limit=args.limit, query=args.search or "")
    if args.json:
        print_json(
            {
                "peer": args.user.lower(),
                "messages": [message_json(m) for m in response.messages],
                "has_more": response.has_more,
            }
        )
        return Exit.OK
    if not response.messages:
        console.say("(no messages)")
    for m in response.messages:
        console.say(message_line(m))
    return Exit.OK


async def cmd_chat(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    await chat.chat(conn, console, args.user, await _logged_in_user(conn))
    return Exit.OK


async def cmd_serve(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    await chat.serve(conn, console, await _logged_in_user(conn))
    return Exit.OK


def _user(p: argparse.ArgumentParser) -> None:
    p.add_argument("user", help="a username (case-insensitive)")


def _user_address(p: argparse.ArgumentParser) -> None:
    _user(p)
    p.add_argument("--address", metavar="HOST:PORT", help="where their agent is reached")


def _password(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input instead of asking",
    )


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _wait(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("--wait takes 0-3600 seconds")
    return value


def _send_args(p: argparse.ArgumentParser) -> None:
    _user(p)
    p.add_argument(
        "text",
        help="the message (UTF-8, at most 16 KiB by default); '-' sends each line of standard "
        "input as a message, in order, in batches",
    )
    p.add_argument(
        "--wait",
        nargs="?",
        const=30.0,
        type=_wait,
        metavar="SECONDS",
        help="wait until delivered (default 30 s); the state printed says whether it was",
    )


def _history_args(p: argparse.ArgumentParser) -> None:
    _user(p)
    p.add_argument("--limit", type=int, default=50, help="how many messages (1-1000, default 50)")
    p.add_argument("--search", metavar="TEXT", help="only messages matching these words")
    _json(p)


def _register_args(p: argparse.ArgumentParser) -> None:
    _user(p)
    p.add_argument(
        "--address",
        metavar="HOST:PORT",
        help="where your agent is reached (default: the agent's own advertised address)",
    )
    _password(p)


def _login_args(p: argparse.ArgumentParser) -> None:
    _user(p)
    _password(p)


def _add_contact_args(p: argparse.ArgumentParser) -> None:
    _user_address(p)
    p.add_argument("--note", metavar="TEXT", help="a note shown with your request (<= 200 chars)")
    p.add_argument("--invite", metavar="CODE", help="one of their invite codes, if they ask one")


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "policy",
        nargs="?",
        choices=["anyone", "invite", "nobody"],
        help="anyone may ask (default), only with one of your invite codes, or nobody; "
        "without it, shows the policy in force",
    )


def _uint32(text: str) -> int:
    """A whole number from 0 to 2^32 - 1 (what the request's field holds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be 0 to {2**32 - 1}: {text!r}")
    return value


def _invite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["create", "list", "revoke"])
    p.add_argument("id", nargs="?", help="revoke: the code's id (from `invite list`)")
    p.add_argument("--expires", type=_uint32, metavar="SECONDS", help="create: good for this long")
    p.add_argument("--uses", type=_uint32, metavar="N", help="create: admits N requests at most")
    _json(p)


COMMANDS = [
    Command("register", "create an account at the directory", cmd_register, _register_args),
    Command("login", "log this agent in as USER", cmd_login, _login_args),
    Command("logout", "log out (pending messages stay queued)", cmd_logout),
    Command(
        "status",
        "who is logged in, messages pending, relayed and delivered, open links, the mailbox",
        cmd_status,
        _json,
    ),
    Command(
        "contacts",
        "list your contacts: accepted (address, presence), requested, awaiting you, blocked",
        cmd_contacts,
        _json,
    ),
    Command(
        "add-contact",
        "ask USER to be your contact (accepted at once if they asked you)",
        cmd_add_contact,
        _add_contact_args,
    ),
    Command("remove-contact", "remove USER from your contacts", cmd_remove_contact, _user),
    Command("requests", "the contact requests awaiting your answer", consent.cmd_requests, _json),
    Command("accept", "accept USER's contact request", consent._answer("accept"), _user),
    Command("decline", "decline USER's contact request", consent._answer("decline"), _user),
    Command("block", "block USER: nothing from them gets through", consent._answer("block"), _user),
    Command("unblock", "lift the block on USER", consent._answer("unblock"), _user),
    Command("policy", "who may send you contact requests", consent.cmd_policy, _policy_args),
    Command(
        "invite",
        "create, list or revoke invite codes (for `policy invite`)",
        consent.cmd_invite,
        _invite_args,
    ),
    Command(
        "send",
        "send TEXT (or each line of stdin: -) to USER; prints each message's id and state",
        cmd_send,
        _send_args,
    ),
    Command("history", "print your conversation with USER", cmd_history, _history_args),
    Command("chat", "chat with USER live (history first)", cmd_chat, _user),
    Command("serve", "show every incoming message live, with replies", cmd_serve),
    Command(
        "trust",
        "accept USER's new key after a key-change warning",
        cmd_trust,
        _user,
        description="Only after checking with USER (in person, by phone) that they really "
        "moved to a new agent: a changed key can also mean someone is impersonating them.",
    ),
]
