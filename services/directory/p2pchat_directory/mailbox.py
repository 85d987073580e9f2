"""The sealed mailbox's use cases (MailboxService in mailbox.proto). Blocking (database,
signature checks): p2pchat_directory.mailbox_relay runs them in the server's threads.

The directory stores of an envelope its recipient, depositor, size, times and the opaque bytes;
it never sees a body nor a key that opens one. Nothing here knows about gRPC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from p2pchat_common.errors import FailedPrecondition, InvalidArgument, PermissionDenied, RateLimited
from p2pchat_common.signatures import MAILBOX_KEY_BYTES, mailbox_binding, verifies
from p2pchat_directory import mailbox_store as store
from p2pchat_directory.config import Settings
from p2pchat_directory.db import Databases
from p2pchat_directory.service import DirectoryService

log = logging.getLogger(__name__)

MAX_SIGNATURE_BYTES = 512
MAX_BATCH = 500  # envelopes per Deposit
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024 + 64 * 1024
MAX_ACKNOWLEDGE = 4096
PAGE_ENVELOPES = 500  # per CollectResponse
# About, per CollectResponse: 4 MiB less room for the framing of 500 envelopes, so that a page
# of several fits a client's default 4 MiB limit; a larger envelope goes alone.
PAGE_BYTES = 4 * 1024 * 1024 - 64 * 1024
BURST_SECONDS = 20.0  # the deposit rate's bucket holds this many seconds of it
_MAX_ID = 2**63 - 1  # ids are BIGINT: a larger one is held by no one


@dataclass(frozen=True)
class Deposited:
    recipient: str  # canonical
    ids: list[int]
    expires_at: datetime


@dataclass(frozen=True)
class HeldEnvelope:
    id: int
    depositor: str
    envelope: bytes
    deposited_at: datetime


@dataclass(frozen=True)
class Page:
    """Envelopes after some id, oldest first, within one response's limits."""

    envelopes: list[HeldEnvelope]
    last_id: int  # the id to read after next (the caller's position even if some vanished)
    more: bool  # more may be held after `last_id`


