"""The contact RPCs of DirectoryService (requests, answers, blocks, policy, invite codes):
protobuf <-> consent.ContactsService, nothing else. A mixin of servicer.DirectoryServicer, so
that every RPC of the service is registered on one servicer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from p2pchat.v1 import common_pb2, directory_pb2
from p2pchat_common.errors import InvalidArgument
from p2pchat_common.timestamps import to_timestamp
from p2pchat_directory.consent import ContactsService
from p2pchat_directory.consent_state import ContactState, ContactView, Policy
from p2pchat_directory.consent_store import Invite
from p2pchat_directory.hot import Plan

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

_STATE = {
    ContactState.NONE: common_pb2.CONTACT_STATE_UNSPECIFIED,
    ContactState.ACCEPTED: common_pb2.CONTACT_STATE_ACCEPTED,
    ContactState.REQUESTED: common_pb2.CONTACT_STATE_REQUESTED,
    ContactState.AWAITING: common_pb2.CONTACT_STATE_AWAITING,
    ContactState.BLOCKED: common_pb2.CONTACT_STATE_BLOCKED,
}
_POLICY = {
    Policy.ANYONE: common_pb2.CONTACT_POLICY_ANYONE,
    Policy.INVITE: common_pb2.CONTACT_POLICY_INVITE,
    Policy.NOBODY: common_pb2.CONTACT_POLICY_NOBODY,
}
_POLICY_OF = {pb: policy for policy, pb in _POLICY.items()}


def contact_pb(view: ContactView) -> common_pb2.Contact:
    pb = common_pb2.Contact(
        username=view.username,
        address=view.address,
        pinned_address=view.pinned_address,
        online=view.online,
        state=_STATE[view.state],
        note=view.note,
    )
    if view.last_seen is not None:
        pb.last_seen.CopyFrom(to_timestamp(view.last_seen))
    if view.requested_at is not None:
        pb.requested_at.CopyFrom(to_timestamp(view.requested_at))
    return pb


def invite_pb(invite: Invite, code: str = "") -> common_pb2.Invite:
    pb = common_pb2.Invite(
        id=invite.id,
        code=code,
        created_at=to_timestamp(invite.created_at),
        uses_left=invite.uses_left or 0,
        unlimited=invite.uses_left is None,
    )
    if invite.expires_at is not None:
        pb.expires_at.CopyFrom(to_timestamp(invite.expires_at))
    if invite.revoked_at is not None:
        pb.revoked_at.CopyFrom(to_timestamp(invite.revoked_at))
    return pb


def _policy(value: int) -> Policy:
    policy: Policy | None = _POLICY_OF.get(value)  # type: ignore[call-overload]
    if policy is None:
        raise InvalidArgument("policy must be ANYONE, INVITE or NOBODY")
    return policy


class ContactRpcs:
    """The contact RPCs; the class they are mixed into provides `_contacts`, `_run`, `_token`."""

    _contacts: ContactsService

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    async def _plan(self, plan: Plan[T]) -> T:
        raise NotImplementedError

    def _token(self, context: Context) -> str:
        raise NotImplementedError

    def _changed(self, context: Context, username: str) -> None:
        """The caller's contacts with `username` changed (their presence streams hear of it)."""
        raise NotImplementedError

    async def _answered(
        self, fn: Callable[[str, str], ContactView], request: Any, context: Context
    ) -> directory_pb2.AddContactResponse:
        view = await self._run(fn, self._token(context), request.username)
        self._changed(context, view.username)
        return directory_pb2.AddContactResponse(contact=contact_pb(view))

    async def AddContact(
        self, request: directory_pb2.AddContactRequest, context: Context
    ) -> directory_pb2.AddContactResponse:
        view = await self._run(
            self._contacts.add_contact,
            self._token(context),
            request.username,
            request.address,
            request.note,
            request.invite_code,
        )
        self._changed(context, view.username)
        return directory_pb2.AddContactResponse(contact=contact_pb(view))

    async def RemoveContact(
        self, request: directory_pb2.RemoveContactRequest, context: Context
    ) -> directory_pb2.RemoveContactResponse:
        await self._run(self._contacts.remove_contact, self._token(context), request.username)
        self._changed(context, request.username)
        return directory_pb2.RemoveContactResponse()

    async def ListContacts(
        self, request: directory_pb2.ListContactsRequest, context: Context
    ) -> directory_pb2.ListContactsResponse:
        views = await self._plan(self._contacts.list_contacts_reads(self._token(context)))
        return directory_pb2.ListContactsResponse(contacts=[contact_pb(v) for v in views])

    async def ListContactRequests(
        self, request: directory_pb2.ListContactRequestsRequest, context: Context
    ) -> directory_pb2.ListContactRequestsResponse:
        views = await self._run(self._contacts.list_requests, self._token(context))
        return directory_pb2.ListContactRequestsResponse(requests=[contact_pb(v) for v in views])

    async def AcceptContact(
        self, request: directory_pb2.ContactAnswerRequest, context: Context
    ) -> directory_pb2.AddContactResponse:
        return await self._answered(self._contacts.accept, request, context)

    async def DeclineContact(
        self, request: directory_pb2.ContactAnswerRequest, context: Context
    ) -> directory_pb2.ContactAnswerResponse:
        await self._run(self._contacts.decline, self._token(context), request.username)
        self._changed(context, request.username)
        return directory_pb2.ContactAnswerResponse()

    async def BlockContact(
        self, request: directory_pb2.ContactAnswerRequest, context: Context
    ) -> directory_pb2.AddContactResponse:
        return await self._answered(self._contacts.block, request, context)

    async def UnblockContact(
        self, request: directory_pb2.ContactAnswerRequest, context: Context
    ) -> directory_pb2.ContactAnswerResponse:
        await self._run(self._contacts.unblock, self._token(context), request.username)
        self._changed(context, request.username)
        return directory_pb2.ContactAnswerResponse()

    async def SetContactPolicy(
        self, request: directory_pb2.SetContactPolicyRequest, context: Context
    ) -> directory_pb2.ContactPolicyResponse:
        policy = await self._run(
            self._contacts.set_policy, self._token(context), _policy(request.policy)
        )
        return directory_pb2.ContactPolicyResponse(policy=_POLICY[policy])

    async def GetContactPolicy(
        self, request: directory_pb2.GetContactPolicyRequest, context: Context
    ) -> directory_pb2.ContactPolicyResponse:
        policy = await self._run(self._contacts.get_policy, self._token(context))
        return directory_pb2.ContactPolicyResponse(policy=_POLICY[policy])

    async def CreateInvite(
        self, request: directory_pb2.CreateInviteRequest, context: Context
    ) -> common_pb2.Invite:
        made = await self._run(
            self._contacts.create_invite,
            self._token(context),
            request.expires_in_seconds,
            request.max_uses,
        )
        return invite_pb(made.invite, made.code)

    async def ListInvites(
        self, request: directory_pb2.ListInvitesRequest, context: Context
    ) -> directory_pb2.ListInvitesResponse:
        found = await self._run(self._contacts.list_invites, self._token(context))
        return directory_pb2.ListInvitesResponse(invites=[invite_pb(i) for i in found])

    async def RevokeInvite(
        self, request: directory_pb2.RevokeInviteRequest, context: Context
    ) -> common_pb2.Invite:
        found = await self._run(self._contacts.revoke_invite, self._token(context), request.id)
        return invite_pb(found)
