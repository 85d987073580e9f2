"""AgentService (the CLI's API) over gRPC: translates protobuf <-> Agent, nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from p2pchat.v1 import agent_pb2 as pb
from p2pchat.v1 import agent_pb2_grpc
from p2pchat_agent.agent import Agent
from p2pchat_agent.events import DeliveryEvent, Event, InputEnded, Item, MessageEvent, Notice
from p2pchat_agent.ids import valid_message_id
from p2pchat_agent.store import StoredMessage
from p2pchat_common.errors import DomainError, InvalidArgument
from p2pchat_common.timestamps import to_timestamp
from p2pchat_common.validation import normalize_username

Context = grpc.aio.ServicerContext[Any, Any]

_STATUS = {
    "pending": pb.MESSAGE_STATUS_PENDING,
    "delivered": pb.MESSAGE_STATUS_DELIVERED,
    "received": pb.MESSAGE_STATUS_RECEIVED,
}
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


def chat_events(event: Event) -> list[pb.ChatEvent]:
    """What the CLI streams show of an event: one ChatEvent per message concerned."""
    if isinstance(event, MessageEvent):
        return [pb.ChatEvent(message=chat_message(event.message))]
    if isinstance(event, DeliveryEvent):
        delivered_at = to_timestamp(event.delivered_at)
        return [
            pb.ChatEvent(
                delivery=pb.DeliveryUpdate(
                    id=id,
                    peer=event.peer,
                    status=pb.MESSAGE_STATUS_DELIVERED,
                    delivered_at=delivered_at,
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


def event_peer(event: Event) -> str:
    return event.message.peer if isinstance(event, MessageEvent) else event.peer


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
        agent = self._agent
        reachable = agent.directory.reachable
        if reachable is None:  # no call made yet: ask now rather than guess
            reachable = await agent.directory.probe()
        response = pb.StatusResponse(
            directory=agent.directory.address,
            directory_reachable=reachable,
            address=agent.address,
        )
        if agent.clock.offset is not None:
            response.clock_offset.FromTimedelta(agent.clock.offset)
        if agent.clock.warning is not None:
            response.warnings.append(agent.clock.warning)
        active = agent.active
        if active is not None:
            response.logged_in = True
            response.username = active.username
            response.session_expires_at.CopyFrom(to_timestamp(active.session.expires_at))
            response.pending_messages = await active.store.count_pending()
            response.linked_peers.extend(active.links.linked_peers)
        return response

    async def ListContacts(
        self, request: pb.AgentListContactsRequest, context: Context
    ) -> pb.AgentListContactsResponse:
        return pb.AgentListContactsResponse(contacts=await self._agent.list_contacts())

    async def AddContact(
        self, request: pb.AgentAddContactRequest, context: Context
    ) -> pb.AgentAddContactResponse:
        contact = await self._agent.add_contact(request.username, request.address)
        return pb.AgentAddContactResponse(contact=contact)

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
        agent = self._agent
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            return
        if first.WhichOneof("kind") != "open":
            raise InvalidArgument("a chat starts with ChatOpen(peer)")
        peer = normalize_username(first.open.peer)
        await agent.require_contact(peer)
        limit = first.open.history_limit or 50

        with agent.events.subscribe(lambda e: event_peer(e) == peer) as sub:

            def stored(future: asyncio.Future[StoredMessage]) -> None:
                exc = None if future.cancelled() else future.exception()
                if exc is not None:
                    refused(exc)

            def refused(exc: BaseException) -> None:
                code = exc.code.name if isinstance(exc, DomainError) else "INTERNAL"
                sub.put(Notice(code, str(exc)))

            async def read_inputs() -> None:
                # Texts are queued in order without waiting for each commit: a fast typist (or a
                # script) is limited by group commit, not by one transaction per message.
                submitted: set[asyncio.Future[StoredMessage]] = set()
                async for item in request_iterator:
                    if item.WhichOneof("kind") != "text":
                        continue
                    try:
                        future = agent.submit(peer, item.text.body)
                    except DomainError as exc:
                        refused(exc)
                        continue
                    future.add_done_callback(stored)
                    submitted.add(future)
                    future.add_done_callback(submitted.discard)
                # The CLI closed its side: the chat ends once what it sent is committed (or
                # refused, with its notice shown first).
                await asyncio.gather(*submitted, return_exceptions=True)

            def input_ended(task: asyncio.Task[None]) -> None:
                sub.put(InputEnded(None if task.cancelled() else task.exception()))

            history, _ = await agent.history(peer, limit)
            shown = {m.id for m in history}
            for m in history:
                yield pb.ChatEvent(message=chat_message(m))
            yield pb.ChatEvent(history_end=pb.HistoryEnd())
            reader = asyncio.create_task(read_inputs())
            reader.add_done_callback(input_ended)
            try:
                # One queue holds the live events, this chat's notices and the end of its
                # input, in order: one wait per burst, no task per event.
                while True:
                    item: Item | None = await sub.get()
                    while item is not None:
                        if isinstance(item, InputEnded):
                            if item.error is not None:
                                raise item.error
                            return  # the CLI closed its side: end the chat
                        if isinstance(item, Notice):
                            notice = pb.Notice(code=item.code, message=item.message)
                            yield pb.ChatEvent(notice=notice)
                        elif not (isinstance(item, MessageEvent) and item.message.id in shown):
                            for event in chat_events(item):
                                yield event
                        item = sub.get_nowait()
            finally:
                reader.cancel()

    async def Serve(
        self, request: pb.ServeRequest, context: Context
    ) -> AsyncIterator[pb.ChatEvent]:
        agent = self._agent
        agent.identity()  # FAILED_PRECONDITION when logged out

        def wanted(event: Event) -> bool:
            if isinstance(event, MessageEvent):
                return event.message.direction == "in"
            return True

        with agent.events.subscribe(wanted) as sub:
            while True:
                item = await sub.get()
                assert not isinstance(item, Notice | InputEnded)  # only Chat puts those
                for event in chat_events(item):
                    yield event
