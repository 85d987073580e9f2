"""How a call's blocking work and hot reads run, in one place: `run` on the shared worker
threads; `read` inline on SQLite (a WAL read never waits for a writer and takes less than the
hand-off to a thread), on a thread with a database server; `plan` (a hot read-only use case,
hot.py) on the event loop on PostgreSQL, inline on SQLite."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from p2pchat_directory.db import Databases
from p2pchat_directory.hot import Plan, run_plan, run_plan_async

T = TypeVar("T")


class Workers:
    def __init__(self, executor: Executor, databases: Databases) -> None:
        self.executor = executor
        self._dbs = databases
        self._inline = databases.local_only

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a shared worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A read-only use case: inline on SQLite, on a thread with a database server (the GIL
        serialises a thread's Python with the loop's anyway)."""
        if self._inline:
            return fn(*args)
        return await self.run(fn, *args)

    async def plan(self, plan: Plan[T]) -> T:
        """A hot read-only use case: on PostgreSQL on the event loop, on SQLite inline."""
        found = self._dbs.async_readers()
        if found is not None:
            return await run_plan_async(plan, *found)
        dbs = self._dbs
        if self._inline:
            return run_plan(plan, dbs.users_reader, dbs.contacts_reader)
        return await self.run(run_plan, plan, dbs.users_reader, dbs.contacts_reader)
