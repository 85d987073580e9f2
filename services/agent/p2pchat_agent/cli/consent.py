"""The consent subcommands: `requests`, `accept`, `decline`, `block`, `unblock`, `policy`,
`invite create|list|revoke` (COMMANDS, added to commands.COMMANDS), and the menu's
`6. Contact requests` screen (`requests_screen`)."""

from __future__ import annotations

import argparse
from typing import Any

from p2pchat.v1 import common_pb2
from p2pchat_agent.cli.client import AgentConnection, Exit
from p2pchat_agent.cli.console import Console
from p2pchat_agent.cli.render import (
    POLICY_WORDS,
    contact_json,
    invite_json,
    invite_row,
    print_json,
    request_rows,
    safe,
)

_POLICIES = {word: value for value, word in POLICY_WORDS.items()}
_DONE = {
    "accept": "{} is an accepted contact now: you can chat",
    "decline": "declined {}'s request",
    "block": "blocked {}: nothing from them gets through",
    "unblock": "unblocked {}",
}


async def cmd_requests(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    requests = await conn.requests()
    if args.json:
        print_json([contact_json(r) for r in requests])
    else:
        for row in request_rows(requests):
            console.say(row)
    return Exit.OK


async def answer(conn: AgentConnection, console: Console, how: str, user: str) -> None:
    await conn.answer(how, user)
    console.say(_DONE[how].format(safe(user.lower())))


def _answer(how: str) -> Any:
    async def handler(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
        await answer(conn, console, how, args.user)
        return Exit.OK

    return handler


async def cmd_policy(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    if args.policy is None:
        policy = await conn.get_policy()
    else:
        policy = await conn.set_policy(_POLICIES[args.policy])
    console.say(f"contact requests from: {POLICY_WORDS.get(policy, 'unknown')}")  # type: ignore[call-overload]
    return Exit.OK


async def cmd_invite(conn: AgentConnection, console: Console, args: argparse.Namespace) -> int:
    if args.action == "create":
        invite = await conn.create_invite(args.expires or 0, args.uses or 0)
        if args.json:
            print_json(invite_json(invite))
        else:
            console.say(f"invite code: {safe(invite.code)}  (id {safe(invite.id)})")
            console.say(invite_row(invite))
    elif args.action == "list":
        invites = await conn.invites()
        if args.json:
            print_json([invite_json(i) for i in invites])
        elif not invites:
            console.say("(no invite codes: make one with `p2pchat invite create`)")
        for invite in invites if not args.json else []:
            console.say(invite_row(invite))
    else:
        if not args.id:
            console.error("invite revoke needs the code's id (see `p2pchat invite list`)")
            return Exit.USAGE
        invite = await conn.revoke_invite(args.id)
        console.say(f"revoked invite {safe(invite.id)}: it admits nobody from now on")
    return Exit.OK


async def requests_screen(conn: AgentConnection, console: Console) -> None:
    """The menu's 6. Contact requests: the list, then accept, decline or block one."""
    requests: list[common_pb2.Contact] = await conn.requests()
    console.say("Contact requests awaiting your answer:")
    for row in request_rows(requests):
        console.say(row)
    if not requests:
        return
    pick = (await console.ask("Answer which (number or username, Enter = none): ")).strip()
    if not pick:
        return
    chosen = (
        requests[int(pick) - 1].username
        if pick.isdigit() and 0 < int(pick) <= len(requests)
        else pick
    )
    how = (await console.ask("a = accept, d = decline, b = block: ")).strip().lower()
    verbs = {"a": "accept", "d": "decline", "b": "block"}
    if how not in verbs:
        console.error(f"{how!r} is not an answer: choose a, d or b")
        return
    await answer(conn, console, verbs[how], chosen)
