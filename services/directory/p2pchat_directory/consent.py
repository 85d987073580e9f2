"""Contact consent's use cases: requests, answers, blocks, policies and invite codes (issue 14).
Blocking (database): the servicer runs them in threads; nothing here knows about gRPC.

A `contacts` row (owner, contact) says what the owner wants of the contact; what a pair is comes
from both rows (`contact_state`): a block wins, both 'want' is ACCEPTED, the owner's 'want' or
'declined' alone is REQUESTED, the other's 'want' alone is AWAITING. Only ACCEPTED reveals an
address, presence or key. Every write runs in one transaction that holds both users' locks
(consent_store.lock_users) and records that both users' contacts changed."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection

from p2pchat_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
)
from p2pchat_common.validation import normalize_address, normalize_username, shown
from p2pchat_directory import consent_store as store
from p2pchat_directory import repository as repo
from p2pchat_directory.config import Settings
from p2pchat_directory.consent_state import (
    ContactState,
    ContactView,
    Policy,
    contact_state,
    contact_view,
)
from p2pchat_directory.consent_store import BLOCK, DECLINED, WANT, Pair, Side
from p2pchat_directory.db import Databases
from p2pchat_directory.hot import Plan, run_plan
from p2pchat_directory.tokens import checked_token_hash, token_hash
from p2pchat_directory.tokens import owner as session_owner

log = logging.getLogger(__name__)

NOTE_MAX = 200
MAX_LIVE_INVITES = 100
KEPT_DEAD_INVITES = 100  # revoked, expired or used-up codes still listed
INVITE_CODE_MAX = 128  # longer is no code of ours (not even hashed)
RATE_WINDOW = timedelta(hours=1)
# The same answer for a block and a policy that refuses: a block is not disclosed.
_REFUSED = "{name!r} does not accept contact requests from you"


@dataclass(frozen=True)
class NewInvite:
    invite: store.Invite
    code: str  # shown once: the directory keeps its hash


class ContactsService:
    def __init__(
        self,
        settings: Settings,
        dbs: Databases,
        authenticate: Callable[[str], str],
        clock: Callable[[], datetime],
    ) -> None:
        self._settings = settings
        self._dbs = dbs
        self._authenticate = authenticate
        self._now = clock

    # -- views ---------------------------------------------------------------------------------

    def _views(
        self, rows: list[tuple[str, ContactState, Side | None, Side | None]]
    ) -> list[ContactView]:
        dbs = self._dbs
        return run_plan(self._views_reads(rows), dbs.users_reader, dbs.contacts_reader)

    def _views_reads(
        self, rows: list[tuple[str, ContactState, Side | None, Side | None]]
    ) -> Plan[list[ContactView]]:
        """Views of (name, state, owner's row, other's row): presence only when ACCEPTED."""
        accepted = [name for name, state, _, _ in rows if state is ContactState.ACCEPTED]
        users = yield from repo.presence_reads(accepted)
        now = self._now()
        views = []
        for name, state, mine, theirs in rows:
            pinned = mine.pinned_address if mine is not None else ""
            user = users.get(name)
            if state is ContactState.ACCEPTED and user is not None:
                views.append(
                    contact_view(name, pinned, user.address, user.online_until, user.last_seen, now)
                )
                continue
            asked = mine if state is ContactState.REQUESTED else theirs
            shows_request = state in (ContactState.REQUESTED, ContactState.AWAITING)
            views.append(
                ContactView(
                    username=name,
                    address="",
                    pinned_address=pinned,
                    online=False,
                    last_seen=None,
                    state=state,
                    note=asked.note if shows_request and asked is not None else "",
                    requested_at=asked.requested_at if shows_request and asked else None,
                )
            )
        return views

    def _view(self, name: str, found: Pair) -> ContactView:
        state = contact_state(found.mine, found.theirs)
        return self._views([(name, state, found.mine, found.theirs)])[0]

    def _other(self, owner: str, username: str) -> str:
        name = normalize_username(username)
        if name == owner:
            raise InvalidArgument("that is you: name another user")
        with self._dbs.users() as s:
            if repo.get_user(s, name) is None:
                raise NotFound(f"no such user: {name!r}")
        return name

    # -- requests and answers --------------------------------------------------------------------

    def add_contact(
        self, token: str, username: str, address: str, note: str, invite_code: str
    ) -> ContactView:
        owner = self._authenticate(token)
        name = normalize_username(username)
        if name == owner:
            raise InvalidArgument("you cannot add yourself as a contact")
        pinned = normalize_address(address)
        if len(note) > NOTE_MAX:
            raise InvalidArgument(f"the note is too long (at most {NOTE_MAX} characters)")
        name = self._other(owner, name)
        now = self._now()
        settings = self._settings
        with store.write_transaction(self._dbs.contacts_engine) as conn:
            store.lock_users(conn, owner, name)
            found = store.pair(conn, owner, name)
            state = contact_state(found.mine, found.theirs)
            if state is ContactState.BLOCKED:
                raise FailedPrecondition(f"you blocked {name!r}: unblock them first")
            if found.mine is not None:
                raise AlreadyExists(f"{name!r} is already in your contacts ({state.value})")
            mine = Side(WANT, pinned, note, now)
            if found.theirs is not None and found.theirs.state in (WANT, DECLINED):
                # They asked first (even if declined since): both want each other now.
                if found.theirs.state == DECLINED:
                    store.set_state(conn, name, owner, WANT, found.theirs.note)
                store.insert_side(conn, owner, name, mine, now)
                store.touch(conn, (owner, name), now)
                log.info("%s accepted %s by adding them", owner, name)
                return self._view(name, Pair(mine, Side(WANT, "", "", None)))
            if found.theirs is not None:  # they blocked the owner
                raise PermissionDenied(_REFUSED.format(name=name))
            # Nobody means nobody, a code of theirs included; under INVITE a code is needed.
            policy = store.policy(conn, name) or Policy.ANYONE.value
            invited = policy != Policy.NOBODY.value and 0 < len(invite_code) <= INVITE_CODE_MAX
            invited = invited and store.use_invite(conn, name, token_hash(invite_code), now)
            if not invited and policy != Policy.ANYONE.value:
                raise PermissionDenied(_REFUSED.format(name=name))
            forget = now - RATE_WINDOW
            if store.requests_since(conn, owner, forget) >= settings.contact_request_rate:
                raise RateLimited(
                    f"too many contact requests sent lately (at most "
                    f"{settings.contact_request_rate} an hour): try again later"
                )
            # A code of theirs is their consent to this one: it passes a full queue.
            if not invited and store.awaiting_count(conn, name) >= settings.contact_request_cap:
                raise RateLimited(
                    f"{name!r} has too many contact requests awaiting an answer: try again later"
                )
            store.insert_side(conn, owner, name, mine, now)
            store.record_request(conn, owner, now, forget)
            store.touch(conn, (owner, name), now)
        log.info("%s asked %s to be a contact%s", owner, name, " (invited)" if invited else "")
        return self._view(name, Pair(mine, None))

    def _answer(self, token: str, username: str) -> tuple[str, str]:
        owner = self._authenticate(token)
        return owner, normalize_username(username)

    def accept(self, token: str, username: str) -> ContactView:
        owner, name = self._answer(token, username)
        now = self._now()
        with store.write_transaction(self._dbs.contacts_engine) as conn:
            found = _awaiting(conn, owner, name)
            mine = Side(WANT, "", "", now)
            store.insert_side(conn, owner, name, mine, now)
            store.touch(conn, (owner, name), now)
        log.info("%s accepted %s", owner, name)
        return self._view(name, Pair(mine, found.theirs))

    def decline(self, token: str, username: str) -> None:
        owner, name = self._answer(token, username)
        now = self._now()
        with store.write_transaction(self._dbs.contacts_engine) as conn:
            found = _awaiting(conn, owner, name)
            assert found.theirs is not None
            store.set_state(conn, name, owner, DECLINED, found.theirs.note)
            store.touch(conn, (owner, name), now)
        log.info("%s declined %s", owner, name)

    def block(self, token: str, username: str) -> ContactView:
        """Blocks whether or not they asked; their want, if any, becomes declined (it does not
        come back as a request after an unblock)."""
        owner = self._authenticate(token)
        name = self._other(owner, username)
        now = self._now()
        with store.write_transaction(self._dbs.contacts_engine) as conn:
            store.lock_users(conn, owner, name)
            found = store.pair(conn, owner, name)
            if found.mine is None:
                store.insert_side(conn, owner, name, Side(BLOCK, "", "", None), now)
            elif found.mine.state != BLOCK:
                store.set_state(conn, owner, name, BLOCK)
            if found.theirs is not None and found.theirs.state == WANT:
                store.set_state(conn, name, owner, DECLINED, found.theirs.note)
            store.touch(conn, (owner, name), now)
        log.info("%s blocked %s", owner, name)
        pinned = found.mine.pinned_address if found.mine is not None else ""
        return self._view(name, Pair(Side(BLOCK, pinned, "", None), None))

    def unblock(self, token: str, username: str) -> None:
        owner, name = self._answer(token, username)
        now = self._now()
        with store.write_transaction(self._dbs.contacts_engine) as conn:
            store.lock_users(conn, owner, name)
            found = store.pair(conn, owner, name)
            if found.mine is None or found.mine.state != BLOCK:
                raise NotFound(f"{name!r} is not blocked")
            store.delete_side(conn, owner, name)
            store.touch(conn, (owner, name), now)
        log.info("%s unblocked %s", owner, name)

    def remove_contact(self, token: str, username: str) -> None:
        owner, name = self._answer(token, username)
        now = self._now()
        with store.write_transaction(self._dbs.contacts_engine) as conn:
            store.lock_users(conn, owner, name)
            found = store.pair(conn, owner, name)
            if found.mine is None:
                raise NotFound(f"{name!r} is not in your contacts")
            if found.mine.state == BLOCK:
                raise NotFound(f"you blocked {name!r}: UnblockContact lifts a block")
            store.delete_side(conn, owner, name)
            store.touch(conn, (owner, name), now)
        log.info("%s removed contact %s", owner, name)

    def list_contacts_reads(self, token: str) -> Plan[list[ContactView]]:
        found = yield from repo.session_owner_reads(checked_token_hash(token), self._now())
        owner = session_owner(found)
        owned, waiting = yield from store.listing_reads(owner)
        rows: list[tuple[str, ContactState, Side | None, Side | None]] = []
        for name, mine, back in owned:
            theirs = None if back is None else Side(back, "", "", None)
            rows.append((name, contact_state(mine, theirs), mine, theirs))
        rows.extend((name, ContactState.AWAITING, None, side) for name, side in waiting)
        rows.sort(key=lambda row: row[0])
        return (yield from self._views_reads(rows))

    def list_requests(self, token: str) -> list[ContactView]:
        owner = self._authenticate(token)
        with self._dbs.contacts_engine.connect() as conn:
            waiting = store.awaiting(conn, owner)
        return self._views([(n, ContactState.AWAITING, None, side) for n, side in waiting])

    # -- who may ask ---------------------------------------------------------------------------

    def set_policy(self, token: str, policy: Policy) -> Policy:
        owner = self._authenticate(token)
        with store.write_transaction(self._dbs.contacts_engine) as conn:
            store.lock_users(conn, owner)
            store.set_policy(conn, owner, policy.value)
        log.info("%s set their contact policy to %s", owner, policy.value)
        return policy

    def get_policy(self, token: str) -> Policy:
        owner = self._authenticate(token)
        with self._dbs.contacts_engine.connect() as conn:
            return Policy(store.policy(conn, owner) or Policy.ANYONE.value)

    def create_invite(self, token: str, expires_in_seconds: int, max_uses: int) -> NewInvite:
        owner = self._authenticate(token)
        if expires_in_seconds < 0 or max_uses < 0:
            raise InvalidArgument("expiry and use count must not be negative")
        now = self._now()
        code = secrets.token_urlsafe(16)
        invite = store.Invite(
            id=secrets.token_urlsafe(8)[:10],
            created_at=now,
            expires_at=now + timedelta(seconds=expires_in_seconds) if expires_in_seconds else None,
            uses_left=max_uses or None,
            revoked_at=None,
        )
        with store.write_transaction(self._dbs.contacts_engine) as conn:
            store.lock_users(conn, owner)
            if store.live_invites(conn, owner, now) >= MAX_LIVE_INVITES:
                raise RateLimited(
                    f"you have {MAX_LIVE_INVITES} live invite codes: revoke one first"
                )
            store.forget_dead_invites(conn, owner, now, KEPT_DEAD_INVITES)
            store.add_invite(conn, owner, token_hash(code), invite)
        log.info("%s created invite code %s", owner, invite.id)
        return NewInvite(invite, code)

    def list_invites(self, token: str) -> list[store.Invite]:
        owner = self._authenticate(token)
        with self._dbs.contacts_engine.connect() as conn:
            return store.invites(conn, owner)

    def revoke_invite(self, token: str, invite_id: str) -> store.Invite:
        owner = self._authenticate(token)
        with store.write_transaction(self._dbs.contacts_engine) as conn:
            store.lock_users(conn, owner)
            found = store.revoke_invite(conn, owner, invite_id, self._now())
        if found is None:
            raise NotFound(f"no invite code {shown(invite_id)} of yours")
        log.info("%s revoked invite code %s", owner, invite_id)
        return found


def _awaiting(conn: Connection, owner: str, name: str) -> Pair:
    """`owner` and `name`'s pair, locked; NotFound unless `name`'s request awaits an answer."""
    store.lock_users(conn, owner, name)
    found = store.pair(conn, owner, name)
    if contact_state(found.mine, found.theirs) is not ContactState.AWAITING:
        raise NotFound(f"no contact request from {name!r} awaits your answer")
    return found
