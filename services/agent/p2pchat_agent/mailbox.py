"""The sending side of the directory's sealed mailbox: the second transport under Delivery.

`Mailbox` is what one session keeps for it: our mailbox key (published at the directory with
the binding of our identity key), the checked mailbox keys of peers, and deposits.
`MailboxTransport` is the Transport to one peer through it: each message is sealed to the
peer's mailbox key (sealing.py) and deposited; the mailbox then holds it (HeldByMailbox:
relayed) until the peer collects it, commits it and sends its receipt back (inbox.py).

A peer's mailbox key is used only once checked: the certificate the directory returns with it
must carry the key pinned for the peer (pinned now, on first contact), and that key must have
signed the mailbox key (the binding), so the directory cannot substitute a key of its own.
A deposit the mailbox refuses (full, too fast) leaves the messages pending with the reason
(`p2pchat history` shows it) and ends the run: the link manager tries again with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from p2pchat.v1 import directory_pb2
from p2pchat_agent.agent_store import AgentStore
from p2pchat_agent.conversations import direct_key
from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_agent.identity import Identity, load_certificate
from p2pchat_agent.messages import IncomingMessage, StoredMessage
from p2pchat_agent.pins import KeyPins
from p2pchat_agent.sealing import (
    MailboxPrivateKey,
    MailboxPublicKey,
    bind,
    check_binding,
    seal,
    seal_receipt,
)
from p2pchat_agent.transport import HeldByMailbox, Received
from p2pchat_common.errors import DomainError, FailedPrecondition
from p2pchat_common.files import write_private
from p2pchat_common.timestamps import from_timestamp
from p2pchat_common.tls import public_key_sha256

log = logging.getLogger(__name__)

DEPOSIT_ENVELOPES = 500  # envelopes per Deposit at most (mailbox.proto)
DEPOSIT_BYTES = 4 * 1024 * 1024  # bytes of envelopes per Deposit, about
KEY_CACHE_SECONDS = 300.0  # a peer's checked mailbox key is asked again after this
SEAL_INLINE = 8  # messages sealed on the event loop; more go to a thread (~0.1 ms each)


def mailbox_key_path(data_dir: Path, username: str) -> Path:
    return data_dir / f"{username}.mailbox.key"


def load_or_create_mailbox_key(data_dir: Path, username: str) -> MailboxPrivateKey:
    """The user's mailbox private key (`<username>.mailbox.key`, 0600), made on first use."""
    path = mailbox_key_path(data_dir, username)
    if path.exists():
        return MailboxPrivateKey.from_bytes(path.read_bytes())
    key = MailboxPrivateKey.generate()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, key.to_bytes())
    return key


@dataclass(frozen=True)
class PeerMailbox:
    key: MailboxPublicKey
    checked_at: float


