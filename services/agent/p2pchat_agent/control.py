"""AgentService (the CLI's API) over gRPC: translates protobuf <-> Agent, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from p2pchat.v1 import agent_pb2 as pb
from p2pchat.v1 import agent_pb2_grpc
from p2pchat_agent import chat
from p2pchat_agent.agent import Agent
from p2pchat_agent.events import DeliveryEvent, Event, MessageEvent, Notice
from p2pchat_agent.ids import valid_message_id
from p2pchat_agent.messages import StoredMessage
from p2pchat_agent.status import status
from p2pchat_common.errors import InvalidArgument
from p2pchat_common.timestamps import to_timestamp

Context = grpc.aio.ServicerContext[Any, Any]

_STATUS = {
    "pending": pb.MESSAGE_STATUS_PENDING,
    "delivered": pb.MESSAGE_STATUS_DELIVERED,
    "received": pb.MESSAGE_STATUS_RECEIVED,
    "relayed": pb.MESSAGE_STATUS_RELAYED,
}
_DELIVERED = pb.MESSAGE_STATUS_DELIVERED
_DIRECTION = {"out": pb.DIRECTION_OUTGOING, "in": pb.DIRECTION_INCOMING}


def chat_message(m: StoredMessage) -> pb.ChatMessage:
    msg = pb.ChatMessage(
        id=m.id,
        peer=m.peer,
        direction=_DIRECTION[m.direction],
        sender=m.sender,
        recipient=m.recipient,
        body=m.body,
        sent_at=to_timestamp(m.sent_at),
        status=_STATUS[m.status],
        status_reason=m.reason,
    )
    if m.received_at is not None:
        msg.received_at.CopyFrom(to_timestamp(m.received_at))
    if m.delivered_at is not None:
        msg.delivered_at.CopyFrom(to_timestamp(m.delivered_at))
    return msg


# A History response stays under gRPC's default 4 MiB receive limit, so that any client can read
# it: a page of large messages holds fewer of them (the newest; has_more says there is more).
HISTORY_PAGE_BYTES = 3 * 1024 * 1024
_MESSAGE_OVERHEAD = 256  # ids, names, times and framing of one ChatMessage, generously


def fit_page(messages: list[StoredMessage]) -> list[StoredMessage]:
    """The newest of `messages` (oldest first) that fit in HISTORY_PAGE_BYTES; at least one."""
    size = 0
    for i in range(len(messages) - 1, -1, -1):
        size += len(messages[i].body.encode()) + _MESSAGE_OVERHEAD
        if size > HISTORY_PAGE_BYTES and i < len(messages) - 1:
            return messages[i + 1 :]
    return messages


def chat_events(event: Event, batches: bool = False) -> list[pb.ChatEvent]:
    """What the CLI streams show of an event: one ChatEvent per message concerned, or with
    `batches` one for all the delivery updates of an acknowledgement."""
    if isinstance(event, MessageEvent):
        return [pb.ChatEvent(message=chat_message(event.message))]
    if isinstance(event, DeliveryEvent):
        state = _STATUS[event.status]
        # A relayed update says when the mailbox took it, not a delivery time: none is sent.
        delivered_at = to_timestamp(event.delivered_at) if state == _DELIVERED else None
        if batches:
            updates = pb.DeliveryUpdates(
                peer=event.peer, ids=event.ids, status=state, delivered_at=delivered_at
            )
            return [pb.ChatEvent(deliveries=updates)]
        return [
            pb.ChatEvent(
                delivery=pb.DeliveryUpdate(
                    id=id, peer=event.peer, status=state, delivered_at=delivered_at
                )
            )
            for id in event.ids
        ]
    return [
        pb.ChatEvent(
            key_changed=pb.PeerKeyChanged(
                peer=event.peer,
                pinned_sha256=event.pinned_sha256,
                presented_sha256=event.presented_sha256,
            )
        )
    ]


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    async def Register(
        self, request: pb.AgentRegisterRequest, context: Context
    ) -> pb.AgentRegisterResponse:
        name = await self._agent.register(request.username, request.password, request.address)
        return pb.AgentRegisterResponse(username=name)

    async def Login(self, request: pb.AgentLoginRequest, context: Context) -> pb.AgentLoginResponse:
        active = await self._agent.login(request.username, request.password)
        return pb.AgentLoginResponse(
            username=active.username,
            session_expires_at=to_timestamp(active.session.expires_at),
            certificate_expires_at=to_timestamp(active.identity.cert_expires_at),
            address=self._agent.address,
        )

    async def Logout(
        self, request: pb.AgentLogoutRequest, context: Context
    ) -> pb.AgentLogoutResponse:
        await self._agent.logout()
        return pb.AgentLogoutResponse()

    async def Status(self, request: pb.StatusRequest, context: Context) -> pb.StatusResponse:
        found = await status(self._agent)
        response = pb.StatusResponse(
            directory=found.directory,
            directory_reachable=found.directory_reachable,
            address=found.address,
            warnings=found.warnings,
        )
        if found.clock_offset is not None:
            response.clock_offset.FromTimedelta(found.clock_offset)
        if found.username is not None:
            response.logged_in = True
            response.username = found.username
            if found.session_expires_at is not None:
                response.session_expires_at.CopyFrom(to_timestamp(found.session_expires_at))
            response.pending_messages = found.pending_messages
            response.relayed_messages = found.relayed_messages
            response.delivered_messages = found.delivered_messages
            response.mailbox_connected = found.mailbox_connected
            response.envelopes_refused = found.envelopes_refused
            response.linked_peers.extend(found.linked_peers)
            response.link_frames_sent = found.link_frames_sent
            response.link_frames_received = found.link_frames_received
        return response

    async def ListContacts(
        self, request: pb.AgentListContactsRequest, context: Context
    ) -> pb.AgentListContactsResponse:
        return pb.AgentListContactsResponse(contacts=await self._agent.list_contacts())

    async def AddContact(
        self, request: pb.AgentAddContactRequest, context: Context
    ) -> pb.AgentAddContactResponse:
        contact = await self._agent.add_contact(
            request.username, request.address, request.note, request.invite_code
        )
        return pb.AgentAddContactResponse(contact=contact)

    # -- consent (contacts.py) -------------------------------------------------------------

    async def ListContactRequests(
        self, request: pb.AgentListContactRequestsRequest, context: Context
    ) -> pb.AgentListContactRequestsResponse:
        requests = await self._agent.contacts().requests()
        return pb.AgentListContactRequestsResponse(requests=requests)

    async def AcceptContact(
        self, request: pb.AgentContactAnswerRequest, context: Context
    ) -> pb.AgentContactAnswerResponse:
        contact = await self._agent.contacts().accept(request.username)
        return pb.AgentContactAnswerResponse(contact=contact)

    async def DeclineContact(
        self, request: pb.AgentContactAnswerRequest, context: Context
    ) -> pb.AgentContactAnswerResponse:
        await self._agent.contacts().decline(request.username)
        return pb.AgentContactAnswerResponse()

    async def BlockContact(
        self, request: pb.AgentContactAnswerRequest, context: Context
    ) -> pb.AgentContactAnswerResponse:
        contact = await self._agent.contacts().block(request.username)
        return pb.AgentContactAnswerResponse(contact=contact)

    async def UnblockContact(
        self, request: pb.AgentContactAnswerRequest, context: Context
    ) -> pb.AgentContactAnswerResponse:
        await self._agent.contacts().unblock(request.username)
        return pb.AgentContactAnswerResponse()

    async def SetContactPolicy(
        self, request: pb.AgentSetContactPolicyRequest, context: Context
    ) -> pb.AgentContactPolicyResponse:
        policy = await self._agent.contacts().set_policy(request.policy)
        return pb.AgentContactPolicyResponse(policy=policy)  # type: ignore[arg-type]

    async def GetContactPolicy(
        self, request: pb.AgentGetContactPolicyRequest, context: Context
    ) -> pb.AgentContactPolicyResponse:
        policy = await self._agent.contacts().get_policy()
        return pb.AgentContactPolicyResponse(policy=policy)  # type: ignore[arg-type]

    async def CreateInvite(
        self, request: pb.AgentCreateInviteRequest, context: Context
    ) -> pb.AgentInviteResponse:
        contacts = self._agent.contacts()
        invite = await contacts.create_invite(request.expires_in_seconds, request.max_uses)
        return pb.AgentInviteResponse(invite=invite)

    async def ListInvites(
        self, request: pb.AgentListInvitesRequest, context: Context
    ) -> pb.AgentListInvitesResponse:
        return pb.AgentListInvitesResponse(invites=await self._agent.contacts().invites())

    async def RevokeInvite(
        self, request: pb.AgentRevokeInviteRequest, context: Context
    ) -> pb.AgentInviteResponse:
        return pb.AgentInviteResponse(invite=await self._agent.contacts().revoke_invite(request.id))

    async def RemoveContact(
        self, request: pb.AgentRemoveContactRequest, context: Context
    ) -> pb.AgentRemoveContactResponse:
        await self._agent.remove_contact(request.username)
        return pb.AgentRemoveContactResponse()

    async def TrustPeerKey(
        self, request: pb.TrustPeerKeyRequest, context: Context
    ) -> pb.TrustPeerKeyResponse:
        sha = await self._agent.trust_peer_key(request.username)
        return pb.TrustPeerKeyResponse(public_key_sha256=sha)

    async def Send(self, request: pb.SendRequest, context: Context) -> pb.SendResponse:
        wait = request.wait.ToTimedelta().total_seconds() if request.HasField("wait") else None
        if wait is not None and not 0 <= wait <= 3600:
            raise InvalidArgument("wait must be 0-3600 seconds")
        message = await self._agent.send(request.peer, request.body, wait)
        return pb.SendResponse(message=chat_message(message))

    async def History(self, request: pb.HistoryRequest, context: Context) -> pb.HistoryResponse:
        # A page starts before a message id: anything else is refused here, never echoed back.
        if request.before_id and not valid_message_id(request.before_id):
            raise InvalidArgument("before_id is not a message id")
        messages, has_more = await self._agent.history(
            request.peer, request.limit, request.before_id, request.query
        )
        page = fit_page(messages)
        has_more = has_more or len(page) < len(messages)
        return pb.HistoryResponse(messages=map(chat_message, page), has_more=has_more)

    async def Chat(
        self, request_iterator: AsyncIterator[pb.ChatInput], context: Context
    ) -> AsyncIterator[pb.ChatEvent]:
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "open":
            raise InvalidArgument("a chat starts with ChatOpen(peer)")

        async def texts() -> AsyncIterator[list[str]]:
            async for item in request_iterator:
                kind = item.WhichOneof("kind")
                if kind == "text":
                    yield [item.text.body]
                elif kind == "texts":
                    yield [text.body for text in item.texts.texts]

        limit = first.open.history_limit or 50
        batches = first.open.batches
        async for burst in chat.chat(self._agent, first.open.peer, limit, texts()):
            events = [e for item in burst for e in chat_item_events(item, batches)]
            for event in _batched(events) if batches else events:
                yield event

    async def Serve(
        self, request: pb.ServeRequest, context: Context
    ) -> AsyncIterator[pb.ChatEvent]:
        batches = request.batches
        async for burst in chat.serve(self._agent):
            events = [e for item in burst for e in chat_events(item, batches)]
            for event in _batched(events) if batches else events:
                yield event


# A ChatEventBatch holds at most this many events and bytes: a burst can be thousands of
# large messages, and one gRPC message is at most 16 MiB (a single event, at most one body of
# --body-limit <= 4 MiB, always fits).
BATCH_EVENTS = 500
BATCH_BYTES = 4 * 1024 * 1024


def _batched(events: list[pb.ChatEvent]) -> list[pb.ChatEvent]:
    """What is ready together as few ChatEvents: batches of several, within the bounds above."""
    if len(events) <= 1:
        return events
    out: list[pb.ChatEvent] = []
    chunk: list[pb.ChatEvent] = []
    size = 0
    for event in events:
        event_size = event.ByteSize()
        if chunk and (len(chunk) == BATCH_EVENTS or size + event_size > BATCH_BYTES):
            out.append(_one_batch(chunk))
            chunk, size = [], 0
        chunk.append(event)
        size += event_size
    out.append(_one_batch(chunk))
    return out


def _one_batch(events: list[pb.ChatEvent]) -> pb.ChatEvent:
    return events[0] if len(events) == 1 else pb.ChatEvent(batch=pb.ChatEventBatch(events=events))


def chat_item_events(item: chat.ChatItem, batches: bool) -> list[pb.ChatEvent]:
    """The ChatEvents of one item of a chat."""
    if isinstance(item, chat.Past):
        return [pb.ChatEvent(message=chat_message(item.message))]
    if isinstance(item, chat.PastEnd):
        return [pb.ChatEvent(history_end=pb.HistoryEnd(batches=True))]
    if isinstance(item, Notice):
        return [pb.ChatEvent(notice=pb.Notice(code=item.code, message=item.message))]
    return chat_events(item, batches)
