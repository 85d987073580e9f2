"""Many lightweight peers in one process, each holding one open `PeerService.Link` to an agent.

Every peer has its own P-256 key (made by `p2pchat_agent.identity`) and a real client certificate
for its own username, signed by the directory's users CA (the key in the directory's data dir,
the same one that signs certificates at Login) and recorded in the directory's users database as
Login records it. Signing locally instead of registering and logging in through the directory
saves two scrypt hashes (about 0.2 s of CPU each) per peer, which for 200 peers would take most
of the time budget; the agent under test cannot tell the difference: it checks the chain, the
name, the Hello and (with the directory) that the certificate is not revoked, and pins the key.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from p2pchat.v1 import peer_pb2_grpc
from p2pchat_agent.handshake import dialler_hello
from p2pchat_agent.identity import load_or_create_key, make_csr
from p2pchat_common.tls import user_dns_name
from p2pchat_directory import repository as repo
from p2pchat_directory.ca import CertificateAuthority
from p2pchat_directory.config import Settings
from p2pchat_directory.db import Databases
from p2pchat_directory.models import Contact, IssuedCertificateRow, User


@dataclass
class PeerIdentity:
    username: str
    key_pem: bytes
    cert_pem: bytes


def make_identities(
    directory_data_dir: Path, count: int, prefix: str = "peer", accepted_by: str = ""
) -> list[PeerIdentity]:
    """`count` users with directory-signed certificates, written straight into the directory's
    databases; with `accepted_by`, each is an accepted contact of that user (both rows 'want':
    contact consent lets their links through)."""
    ca = CertificateAuthority.load_or_create(directory_data_dir)
    settings = Settings(data_dir=directory_data_dir)
    dbs = Databases.open(settings.users_url, settings.contacts_url)
    out = []
    now = datetime.now(UTC)
    try:
        with tempfile.TemporaryDirectory() as tmp, dbs.users() as s, s.begin():
            for i in range(count):
                name = f"{prefix}{i:03d}"
                key = load_or_create_key(Path(tmp), name)
                issued = ca.sign_agent_csr(make_csr(key, name), name, timedelta(days=1))
                out.append(PeerIdentity(name, key, issued.pem))
                row = IssuedCertificateRow(
                    sha256=issued.sha256,
                    username=name,
                    device=issued.device,
                    public_key_sha256=issued.public_key_sha256,
                    session_hash="",
                    issued_at=now,
                    expires_at=issued.expires_at,
                )
                repo.add_certificate(s, row)
                if accepted_by:
                    s.add(User(username=name, password_hash="!", created_at=now))
        if accepted_by:
            with dbs.contacts() as s, s.begin():
                for peer in out:
                    for owner, contact in (
                        (peer.username, accepted_by),
                        (accepted_by, peer.username),
                    ):
                        s.add(
                            Contact(owner=owner, contact=contact, created_at=now, requested_at=now)
                        )
    finally:
        dbs.dispose()
    return out


class PeerLinks:
    """Opens one link per identity to the agent at `address` (whose username is `agent_name`)."""

    def __init__(
        self, identities: list[PeerIdentity], ca_pem: bytes, address: str, agent_name: str
    ):
        self._identities = identities
        self._ca_pem = ca_pem
        self._address = address
        self._agent_name = agent_name
        self._channels: list[grpc.aio.Channel] = []
        self._calls: list[Any] = []
        self._stop = asyncio.Event()
        self.open = 0

    async def _one(self, ident: PeerIdentity) -> None:
        creds = grpc.ssl_channel_credentials(self._ca_pem, ident.key_pem, ident.cert_pem)
        options = [
            ("grpc.ssl_target_name_override", user_dns_name(self._agent_name)),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        channel = grpc.aio.secure_channel(self._address, creds, options=options)
        self._channels.append(channel)
        stop = self._stop

        async def frames() -> Any:
            yield dialler_hello(ident.username)
            await stop.wait()

        call = peer_pb2_grpc.PeerServiceStub(channel).Link(frames())
        self._calls.append(call)
        first: Any = await asyncio.wait_for(call.read(), 30)
        if first is grpc.aio.EOF or first.WhichOneof("kind") != "hello":
            raise RuntimeError(f"{ident.username}: no Hello from the agent")
        self.open += 1

    async def open_all(self, concurrency: int = 20) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def guarded(ident: PeerIdentity) -> None:
            async with sem:
                await self._one(ident)

        await asyncio.gather(*(guarded(i) for i in self._identities))

    async def close(self) -> None:
        self._stop.set()
        for call in self._calls:
            call.cancel()
        for channel in self._channels:
            await channel.close()
