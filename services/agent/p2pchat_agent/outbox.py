"""Group commit of outgoing messages.

Every message a user sends is committed as pending before anything goes on the wire. Sends that
arrive together (several CLI callers, a fast chat) are stored by one writer in one transaction,
in the order they were submitted; then each is handed on (live event, peer link) without being
read back from the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from p2pchat_agent.agent_store import AgentStore
from p2pchat_agent.messages import OutgoingMessage, StoredMessage

log = logging.getLogger(__name__)


class Outbox:
    def __init__(
        self,
        store: AgentStore,
        on_stored: Callable[[list[StoredMessage]], None],
    ) -> None:
        self._store = store
        self._on_stored = on_stored
        self._waiting: list[tuple[OutgoingMessage, asyncio.Future[StoredMessage]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox")

    def submit(self, message: OutgoingMessage) -> asyncio.Future[StoredMessage]:
        """Queues `message`; the future resolves once it is committed as pending. Messages are
        stored in the order they were submitted."""
        if self._task is None or self._task.done():
            raise RuntimeError("the outbox is closed")
        future: asyncio.Future[StoredMessage] = asyncio.get_running_loop().create_future()
        self._waiting.append((message, future))
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._waiting = self._waiting, []
            if not batch:
                continue
            try:
                stored = await self._store.add_outgoing_many([m for m, _ in batch])
            except Exception as exc:  # nothing of the batch was stored: each sender hears why
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), message in zip(batch, stored, strict=True):
                if not future.done():
                    future.set_result(message)
            self._on_stored(stored)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(RuntimeError("the agent is shutting down"))
        self._waiting.clear()
