"""Password hashing on threads of its own, bounded and paced, so that logins never starve the rest.

scrypt costs 65-130 ms of CPU per hash (n = 2^15, r = 8: 32 MiB of memory each). On the shared
worker pool (server.py `executor`) a burst of logins took every thread and queued without
limit, and each heartbeat and lookup waited behind them: 200 logins at one replica running
1,000 agents took its heartbeat p99 from 7 ms to 708 ms. Here hashes run on their own threads
(`--hash-workers`), and at most `--hash-queue` more may wait: past that bound Register and Login
are refused at once with RateLimited (RESOURCE_EXHAUSTED; BUSY says when to retry: when a
place will be free, each refused caller a later one) rather than queued.

Threads, not processes, because hashlib.scrypt (OpenSSL's EVP_PBE_scrypt) releases the GIL
while it hashes: 16 hashes took 1.04 s on one thread and 0.54 s on two, and a pure-Python loop
on another thread kept 99 % of its speed while a thread hashed.

Paced (`--hash-share`): together the hashing threads use at most that share of one core on
average. A thread that spent c seconds of CPU on a hash starts its next one no sooner than
c * (1 / duty - 1) seconds later, duty being the share divided among the threads, while other
hashes wait (a lone hash never waits, so logins one at a time are not slowed). Lowering the
threads' priority alone (HASH_NICE) was not enough: on a 2-core machine with 2,000 simulated
agents, a process doing nothing but scrypt on two threads at nice 10, no Login at all, took the
directory's p99 from 30 ms to 700 ms and PostgreSQL's own round trips from 4 ms to 600 ms
(bench directory_load's setup, an outside scrypt loop; the cores' shared caches and memory
bandwidth are not scheduled by priority). One thread hashing all the time: still 11x. One
thread at half a core: within the run's own noise (in-window ratio 1.4). So a burst of logins
is spread out: at the default half core, about 4-6 logins a second per replica, while a lone
login never waits.

A caller takes a ticket (`admit`) before any other work of its call, so that a refused call
has read and written nothing and cost no thread. The ticket's place is given back when its
hash has run, not when its caller stops waiting: the hash of a cancelled call still holds its
thread until it ends, and the bound counts the threads' real work.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from p2pchat_common.errors import RateLimited
from p2pchat_directory.passwords import hash_password, verify_password

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY = "the directory is busy hashing passwords: retry in {seconds} s"
FIRST_GUESS = 0.1  # s of CPU per hash until one has been measured


# How much nicer than the rest the hashing threads are (on Linux a thread's own): the
# scheduler gives the event loop and the database threads the CPU first, and hashing what they
# leave (with the event loop busy, at nice 10 a hashing thread gets about a tenth of a core).
# Without it a burst of 200 logins took both cores of a 2-core machine for 14 s: the other
# calls' p99 went from 28 ms to 491 ms (bench directory_load). Logins then wait their turn,
# within the bound, or are told to come back. Not enough on its own: see the pacing above.
HASH_NICE = 10


def _lower_priority() -> None:
    try:
        thread = threading.get_native_id()  # new threads start at the process's nice value
        os.setpriority(
            os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + HASH_NICE)
        )
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: hashing as before
        log.info("password hashing threads keep their priority: %s", exc)


class HashingPool:
    """`workers` threads that run scrypt, using `share` of one core between them on average
    (None: as much as they can), and room for `queue` more hashes to wait."""

    def __init__(self, workers: int, queue: int, share: float | None = None) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"hash workers must be >= 1 and queue >= 0, not {workers}, {queue}")
        if share is not None and not 0 < share <= workers:
            raise ValueError(f"the hashing share must be > 0 and <= {workers}, not {share}")
        self.bound = workers + queue
        self._workers = workers
        self._duty = 1.0 if share is None else share / workers  # of each thread's time
        self._hash_cpu = FIRST_GUESS  # a moving average of the CPU seconds of one hash
        self._next_free = 0.0  # monotonic time of the next place promised to a refused caller
        self._paced = threading.local()  # per hashing thread: when its next hash may start
        self._executor = ThreadPoolExecutor(
            workers, thread_name_prefix="scrypt", initializer=_lower_priority
        )
        self._lock = threading.Lock()  # tickets are given back from the hashing threads
        self._taken = 0
        self._refusing = False

    @property
    def taken(self) -> int:
        """Tickets out: hashes running or waiting, and calls on their way to one."""
        with self._lock:
            return self._taken

    def admit(self) -> HashTicket:
        """A ticket for one hash; RateLimited(BUSY, with `retry_after`) at once when `bound`
        are out."""
        with self._lock:
            if self._taken >= self.bound:
                warn, self._refusing = not self._refusing, True
            else:
                warn, self._refusing = False, False
                self._taken += 1
                return HashTicket(self)
        if warn:  # once per episode, not once per refused call of a burst
            log.warning("password hashing saturated (%d running or waiting): refusing", self.bound)
        raise RateLimited(BUSY.format(seconds=self.retry_after()))

    def retry_after(self) -> int:
        """Whole seconds (at least 1) a refused caller is told to wait: when a place will be
        free for it, each refused caller given a later one, one hash apart. So a burst of
        refused logins comes back spread out, at the pace the pool hashes, rather than every
        second or all at once (each try is a call the replica serves: 5,000 of them in a
        minute slowed every other call)."""
        with self._lock:
            per_place = self._hash_cpu / self._duty / self._workers  # CPU and pause, per thread
            now = time.monotonic()
            drained = now + self._taken * per_place  # when the hashes now out will have run
            slot = max(self._next_free, drained)
            self._next_free = slot + per_place
            return max(1, math.ceil(slot - now))

    def _give_back(self) -> None:
        with self._lock:
            self._taken -= 1

    def _pace(self, fn: Callable[..., T], *args: Any) -> T:
        """In a hashing thread: waits out the pause its last hash earned, unless this hash is
        the only one out (nothing waits behind it: logins one at a time are never slowed),
        then hashes."""
        delay = getattr(self._paced, "next_at", 0.0) - time.monotonic()
        if delay > 0 and self.taken > 1:
            time.sleep(delay)
        cpu = time.thread_time()
        try:
            return fn(*args)
        finally:
            used = time.thread_time() - cpu
            self._paced.next_at = time.monotonic() + used * (1 / self._duty - 1)
            with self._lock:
                self._hash_cpu += (used - self._hash_cpu) / 8

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        future = self._executor.submit(self._pace, fn, *args)
        future.add_done_callback(lambda _: self._give_back())
        return future

    def shutdown(self) -> None:
        """Cancels the hashes still waiting and waits for the running ones (a hash and the pause
        before it, at most)."""
        self._executor.shutdown(wait=True, cancel_futures=True)


class HashTicket:
    """A place in the pool for one `hash` or `verify`. Use it as a context manager: a ticket
    whose call ends before it hashes (bad input, a throttled login, a database error) gives its
    place back on exit."""

    def __init__(self, pool: HashingPool) -> None:
        self._pool = pool
        self._used = False

    async def hash(self, password: str) -> str:
        return await self._run(hash_password, password)

    async def verify(self, password: str, stored: str) -> bool:
        return await self._run(verify_password, password, stored)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._used:
            raise RuntimeError("a hashing ticket is good for one hash")
        future = self._pool._submit(fn, *args)  # from here its done callback gives it back
        self._used = True
        return await asyncio.wrap_future(future)

    def __enter__(self) -> HashTicket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._used:
            self._used = True
            self._pool._give_back()
