"""The receiving side of the directory's sealed mailbox: one Collect stream per session.

The directory streams our envelopes: first what it holds, then each new one as it is deposited
(so an agent nobody can dial still receives live: the mailbox doubles as a relay). Each is
opened and checked (sealing.open_envelope: our key, the users CA, the sender's signature over
everything including us), then the sender's key is checked against its pin. Then, in order:

1. the messages are committed (once each: an id already stored is not stored again);
2. a receipt goes back to each sender: on the direct link when one is open, else sealed
   through the mailbox (its "delivered" means committed here, as on a link);
3. the envelopes are acknowledged at the directory, which deletes them.

A crash between 1 and 3 brings the same envelopes again on the next Collect: stored once,
receipted again. An envelope that fails a check is refused (counted, logged, nothing stored)
and acknowledged, so it does not come back, except one whose sender's key differs from the
pinned one: it stays at the directory until the user trusts the new key (`p2pchat trust`).
A receipt marks our messages delivered, on the same checks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import grpc

from p2pchat.v1 import mailbox_pb2
from p2pchat_agent.delivery import Delivery
from p2pchat_agent.direct import check_body
from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_agent.mailbox import Mailbox
from p2pchat_agent.messages import IncomingMessage
from p2pchat_agent.pins import KeyPins
from p2pchat_agent.sealing import Opened, open_envelope
from p2pchat_common.errors import DomainError, PermissionDenied, Unauthenticated, from_rpc_error
from p2pchat_common.timestamps import from_timestamp
from p2pchat_common.tls import device_id, public_key_sha256
from p2pchat_common.validation import shown

log = logging.getLogger(__name__)

FIRST_DELAY = 0.5
OPEN_INLINE = 8  # envelopes opened on the event loop; more go to a thread (~0.1 ms each)
# A certificate's validity is checked against when the envelope was deposited, with this slack
# for clocks (the certificate has usually expired by the time an envelope is collected).
CLOCK_SLACK = timedelta(minutes=5)


@dataclass
class InboxCounts:
    envelopes: int = 0  # collected and handled
    refused: int = 0  # failed a check: nothing of them stored
    connected: bool = False  # a Collect stream is open now


@dataclass
class _Sorted:
    """One response's envelopes, sorted out."""

    ack: list[int] = field(default_factory=list)
    messages: dict[str, list[IncomingMessage]] = field(default_factory=dict)
    envelopes: dict[str, list[int]] = field(default_factory=dict)  # of the messages, by sender
    receipts: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # device, ids


