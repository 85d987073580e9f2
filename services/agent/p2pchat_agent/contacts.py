"""The contact use cases of a logged-in user: requests, answers, blocks, the policy and invite
codes at the directory, each followed by a refresh of this agent's copy (consent.ContactBook)
and its effects on delivery: a user newly accepted is dialled (what waited for them goes), a
user no longer accepted has their links closed."""

from __future__ import annotations

import logging

from p2pchat.v1 import common_pb2
from p2pchat_agent.consent import ACCEPTED, AWAITING, BLOCKED, Changes, ContactBook
from p2pchat_agent.directory_client import DirectoryClient
from p2pchat_agent.peer import LinkManager
from p2pchat_common.errors import FailedPrecondition
from p2pchat_common.validation import normalize_username

log = logging.getLogger(__name__)


class Contacts:
    def __init__(self, book: ContactBook, directory: DirectoryClient, links: LinkManager) -> None:
        self.book = book
        self._directory = directory
        self._links = links
        book.on_change = self.changed

    async def changed(self, changes: Changes) -> None:
        """What a refresh found: newly accepted users are dialled at once (messages that waited
        for their answer go), links with users no longer accepted close."""
        for peer in changes.accepted:
            self._links.reached(peer)
            self._links.ensure_dialer(peer)
        for peer in changes.ended:
            self._links.close_peer(peer)

    async def refresh(self) -> None:
        await self.book.refresh()  # its changes come to `changed`

    async def _after(self, contact: common_pb2.Contact) -> common_pb2.Contact:
        await self.refresh()
        self._links.remember_address(contact.username, contact.address)
        return contact

    # -- the seed's contacts ----------------------------------------------------------------

    async def all(self) -> list[common_pb2.Contact]:
        contacts = await self.book.refresh()
        for c in contacts:
            self._links.remember_address(c.username, c.address)
        return contacts

    async def add(
        self, username: str, address: str, note: str = "", invite: str = ""
    ) -> common_pb2.Contact:
        response = await self._directory.add_contact(username, address, note, invite)
        return await self._after(response.contact)

    async def remove(self, username: str) -> None:
        await self._directory.remove_contact(username)
        await self.refresh()

    async def require(self, peer: str) -> None:
        """FAILED_PRECONDITION unless a message to `peer` may be sent: accepted, or asked by us
        (it then waits, pending, until they accept)."""
        if self.book.may_send(peer):
            return
        await self.refresh()
        if self.book.may_send(peer):
            return
        state = self.book.state(peer)
        if state == BLOCKED:
            raise FailedPrecondition(f"you blocked {peer}: unblock them first")
        if state == AWAITING:
            raise FailedPrecondition(f"{peer} asked to be your contact: accept them first")
        await self._directory.lookup(peer)  # its refusal says why: no such user, no contact
        await self.refresh()  # it answered: the copy was behind

    # -- consent ----------------------------------------------------------------------------

    async def requests(self) -> list[common_pb2.Contact]:
        return list((await self._directory.list_contact_requests()).requests)

    async def accept(self, username: str) -> common_pb2.Contact:
        return await self._after(await self._directory.accept_contact(username))

    async def decline(self, username: str) -> None:
        await self._directory.decline_contact(username)
        await self.refresh()

    async def block(self, username: str) -> common_pb2.Contact:
        contact = await self._directory.block_contact(username)
        await self.refresh()
        return contact

    async def unblock(self, username: str) -> None:
        await self._directory.unblock_contact(username)
        await self.refresh()

    async def set_policy(self, policy: common_pb2.ContactPolicy.ValueType) -> int:
        return await self._directory.set_contact_policy(policy)

    async def get_policy(self) -> int:
        return await self._directory.get_contact_policy()

    async def create_invite(self, expires_in: int, max_uses: int) -> common_pb2.Invite:
        return await self._directory.create_invite(expires_in, max_uses)

    async def invites(self) -> list[common_pb2.Invite]:
        return await self._directory.list_invites()

    async def revoke_invite(self, id: str) -> common_pb2.Invite:
        return await self._directory.revoke_invite(id)

    def accepted(self, username: str) -> bool:
        return self.book.state(normalize_username(username)) == ACCEPTED
