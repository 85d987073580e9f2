"""Terminal input and output for the CLI.

On a terminal, prompt_toolkit reads lines so that messages printed while the user types appear
above the line being typed, without mangling it. Without a terminal (pipes, scripts), lines come
from stdin and go to stdout plainly. Passwords are read without echo.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
import threading
from collections.abc import Iterator

from prompt_toolkit import PromptSession
from prompt_toolkit.patch_stdout import patch_stdout


class Console:
    def __init__(self, interactive: bool | None = None) -> None:
        if interactive is None:
            interactive = sys.stdin.isatty() and sys.stdout.isatty()
        self.interactive = interactive
        self._sessions: dict[bool, PromptSession[str]] = {}
        self._lines: asyncio.Queue[str | None] | None = None

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", flush=True)

    async def ask(self, prompt: str, *, erase: bool = False) -> str:
        """One line of input; EOFError on Ctrl-D / end of input, KeyboardInterrupt on Ctrl-C.

        With `erase`, the typed line disappears once entered (a chat shows it formatted instead).
        """
        if self.interactive:
            session = self._sessions.get(erase)
            if session is None:
                session = self._sessions[erase] = PromptSession(erase_when_done=erase)
            return await session.prompt_async(prompt)
        self.say_inline(prompt)
        line = await self._next_line()
        return line

    async def ask_secret(self, prompt: str) -> str:
        if self.interactive:
            return await asyncio.to_thread(getpass.getpass, prompt)
        self.say_inline(prompt)
        return await self._next_line()

    def say_inline(self, text: str) -> None:
        print(text, end="", flush=True)

    async def _next_line(self) -> str:
        if self._lines is None:
            self._lines = asyncio.Queue()
            loop = asyncio.get_running_loop()
            queue = self._lines

            def read() -> None:  # a daemon thread: never blocks the program's exit
                for line in sys.stdin:
                    loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
                loop.call_soon_threadsafe(queue.put_nowait, None)

            threading.Thread(target=read, daemon=True, name="stdin").start()
        line = await self._lines.get()
        if line is None:
            self._lines.put_nowait(None)  # stay at end of input
            raise EOFError
        return line

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """While inside, printed lines appear above the prompt being edited."""
        if self.interactive:
            with patch_stdout(raw=True):
                yield
        else:
            yield