class DepositRate:
    """A token bucket per depositor: `rate` envelopes a second sustained, bursts of
    BURST_SECONDS of it. In memory, so per replica: behind N replicas a depositor may reach
    N times the rate (the per-recipient quota, in the database, bounds what is stored)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._capacity = rate * BURST_SECONDS
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # depositor -> (tokens, at)

    def _tokens(self, depositor: str, now: float) -> float:
        tokens, at = self._buckets.get(depositor, (self._capacity, now))
        return min(self._capacity, tokens + (now - at) * self._rate)

    def take(self, depositor: str, count: int) -> float:
        """Takes `count` tokens and returns 0, or takes none and returns the seconds until
        there are enough. A batch larger than the burst passes once the bucket is full."""
        cost = min(float(count), self._capacity)
        with self._lock:
            now = self._clock()
            tokens = self._tokens(depositor, now)
            if tokens < cost:
                self._buckets[depositor] = (tokens, now)
                return (cost - tokens) / self._rate
            self._buckets[depositor] = (tokens - cost, now)
            return 0.0

    def give_back(self, depositor: str, count: int) -> None:
        """Returns the tokens of a deposit that stored nothing (e.g. the mailbox was full)."""
        with self._lock:
            now = self._clock()
            tokens = self._tokens(depositor, now) + min(float(count), self._capacity)
            self._buckets[depositor] = (min(tokens, self._capacity), now)

    def forget_idle(self) -> None:
        """Drops the buckets that have filled up again (as good as absent): memory stays
        proportional to the depositors of the last BURST_SECONDS."""
        with self._lock:
            now = self._clock()
            full = [d for d in self._buckets if self._tokens(d, now) >= self._capacity]
            for depositor in full:
                del self._buckets[depositor]


def _quantity(count: int, what: str) -> str:
    return f"{count} {what}" if what != "bytes" else f"{count / 2**20:.1f} MiB"


def quota_refusal(recipient: str, held: int, adding: int, limit: int, what: str) -> str | None:
    """Why a deposit of `adding` more (envelopes or bytes) to `held` is refused, or None."""
    if held + adding <= limit:
        return None
    shown_held, shown_limit = _quantity(held, what), _quantity(limit, what)
    if held >= limit:
        state = f"is full: {shown_held} held (the limit is {shown_limit})"
    else:
        more = _quantity(adding, what)
        state = (
            f"is nearly full: {shown_held} held, {more} more would pass the limit of {shown_limit}"
        )
    return f"{recipient}'s mailbox {state}; try again once they collect it"


class MailboxService:
    def __init__(
        self,
        settings: Settings,
        dbs: Databases,
        directory: DirectoryService,
        clock: Callable[[], datetime],
    ) -> None:
        self._settings = settings
        self._engine = dbs.users_engine  # the mailbox lives in the users database
        self._directory = directory
        self._now = clock
        self._rate = DepositRate(settings.mailbox_deposit_rate)
        self._postgres = self._engine.dialect.name == "postgresql"

    def authenticate(self, token: str) -> str:
        return self._directory.authenticate(token)

    def publish_key(self, token: str, key: bytes, signature: bytes) -> None:
        name = self.authenticate(token)
        if len(key) != MAILBOX_KEY_BYTES:
            raise InvalidArgument(f"a mailbox key is {MAILBOX_KEY_BYTES} bytes, not {len(key)}")
        if not 1 <= len(signature) <= MAX_SIGNATURE_BYTES:
            raise InvalidArgument(f"the signature must be 1 to {MAX_SIGNATURE_BYTES} bytes")
        with self._engine.connect() as conn:
            found = store.identity(conn, name)
        cert_pem, key_sha256 = found if found is not None else (None, "")
        if not cert_pem:
            raise FailedPrecondition("log in with a key first: you have no certificate")
        cert = x509.load_pem_x509_certificate(cert_pem)
        if not verifies(cert, signature, mailbox_binding(name, key)):
            raise PermissionDenied(
                "the signature does not bind this mailbox key to you with your current "
                "certificate's key"
            )
        with self._engine.begin() as conn:
            store.upsert_key(conn, name, key, signature, key_sha256, self._now())
        log.info("user %s published a mailbox key", name)

    def deposit(self, token: str, recipient: str, envelopes: Sequence[bytes]) -> Deposited:
        now = self._now()
        depositor, name, user, _ = self._directory.caller_and_contact(token, recipient, now)
        if user.mailbox_key is None:
            raise FailedPrecondition(
                f"{name!r} has no mailbox key for their current identity: they must log in "
                "with an agent that publishes one"
            )
        _check_batch(envelopes)
        wait = self._rate.take(depositor, len(envelopes))
        if wait > 0:
            raise RateLimited(f"depositing too fast: retry in {max(wait, 0.1):.1f} s")
        settings = self._settings
        expires = now + settings.mailbox_expiry
        size = sum(len(e) for e in envelopes)
        try:
            with store.write_transaction(self._engine) as conn:
                if not store.lock_recipient(conn, name):  # keys are never deleted: a guard
                    raise FailedPrecondition(f"{name!r} has no mailbox key")
                count, held_bytes = store.held(conn, name, now)
                refusal = quota_refusal(
                    name, count, len(envelopes), settings.mailbox_max_envelopes, "envelopes"
                ) or quota_refusal(name, held_bytes, size, settings.mailbox_max_bytes, "bytes")
                if refusal is not None:
                    raise RateLimited(refusal)
                rows = [
                    {
                        "recipient": name,
                        "depositor": depositor,
                        "envelope": envelope,
                        "size": len(envelope),
                        "deposited_at": now,
                        "expires_at": expires,
                    }
                    for envelope in envelopes
                ]
                ids = store.insert_envelopes(conn, rows)
                if self._postgres:
                    store.notify(conn, name)  # delivered to every replica at commit
        except BaseException:
            self._rate.give_back(depositor, len(envelopes))
            raise
        log.debug("%s deposited %d envelope(s) for %s", depositor, len(ids), name)
        return Deposited(name, ids, expires)

    def page(self, recipient: str, after: int) -> Page:
        """The unexpired envelopes of `recipient` after id `after`: at most PAGE_ENVELOPES and
        about PAGE_BYTES (the sizes are read first, so no more bodies than sent are loaded)."""
        now = self._now()
        with self._engine.connect() as conn:
            sizes = store.sizes_after(conn, recipient, after, now, PAGE_ENVELOPES)
            taken, total = 0, 0
            for _, size in sizes:
                if taken and total + size > PAGE_BYTES:
                    break
                taken, total = taken + 1, total + size
            if not taken:
                return Page([], after, False)
            last = sizes[taken - 1][0]
            rows = store.envelopes_up_to(conn, recipient, after, last, now)
        more = taken < len(sizes) or len(sizes) == PAGE_ENVELOPES
        return Page([HeldEnvelope(*row) for row in rows], last, more)

    def acknowledge(self, token: str, ids: Sequence[int]) -> int:
        name = self.authenticate(token)
        if not 1 <= len(ids) <= MAX_ACKNOWLEDGE:
            raise InvalidArgument(f"acknowledge 1 to {MAX_ACKNOWLEDGE} envelopes at once")
        wanted = sorted({i for i in ids if i <= _MAX_ID})
        if not wanted:
            return 0
        with self._engine.begin() as conn:
            return store.delete_envelopes(conn, name, wanted)

    def sweep(self) -> int:
        """Deletes the expired envelopes (and forgets idle depositors); how many."""
        self._rate.forget_idle()
        with self._engine.begin() as conn:
            return store.delete_expired(conn, self._now())

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps: a tenth of the expiry, at most a minute."""
        return max(0.1, min(60.0, self._settings.mailbox_expiry.total_seconds() / 10))


def _check_batch(envelopes: Sequence[bytes]) -> None:
    if not 1 <= len(envelopes) <= MAX_BATCH:
        raise InvalidArgument(f"deposit 1 to {MAX_BATCH} envelopes at once, not {len(envelopes)}")
    for i, envelope in enumerate(envelopes):
        if not envelope:
            raise InvalidArgument(f"envelope {i} is empty")
        if len(envelope) > MAX_ENVELOPE_BYTES:
            raise InvalidArgument(
                f"envelope {i} is {len(envelope)} bytes: at most {MAX_ENVELOPE_BYTES}"
            )
