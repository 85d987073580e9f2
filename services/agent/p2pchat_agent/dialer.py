"""Dialling with backoff: while messages are not yet delivered to a peer without a direct link,
one task per peer looks its address up (the last known one when the directory is down) and
tries to link, waiting 0.5 s doubling up to `retry_max` (with jitter) between attempts. The
wait is kept per peer across tasks (a peer found unreachable is not dialled again for each new
message) and reset once a link with the peer opens, whoever dialled.

An attempt that fails, or a peer offline by presence (not dialled at all, when the mailbox is
on), calls `unreachable(peer, online)`: the link manager then relays through the mailbox
meanwhile (`online`: the peer was online by presence, so it collects now)."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_common.errors import AlreadyExists, DomainError, FailedPrecondition, Unavailable
from p2pchat_common.validation import shown

log = logging.getLogger(__name__)

FIRST_DELAY = 0.5
# How long close() waits for the cancelled diallers. A dialler running a link has once been
# seen not to end on cancellation (CI: an agent's stop waited 60 s in `dial-bob`, its link's
# delivery tasks never cancelled); shutdown then goes on without it rather than hang.
CLOSE_WAIT = 5.0


@dataclass(frozen=True)
class Target:
    """Where to dial a peer, and the key the directory says is its current one ("" when the
    directory could not be asked and the last known address is used)."""

    address: str
    key_sha256: str


class Dialer:
    def __init__(
        self,
        directory: DirectoryClient,
        retry_max: float,
        has_pending: Callable[[str], Awaitable[bool]],
        is_linked: Callable[[str], bool],
        connect: Callable[[str, Target], Awaitable[None]],
        unreachable: Callable[[str, bool], None] = lambda _peer, _online: None,
        skip_offline: Callable[[], bool] = lambda: False,
    ) -> None:
        """`connect(peer, target)` links and runs until the link ends; `is_linked(peer)`: a
        direct link is open; while `skip_offline()`, a peer offline by presence is not dialled."""
        self._directory = directory
        self._retry_max = retry_max
        self._has_pending = has_pending
        self._is_linked = is_linked
        self._connect = connect
        self._unreachable = unreachable
        self._skip_offline = skip_offline
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()  # peers asked for while their dialler was running
        self._addresses: dict[str, str] = {}  # last known address per peer
        self._backoff: dict[str, tuple[float, float]] = {}  # peer: (next delay, not before)
        self._online: dict[str, bool] = {}  # peer: online by presence at the last lookup
        self._closing = False

    def ensure(self, peer: str) -> None:
        """Starts dialling `peer` unless a dialler runs already (it ends at once when nothing
        is pending or a link is open)."""
        if self._closing:
            return
        if peer in self._tasks:
            # It may be between reading "nothing pending" and ending: it looks again first.
            self._again.add(peer)
            return
        task = asyncio.get_running_loop().create_task(self._loop(peer), name=f"dial-{peer}")
        self._tasks[peer] = task
        task.add_done_callback(lambda _t: self._tasks.pop(peer, None))

    def reached(self, peer: str) -> None:
        """A link with `peer` opened: the next attempt, if any, starts without waiting."""
        self._backoff.pop(peer, None)

    def unreachable_now(self, peer: str) -> bool:
        """Whether the last attempt to link with `peer` failed (and no link opened since)."""
        return peer in self._backoff

    def remember_address(self, peer: str, address: str) -> None:
        if address:
            self._addresses[peer] = address

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, stuck = await asyncio.wait(tasks, timeout=CLOSE_WAIT)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: it ended the way it ended
        for task in stuck:
            log.warning(
                "%s did not end within %.0f s of its cancellation; shutting down without it",
                task.get_name(),
                CLOSE_WAIT,
            )

    async def _target_of(self, peer: str) -> Target:
        try:
            found = await self._directory.lookup(peer)
        except Unavailable:
            if peer in self._addresses:
                return Target(self._addresses[peer], "")
            raise
        self.remember_address(peer, found.contact.address)
        self._online[peer] = found.contact.online
        if not found.contact.online and self._skip_offline():
            raise Unavailable(f"{peer} is offline")
        if not found.contact.address:
            raise FailedPrecondition(f"{peer} has no known address yet")
        return Target(found.contact.address, found.public_key_sha256)

    async def _loop(self, peer: str) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing and not self._is_linked(peer):
            delay, not_before = self._backoff.get(peer, (FIRST_DELAY, 0.0))
            if not_before > loop.time():
                await asyncio.sleep(not_before - loop.time())
                continue
            self._again.discard(peer)  # what is asked from now on, this read may miss
            if not await self._has_pending(peer):
                if peer in self._again:
                    continue
                return
            self._online.pop(peer, None)
            try:
                await self._connect(peer, await self._target_of(peer))
                continue  # the link ran and ended (`reached` reset the wait)
            except asyncio.CancelledError:
                raise
            except AlreadyExists:
                continue  # a link the peer dialled won the race: the peer is reachable
            except (DomainError, grpc.RpcError, OSError, ssl.SSLError, TimeoutError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else None
                reason = shown(detail or str(exc) or type(exc).__name__, 200, quoted=False)
                log.info("cannot reach %s (%s); retrying in %.1f s", peer, reason, delay)
            except Exception:
                log.exception("unexpected error while linking with %s", peer)
            wait = delay * random.uniform(0.8, 1.2)
            self._backoff[peer] = (min(delay * 2, self._retry_max), loop.time() + wait)
            self._unreachable(peer, self._online.get(peer, False))
