"""One logged-in user on this agent: the composition root of what a login brings up.

`UserSession.open` builds the user's store, delivery, links and outbox, and `close` takes them
down in order. The use cases that need a logged-in user (sending, history, contacts, trusting a
key) live here; the layers below publish events or return values and never call back up. Agent
(agent.py) keeps what outlives a login: the directory client, the event hub, the clock, and
logging in and out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from p2pchat.v1 import common_pb2
from p2pchat_agent.agent_store import AgentStore
from p2pchat_agent.config import Settings
from p2pchat_agent.consent import ContactBook
from p2pchat_agent.contacts import Contacts
from p2pchat_agent.delivery import Delivery
from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_agent.events import DeliveryEvent, EventHub, MessageEvent
from p2pchat_agent.identity import Identity, StoredSession
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.inbox import Inbox
from p2pchat_agent.mailbox import Mailbox, load_or_create_mailbox_key
from p2pchat_agent.messages import OutgoingMessage, Status, StoredMessage, UnknownMessageError
from p2pchat_agent.outbox import Outbox
from p2pchat_agent.peer import LinkManager
from p2pchat_agent.pins import KeyPins
from p2pchat_agent.revocation import RevocationChecker
from p2pchat_common.errors import DomainError, FailedPrecondition, InvalidArgument
from p2pchat_common.validation import normalize_username, utf8_size_over

log = logging.getLogger(__name__)

HISTORY_MAX = 1000
EXPIRY_CHECK = 5.0  # seconds between looks for relayed messages the mailbox dropped (a cheap read)
_EXPIRED = "the mailbox dropped it: not collected in time; it goes again once the peer is online"


@dataclass
class UserSession:
    session: StoredSession
    identity: Identity
    store: AgentStore
    links: LinkManager
    outbox: Outbox
    settings: Settings
    directory: DirectoryClient
    events: EventHub
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    inbox: Inbox | None = None  # None with --no-mailbox
    renewed_for_format: bool = False
    contacts: Contacts | None = None  # set by open (the contact use cases and consent)

    @property
    def username(self) -> str:
        return self.session.username

    @classmethod
    async def open(
        cls,
        session: StoredSession,
        identity: Identity,
        settings: Settings,
        directory: DirectoryClient,
        events: EventHub,
        current_identity: Callable[[], Identity],
    ) -> UserSession:
        """Opens `<username>.db` and brings up delivery: dialling starts for every peer with
        messages still pending."""
        store = await AgentStore.open(settings.data_dir / f"{session.username}.db")
        # With the mailbox, a link is declared dead when the peer leaves messages unacknowledged
        # for 3/4 of the keepalive (found within the keepalive: the watchdog looks every
        # quarter), whatever the pings say: what waits then goes by the mailbox. Without the
        # mailbox, a slow link is better than none.
        ack_timeout = settings.keepalive * 0.75 if settings.mailbox else 0.0
        delivery = Delivery(store, events, ack_timeout=ack_timeout)
        pins = KeyPins(store, events)
        book = ContactBook(store, directory)
        await book.load()
        links = LinkManager(
            current_identity,
            store,
            delivery,
            directory,
            events,
            settings.retry_max,
            RevocationChecker(directory, settings.revocation_interval),
            settings.body_limit,
            settings.dial_timeout,
            settings.keepalive,
            pins,
            book.admits,
        )

        def on_stored(messages: list[StoredMessage]) -> None:
            user._stored(messages)

        outbox = Outbox(store, on_stored)
        user = cls(session, identity, store, links, outbox, settings, directory, events)
        user.contacts = Contacts(book, directory, links)
        try:
            await user.contacts.refresh()
        except DomainError as exc:  # the directory is away: the stored copy stands
            log.info("contacts not refreshed at start (%s)", exc)
        outbox.start()
        if settings.mailbox:
            key = await asyncio.to_thread(
                load_or_create_mailbox_key, settings.data_dir, session.username
            )
            # The session's identity (renewal replaces it), not the agent's: the agent has no
            # active session until this returns.
            links.mailbox = Mailbox(lambda: user.identity, key, directory, pins)
            user.inbox = Inbox(
                links.mailbox,
                directory,
                delivery,
                pins,
                links.send_acks,
                settings.retry_max,
                settings.body_limit,
                book.verdict,
            )
            loop = asyncio.get_running_loop()
            user.tasks.append(loop.create_task(user.inbox.run(), name="inbox"))
            user.tasks.append(loop.create_task(user._expiries(), name="relay-expiries"))
        for peer in await store.peers_with_pending():
            links.ensure_dialer(peer)
        return user

    async def _expiries(self) -> None:
        """Relayed messages whose envelope the mailbox dropped uncollected (it expired) become
        pending again, with the reason, and go out again."""
        while True:
            try:
                first = await self.store.next_relay_expiry()
                wait = EXPIRY_CHECK
                if first is not None:
                    wait = min(wait, max(0.1, (first - datetime.now(UTC)).total_seconds()))
                await asyncio.sleep(wait)
                peers = await self.store.unrelay_expired(datetime.now(UTC), _EXPIRED)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking for expired relayed messages failed")
                await asyncio.sleep(EXPIRY_CHECK)
                continue
            for peer in peers:
                log.warning("relayed messages to %s expired uncollected: pending again", peer)
                self.links.ensure_dialer(peer)

    async def close(self) -> None:
        """Stops its tasks (but the one calling), then the outbox, the links and the store:
        pending messages stay pending for the next session."""
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        await self.outbox.close()
        await self.links.close()
        await self.store.close()

    # -- contacts (contacts.py) ---------------------------------------------------------------

    def contact_book(self) -> Contacts:
        assert self.contacts is not None
        return self.contacts

    async def list_contacts(self) -> list[common_pb2.Contact]:
        return await self.contact_book().all()

    async def add_contact(
        self, username: str, address: str, note: str = "", invite: str = ""
    ) -> common_pb2.Contact:
        return await self.contact_book().add(username, address, note, invite)

    async def remove_contact(self, username: str) -> None:
        await self.contact_book().remove(username)

    async def require_contact(self, peer: str) -> None:
        """FAILED_PRECONDITION unless a message to `peer` may be sent (contacts.py)."""
        await self.contact_book().require(peer)

    async def trust_peer_key(self, username: str) -> str:
        peer = normalize_username(username)
        pin = await self.store.get_pin(peer)
        if pin is None or not pin.presented_sha256:
            raise FailedPrecondition(f"no key change recorded for {peer}: nothing to trust")
        await self.store.pin(peer, pin.presented_sha256, datetime.now(UTC))
        log.warning("user trusted %s's new key %s", peer, pin.presented_sha256[:16])
        self.links.ensure_dialer(peer)
        if self.links.mailbox is not None:
            self.links.mailbox.forget(peer)
        if self.inbox is not None:
            self.inbox.reconnect()  # what the directory kept for the new key comes again
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
        if peer == self.username:
            raise InvalidArgument("you cannot send messages to yourself")
        self.check_body(body)
        outgoing = OutgoingMessage(
            message_id or new_message_id(), self.username, peer, body, datetime.now(UTC)
        )
        return self.outbox.submit(outgoing)

    async def send(self, username: str, body: str, wait: float | None = None) -> StoredMessage:
        """Stores a message as pending and hands it to delivery; with `wait`, also waits (that
        long at most) for the peer's acknowledgement."""
        peer = normalize_username(username)
        if peer == self.username:
            raise InvalidArgument("you cannot send messages to yourself")
        self.check_body(body)
        await self.require_contact(peer)
        if not wait:
            return await asyncio.shield(self.submit(peer, body))
        message_id = new_message_id()
        with self.events.subscribe(
            lambda e: (
                isinstance(e, DeliveryEvent)
                and e.status == Status.DELIVERED
                and e.peer == peer
                and message_id in e.ids
            )
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
        by_peer: dict[str, list[StoredMessage]] = {}
        listening = self.events.listening
        for message in messages:
            if listening:
                self.events.publish(MessageEvent(message))
            by_peer.setdefault(message.peer, []).append(message)
        for peer, batch in by_peer.items():
            self.links.deliver(peer, batch)

    async def history(
        self, username: str, limit: int, before_id: str = "", query: str = ""
    ) -> tuple[list[StoredMessage], bool]:
        peer = normalize_username(username)
        if limit < 0 or limit > HISTORY_MAX:
            raise InvalidArgument(f"limit must be 0-{HISTORY_MAX} (0 means 50)")
        if len(query) > 1000:
            raise InvalidArgument("search text is too long (at most 1000 characters)")
        try:  # a search sees every message committed before it (the store sees to that)
            return await self.store.history(peer, limit or 50, before_id or None, query or None)
        except UnknownMessageError:
            raise  # NOT_FOUND: a well-formed id with no message in this conversation
        except (KeyError, ValueError) as exc:
            raise InvalidArgument(str(exc).strip("'\"")) from None
