"""Register and Login as the event loop runs them: their database phases on the shared worker
threads, scrypt on the hashing pool (hashing.py) in between, awaited from the loop. So no shared
thread ever hashes, nor waits for a hash, and a burst of logins leaves those threads to the
heartbeats and lookups.

Login: a hashing ticket first (refused at once when the pool is full: nothing read, nothing
written), then the checks, the failed-login throttles and the stored hash in one hot read
(DirectoryService.begin_login_reads, on the loop like a Lookup: a burst of 200 logins once put
200 ORM transactions on the shared threads at once, and the lookups meanwhile waited up to
1.2 s; a throttled login is refused before any hashing), then scrypt
against that hash (the dummy one for an unknown name, at the same cost), then on a shared
thread the failure recorded or the session made (finish_login).

Register: the checks (on the loop: no I/O), a ticket, scrypt, then the insert on a shared thread.
"""

from __future__ import annotations

import asyncio

from p2pchat_directory.hashing import HashingPool
from p2pchat_directory.service import DirectoryService, LoginResult
from p2pchat_directory.workers import Workers

# Logins whose checks are read at once: the rest wait their turn (they wait for their hash
# anyway), and the hot readers' connections stay free for the lookups. 200 logins arriving at
# once otherwise queued 200 reads ahead of every lookup (p99 400 ms for a second or two).
CHECKS_AT_ONCE = 2


class Accounts:
    def __init__(self, service: DirectoryService, workers: Workers, hashing: HashingPool) -> None:
        self._svc = service
        self._workers = workers
        self._hashing = hashing
        self._checks = asyncio.Semaphore(CHECKS_AT_ONCE)

    async def register(self, username: str, password: str, address: str) -> str:
        account = self._svc.check_registration(username, password, address)
        with self._hashing.admit() as ticket:
            password_hash = await ticket.hash(password)
        return await self._workers.run(self._svc.add_account, account, password_hash)

    async def login(
        self, username: str, password: str, address: str, csr_pem: bytes, source: str
    ) -> LoginResult:
        with self._hashing.admit() as ticket:
            async with self._checks:
                attempt = await self._workers.plan(
                    self._svc.begin_login_reads(username, password, address, source)
                )
            verified = await ticket.verify(password, attempt.stored_hash)
        return await self._workers.run(self._svc.finish_login, attempt, verified, csr_pem)
