"""The peer side of an agent: at most one link per peer, dialled or accepted, over mutual TLS.

- Dialling: look the peer up in the directory (or use its last known address when the directory
  is down), read the certificate it presents, ask the directory whether that certificate is still
  good, open `PeerService.Link` with TLS that requires the server certificate to name the peer,
  exchange Hellos (the answer is signed over our nonce with the key of the certificate just
  checked: see handshake.py), then check the key against the pinned one and run delivery.
- Accepting: the peer's username comes from its verified client certificate (the URI SAN
  ``p2pchat:user:<name>``), never from a field; its Hello must name the same user.
- Nothing is written for a refused link: a key is pinned on first contact only once the Hellos
  matched and the certificate was found good.
- While a link is open its certificate is asked about again every `revocation_interval`
  seconds; a revoked one closes the link.
- Two links between the same pair (both dialled at once): the one dialled by the smaller username
  stays, on both sides alike.
- While messages are pending for a peer without a link, a dialer retries with backoff
  (0.5 s doubling up to --retry-max).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from p2pchat.v1 import peer_pb2 as pb
from p2pchat.v1 import peer_pb2_grpc
from p2pchat_agent.delivery import Delivery
from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_agent.events import EventHub, KeyChangedEvent
from p2pchat_agent.handshake import (
    answer_hello,
    check_dialler_hello,
    dialler_hello,
    verify_answer,
)
from p2pchat_agent.identity import Identity, load_certificate
from p2pchat_agent.link import MAX_PEER_MESSAGE, PeerLink
from p2pchat_agent.revocation import RevocationChecker
from p2pchat_agent.store import MessageStore, StoredMessage
from p2pchat_common.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from p2pchat_common.tls import (
    certificate_sha256,
    public_key_sha256,
    user_dns_name,
    user_identity,
)
from p2pchat_common.validation import parse_address, shown

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Both ends of a link, dialled or accepted, take frames of the same size.
    ("grpc.max_receive_message_length", MAX_PEER_MESSAGE),
    ("grpc.max_send_message_length", MAX_PEER_MESSAGE),
]
HELLO_TIMEOUT = 10.0


@functools.lru_cache(maxsize=2)  # the identity in use, and the one before a renewal
def _probe_context(identity: Identity) -> ssl.SSLContext:
    """A client TLS context with our certificate, trusting only our CA: made once per identity
    (ssl loads a key only from a file), not on every dial and retry."""
    ctx = ssl.create_default_context(cadata=identity.ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert.write_bytes(identity.cert_pem)
        key.write_bytes(identity.key_pem)
        ctx.load_cert_chain(cert, key)
    return ctx


def probe_peer_certificate(
    address: str, peer: str, identity: Identity, timeout: float
) -> x509.Certificate:
    """The DER certificate the agent at `address` presents, verified to chain to our CA and to
    name `peer` (blocking). Used to compare the real key with the pinned one before linking."""
    target = parse_address(address)
    ctx = _probe_context(identity)
    with socket.create_connection((target.host, target.port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=user_dns_name(peer)) as tls:
            der = tls.getpeercert(binary_form=True)
    if der is None:
        raise Unavailable(f"{peer} at {address} presented no certificate")
    cert = load_certificate(der)
    if peer_identity(cert) != peer:
        raise Unauthenticated(f"the agent at {address} does not present {peer}'s certificate")
    return cert


def peer_identity(cert: x509.Certificate) -> str | None:
    """The user a verified peer certificate names (its URI SAN), or None."""
    found = user_identity(cert)
    return None if found is None else found[0]


class LinkManager:
    def __init__(
        self,
        identity: Callable[[], Identity],
        store: MessageStore,
        delivery: Delivery,
        directory: DirectoryClient,
        events: EventHub,
        read: Callable[..., Awaitable[Any]],
        write: Callable[..., Awaitable[Any]],
        retry_max: float,
        revocation: RevocationChecker,
    ) -> None:
        self._identity = identity
        self._store = store
        self._delivery = delivery
        self._directory = directory
        self._events = events
        self._read = read
        self._write = write
        self._retry_max = retry_max
        self.links: dict[str, PeerLink] = {}
        self._dialers: dict[str, asyncio.Task[None]] = {}
        self._addresses: dict[str, str] = {}  # last known address per peer
        self._closing = False
        self._revocation = revocation
        self._certs: dict[PeerLink, str] = {}  # open link -> SHA-256 of the peer's certificate
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch_revocations(), name="revocations"
        )

    @property
    def me(self) -> str:
        return self._identity().username

    # -- what callers use ---------------------------------------------------------------------

    def deliver(self, peer: str, messages: list[StoredMessage]) -> None:
        """`messages` were just committed as pending for `peer`: hand them to its link, or
        start dialling."""
        link = self.links.get(peer)
        if link is not None:
            link.push_fresh(messages)
        else:
            self.ensure_dialer(peer)

    def ensure_dialer(self, peer: str) -> None:
        if self._closing or peer in self._dialers:
            return
        task = asyncio.get_running_loop().create_task(self._dial_loop(peer), name=f"dial-{peer}")
        self._dialers[peer] = task
        task.add_done_callback(lambda _t: self._dialers.pop(peer, None))

    def remember_address(self, peer: str, address: str) -> None:
        if address:
            self._addresses[peer] = address

    async def close(self) -> None:
        self._closing = True
        self._watcher.cancel()
        for task in list(self._dialers.values()):
            task.cancel()
        for link in list(self.links.values()):
            link.close()
        await asyncio.gather(*self._dialers.values(), return_exceptions=True)

    # -- pinning ------------------------------------------------------------------------------

    async def check_key(self, peer: str, presented: str) -> None:
        """Pins the key on first contact; refuses a key that differs until the user trusts it.
        Called only once the link is otherwise accepted (Hellos matched, certificate good)."""
        pin = await self._read(self._store.get_pin, peer)
        now = datetime.now(UTC)
        if pin is None:
            await self._write(self._store.pin, peer, presented, now)
            log.info("pinned %s's key %s on first contact", peer, presented[:16])
            return
        if pin.sha256 == presented:
            return
        if pin.presented_sha256 != presented:
            await self._write(self._store.record_key_change, peer, presented, now)
            log.warning(
                "KEY CHANGE: %s presented key %s but %s is pinned; links refused until the user "
                "trusts the new key",
                peer,
                presented[:16],
                pin.sha256[:16],
            )
            self._events.publish(KeyChangedEvent(peer, pin.sha256, presented))
        raise PermissionDenied(
            f"{peer}'s key has changed since it was pinned; if expected, trust it with "
            f"`p2pchat trust {peer}`"
        )

    # -- one link per peer ----------------------------------------------------------------------

    def _attach(self, link: PeerLink) -> None:
        current = self.links.get(link.peer)
        if current is not None and not current.closed:
            keeper = min(self.me, link.peer)
            if link.dialed_by != keeper or current.dialed_by == keeper:
                raise AlreadyExists(f"a link with {link.peer} is already open")
            log.info("replacing %r by %r", current, link)
            current.close()
        self.links[link.peer] = link

    def _detach(self, link: PeerLink) -> None:
        if self.links.get(link.peer) is link:
            del self.links[link.peer]

    async def _run(
        self, link: PeerLink, cert_sha256: str, incoming: AsyncIterator[pb.Frame]
    ) -> None:
        try:
            self._attach(link)
        except DomainError:
            link.close()
            raise
        self._certs[link] = cert_sha256
        log.info("link open: %r", link)
        try:
            await self._delivery.run(link, incoming)
        finally:
            self._certs.pop(link, None)
            self._detach(link)
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
        cert_sha = certificate_sha256(cert)
        await self._revocation.require_good(peer, cert_sha)
        await self.check_key(peer, public_key_sha256(cert))
        link = PeerLink(self.me, peer, dialed_by=peer)
        await link.send(answer_hello(self.me, self._identity().key_pem, first.hello))
        runner = asyncio.create_task(self._run(link, cert_sha, incoming))
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

    async def _address_of(self, peer: str) -> str:
        try:
            found = await self._directory.lookup(peer)
        except Unavailable:
            if peer in self._addresses:
                return self._addresses[peer]
            raise
        self.remember_address(peer, found.contact.address)
        if not found.contact.address:
            raise FailedPrecondition(f"{peer} has no known address yet")
        return found.contact.address

    async def _dial_loop(self, peer: str) -> None:
        delay = 0.5
        while not self._closing and peer not in self.links:
            if not await self._read(self._store.pending_for, peer, 0, 1):
                return
            try:
                await self._dial_once(peer)
                delay = 0.5
                continue
            except asyncio.CancelledError:
                raise
            except (DomainError, grpc.RpcError, OSError, ssl.SSLError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else None
                reason = shown(detail or str(exc), 200, quoted=False)
                log.info("cannot reach %s (%s); retrying in %.1f s", peer, reason, delay)
            except Exception:
                log.exception("unexpected error while linking with %s", peer)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._retry_max)

    async def _dial_once(self, peer: str) -> None:
        identity = self._identity()
        address = await self._address_of(peer)
        cert = await asyncio.to_thread(probe_peer_certificate, address, peer, identity, 5.0)
        cert_sha = certificate_sha256(cert)
        await self._revocation.require_good(peer, cert_sha)
        creds = grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem)
        options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", user_dns_name(peer))]
        async with grpc.aio.secure_channel(address, creds, options=options) as channel:
            link = PeerLink(identity.username, peer, dialed_by=identity.username)
            hello = dialler_hello(identity.username)
            await link.send(hello)
            call = peer_pb2_grpc.PeerServiceStub(channel).Link(link.frames_out())
            responses: AsyncIterator[pb.Frame] = call.__aiter__()
            try:
                first = await asyncio.wait_for(anext(responses), HELLO_TIMEOUT)
            except StopAsyncIteration:
                raise Unavailable(f"{peer} closed the link before Hello") from None
            if first.WhichOneof("kind") != "hello" or first.hello.username != peer:
                raise Unauthenticated(f"{peer} answered without a proper Hello")
            # The key checked (revocation now, pin below) is the key of this connection.
            verify_answer(first.hello, identity.username, peer, hello.hello.nonce, cert)
            try:
                await self.check_key(peer, public_key_sha256(cert))
                await self._run(link, cert_sha, responses)
            finally:
                call.cancel()

    # -- revocation -----------------------------------------------------------------------------

    async def _watch_revocations(self) -> None:
        """Closes open links whose certificate the directory no longer vouches for."""
        while True:
            await asyncio.sleep(self._revocation.interval)
            open_links = dict(self._certs)
            if not open_links:
                continue
            try:
                revoked = await self._revocation.revoked_among(sorted(set(open_links.values())))
            except Exception:  # the next round asks again: never stop watching
                log.exception("checking the certificates of open links failed")
                continue
            for link, sha in open_links.items():
                if sha in revoked:
                    log.warning("closing %r: the peer's certificate was revoked", link)
                    link.close()


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
