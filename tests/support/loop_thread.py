"""Runs asyncio servers on a private event loop in a background thread, so that tests stay
plain synchronous code that talks to them over real gRPC channels."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import sys
import threading
import traceback
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Runs `coro` on the loop; past `timeout`, prints where every task and thread was
        (a hang then says where it hung) and raises TimeoutError."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            try:
                print(self._where(), file=sys.stderr)
            except RuntimeError:  # the tasks changed while being listed: no picture then
                pass
            raise

    def _where(self) -> str:
        out = io.StringIO()
        out.write("loop thread: a call timed out; its tasks and the threads were at:\n")
        for task in asyncio.all_tasks(self.loop):
            out.write(f"-- {task!r}\n")
            for frame in task.get_stack(limit=8):
                out.write("".join(traceback.format_stack(frame, limit=1)))
        for ident, frame in sys._current_frames().items():
            out.write(f"-- thread {ident}\n{''.join(traceback.format_stack(frame, limit=8))}")
        return out.getvalue()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