class Inbox:
    def __init__(
        self,
        mailbox: Mailbox,
        directory: DirectoryClient,
        delivery: Delivery,
        pins: KeyPins,
        send_acks: Callable[[str, list[str]], Awaitable[bool]],
        retry_max: float,
        body_limit: int,
        verdict: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        """`send_acks(peer, ids)` sends an ack on an open direct link with `peer`; False when
        there is none (the receipt then goes through the mailbox)."""
        self._mailbox = mailbox
        self._directory = directory
        self._delivery = delivery
        self._pins = pins
        self._send_acks = send_acks
        self._retry_max = retry_max
        self._body_limit = body_limit
        self._consent = verdict  # consent.ContactBook.verdict
        self._collected = False  # the current stream brought something: it worked
        self.counts = InboxCounts()
        self._call: grpc.aio.UnaryStreamCall[object, mailbox_pb2.CollectResponse] | None = None

    async def run(self) -> None:
        """Collects until cancelled, reconnecting with backoff (0.5 s doubling to retry_max)."""
        delay = FIRST_DELAY
        while True:
            try:
                await self._mailbox.publish()
                await self._collect()
            except asyncio.CancelledError:
                raise
            except Unauthenticated as exc:
                log.info("mailbox: %s", exc)  # the session ends: the agent logs out
            except DomainError as exc:
                log.info("mailbox unavailable (%s); retrying in %.1f s", exc, delay)
            except Exception:
                log.exception("collecting from the mailbox failed")
            finally:
                self.counts.connected = False
            if self._collected:  # that stream worked: the next one starts over
                delay, self._collected = FIRST_DELAY, False
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._retry_max)

    def reconnect(self) -> None:
        """Ends the current stream (the next one brings again what is not acknowledged)."""
        if self._call is not None:
            self._call.cancel()

    async def _collect(self) -> None:
        call = self._directory.collect()
        self._call = call
        try:
            async for response in call:
                self.counts.connected = self._collected = True
                if response.envelopes:
                    await self._handle(list(response.envelopes))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise from_rpc_error(err, f"the mailbox at {self._directory.address}") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the session ends
            # else only the call was cancelled (reconnect): collect again
        finally:
            self._call = None
            call.cancel()

    # -- one response -------------------------------------------------------------------------

    async def _handle(self, envelopes: list[mailbox_pb2.Envelope]) -> None:
        if len(envelopes) <= OPEN_INLINE:
            opened = [self._open(e) for e in envelopes]
        else:
            opened = await asyncio.to_thread(lambda: [self._open(e) for e in envelopes])
        sorted_out = _Sorted()
        for envelope, result in zip(envelopes, opened, strict=True):
            verdict = "discard" if result is None else await self._verdict(envelope, result)
            if verdict == "discard":  # refused for good: acknowledged, it does not come again
                sorted_out.ack.append(envelope.id)
            elif verdict == "store":
                assert result is not None
                self._sort(envelope.id, result, sorted_out)
        self.counts.envelopes += len(envelopes)
        for batch in sorted_out.messages.values():
            await self._delivery.commit(batch)
        kept: set[int] = set()
        for peer, batch in sorted_out.messages.items():
            if not await self._receipt(peer, [m.id for m in batch]):
                kept.update(sorted_out.envelopes[peer])
        for peer, (device, ids) in sorted_out.receipts.items():
            await self._delivery.acknowledged(peer, ids, device)
        ack = [id for id in sorted_out.ack if id not in kept]
        if ack:
            await self._directory.acknowledge(ack)
        if kept:  # they come again on a later stream, and their receipt is tried again
            asyncio.get_running_loop().call_later(self._retry_max, self.reconnect)

    def _open(self, envelope: mailbox_pb2.Envelope) -> Opened | None:
        identity = self._mailbox.identity
        try:
            opened = open_envelope(
                envelope.envelope, self._mailbox.key, identity.username, identity.users_ca
            )
            if opened.sender != envelope.depositor:
                raise PermissionDenied(
                    f"sealed by {opened.sender} but deposited by {shown(envelope.depositor)}"
                )
            if opened.message is not None:
                check_body(opened.message.body, self._body_limit)
        except DomainError as exc:
            self._refuse(envelope, str(exc))
            return None
        deposited = from_timestamp(envelope.deposited_at)
        cert = opened.certificate
        if not (
            cert.not_valid_before_utc - CLOCK_SLACK
            <= deposited
            <= cert.not_valid_after_utc + CLOCK_SLACK
        ):
            self._refuse(envelope, "its certificate was not valid when it was deposited")
            return None
        return opened

    def _refuse(self, envelope: mailbox_pb2.Envelope, reason: str) -> None:
        self.counts.refused += 1
        log.warning(
            "refused envelope %d deposited by %s: %s (nothing stored)",
            envelope.id,
            envelope.depositor,
            reason,
        )

    async def _verdict(
        self, envelope: mailbox_pb2.Envelope, opened: Opened
    ) -> Literal["store", "discard", "keep"]:
        """What to do with an envelope that opened: discard it when the sender is blocked or,
        as a refresh just said, not an accepted contact; keep it at the directory when that
        cannot be known now, or when their key is not the pinned one (it comes again once the
        user trusts the new key); else store (pinned on first contact)."""
        consent = "accepted" if self._consent is None else await self._consent(opened.sender)
        if consent == "refused":
            self._refuse(envelope, f"{opened.sender} is not an accepted contact")
            return "discard"
        if consent != "accepted":
            self._refuse(envelope, "consent cannot be checked now (kept at the directory)")
            return "keep"
        try:
            await self._pins.check(opened.sender, public_key_sha256(opened.certificate))
        except DomainError as exc:
            self._refuse(envelope, f"{exc} (kept at the directory until then)")
            return "keep"
        return "store"

    @staticmethod
    def _sort(envelope_id: int, opened: Opened, into: _Sorted) -> None:
        into.ack.append(envelope_id)
        if opened.message is not None:
            into.messages.setdefault(opened.sender, []).append(opened.message)
            into.envelopes.setdefault(opened.sender, []).append(envelope_id)
        else:
            device = device_id(public_key_sha256(opened.certificate))
            into.receipts.setdefault(opened.sender, (device, []))[1].extend(opened.receipt)

    async def _receipt(self, peer: str, ids: list[str]) -> bool:
        """Tells `peer` we committed `ids`: on the direct link if open, else sealed. False
        when it could not go: the caller keeps the envelopes at the directory, so that they
        come again (stored once) and the receipt is tried again."""
        try:
            if not await self._send_acks(peer, ids):
                await self._mailbox.send_receipt(peer, ids)
        except DomainError as exc:
            log.info("no receipt to %s for %d message(s) yet: %s", peer, len(ids), exc)
            return False
        return True
