"""The CLI's connection to its agent: AgentService over gRPC, errors turned into exit codes."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from typing import TypeVar

import grpc

from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import agent_pb2_grpc, common_pb2
from p2pchat_agent.cli.render import safe
from p2pchat_agent.config import MAX_CONTROL_MESSAGE

T = TypeVar("T")
CALL_TIMEOUT = 30.0


class Exit(enum.IntEnum):
    OK = 0
    USAGE = 1
    REFUSED = 2  # the agent or the directory said no; the reason is printed
    UNREACHABLE = 3  # the agent could not be reached


class CliError(Exception):
    def __init__(self, message: str, code: Exit) -> None:
        super().__init__(message)
        self.code = code


def cli_error(err: grpc.RpcError, agent: str) -> CliError:
    """What the CLI says about a failed call: the details the agent sent, made safe to print."""
    code = err.code() if isinstance(err, grpc.aio.AioRpcError | grpc.Call) else None
    raw = err.details() if isinstance(err, grpc.aio.AioRpcError | grpc.Call) else str(err)
    details = safe(raw or "")
    # The agent's own UNAVAILABLE for its directory says "directory at ... unreachable: ..."; a
    # missing socket's says "No such file or directory", and is about the agent.
    if code == grpc.StatusCode.UNAVAILABLE and not (details or "").startswith("directory"):
        return CliError(
            f"cannot reach the agent at {agent} (is p2pchat-agent running? use --agent "
            "unix:PATH for its control socket, or --agent HOST:PORT)",
            Exit.UNREACHABLE,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(f"the agent at {agent} did not answer in time", Exit.UNREACHABLE)
    return CliError(details or str(code), Exit.REFUSED)


class AgentConnection:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", MAX_CONTROL_MESSAGE)]
        )
        self.stub = agent_pb2_grpc.AgentServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            raise cli_error(err, self.address) from None

    async def status(self) -> apb.StatusResponse:
        return await self._call(self.stub.Status(apb.StatusRequest(), timeout=CALL_TIMEOUT))

    async def register(self, username: str, password: str, address: str) -> str:
        request = apb.AgentRegisterRequest(username=username, password=password, address=address)
        response = await self._call(self.stub.Register(request, timeout=CALL_TIMEOUT))
        return response.username

    async def login(self, username: str, password: str) -> apb.AgentLoginResponse:
        request = apb.AgentLoginRequest(username=username, password=password)
        return await self._call(self.stub.Login(request, timeout=CALL_TIMEOUT))

    async def logout(self) -> None:
        await self._call(self.stub.Logout(apb.AgentLogoutRequest(), timeout=CALL_TIMEOUT))

    async def contacts(self) -> list[common_pb2.Contact]:
        response = await self._call(
            self.stub.ListContacts(apb.AgentListContactsRequest(), timeout=CALL_TIMEOUT)
        )
        return list(response.contacts)

    async def add_contact(
        self, username: str, address: str, note: str = "", invite: str = ""
    ) -> common_pb2.Contact:
        request = apb.AgentAddContactRequest(
            username=username, address=address, note=note, invite_code=invite
        )
        return (await self._call(self.stub.AddContact(request, timeout=CALL_TIMEOUT))).contact

    # -- consent ----------------------------------------------------------------------------

    async def requests(self) -> list[common_pb2.Contact]:
        call = self.stub.ListContactRequests(
            apb.AgentListContactRequestsRequest(), timeout=CALL_TIMEOUT
        )
        return list((await self._call(call)).requests)

    async def answer(self, how: str, username: str) -> common_pb2.Contact | None:
        """`how`: accept, decline, block or unblock."""
        request = apb.AgentContactAnswerRequest(username=username)
        stub = self.stub
        if how == "accept":
            return (await self._call(stub.AcceptContact(request, timeout=CALL_TIMEOUT))).contact
        if how == "block":
            return (await self._call(stub.BlockContact(request, timeout=CALL_TIMEOUT))).contact
        if how == "decline":
            await self._call(stub.DeclineContact(request, timeout=CALL_TIMEOUT))
        else:
            await self._call(stub.UnblockContact(request, timeout=CALL_TIMEOUT))
        return None

    async def set_policy(self, policy: common_pb2.ContactPolicy.ValueType) -> int:
        request = apb.AgentSetContactPolicyRequest(policy=policy)
        return (await self._call(self.stub.SetContactPolicy(request, timeout=CALL_TIMEOUT))).policy

    async def get_policy(self) -> int:
        request = apb.AgentGetContactPolicyRequest()
        return (await self._call(self.stub.GetContactPolicy(request, timeout=CALL_TIMEOUT))).policy

    async def create_invite(self, expires_in: int, max_uses: int) -> common_pb2.Invite:
        request = apb.AgentCreateInviteRequest(expires_in_seconds=expires_in, max_uses=max_uses)
        return (await self._call(self.stub.CreateInvite(request, timeout=CALL_TIMEOUT))).invite

    async def invites(self) -> list[common_pb2.Invite]:
        call = self.stub.ListInvites(apb.AgentListInvitesRequest(), timeout=CALL_TIMEOUT)
        return list((await self._call(call)).invites)

    async def revoke_invite(self, id: str) -> common_pb2.Invite:
        request = apb.AgentRevokeInviteRequest(id=id)
        return (await self._call(self.stub.RevokeInvite(request, timeout=CALL_TIMEOUT))).invite

    async def remove_contact(self, username: str) -> None:
        request = apb.AgentRemoveContactRequest(username=username)
        await self._call(self.stub.RemoveContact(request, timeout=CALL_TIMEOUT))

    async def trust(self, username: str) -> str:
        request = apb.TrustPeerKeyRequest(username=username)
        response = await self._call(self.stub.TrustPeerKey(request, timeout=CALL_TIMEOUT))
        return response.public_key_sha256

    async def send(self, peer: str, body: str, wait: float | None = None) -> apb.ChatMessage:
        request = apb.SendRequest(peer=peer, body=body)
        if wait is not None:
            request.wait.FromMilliseconds(int(wait * 1000))
        timeout = CALL_TIMEOUT + (wait or 0)
        return (await self._call(self.stub.Send(request, timeout=timeout))).message

    async def history(
        self, peer: str, limit: int = 50, query: str = "", before_id: str = ""
    ) -> apb.HistoryResponse:
        request = apb.HistoryRequest(peer=peer, limit=limit, query=query, before_id=before_id)
        return await self._call(self.stub.History(request, timeout=CALL_TIMEOUT))

    async def events(self, stream: AsyncIterable[apb.ChatEvent]) -> AsyncIterator[apb.ChatEvent]:
        """Events of a Chat or Serve stream, with errors turned into CliError."""
        try:
            async for event in stream:
                yield event
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise cli_error(err, self.address) from None
