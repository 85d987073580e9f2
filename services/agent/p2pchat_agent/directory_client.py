"""The agent's client of the DirectoryService: one TLS channel, the session token in metadata,
failures translated into domain errors (so the control API passes on the directory's reason)."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from p2pchat.v1 import common_pb2, directory_pb2_grpc, mailbox_pb2, mailbox_pb2_grpc
from p2pchat.v1 import directory_pb2 as pb
from p2pchat_agent.config import Settings
from p2pchat_common.errors import FailedPrecondition, InvalidArgument, Unavailable, from_rpc_error
from p2pchat_common.serving import keepalive_options
from p2pchat_common.validation import parse_address

log = logging.getLogger(__name__)

T = TypeVar("T")
CALL_TIMEOUT = 10.0
DIRECTORY_CA_FILE = "directory-ca.pem"
# A mailbox deposit or collected response may carry up to ~4 MiB of envelopes.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Calls go round-robin over every address the directory's name resolves to (its replicas), and
# only to those with a working connection: when one goes away, the next call, and the next
# Collect stream, goes to another. Only this policy applies: a DNS TXT record cannot set another.
SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
# A replica back after an outage is connected to again within this (gRPC's default: 120 s).
MAX_RECONNECT_BACKOFF_MS = 10_000


def directory_target(address: str) -> str:
    """The gRPC target for the directory at `address` ("host:port", as config.py gives it).

    A DNS name becomes `dns:///host:port`: every address it resolves to (A and AAAA records,
    re-resolved when a connection fails) is a subchannel of the round_robin policy. The
    authority, the name the directory's certificate must show, is still `host`, as without the
    scheme. An IP literal stays as it is (one address); a target that is not "host:port" (such
    as unix:PATH, or one that names its own scheme) is passed on unchanged."""
    if address.startswith(("unix:", "unix-abstract:")):
        return address
    try:
        host = parse_address(address).host
    except InvalidArgument:
        return address
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return f"dns:///{address}"
    return address


def channel_options(keepalive: float) -> list[tuple[str, Any]]:
    """Keepalive pings on the channel (also with no call open), so that a long Collect stream
    to a directory that vanished ends within 1.5 x `keepalive`; round_robin over the replicas
    (see SERVICE_CONFIG); and room for envelopes."""
    return [
        *keepalive_options(keepalive),
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def directory_ca(settings: Settings) -> bytes | None:
    """The root that the directory's TLS certificate must chain to (None: no TLS)."""
    if settings.directory_insecure:
        return None
    path = settings.directory_ca or settings.data_dir / DIRECTORY_CA_FILE
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot read the directory CA certificate {path}: {exc.strerror}; pass "
            "--directory-ca (the directory's <data-dir>/ca.pem)"
        ) from None