class Mailbox:
    """The mailbox as one session uses it: our key, peers' checked keys, sealing, deposits."""

    def __init__(
        self,
        identity: Callable[[], Identity],
        key: MailboxPrivateKey,
        directory: DirectoryClient,
        pins: KeyPins,
    ) -> None:
        """`identity()`: the current one (a renewed certificate replaces it)."""
        self._identity = identity
        self.key = key
        self._directory = directory
        self._pins = pins
        self._peers: dict[str, PeerMailbox] = {}

    @property
    def identity(self) -> Identity:
        return self._identity()

    @property
    def me(self) -> str:
        return self.identity.username

    async def publish(self) -> None:
        """Publishes our mailbox key, bound to the identity key of our current certificate."""
        public = self.key.public()
        signature = bind(self.identity.key_pem, self.me, public)
        await self._directory.publish_mailbox_key(public.raw, signature)
        log.info("published the mailbox key %s", public.sha256[:16])

    def forget(self, peer: str) -> None:
        self._peers.pop(peer, None)

    async def key_of(self, peer: str) -> MailboxPublicKey:
        """`peer`'s mailbox key, checked against the identity key pinned for them."""
        cached = self._peers.get(peer)
        if cached is not None and time.monotonic() - cached.checked_at < KEY_CACHE_SECONDS:
            return cached.key
        found = await self._directory.lookup(peer)
        key = await self._checked(peer, found)
        self._peers[peer] = PeerMailbox(key, time.monotonic())
        return key

    async def _checked(self, peer: str, found: directory_pb2.LookupResponse) -> MailboxPublicKey:
        if not found.mailbox_key or not found.certificate_pem:
            raise FailedPrecondition(
                f"{peer} has no mailbox key yet: their agent publishes one when it logs in"
            )
        cert = load_certificate(found.certificate_pem)
        await self._pins.check(peer, public_key_sha256(cert))
        key = MailboxPublicKey.from_bytes(found.mailbox_key)
        check_binding(cert, peer, key, found.mailbox_key_signature)
        return key

    def _seal_all(self, messages: list[StoredMessage], to: MailboxPublicKey) -> list[bytes]:
        identity = self.identity
        key_pem, cert_der = identity.key_pem, identity.cert_der
        return [
            seal(
                IncomingMessage(m.id, m.sender, m.recipient, m.body, m.sent_at),
                direct_key(m.sender, m.recipient),
                key_pem,
                cert_der,
                to,
            )
            for m in messages
        ]

    async def deposit_messages(
        self, peer: str, messages: list[StoredMessage], held: list[HeldByMailbox]
    ) -> None:
        """Seals `messages` to `peer` and deposits them in order, in Deposits of at most
        DEPOSIT_ENVELOPES / about DEPOSIT_BYTES, appending to `held` what each made the mailbox
        hold. A Deposit refused as too much (a mailbox nearly full) is tried again in halves,
        so that what fits goes; the first refusal of a single envelope is raised."""
        to = await self.key_of(peer)
        if len(messages) <= SEAL_INLINE:
            envelopes = self._seal_all(messages, to)
        else:
            envelopes = await asyncio.to_thread(self._seal_all, messages, to)
        start = 0
        while start < len(envelopes):
            end, size = start, 0
            while end < len(envelopes) and end - start < DEPOSIT_ENVELOPES:
                if end > start and size + len(envelopes[end]) > DEPOSIT_BYTES:
                    break
                size += len(envelopes[end])
                end += 1
            await self._deposit(peer, envelopes[start:end], messages[start:end], held)
            start = end

    async def _deposit(
        self,
        peer: str,
        envelopes: list[bytes],
        messages: list[StoredMessage],
        held: list[HeldByMailbox],
    ) -> None:
        try:
            response = await self._directory.deposit(peer, envelopes)
        except DomainError as exc:
            if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or len(envelopes) == 1:
                raise
            half = len(envelopes) // 2
            await self._deposit(peer, envelopes[:half], messages[:half], held)
            await self._deposit(peer, envelopes[half:], messages[half:], held)
            return
        ids = [m.id for m in messages]
        held.append(HeldByMailbox(ids, from_timestamp(response.expires_at)))

    async def send_receipt(self, peer: str, ids: list[str]) -> None:
        """Tells `peer`, through the mailbox, that we committed their messages `ids`."""
        to = await self.key_of(peer)
        identity = self.identity
        envelope = seal_receipt(self.me, peer, ids, identity.key_pem, identity.cert_der, to)
        await self._directory.deposit(peer, [envelope])


class MailboxTransport:
    """A Transport to `peer` through the mailbox: it only sends (what the peer sends us comes
    through inbox.Inbox, for every peer at once); `received()` reports what the mailbox took."""

    def __init__(self, mailbox: Mailbox, peer: str, store: AgentStore) -> None:
        self._mailbox = mailbox
        self._peer = peer
        self._store = store
        # What the mailbox took, then the refusal that ends the run, if any: reported through
        # received(), in order, so that Delivery records what was taken before the run ends.
        self._held: asyncio.Queue[HeldByMailbox | DomainError | None] = asyncio.Queue()
        self._refused = False
        self.took_any = False  # the mailbox held something this transport deposited
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return f"MailboxTransport({self._mailbox.me}->{self._peer})"

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def device(self) -> str:
        return ""  # whichever device of the peer collects

    @property
    def relays(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def received(self) -> AsyncIterator[Received]:
        while (item := await self._held.get()) is not None:
            if isinstance(item, DomainError):
                raise item
            yield item

    async def send_messages(self, messages: list[StoredMessage]) -> None:
        """Deposits `messages`. A refusal is recorded with the messages not taken (they stay
        pending, with the reason) and ends the run once what was taken is reported; nothing
        more is sent on this transport."""
        if self._refused:
            await self._closed.wait()
            return
        held: list[HeldByMailbox] = []
        try:
            await self._mailbox.deposit_messages(self._peer, messages, held)
        except DomainError as exc:
            taken = {id for h in held for id in h.ids}
            rest = [m.id for m in messages if m.id not in taken]
            await self._store.hold_back(self._peer, rest, f"not relayed: {exc}")
            self._refused = True
            held_and_refusal: list[HeldByMailbox | DomainError] = [*held, exc]
        else:
            held_and_refusal = list(held)
        self.took_any = self.took_any or bool(held)
        for item in held_and_refusal:
            self._held.put_nowait(item)

    async def send_acks(self, ids: list[str]) -> None:
        await self._mailbox.send_receipt(self._peer, ids)

    def close(self) -> None:
        if not self.closed:
            self._closed.set()
            self._held.put_nowait(None)

    async def wait_closed(self) -> None:
        await self._closed.wait()
