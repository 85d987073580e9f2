"""The agent: what outlives a login (the directory client, the event hub, the clock) and the
session lifecycle (register, log in, resume, heartbeats and certificate renewal, log out).

One `Agent` per daemon. A login brings up a UserSession (session.py), the composition root of
that user's store, links and outbox, where the use cases of a logged-in user live; the methods
at the end of this class hand those calls to it. Blocking work of its own (key files, CSRs)
runs in a thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc

from p2pchat.v1 import common_pb2, directory_pb2
from p2pchat_agent.clock import ClockWatch
from p2pchat_agent.config import Settings
from p2pchat_agent.contacts import Contacts
from p2pchat_agent.directory_client import CALL_TIMEOUT, DirectoryClient
from p2pchat_agent.events import EventHub
from p2pchat_agent.identity import Identity, StoredSession, load_or_make_key, make_csr, save_key
from p2pchat_agent.messages import StoredMessage
from p2pchat_agent.peer import LinkManager
from p2pchat_agent.session import UserSession
from p2pchat_common.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from p2pchat_common.timestamps import from_timestamp
from p2pchat_common.validation import normalize_username

log = logging.getLogger(__name__)

T = TypeVar("T")


class Agent:
    def __init__(self, settings: Settings, peer_port: int = 0) -> None:
        """`peer_port`: the port other agents reach, as bound (for --peer-listen port 0)."""
        self.settings = settings
        self.directory = DirectoryClient(settings)
        self.events = EventHub()
        self.active: UserSession | None = None
        self.peer_port = peer_port
        self._lock = asyncio.Lock()
        self.clock = ClockWatch()
        self._contacts_changed_at: datetime | None = None  # as the last heartbeat said

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs blocking work other than the store's (key files, CSRs) in a thread."""
        return await asyncio.to_thread(fn, *args)

    @property
    def address(self) -> str:
        """The address other agents dial (with the real port when listening on port 0)."""
        address = self.settings.advertised_address
        host, _, port = address.rpartition(":")
        if port == "0" and self.peer_port:
            return f"{host}:{self.peer_port}"
        return address

    def _require_active(self) -> UserSession:
        if self.active is None:
            raise FailedPrecondition("not logged in: log in first")
        return self.active

    def identity(self) -> Identity:
        return self._require_active().identity

    def current_identity(self) -> Identity | None:
        """The logged-in user's identity, or None: what the peer port presents."""
        return None if self.active is None else self.active.identity

    def current_links(self) -> LinkManager | None:
        """The logged-in user's links, or None: where inbound links go."""
        return None if self.active is None else self.active.links

    # -- session lifecycle ----------------------------------------------------------------------

    async def register(self, username: str, password: str, address: str) -> str:
        """Registers at the directory; an empty address means this agent's own."""
        response = await self.directory.register(username, password, address or self.address)
        return response.username

    async def login(self, username: str, password: str) -> UserSession:
        name = normalize_username(username)
        if not password:
            raise InvalidArgument("password is required")
        async with self._lock:
            if self.active is not None and self.active.username != name:
                raise FailedPrecondition(
                    f"already logged in as {self.active.username}: log out first"
                )
            data_dir = self.settings.data_dir
            # A new key is saved only once the directory accepted the login: a refused login
            # writes nothing.
            key_pem, new_key = await self.blocking(load_or_make_key, data_dir, name)
            csr = await self.blocking(make_csr, key_pem, name)
            asked = datetime.now(UTC)
            response = await self.directory.login(name, password, self.address, csr)
            self.clock.note(response.server_time, asked)
            if new_key:
                await self.blocking(save_key, data_dir, name, key_pem)
            identity = Identity(
                name, key_pem, response.certificate_pem, response.ca_certificate_pem
            )
            session = StoredSession(
                username=name,
                token=response.session_token,
                directory=self.directory.address,
                expires_at=from_timestamp(response.session_expires_at),
            )
            await self.blocking(identity.save, data_dir)
            await self.blocking(session.save, data_dir)
            self.directory.token = session.token
            if self.active is not None:  # the same user again: renewed session and certificate
                self.active.session, self.active.identity = session, identity
            else:
                await self._activate(session, identity)
            log.info("logged in as %s", name)
            assert self.active is not None
            return self.active

    async def resume(self) -> bool:
        """Resumes the session stored by an earlier run; False when there is none."""
        data_dir = self.settings.data_dir
        session = await self.blocking(StoredSession.load, data_dir)
        if session is None:
            return False
        try:
            identity = await self.blocking(Identity.load, data_dir, session.username)
        except OSError:
            log.warning("stored session for %s has no certificate; log in again", session.username)
            await self.blocking(StoredSession.clear, data_dir)
            return False
        self.directory.token = session.token
        async with self._lock:
            await self._activate(session, identity)
        log.info("resumed the session of %s", session.username)
        return True

    async def _activate(self, session: StoredSession, identity: Identity) -> None:
        self.active = await UserSession.open(
            session, identity, self.settings, self.directory, self.events, self.identity
        )
        loop = asyncio.get_running_loop()
        self.active.tasks.append(loop.create_task(self._heartbeats(), name="heartbeats"))

    async def _deactivate(self) -> None:
        active, self.active = self.active, None
        self.directory.token = ""
        if active is not None:
            await active.close()

    async def _end_session(self) -> None:
        """Forgets the stored session, then closes the active one: once `status` says logged
        out, session.json is gone too (a restart then cannot resume a session that ended)."""
        try:
            await self.blocking(StoredSession.clear, self.settings.data_dir)
        finally:
            await self._deactivate()

    async def logout(self) -> None:
        async with self._lock:
            active = self._require_active()
            try:
                await self.directory.logout()
            except (Unavailable, Unauthenticated) as exc:
                log.warning("directory logout failed (%s); logging out locally", exc)
            await self._end_session()
            log.info("logged out %s", active.username)

    async def _heartbeats(self) -> None:
        """Presence: beats every --heartbeat-interval on one Presence stream, opened again (to
        any replica) when it breaks; unary Heartbeat calls against a directory without it. A
        session the directory ended logs this agent out."""
        streaming = True
        while True:
            try:
                if streaming:
                    await self._beat_on_stream()  # returns only by raising
                else:
                    await self._beat_once()
            except DomainError as exc:
                if exc.code == grpc.StatusCode.UNIMPLEMENTED and streaming:
                    log.info("the directory has no Presence stream: heartbeats one by one")
                    streaming = False
                    continue
                if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                    log.warning("session ended by the directory (%s): log in again", exc)
                    async with self._lock:
                        await self._end_session()
                    return
                log.info("heartbeat failed: %s", exc)
            except Exception:  # a bug must not end presence: logged, tried again
                log.exception("heartbeat failed")
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def _beat_on_stream(self) -> None:
        """One Presence stream, until it fails (raised as a domain error)."""
        call = self.directory.presence()
        where = f"directory at {self.directory.address}"
        try:
            while True:
                asked = datetime.now(UTC)
                try:
                    await call.write(directory_pb2.HeartbeatRequest())
                except asyncio.InvalidStateError:  # the directory ended it: with what status
                    code, details = await call.code(), await call.details()
                    metadata = grpc.aio.Metadata()
                    err = grpc.aio.AioRpcError(code, metadata, metadata, details)
                    raise from_rpc_error(err, where) from None
                beat = await asyncio.wait_for(call.read(), CALL_TIMEOUT)
                if not isinstance(beat, directory_pb2.HeartbeatResponse):
                    raise Unavailable("the directory closed the presence stream")
                await self._on_beat(beat, asked)
                await asyncio.sleep(self.settings.heartbeat_interval)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, where) from None
        except TimeoutError:
            raise Unavailable("the directory did not answer a beat in time") from None
        finally:
            call.cancel()

    async def _beat_once(self) -> None:
        asked = datetime.now(UTC)
        await self._on_beat(await self.directory.heartbeat(), asked)

    async def _on_beat(self, beat: directory_pb2.HeartbeatResponse, asked: datetime) -> None:
        """What an answer to a beat tells: the directory's clock, whether the certificate is due
        for renewal, whether contacts changed, the session's expiry."""
        self.clock.note(beat.server_time, asked)
        await self._renew_certificate_if_due()
        active = self.active
        if active is not None and beat.HasField("contacts_changed_at"):
            changed = from_timestamp(beat.contacts_changed_at)
            # Also the first time: a change may have come between the session's start and
            # this answer. Noted once the refresh worked, so that a failed one is tried again.
            if changed != self._contacts_changed_at and await self._refresh_contacts(active):
                self._contacts_changed_at = changed
        if active is not None:
            expires = from_timestamp(beat.session_expires_at)
            active.session = StoredSession(
                active.username, active.session.token, active.session.directory, expires
            )

    @staticmethod
    async def _refresh_contacts(active: UserSession) -> bool:
        """Whether the copy of the contacts was brought up to the directory's."""
        try:
            await active.contact_book().refresh()
        except (Unavailable, Unauthenticated) as exc:
            log.info("contacts not refreshed: %s", exc)
            return False
        except Exception:  # never the end of the heartbeats: the next beat tries again
            log.exception("contacts not refreshed")
            return False
        return True

    async def _renew_certificate_if_due(self) -> None:
        active = self.active
        if active is None:
            return
        identity = active.identity
        lifetime = identity.cert_expires_at - identity.cert_issued_at
        left = identity.cert_expires_at - datetime.now(UTC)
        # A certificate of the old format is renewed at once, but once a session only: a
        # directory of the old version would answer with the old format again.
        old_format = not identity.names_device and not active.renewed_for_format
        if left > max(lifetime / 3, timedelta(minutes=1)) and not old_format:
            return
        active.renewed_for_format = True
        csr = await self.blocking(make_csr, identity.key_pem, identity.username)
        renewed = await self.directory.renew_certificate(csr)

        fresh = Identity(
            identity.username, identity.key_pem, renewed.certificate_pem, renewed.ca_certificate_pem
        )
        await self.blocking(fresh.save, self.settings.data_dir)
        active.identity = fresh
        log.info("renewed the certificate of %s", identity.username)

    async def close(self) -> None:
        """Shutdown: close links (pending stays pending), stop heartbeats, close the store."""
        async with self._lock:
            await self._deactivate()
        await self.directory.close()

    # -- what a logged-in user does (session.py) ------------------------------------------------

    async def list_contacts(self) -> list[common_pb2.Contact]:
        return await self._require_active().list_contacts()

    async def add_contact(
        self, username: str, address: str, note: str = "", invite: str = ""
    ) -> common_pb2.Contact:
        return await self._require_active().add_contact(username, address, note, invite)

    def contacts(self) -> Contacts:
        """The logged-in user's contact use cases (requests, answers, policy, invites)."""
        return self._require_active().contact_book()

    async def remove_contact(self, username: str) -> None:
        await self._require_active().remove_contact(username)

    async def require_contact(self, peer: str) -> None:
        await self._require_active().require_contact(peer)

    async def trust_peer_key(self, username: str) -> str:
        return await self._require_active().trust_peer_key(username)

    def submit(self, peer: str, body: str, message_id: str = "") -> asyncio.Future[StoredMessage]:
        return self._require_active().submit(peer, body, message_id)

    async def send(self, username: str, body: str, wait: float | None = None) -> StoredMessage:
        return await self._require_active().send(username, body, wait)

    async def history(
        self, username: str, limit: int, before_id: str = "", query: str = ""
    ) -> tuple[list[StoredMessage], bool]:
        return await self._require_active().history(username, limit, before_id, query)
