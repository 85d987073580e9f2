"""The interactive menu of the seed, driven through a real pseudo-terminal against a real
directory and agents on loopback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pexpect

from tests.support.agent import InProcessAgent, wait_until
from tests.support.cli import Terminal, spawn_menu

PASSWORD = "menu password 1"
MAIN = ["1. Register", "2. Log in", "3. Exit"]
USER = [
    "1. View contacts",
    "2. Add contact",
    "3. Connect to user",
    "4. Set up as server",
    "5. Log out",
]


def expect_menu(child: Terminal, items: list[str]) -> None:
    for item in items:
        child.expect_exact(item)
    child.expect_exact("Choose an option:")


def register(child: Terminal, name: str) -> None:
    expect_menu(child, MAIN)
    child.sendline("1")
    child.expect_exact("Username:")
    child.sendline(name)
    child.expect_exact("Password:")
    child.sendline(PASSWORD)
    child.expect_exact("Password (again):")
    child.sendline(PASSWORD)
    child.expect_exact("[Enter = ")
    child.sendline("")
    child.expect_exact(f"Registered {name}. You can log in now.")


def login(child: Terminal, name: str) -> None:
    expect_menu(child, MAIN)
    child.sendline("2")
    child.expect_exact("Username:")
    child.sendline(name)
    child.expect_exact("Password:")
    child.sendline(PASSWORD)
    child.expect_exact(f"Logged in as {name}")


def add_contact(child: Terminal, name: str) -> None:
    expect_menu(child, USER)
    child.sendline("2")
    child.expect_exact("Contact's username:")
    child.sendline(name)
    child.expect_exact("Pin an address")
    child.sendline("")
    child.expect_exact(f"Added {name}")


def test_the_seed_usage_step_by_step_two_users_chat_both_ways(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    agents = {name: make_agent(name) for name in ("alice", "bob")}
    screens = {n: spawn_menu(a.server.control_port, tmp_path) for n, a in agents.items()}
    alice, bob = screens["alice"], screens["bob"]
    try:
        for name, child in screens.items():
            register(child, name)
            login(child, name)
        add_contact(alice, "bob")
        add_contact(bob, "alice")

        expect_menu(alice, USER)
        alice.sendline("1")  # View contacts
        alice.expect(r"bob\s+127\.0\.0\.1:\d+\s+online")

        # bob leaves a message before alice connects: it is in the history she sees.
        expect_menu(bob, USER)
        bob.sendline("3")
        bob.expect_exact("Connect to (username):")
        bob.sendline("alice")
        bob.expect_exact("you are live")
        bob.expect_exact("bob>")
        bob.sendline("hello alice, from before")
        bob.expect_exact("delivered to alice")

        expect_menu(alice, USER)
        alice.sendline("3")
        alice.expect_exact("Connect to (username):")
        alice.sendline("bob")
        alice.expect_exact("bob: hello alice, from before")  # history printed on connect
        alice.expect_exact("you are live")
        alice.sendline("hi bob, live now")
        bob.expect_exact("alice: hi bob, live now")  # appears live on bob's screen
        alice.expect_exact("delivered to bob")
        bob.sendline("great, it works")
        alice.expect_exact("bob: great, it works")

        alice.sendline("/history 2")
        alice.expect_exact("--- last 2: 2 message(s) ---")
        alice.sendline("/search works")
        alice.expect_exact("--- search 'works': 1 message(s) ---")
        alice.sendline("/quit")
        alice.expect_exact("left the chat with bob")
        bob.sendcontrol("d")  # Ctrl-D leaves a chat too
        bob.expect_exact("left the chat with alice")

        # Set up as server: shows the address and every incoming message, with replies.
        expect_menu(bob, USER)
        bob.sendline("4")
        bob.expect(r"reachable at 127\.0\.0\.1:\d+")
        expect_menu(alice, USER)
        alice.sendline("3")
        alice.expect_exact("Connect to (username):")
        alice.sendline("bob")
        alice.expect_exact("you are live")
        alice.sendline("are you serving?")
        bob.expect_exact("alice: are you serving?")
        bob.sendline("yes, replying from the server screen")
        alice.expect_exact("bob: yes, replying from the server screen")
        bob.expect_exact("[→ alice]")  # the reply's send has returned: bob's prompt is back
        bob.sendcontrol("c")  # Ctrl-C leaves the server screen, not the program
        bob.expect_exact("stopped serving")
        alice.sendline("/quit")

        for child in (alice, bob):
            expect_menu(child, USER)
            child.sendline("5")
            child.expect_exact("Logged out.")
            expect_menu(child, MAIN)
            child.sendline("3")
            child.expect_exact("Goodbye.")
            child.expect(pexpect.EOF)
            child.close()
            assert child.exitstatus == 0
        assert "Traceback" not in (alice.before or "") + (bob.before or "")
    finally:
        for child in screens.values():
            child.close(force=True)


def test_bad_menu_input_and_wrong_password_return_to_the_menu(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    agent = make_agent("carol")
    child = spawn_menu(agent.server.control_port, tmp_path)
    try:
        expect_menu(child, MAIN)
        child.sendline("9")
        child.expect_exact("error: '9' is not an option: choose 1-3")
        child.sendline("banana")
        child.expect_exact("error: 'banana' is not an option")
        register(child, "carol")
        expect_menu(child, MAIN)
        child.sendline("2")
        child.expect_exact("Username:")
        child.sendline("carol")
        child.expect_exact("Password:")
        child.sendline("not the password")
        child.expect_exact("error: wrong username or password")
        login(child, "carol")
        expect_menu(child, USER)
        child.sendline("3")
        child.expect_exact("Connect to (username):")
        child.sendline("nobody")
        child.expect_exact("error: no such user")
        expect_menu(child, USER)
        child.sendline("2")
        child.expect_exact("Contact's username:")
        child.sendline("bad name!")
        child.expect_exact("Pin an address")
        child.sendline("")
        child.expect_exact("error: invalid username")
        expect_menu(child, USER)
        child.sendline("1")
        child.expect_exact("no contacts yet")
        expect_menu(child, USER)
        child.sendcontrol("d")  # Ctrl-D at the menu leaves the program cleanly
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert "Traceback" not in (child.before or "")
        wait_until(lambda: True)
    finally:
        child.close(force=True)


def test_registration_with_mismatched_passwords_registers_nothing(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    agent = make_agent("dave")
    child = spawn_menu(agent.server.control_port, tmp_path)
    try:
        expect_menu(child, MAIN)
        child.sendline("1")
        child.expect_exact("Username:")
        child.sendline("dave")
        child.expect_exact("Password:")
        child.sendline(PASSWORD)
        child.expect_exact("Password (again):")
        child.sendline(PASSWORD + "x")
        child.expect_exact("error: the passwords do not match")
        login_attempt = child
        expect_menu(login_attempt, MAIN)
        child.sendline("2")
        child.expect_exact("Username:")
        child.sendline("dave")
        child.expect_exact("Password:")
        child.sendline(PASSWORD)
        child.expect_exact("error: wrong username or password")
    finally:
        child.close(force=True)


def test_menu_without_an_agent_exits_3_with_a_clear_message(tmp_path: Path) -> None:
    from tests.support.process import free_port

    child = spawn_menu(free_port(), tmp_path)
    child.expect_exact("cannot reach the agent")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3


def test_menu_6_lists_a_contact_request_and_accepts_it(
    make_agent: Callable[[str], InProcessAgent], tmp_path: Path
) -> None:
    """The seed's menu keeps 1-5; 6. Contact requests shows the request (with its note) and
    answers it: the requester becomes an accepted contact in View contacts."""
    agents = {name: make_agent(name) for name in ("alice", "bob")}
    screens = {n: spawn_menu(a.server.control_port, tmp_path) for n, a in agents.items()}
    alice, bob = screens["alice"], screens["bob"]
    try:
        for name, child in screens.items():
            register(child, name)
            login(child, name)
        add_contact(alice, "bob")  # a request: bob has not asked alice
        expect_menu(bob, [*USER, "6. Contact requests"])
        bob.sendline("6")
        bob.expect_exact("Contact requests awaiting your answer:")
        bob.expect(r"1\. alice \(asked ")
        bob.expect_exact("Answer which")
        bob.sendline("1")
        bob.expect_exact("a = accept, d = decline, b = block:")
        bob.sendline("a")
        bob.expect_exact("alice is an accepted contact now")
        expect_menu(bob, USER)
        bob.sendline("1")
        bob.expect(r"alice\s+127\.0\.0\.1:\d+\s+online")
    finally:
        for child in screens.values():
            child.close(force=True)