class DirectoryClient:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.address = settings.directory
        self._channel: grpc.aio.Channel | None = None
        self._stub: directory_pb2_grpc.DirectoryServiceAsyncStub | None = None
        self._mailbox: mailbox_pb2_grpc.MailboxServiceAsyncStub | None = None
        self.token = ""
        self.reachable: bool | None = None  # None until the first call or probe

    def _get_stub(self) -> directory_pb2_grpc.DirectoryServiceAsyncStub:
        if self._stub is None:
            ca = directory_ca(self._settings)
            options = channel_options(self._settings.keepalive)
            target = directory_target(self.address)
            if ca is None:
                log.warning("talking to the directory WITHOUT TLS (--directory-insecure)")
                self._channel = grpc.aio.insecure_channel(target, options=options)
            else:
                creds = grpc.ssl_channel_credentials(root_certificates=ca)
                self._channel = grpc.aio.secure_channel(target, creds, options=options)
            self._stub = directory_pb2_grpc.DirectoryServiceStub(self._channel)
            self._mailbox = mailbox_pb2_grpc.MailboxServiceStub(self._channel)
        assert self._stub is not None
        return self._stub

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    async def _call(
        self,
        method: Callable[
            [directory_pb2_grpc.DirectoryServiceAsyncStub], Callable[..., Awaitable[T]]
        ],
        request: Any,
    ) -> T:
        return await self._invoke(method(self._get_stub()), request, "directory")

    async def _invoke(self, rpc: Callable[..., Awaitable[T]], request: Any, what: str) -> T:
        """One unary call with the token and the deadline; failures as domain errors."""
        try:
            result = await rpc(request, metadata=self._metadata(), timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            error = from_rpc_error(err, f"{what} at {self.address}")
            self.reachable = not isinstance(error, Unavailable)
            raise error from None
        self.reachable = True
        return result

    async def register(self, username: str, password: str, address: str) -> pb.RegisterResponse:
        req = pb.RegisterRequest(username=username, password=password, address=address)
        return await self._call(lambda s: s.Register, req)

    async def login(
        self, username: str, password: str, address: str, csr_pem: bytes
    ) -> pb.LoginResponse:
        req = pb.LoginRequest(
            username=username, password=password, address=address, csr_pem=csr_pem
        )
        return await self._call(lambda s: s.Login, req)

    async def logout(self) -> None:
        await self._call(lambda s: s.Logout, pb.LogoutRequest())

    async def heartbeat(self) -> pb.HeartbeatResponse:
        return await self._call(lambda s: s.Heartbeat, pb.HeartbeatRequest())

    def presence(self) -> grpc.aio.StreamStreamCall[pb.HeartbeatRequest, pb.HeartbeatResponse]:
        """The Presence stream (no deadline: it lives as long as the session); the caller
        writes beats, reads the answers, cancels it and translates its errors."""
        return self._get_stub().Presence(metadata=self._metadata())

    async def renew_certificate(self, csr_pem: bytes) -> pb.RenewCertificateResponse:
        return await self._call(
            lambda s: s.RenewCertificate, pb.RenewCertificateRequest(csr_pem=csr_pem)
        )

    async def list_contacts(self) -> pb.ListContactsResponse:
        return await self._call(lambda s: s.ListContacts, pb.ListContactsRequest())

    async def add_contact(
        self, username: str, address: str, note: str = "", invite_code: str = ""
    ) -> pb.AddContactResponse:
        req = pb.AddContactRequest(
            username=username, address=address, note=note, invite_code=invite_code
        )
        return await self._call(lambda s: s.AddContact, req)

    # -- consent ----------------------------------------------------------------------------

    async def list_contact_requests(self) -> pb.ListContactRequestsResponse:
        return await self._call(lambda s: s.ListContactRequests, pb.ListContactRequestsRequest())

    async def accept_contact(self, username: str) -> common_pb2.Contact:
        req = pb.ContactAnswerRequest(username=username)
        return (await self._call(lambda s: s.AcceptContact, req)).contact

    async def decline_contact(self, username: str) -> None:
        await self._call(lambda s: s.DeclineContact, pb.ContactAnswerRequest(username=username))

    async def block_contact(self, username: str) -> common_pb2.Contact:
        req = pb.ContactAnswerRequest(username=username)
        return (await self._call(lambda s: s.BlockContact, req)).contact

    async def unblock_contact(self, username: str) -> None:
        await self._call(lambda s: s.UnblockContact, pb.ContactAnswerRequest(username=username))

    async def set_contact_policy(self, policy: common_pb2.ContactPolicy.ValueType) -> int:
        req = pb.SetContactPolicyRequest(policy=policy)
        return (await self._call(lambda s: s.SetContactPolicy, req)).policy

    async def get_contact_policy(self) -> int:
        req = pb.GetContactPolicyRequest()
        return (await self._call(lambda s: s.GetContactPolicy, req)).policy

    async def create_invite(self, expires_in: int, max_uses: int) -> common_pb2.Invite:
        req = pb.CreateInviteRequest(expires_in_seconds=expires_in, max_uses=max_uses)
        return await self._call(lambda s: s.CreateInvite, req)

    async def list_invites(self) -> list[common_pb2.Invite]:
        return list((await self._call(lambda s: s.ListInvites, pb.ListInvitesRequest())).invites)

    async def revoke_invite(self, id: str) -> common_pb2.Invite:
        return await self._call(lambda s: s.RevokeInvite, pb.RevokeInviteRequest(id=id))

    async def remove_contact(self, username: str) -> None:
        await self._call(lambda s: s.RemoveContact, pb.RemoveContactRequest(username=username))

    async def certificate_status(self, sha256s: list[str]) -> list[int]:
        """The CertificateState of each certificate (by the SHA-256 of its DER)."""
        request = pb.CertificateStatusRequest(certificate_sha256=sha256s)
        response = await self._call(lambda s: s.CertificateStatus, request)
        return list(response.states)

    async def lookup(self, username: str) -> pb.LookupResponse:
        return await self._call(lambda s: s.Lookup, pb.LookupRequest(username=username))

    # -- the sealed mailbox (mailbox.proto) ----------------------------------------------------

    def _mailbox_stub(self) -> mailbox_pb2_grpc.MailboxServiceAsyncStub:
        self._get_stub()
        assert self._mailbox is not None
        return self._mailbox

    async def _mailbox_call(self, rpc: Callable[..., Awaitable[T]], request: Any) -> T:
        return await self._invoke(rpc, request, "the mailbox")

    async def publish_mailbox_key(self, key: bytes, signature: bytes) -> None:
        request = mailbox_pb2.PublishKeyRequest(mailbox_key=key, signature=signature)
        await self._mailbox_call(self._mailbox_stub().PublishKey, request)

    async def deposit(self, recipient: str, envelopes: list[bytes]) -> mailbox_pb2.DepositResponse:
        request = mailbox_pb2.DepositRequest(recipient=recipient, envelopes=envelopes)
        return await self._mailbox_call(self._mailbox_stub().Deposit, request)

    async def acknowledge(self, ids: list[int]) -> int:
        request = mailbox_pb2.AcknowledgeRequest(ids=ids)
        return (await self._mailbox_call(self._mailbox_stub().Acknowledge, request)).deleted

    def collect(self) -> grpc.aio.UnaryStreamCall[Any, mailbox_pb2.CollectResponse]:
        """The Collect stream (no deadline: it lives as long as the session); the caller reads
        it and cancels it, and translates its errors (from_rpc_error)."""
        return self._mailbox_stub().Collect(mailbox_pb2.CollectRequest(), metadata=self._metadata())

    async def probe(self) -> bool:
        """Whether the directory answers its health check now (1 s at most)."""
        request = health_pb2.HealthCheckRequest(service="p2pchat.v1.DirectoryService")
        try:
            stub = health_pb2_grpc.HealthStub(self._channel_for_probe())
            response = await stub.Check(request, timeout=1.0)
            self.reachable = response.status == health_pb2.HealthCheckResponse.SERVING
        except (grpc.aio.AioRpcError, FailedPrecondition):
            self.reachable = False
        return self.reachable

    def _channel_for_probe(self) -> grpc.aio.Channel:
        self._get_stub()
        assert self._channel is not None
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None
        self._mailbox = None
