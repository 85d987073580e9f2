"""DirectoryService over gRPC: translates protobuf <-> the use cases, nothing else.

The use cases block (database), so each call runs in the server's worker threads; Register and
Login go through accounts.py, which runs their scrypt on the hashing pool between their database
phases. Domain errors are mapped to status codes by p2pchat_common.errors.add_service.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

import grpc

from p2pchat.v1 import directory_pb2, directory_pb2_grpc
from p2pchat_common.timestamps import to_timestamp
from p2pchat_common.validation import normalize_username
from p2pchat_directory.accounts import Accounts
from p2pchat_directory.certificates import CertificateState
from p2pchat_directory.contacts_servicer import ContactRpcs, contact_pb
from p2pchat_directory.hot import Plan
from p2pchat_directory.presence import PresenceHub
from p2pchat_directory.service import DirectoryService, HeartbeatResult
from p2pchat_directory.tokens import checked_token_hash
from p2pchat_directory.workers import Workers

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]


def bearer_token(context: Context) -> str:
    """The token of `authorization: Bearer <token>`, or "" when absent or malformed."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def client_source(context: Context) -> str:
    """Where a call comes from, as failed logins are counted: the IPv4 address (also when seen
    as IPv4-mapped IPv6), the /64 of an IPv6 address (one host usually holds a whole /64: it
    must not get a fresh count per address), "unknown" for a Unix socket or anything else.
    Peers look like "ipv4:10.0.0.1:5000", "ipv6:[::1]:5000" or "ipv6:%5B::1%5D:5000"."""
    scheme, _, rest = unquote(context.peer() or "").partition(":")
    host = rest.rpartition(":")[0].removeprefix("[").removesuffix("]").partition("%")[0]
    try:
        ip = ipaddress.ip_address(host) if scheme in ("ipv4", "ipv6") else None
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is None:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        ip = ip.ipv4_mapped
    return "unknown" if ip is None else str(ip)


class DirectoryServicer(ContactRpcs, directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(
        self,
        service: DirectoryService,
        workers: Workers,
        presence: PresenceHub,
        accounts: Accounts,
    ) -> None:
        self._svc = service
        self._accounts = accounts
        self._contacts = service.contacts
        self._workers = workers
        self._presence = presence

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._workers.run(fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._workers.read(fn, *args)

    async def _plan(self, plan: Plan[T]) -> T:
        return await self._workers.plan(plan)

    def _token(self, context: Context) -> str:
        return bearer_token(context)

    def _changed(self, context: Context, username: str) -> None:
        # Only after the call succeeded: the token and the name were good.
        self._presence.contacts_changed(
            checked_token_hash(bearer_token(context)), normalize_username(username)
        )

    async def Register(
        self, request: directory_pb2.RegisterRequest, context: Context
    ) -> directory_pb2.RegisterResponse:
        name = await self._accounts.register(request.username, request.password, request.address)
        return directory_pb2.RegisterResponse(username=name)

    async def Login(
        self, request: directory_pb2.LoginRequest, context: Context
    ) -> directory_pb2.LoginResponse:
        result = await self._accounts.login(
            request.username,
            request.password,
            request.address,
            request.csr_pem,
            client_source(context),
        )
        response = directory_pb2.LoginResponse(
            username=result.username,
            session_token=result.token,
            session_expires_at=to_timestamp(result.session_expires_at),
            ca_certificate_pem=result.ca_certificate_pem,
            directory_ca_pem=result.directory_ca_pem,
            server_time=to_timestamp(result.server_time),
        )
        if result.certificate is not None:
            response.certificate_pem = result.certificate.pem
            response.certificate_expires_at.CopyFrom(to_timestamp(result.certificate.expires_at))
        return response

    async def Logout(
        self, request: directory_pb2.LogoutRequest, context: Context
    ) -> directory_pb2.LogoutResponse:
        token = bearer_token(context)
        await self._run(self._svc.logout, token)
        self._presence.revoke(checked_token_hash(token))  # its stream ends now
        return directory_pb2.LogoutResponse()

    async def Heartbeat(
        self, request: directory_pb2.HeartbeatRequest, context: Context
    ) -> directory_pb2.HeartbeatResponse:
        return heartbeat_pb(await self._run(self._svc.heartbeat, bearer_token(context)))

    async def Presence(
        self, request_iterator: AsyncIterator[directory_pb2.HeartbeatRequest], context: Context
    ) -> AsyncIterator[directory_pb2.HeartbeatResponse]:
        async for result in self._presence.attend(bearer_token(context), request_iterator):
            yield heartbeat_pb(result)

    async def RenewCertificate(
        self, request: directory_pb2.RenewCertificateRequest, context: Context
    ) -> directory_pb2.RenewCertificateResponse:
        issued = await self._run(
            self._svc.renew_certificate, bearer_token(context), request.csr_pem
        )
        return directory_pb2.RenewCertificateResponse(
            certificate_pem=issued.pem,
            certificate_expires_at=to_timestamp(issued.expires_at),
            ca_certificate_pem=self._svc.ca_certificate_pem,
            directory_ca_pem=self._svc.directory_ca_pem,
        )

    async def Lookup(
        self, request: directory_pb2.LookupRequest, context: Context
    ) -> directory_pb2.LookupResponse:
        view = await self._plan(self._svc.lookup_reads(bearer_token(context), request.username))
        return directory_pb2.LookupResponse(
            contact=contact_pb(view.contact),
            public_key_sha256=view.public_key_sha256,
            certificate_pem=view.certificate_pem,
            mailbox_key=view.mailbox_key,
            mailbox_key_signature=view.mailbox_key_signature,
        )

    async def CertificateStatus(
        self, request: directory_pb2.CertificateStatusRequest, context: Context
    ) -> directory_pb2.CertificateStatusResponse:
        states = await self._run(
            self._svc.certificate_status, bearer_token(context), list(request.certificate_sha256)
        )
        return directory_pb2.CertificateStatusResponse(states=[_STATE[s] for s in states])


def heartbeat_pb(result: HeartbeatResult) -> directory_pb2.HeartbeatResponse:
    response = directory_pb2.HeartbeatResponse(
        session_expires_at=to_timestamp(result.session_expires_at),
        online_until=to_timestamp(result.online_until),
        server_time=to_timestamp(result.server_time),
    )
    if result.contacts_changed_at is not None:
        response.contacts_changed_at.CopyFrom(to_timestamp(result.contacts_changed_at))
    return response


_STATE = {
    CertificateState.GOOD: directory_pb2.CERTIFICATE_STATE_GOOD,
    CertificateState.REVOKED: directory_pb2.CERTIFICATE_STATE_REVOKED,
    CertificateState.UNKNOWN: directory_pb2.CERTIFICATE_STATE_UNKNOWN,
}
