"""The interactive menus of the seed, with its numbers:
`1. Register 2. Log in 3. Exit`, then `1. View contacts 2. Add contact 3. Connect to user
4. Set up as server 5. Log out`, and after them `6. Contact requests` (consent)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from p2pchat_agent.cli import chat, consent
from p2pchat_agent.cli.client import AgentConnection, CliError, Exit
from p2pchat_agent.cli.console import Console
from p2pchat_agent.cli.render import added_line, contact_rows, safe

MAIN_MENU = "\n1. Register\n2. Log in\n3. Exit"
USER_MENU = (
    "\n1. View contacts\n2. Add contact\n3. Connect to user\n4. Set up as server\n5. Log out"
    "\n6. Contact requests"
)


@contextmanager
def _carry_on(console: Console) -> Iterator[None]:
    """A menu action that fails is reported and the menu goes on; an unreachable agent ends the
    program (exit code 3). Ctrl-C or Ctrl-D inside an action only abandons that action."""
    try:
        yield
    except CliError as exc:
        if exc.code == Exit.UNREACHABLE:
            raise
        console.error(str(exc))
    except (EOFError, KeyboardInterrupt):
        console.say("")


async def ask_new_password(console: Console) -> str | None:
    password = await console.ask_secret("Password: ")
    again = await console.ask_secret("Password (again): ")
    if password != again:
        console.error("the passwords do not match")
        return None
    return password


async def _register(conn: AgentConnection, console: Console) -> None:
    username = (await console.ask("Username: ")).strip()
    password = await ask_new_password(console)
    if password is None:
        return
    status = await conn.status()
    address = (await console.ask(f"Address host:port [Enter = {status.address}]: ")).strip()
    name = await conn.register(username, password, address)
    console.say(f"Registered {safe(name)}. You can log in now.")


async def _login(conn: AgentConnection, console: Console) -> str:
    username = (await console.ask("Username: ")).strip()
    password = await console.ask_secret("Password: ")
    response = await conn.login(username, password)
    console.say(f"Logged in as {safe(response.username)} (reachable at {safe(response.address)}).")
    return response.username


async def _user_menu(conn: AgentConnection, console: Console, me: str) -> bool:
    """Runs the logged-in menu; True when the user logged out, False to exit the program."""
    while True:
        console.say(USER_MENU)
        try:
            choice = (await console.ask("Choose an option: ")).strip()
        except (EOFError, KeyboardInterrupt):
            return False
        with _carry_on(console):
            if choice == "1":
                contacts = await conn.contacts()
                console.say("Your contacts:")
                for row in contact_rows(contacts):
                    console.say(row)
            elif choice == "2":
                username = (await console.ask("Contact's username: ")).strip()
                pinned = (await console.ask("Pin an address host:port [Enter = theirs]: ")).strip()
                contact = await conn.add_contact(username, pinned)  # the seed's prompts only
                line = added_line(contact)
                console.say(line[0].upper() + line[1:] + ".")
            elif choice == "3":
                peer = (await console.ask("Connect to (username): ")).strip()
                if peer:
                    await chat.chat(conn, console, peer, me)
            elif choice == "4":
                await chat.serve(conn, console, me)
            elif choice == "5":
                await conn.logout()
                console.say("Logged out.")
                return True
            elif choice == "6":
                await consent.requests_screen(conn, console)
            else:
                console.error(f"{choice!r} is not an option: choose 1-6")


async def run_menu(conn: AgentConnection, console: Console) -> int:
    status = await conn.status()  # fails early, with exit code 3, when the agent is not there
    if status.logged_in:
        console.say(f"Welcome back, {safe(status.username)}.")
        if not await _user_menu(conn, console, status.username):
            return Exit.OK
    while True:
        console.say(MAIN_MENU)
        try:
            choice = (await console.ask("Choose an option: ")).strip()
        except (EOFError, KeyboardInterrupt):
            return Exit.OK
        with _carry_on(console):
            if choice == "1":
                await _register(conn, console)
            elif choice == "2":
                me = await _login(conn, console)
                if not await _user_menu(conn, console, me):
                    return Exit.OK
            elif choice == "3":
                console.say("Goodbye.")
                return Exit.OK
            else:
                console.error(f"{choice!r} is not an option: choose 1-3")
