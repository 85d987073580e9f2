"""MailboxService over gRPC: translates protobuf <-> the mailbox (mailbox_relay), nothing else.

Domain errors are mapped to status codes by p2pchat_common.errors.add_service.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from p2pchat.v1 import mailbox_pb2 as pb
from p2pchat.v1 import mailbox_pb2_grpc
from p2pchat_common.timestamps import to_timestamp
from p2pchat_directory.mailbox import HeldEnvelope
from p2pchat_directory.mailbox_relay import MailboxRelay
from p2pchat_directory.servicer import bearer_token

Context = grpc.aio.ServicerContext[Any, Any]


def envelope_pb(held: HeldEnvelope) -> pb.Envelope:
    return pb.Envelope(
        id=held.id,
        depositor=held.depositor,
        envelope=held.envelope,
        deposited_at=to_timestamp(held.deposited_at),
    )


class MailboxServicer(mailbox_pb2_grpc.MailboxServiceServicer):
    def __init__(self, mailbox: MailboxRelay) -> None:
        self._mailbox = mailbox

    async def PublishKey(
        self, request: pb.PublishKeyRequest, context: Context
    ) -> pb.PublishKeyResponse:
        await self._mailbox.publish_key(
            bearer_token(context), request.mailbox_key, request.signature
        )
        return pb.PublishKeyResponse()

    async def Deposit(self, request: pb.DepositRequest, context: Context) -> pb.DepositResponse:
        deposited = await self._mailbox.deposit(
            bearer_token(context), request.recipient, list(request.envelopes)
        )
        return pb.DepositResponse(ids=deposited.ids, expires_at=to_timestamp(deposited.expires_at))

    async def Collect(
        self, request: pb.CollectRequest, context: Context
    ) -> AsyncIterator[pb.CollectResponse]:
        async for envelopes, backlog_done in self._mailbox.collect(bearer_token(context)):
            yield pb.CollectResponse(
                envelopes=[envelope_pb(e) for e in envelopes], backlog_done=backlog_done
            )

    async def Acknowledge(
        self, request: pb.AcknowledgeRequest, context: Context
    ) -> pb.AcknowledgeResponse:
        deleted = await self._mailbox.acknowledge(bearer_token(context), list(request.ids))
        return pb.AcknowledgeResponse(deleted=deleted)
