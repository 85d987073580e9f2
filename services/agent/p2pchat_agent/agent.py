"""The agent's use cases: session lifecycle, contacts, sending, history, key trust.

One `Agent` per daemon. The message store (AgentStore) runs its own threads; other blocking
work (key files, CSRs) runs in a thread too; the directory is reached through DirectoryClient;
peers through LinkManager.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from p2pchat.v1 import common_pb2, directory_pb2
from p2pchat_agent.agent_store import AgentStore
from p2pchat_agent.clock import ClockWatch
from p2pchat_agent.config import Settings
from p2pchat_agent.delivery import Delivery
from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_agent.events import DeliveryEvent, EventHub, MessageEvent
from p2pchat_agent.identity import Identity, StoredSession, load_or_make_key, make_csr, save_key
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.messages import OutgoingMessage, Status, StoredMessage, UnknownMessageError
from p2pchat_agent.outbox import Outbox
from p2pchat_agent.peer import LinkManager
from p2pchat_agent.revocation import RevocationChecker
from p2pchat_common.errors import (
    FailedPrecondition,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
)
from p2pchat_common.timestamps import from_timestamp
from p2pchat_common.validation import normalize_username, utf8_size_over

log = logging.getLogger(__name__)

T = TypeVar("T")
HISTORY_MAX = 1000


@dataclass
class Active:
    """A logged-in user on this agent."""

    session: StoredSession
    identity: Identity
    store: AgentStore
    links: LinkManager
    outbox: Outbox
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    renewed_for_format: bool = False

    @property
    def username(self) -> str:
        return self.session.username


class Agent:
    def __init__(self, settings: Settings, peer_port: int = 0) -> None:
        """`peer_port`: the port other agents reach, as bound (for --peer-listen port 0)."""
        self.settings = settings
        self.directory = DirectoryClient(settings)
        self.events = EventHub()
        self.active: Active | None = None
        self.peer_port = peer_port
        self._lock = asyncio.Lock()
        self._contacts: set[str] = set()
        self.clock = ClockWatch()

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs blocking work other than the store's (key files, CSRs) in a thread."""
        return await asyncio.to_thread(fn, *args)

    @property
    def address(self) -> str:
        """The address other agents dial (with the real port when listening on port 0)."""
        address = self.settings.advertised_address
        host, _, port = address.rpartition(":")
        if port == "0" and self.peer_port:
            return f"{host}:{self.peer_port}"
        return address

    def _require_active(self) -> Active:
        if self.active is None:
            raise FailedPrecondition("not logged in: log in first")
        return self.active

    def identity(self) -> Identity:
        return self._require_active().identity

    def current_identity(self) -> Identity | None:
        """The logged-in user's identity, or None: what the peer port presents."""
        return None if self.active is None else self.active.identity

    def current_links(self) -> LinkManager | None:
        """The logged-in user's links, or None: where inbound links go."""
        return None if self.active is None else self.active.links

    # -- session lifecycle ----------------------------------------------------------------------

    async def register(self, username: str, password: str, address: str) -> str:
        """Registers at the directory; an empty address means this agent's own."""
        response = await self.directory.register(username, password, address or self.address)
        return response.username

    async def login(self, username: str, password: str) -> Active:
        name = normalize_username(username)
        if not password:
            raise InvalidArgument("password is required")
        async with self._lock:
            if self.active is not None and self.active.username != name:
                raise FailedPrecondition(
                    f"already logged in as {self.active.username}: log out first"
                )
            data_dir = self.settings.data_dir
            # A new key is saved only once the directory accepted the login: a refused login
            # writes nothing.
            key_pem, new_key = await self.blocking(load_or_make_key, data_dir, name)
            csr = await self.blocking(make_csr, key_pem, name)
            asked = datetime.now(UTC)
            response = await self.directory.login(name, password, self.address, csr)
            self.clock.note(response.server_time, asked)
            if new_key:
                await self.blocking(save_key, data_dir, name, key_pem)
            identity = Identity(
                name, key_pem, response.certificate_pem, response.ca_certificate_pem
            )
            session = StoredSession(
                username=name,
                token=response.session_token,
                directory=self.directory.address,
                expires_at=from_timestamp(response.session_expires_at),
            )
            await self.blocking(identity.save, data_dir)
            await self.blocking(session.save, data_dir)
            self.directory.token = session.token
            if self.active is not None:  # the same user again: renewed session and certificate
                self.active.session, self.active.identity = session, identity
            else:
                await self._activate(session, identity)
            log.info("logged in as %s", name)
            assert self.active is not None
            return self.active

    async def resume(self) -> bool:
        """Resumes the session stored by an earlier run; False when there is none."""
        data_dir = self.settings.data_dir
        session = await self.blocking(StoredSession.load, data_dir)
        if session is None:
            return False
        try:
            identity = await self.blocking(Identity.load, data_dir, session.username)
        except OSError:
            log.warning("stored session for %s has no certificate; log in again", session.username)
            await self.blocking(StoredSession.clear, data_dir)
            return False
        self.directory.token = session.token
        async with self._lock:
            await self._activate(session, identity)
        log.info("resumed the session of %s", session.username)
        return True

    async def _activate(self, session: StoredSession, identity: Identity) -> None:
        db_path = self.settings.data_dir / f"{session.username}.db"
        store = await AgentStore.open(db_path)
        delivery = Delivery(store, self.events)
        links = LinkManager(
            self.identity,
            store,
            delivery,
            self.directory,
            self.events,
            self.settings.retry_max,
            RevocationChecker(self.directory, self.settings.revocation_interval),
            self.settings.body_limit,
        )
        outbox = Outbox(store, self._stored)
        self.active = Active(session, identity, store, links, outbox)
        outbox.start()
        self._contacts.clear()
        loop = asyncio.get_running_loop()
        self.active.tasks.append(loop.create_task(self._heartbeats(), name="heartbeats"))
        for peer in await store.peers_with_pending():
            links.ensure_dialer(peer)

    async def _deactivate(self) -> None:
        active, self.active = self.active, None
        self.directory.token = ""
        self._contacts.clear()
        if active is None:
            return
        current = asyncio.current_task()
        for task in active.tasks:
            if task is not current:
                task.cancel()
        await active.outbox.close()
        await active.links.close()
        await active.store.close()

    async def logout(self) -> None:
        async with self._lock:
            active = self._require_active()
            try:
                await self.directory.logout()
            except (Unavailable, Unauthenticated) as exc:
                log.warning("directory logout failed (%s); logging out locally", exc)
            await self._deactivate()
            await self.blocking(StoredSession.clear, self.settings.data_dir)
            log.info("logged out %s", active.username)

    async def _heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval
        first = True
        while True:
            if not first:
                await asyncio.sleep(interval)
            first = False
            try:
                asked = datetime.now(UTC)
                beat = await self.directory.heartbeat()
                self.clock.note(beat.server_time, asked)
                await self._renew_certificate_if_due()
            except Unauthenticated as exc:
                log.warning("session ended by the directory (%s): log in again", exc)
                async with self._lock:
                    await self._deactivate()
                    await self.blocking(StoredSession.clear, self.settings.data_dir)
                return
            except Unavailable as exc:
                log.info("heartbeat failed: %s", exc)
                continue
            active = self.active
            if active is not None:
                expires = from_timestamp(beat.session_expires_at)
                active.session = StoredSession(
                    active.username, active.session.token, active.session.directory, expires
                )

    async def _renew_certificate_if_due(self) -> None:
        active = self.active
        if active is None:
            return
        identity = active.identity
        lifetime = identity.cert_expires_at - identity.cert_issued_at
        left = identity.cert_expires_at - datetime.now(UTC)
        # A certificate of the old format is renewed at once, but once a session only: a
        # directory of the old version would answer with the old format again.
        old_format = not identity.names_device and not active.renewed_for_format
        if left > max(lifetime / 3, timedelta(minutes=1)) and not old_format:
            return
        active.renewed_for_format = True
        csr = await self.blocking(make_csr, identity.key_pem, identity.username)
        renewed = await self.directory.renew_certificate(csr)

        fresh = Identity(
            identity.username, identity.key_pem, renewed.certificate_pem, renewed.ca_certificate_pem
        )
        await self.blocking(fresh.save, self.settings.data_dir)
        active.identity = fresh
        log.info("renewed the certificate of %s", identity.username)

    async def close(self) -> None:
        """Shutdown: close links (pending stays pending), stop heartbeats, close the store."""
        async with self._lock:
            await self._deactivate()
        await self.directory.close()

    # -- contacts -------------------------------------------------------------------------------

    async def list_contacts(self) -> list[common_pb2.Contact]:
        active = self._require_active()
        contacts = list((await self.directory.list_contacts()).contacts)
        self._contacts = {c.username for c in contacts}
        for c in contacts:
            active.links.remember_address(c.username, c.address)
        return contacts

    async def add_contact(self, username: str, address: str) -> common_pb2.Contact:
        active = self._require_active()
        contact = (await self.directory.add_contact(username, address)).contact
        self._contacts.add(contact.username)
        active.links.remember_address(contact.username, contact.address)
        return contact

    async def remove_contact(self, username: str) -> None:
        self._require_active()
        await self.directory.remove_contact(username)
        self._contacts.discard(normalize_username(username))

    async def require_contact(self, peer: str) -> directory_pb2.LookupResponse | None:
        """FAILED_PRECONDITION unless `peer` is a contact (known locally or per the directory)."""
        active = self._require_active()
        if peer in self._contacts:
            return None
        found = await self.directory.lookup(peer)
        self._contacts.add(peer)
        active.links.remember_address(peer, found.contact.address)
        return found

    async def trust_peer_key(self, username: str) -> str:
        active = self._require_active()
        peer = normalize_username(username)
        pin = await active.store.get_pin(peer)
        if pin is None or not pin.presented_sha256:
            raise FailedPrecondition(f"no key change recorded for {peer}: nothing to trust")
        await active.store.pin(peer, pin.presented_sha256, datetime.now(UTC))
        log.warning("user trusted %s's new key %s", peer, pin.presented_sha256[:16])
        active.links.ensure_dialer(peer)
        return pin.presented_sha256

    # -- messages -------------------------------------------------------------------------------

    def check_body(self, body: str) -> None:
        if not body.strip():
            raise InvalidArgument("message is empty")
        size = utf8_size_over(body, self.settings.body_limit)
        if size is not None:
            raise InvalidArgument(
                f"message is too long: {size} bytes of UTF-8; the limit is "
                f"{self.settings.body_limit} bytes"
            )

    def submit(self, peer: str, body: str, message_id: str = "") -> asyncio.Future[StoredMessage]:
        """Queues a message to a peer already known to be a contact, without waiting: the
        future resolves once it is committed as pending. Bad input raises at once."""
        active = self._require_active()
        if peer == active.username:
            raise InvalidArgument("you cannot send messages to yourself")
        self.check_body(body)
        outgoing = OutgoingMessage(
            message_id or new_message_id(), active.username, peer, body, datetime.now(UTC)
        )
        return active.outbox.submit(outgoing)

    async def send(self, username: str, body: str, wait: float | None = None) -> StoredMessage:
        """Stores a message as pending and hands it to delivery; with `wait`, also waits (that
        long at most) for the peer's acknowledgement."""
        active = self._require_active()
        peer = normalize_username(username)
        if peer == active.username:
            raise InvalidArgument("you cannot send messages to yourself")
        self.check_body(body)
        await self.require_contact(peer)
        if not wait:
            return await asyncio.shield(self.submit(peer, body))
        message_id = new_message_id()
        with self.events.subscribe(
            lambda e: isinstance(e, DeliveryEvent) and e.peer == peer and message_id in e.ids
        ) as delivered:
            message = await asyncio.shield(self.submit(peer, body, message_id))
            try:
                event = await asyncio.wait_for(delivered.get(), wait)
            except TimeoutError:
                return message
            assert isinstance(event, DeliveryEvent)
            return message._replace(status=Status.DELIVERED, delivered_at=event.delivered_at)

    def _stored(self, messages: list[StoredMessage]) -> None:
        """Messages just committed as pending: show them live and hand them to their links."""
        active = self.active
        if active is None:
            return
        by_peer: dict[str, list[StoredMessage]] = {}
        listening = self.events.listening
        for message in messages:
            if listening:
                self.events.publish(MessageEvent(message))
            by_peer.setdefault(message.peer, []).append(message)
        for peer, batch in by_peer.items():
            active.links.deliver(peer, batch)

    async def history(
        self, username: str, limit: int, before_id: str = "", query: str = ""
    ) -> tuple[list[StoredMessage], bool]:
        active = self._require_active()
        peer = normalize_username(username)
        if limit < 0 or limit > HISTORY_MAX:
            raise InvalidArgument(f"limit must be 0-{HISTORY_MAX} (0 means 50)")
        if len(query) > 1000:
            raise InvalidArgument("search text is too long (at most 1000 characters)")
        try:  # a search sees every message committed before it (the store sees to that)
            return await active.store.history(peer, limit or 50, before_id or None, query or None)
        except UnknownMessageError:
            raise  # NOT_FOUND: a well-formed id with no message in this conversation
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(str(exc).strip("'\"")) from None
