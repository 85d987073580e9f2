"""The peer side of an agent: links with other agents, dialled or accepted, over mutual TLS.

This module opens links and runs Delivery over each; the roles around it live apart:
registry.py (at most one link per pair), dialer.py (dialling with backoff), pins.py (key
pinning), revocation.py (is a peer's certificate still good), handshake.py (the Hellos),
direct.py (the link as a Transport: framing and the checks of what arrives).

- Dialling: the dialer finds the peer's address; here the certificate the peer presents is read
  (a TLS probe) and asked about at the directory, `PeerService.Link` is opened with TLS that
  requires the server certificate to name the peer, and the Hellos are exchanged: the answer is
  signed over our nonce with the key of the certificate just checked, so the key checked is the
  key of this connection. Then the key is checked against the pinned one and delivery runs.
- Accepting: the peer's username comes from its verified client certificate (the URI SAN
  ``p2pchat:user:<name>``), never from a field; its Hello must name the same user.
- Nothing is written for a refused link: a key is pinned on first contact only once the Hellos
  matched and the certificate was found good.
- While a link is open its certificate is asked about again every `revocation_interval`
  seconds; a revoked one closes the link.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from cryptography import x509

from p2pchat.v1 import peer_pb2 as pb
from p2pchat.v1 import peer_pb2_grpc
from p2pchat_agent.agent_store import AgentStore
from p2pchat_agent.delivery import Delivery
from p2pchat_agent.dialer import FIRST_DELAY, Dialer, Target
from p2pchat_agent.direct import MAX_PEER_MESSAGE, DirectLink, FrameCounts
from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_agent.events import EventHub
from p2pchat_agent.handshake import (
    answer_hello,
    check_dialler_hello,
    dialler_hello,
    verify_answer,
)
from p2pchat_agent.identity import Identity, load_certificate
from p2pchat_agent.mailbox import Mailbox, MailboxTransport
from p2pchat_agent.messages import StoredMessage
from p2pchat_agent.pins import KeyPins
from p2pchat_agent.probe import peer_identity, probe_peer_certificate
from p2pchat_agent.registry import LinkRegistry, OpenLink
from p2pchat_agent.revocation import RevocationChecker
from p2pchat_common.errors import (
    DomainError,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from p2pchat_common.serving import keepalive_options
from p2pchat_common.tls import (
    certificate_sha256,
    device_id,
    public_key_sha256,
    user_dns_name,
)
from p2pchat_common.validation import shown

log = logging.getLogger(__name__)


def channel_options(keepalive: float) -> list[tuple[str, Any]]:
    """The options of both ends of a link (dialled or accepted): a ping after `keepalive`
    seconds of silence, and the link declared dead when one goes unanswered for half that (a
    frozen or cut-off peer: its messages then go through the mailbox); frames of one size."""
    return [
        *keepalive_options(keepalive),
        ("grpc.max_receive_message_length", MAX_PEER_MESSAGE),
        ("grpc.max_send_message_length", MAX_PEER_MESSAGE),
    ]


HELLO_TIMEOUT = 10.0


class LinkManager:
    """The peer side of one logged-in user: the open links (registry.py), dialling (dialer.py),
    key pins (pins.py) and revocation checks (revocation.py), with Delivery run over each
    link."""

    def __init__(
        self,
        identity: Callable[[], Identity],
        store: AgentStore,
        delivery: Delivery,
        directory: DirectoryClient,
        events: EventHub,
        retry_max: float,
        revocation: RevocationChecker,
        body_limit: int,
        dial_timeout: float = 5.0,
        keepalive: float = 10.0,
        pins: KeyPins | None = None,
        admits: Callable[[str, bool], Awaitable[bool]] | None = None,
    ) -> None:
        """`admits(peer)`: whether consent lets `peer` link with us (consent.ContactBook);
        None: anyone the directory vouches for (tests of the link alone)."""
        self._identity = identity
        self._admits = admits
        self._store = store
        self._delivery = delivery
        self._revocation = revocation
        self._body_limit = body_limit
        self._dial_timeout = dial_timeout
        self._options = channel_options(keepalive)
        self._retry_max = retry_max
        self.frames = FrameCounts()  # of every link of this session
        self.registry = LinkRegistry(lambda: self.me)
        self.pins = pins if pins is not None else KeyPins(store, events)
        self.mailbox: Mailbox | None = None  # set by the session when the mailbox is on
        self._relays: dict[str, asyncio.Task[None]] = {}

        async def has_pending(peer: str) -> bool:
            return bool(await store.pending_for(peer, 0, 1))

        self._dialer = Dialer(
            directory,
            retry_max,
            has_pending,
            self.registry.linked,
            self._dial_once,
            self.ensure_relay,
            skip_offline=lambda: self.mailbox is not None,  # the mailbox takes it meanwhile
        )
        self._closing = False
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch_revocations(), name="revocations"
        )

    @property
    def me(self) -> str:
        return self._identity().username

    # -- what callers use ---------------------------------------------------------------------

    @property
    def linked_peers(self) -> list[str]:
        return self.registry.peers

    @property
    def relayed_peers(self) -> list[str]:
        return self.registry.relayed_peers

    def deliver(self, peer: str, messages: list[StoredMessage]) -> None:
        """`messages` were just committed as pending for `peer`: hand them to its link (direct,
        or the mailbox), and unless a direct link is open, dial (after the wait left, if the
        last attempt failed); a peer found unreachable gets them through the mailbox."""
        entry = self.registry.get(peer)
        if entry is not None:
            entry.outflow.push_fresh(messages)
        if entry is None or not entry.direct:
            self.ensure_dialer(peer)
            if entry is None and self._dialer.unreachable_now(peer):
                self.ensure_relay(peer, online=False)

    async def send_acks(self, peer: str, ids: list[str]) -> bool:
        """Acknowledges `ids` on the direct link with `peer`; False when none is open."""
        entry = self.registry.get(peer)
        if entry is None or not entry.direct or entry.transport.closed:
            return False
        await entry.transport.send_acks(ids)
        return True

    def ensure_dialer(self, peer: str) -> None:
        if not self._closing:
            self._dialer.ensure(peer)

    def remember_address(self, peer: str, address: str) -> None:
        self._dialer.remember_address(peer, address)

    def reached(self, peer: str) -> None:
        """The next dial to `peer` starts without waiting (they just accepted us)."""
        self._dialer.reached(peer)

    def close_peer(self, peer: str) -> None:
        """Closes the link (direct or mailbox) with `peer`: consent ended."""
        entry = self.registry.get(peer)
        if entry is not None:
            log.info("closing %r: %s is no longer an accepted contact", entry.transport, peer)
            entry.transport.close()

    async def _require_consent(self, peer: str, ours: bool = False) -> None:
        if self._admits is not None and not await self._admits(peer, ours):
            raise PermissionDenied(f"{peer} is not an accepted contact of {self.me}")

    async def close(self) -> None:
        self._closing = True
        self._watcher.cancel()
        closing = asyncio.ensure_future(self._dialer.close())
        for task in self._relays.values():
            task.cancel()
        self.registry.close_all()
        await closing
        await asyncio.gather(*self._relays.values(), return_exceptions=True)

    # -- the mailbox ------------------------------------------------------------------------

    def ensure_relay(self, peer: str, online: bool) -> None:
        """Relays through the mailbox to `peer`, unreachable directly, until a direct link
        opens (it replaces the mailbox transport) or the session ends. With `online` (the peer
        is online by presence: it collects now), what is pending and not relayed goes again,
        such as messages whose envelope expired while the peer was away."""
        if self.mailbox is None or self._closing:
            return
        entry = self.registry.get(peer)
        if entry is not None:
            if online and not entry.direct:
                entry.outflow.reread()
            return
        if peer in self._relays:
            return
        task = asyncio.get_running_loop().create_task(self._relay(peer), name=f"relay-{peer}")
        self._relays[peer] = task
        task.add_done_callback(lambda _t: self._relays.pop(peer, None))

    async def _relay(self, peer: str) -> None:
        delay = FIRST_DELAY
        while not self._closing and self.mailbox is not None:
            transport = MailboxTransport(self.mailbox, peer, self._store)
            entry = OpenLink(transport, "")
            try:
                self.registry.attach(entry)
            except DomainError:
                return  # a direct link is open
            log.info("relaying to %s through the mailbox", peer)
            try:
                await self._delivery.run(transport, entry.outflow)
                return  # closed: a direct link replaced it, or the session ends
            except DomainError as exc:
                if transport.took_any:  # it worked for a while: start the backoff over
                    delay = FIRST_DELAY
                log.info("relaying to %s failed (%s); retrying in %.1f s", peer, exc, delay)
                self.mailbox.forget(peer)
            except Exception:
                log.exception("relaying to %s failed", peer)
            finally:
                self.registry.detach(entry)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._retry_max)

    # -- running a link -----------------------------------------------------------------------

    async def _run(self, link: DirectLink, cert_sha256: str) -> None:
        entry = OpenLink(link, cert_sha256)
        try:
            self.registry.attach(entry)
        except DomainError:
            link.close()
            raise
        try:  # again: consent may have ended while the link was being set up
            await self._require_consent(link.peer)
        except DomainError:
            self.registry.detach(entry)
            link.close()
            raise
        self._dialer.reached(link.peer)
        log.info("link open: %r", link)
        try:
            await self._delivery.run(link, entry.outflow)
        finally:
            self.registry.detach(entry)
            log.info("link closed: %r", link)
            if not self._closing:
                self.ensure_dialer(link.peer)  # it returns at once when nothing is pending

    # -- accepting ------------------------------------------------------------------------------

    async def accept(
        self, peer: str, cert: x509.Certificate, incoming: AsyncIterator[pb.Frame]
    ) -> AsyncIterator[pb.Frame]:
        """Serves an inbound Link from the verified `peer`; yields what to write back."""
        try:
            first = await asyncio.wait_for(anext(incoming), HELLO_TIMEOUT)
        except (StopAsyncIteration, TimeoutError):
            raise FailedPrecondition("a link starts with a Hello frame") from None
        if first.WhichOneof("kind") != "hello":
            raise FailedPrecondition("a link starts with a Hello frame")
        check_dialler_hello(first.hello, peer)
        if first.hello.username != peer:
            raise PermissionDenied(
                f"Hello claims {shown(first.hello.username)} but the certificate names {peer!r}"
            )
        await self._require_consent(peer)  # before anything is written (a pin, a message)
        cert_sha = certificate_sha256(cert)
        await self._revocation.require_good(peer, cert_sha)
        key_sha = public_key_sha256(cert)
        await self.pins.check(peer, key_sha)
        device = device_id(key_sha)
        link = DirectLink(self.me, peer, device, peer, self._body_limit, incoming, self.frames)
        self.frames.received += 1  # the Hello, read above
        await link.send(answer_hello(self.me, self._identity().key_pem, first.hello))
        runner = asyncio.create_task(self._run(link, cert_sha))
        try:
            async for frame in link.frames_out():
                yield frame
        except BaseException:
            runner.cancel()
            raise
        finally:
            link.close()
        await runner  # raises the error that ended the link, for the status code

    # -- dialling -------------------------------------------------------------------------------

    async def _dial_once(self, peer: str, target: Target) -> None:
        """Links with `peer` at `target` and runs delivery until the link ends."""
        await self._require_consent(peer, ours=True)
        identity = self._identity()
        address = target.address
        timeout = self._dial_timeout
        cert = await asyncio.to_thread(probe_peer_certificate, address, peer, identity, timeout)
        key_sha = public_key_sha256(cert)
        if target.key_sha256 and target.key_sha256 != key_sha:
            raise Unauthenticated(
                f"the agent at {address} presents a key for {peer} other than the one the "
                "directory knows as current"
            )
        cert_sha = certificate_sha256(cert)
        await self._revocation.require_good(peer, cert_sha)
        creds = grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)
        options = [*self._options, ("grpc.ssl_target_name_override", user_dns_name(peer))]
        async with grpc.aio.secure_channel(address, creds, options=options) as channel:
            device = device_id(key_sha)
            me = identity.username
            link = DirectLink(me, peer, device, me, self._body_limit, counts=self.frames)
            hello = dialler_hello(identity.username)
            await link.send(hello)
            call = peer_pb2_grpc.PeerServiceStub(channel).Link(link.frames_out())
            responses: AsyncIterator[pb.Frame] = call.__aiter__()
            link.incoming = responses
            try:
                try:  # the answerer asks the directory about us first: not dial_timeout
                    first = await asyncio.wait_for(anext(responses), HELLO_TIMEOUT)
                except StopAsyncIteration:
                    raise Unavailable(f"{peer} closed the link before Hello") from None
                self.frames.received += 1
                if first.WhichOneof("kind") != "hello" or first.hello.username != peer:
                    raise Unauthenticated(f"{peer} answered without a proper Hello")
                # The key checked (revocation above, pin below) is the key of this connection.
                verify_answer(first.hello, identity.username, peer, hello.hello.nonce, cert)
                await self.pins.check(peer, key_sha)
                await self._run(link, cert_sha)
            finally:
                call.cancel()

    # -- revocation -----------------------------------------------------------------------------

    async def _watch_revocations(self) -> None:
        """Closes open links whose certificate the directory no longer vouches for."""
        while True:
            await asyncio.sleep(self._revocation.interval)
            entries = [e for e in self.registry.entries() if e.cert_sha256]
            if not entries:
                continue
            try:
                shas = sorted({e.cert_sha256 for e in entries})
                revoked = await self._revocation.revoked_among(shas)
            except Exception:  # the next round asks again: never stop watching
                log.exception("checking the certificates of open links failed")
                continue
            for entry in entries:
                if entry.cert_sha256 in revoked:
                    log.warning("closing %r: the peer's certificate was revoked", entry.transport)
                    entry.transport.close()


class PeerServicer(peer_pb2_grpc.PeerServiceServicer):
    """PeerService.Link: identifies the caller by its client certificate."""

    def __init__(self, links: Callable[[], LinkManager | None]) -> None:
        self._links = links

    async def Link(
        self, request_iterator: AsyncIterator[pb.Frame], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.Frame]:
        auth = context.auth_context()
        pems = list(auth.get("x509_pem_cert") or [])
        cert = load_certificate(pems[0]) if pems else None
        peer = peer_identity(cert) if cert is not None else None
        if cert is None or peer is None:
            raise Unauthenticated("a client certificate naming a p2pchat user is required")
        manager = self._links()
        if manager is None:
            raise Unavailable("this agent is not logged in")
        async for frame in manager.accept(peer, cert, request_iterator):
            yield frame
