"""Helpers for the mailbox tests: accounts logged in with a key and a published mailbox key, a
Collect stream read in a thread, and a clock the tests move."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from p2pchat.v1 import directory_pb2 as dpb
from p2pchat.v1 import directory_pb2_grpc, mailbox_pb2_grpc
from p2pchat.v1 import mailbox_pb2 as mpb
from p2pchat_agent.identity import make_csr
from p2pchat_agent.sealing import MailboxPrivateKey, bind
from p2pchat_common.tls import private_key_pem
from p2pchat_directory.service import utcnow
from tests.support.directory import PASSWORD, auth

DirectoryStub = directory_pb2_grpc.DirectoryServiceStub
MailboxStub = mailbox_pb2_grpc.MailboxServiceStub
RPC_TIMEOUT = 10.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]


def mailbox_channel(port: int, ca_pem: bytes) -> grpc.Channel:
    """A channel that receives what the mailbox may send (a CollectResponse over 4 MiB)."""
    return grpc.secure_channel(
        f"localhost:{port}", grpc.ssl_channel_credentials(ca_pem), options=CHANNEL_OPTIONS
    )


class FakeClock:
    """The directory's time: the real time when made, moved only by `advance`."""

    def __init__(self) -> None:
        self._now = utcnow()
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


def new_key_pem() -> bytes:
    return private_key_pem(ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Account:
    name: str
    token: str
    key_pem: bytes
    mailbox: MailboxPrivateKey = field(default_factory=MailboxPrivateKey.generate)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth(self.token)


def log_in(stub: DirectoryStub, name: str, key_pem: bytes | None = None) -> Account:
    """Logs `name` in with a CSR for `key_pem` (a new key when None)."""
    key = key_pem or new_key_pem()
    request = dpb.LoginRequest(username=name, password=PASSWORD, csr_pem=make_csr(key, name))
    reply = stub.Login(request, timeout=RPC_TIMEOUT)
    return Account(name, reply.session_token, key)


def publish(mailbox: MailboxStub, account: Account) -> None:
    key = account.mailbox.public()
    request = mpb.PublishKeyRequest(
        mailbox_key=key.raw, signature=bind(account.key_pem, account.name, key)
    )
    mailbox.PublishKey(request, metadata=account.metadata, timeout=RPC_TIMEOUT)


def enrol(
    directory: DirectoryStub, mailbox: MailboxStub, *names: str, register: bool = True
) -> list[Account]:
    """Registers and logs in `names` with keys, makes everyone everyone's contact and publishes
    each one's mailbox key."""
    if register:
        for name in names:
            directory.Register(
                dpb.RegisterRequest(username=name, password=PASSWORD), timeout=RPC_TIMEOUT
            )
    accounts = [log_in(directory, name) for name in names]
    for account in accounts:
        for other in names:
            if other != account.name:
                directory.AddContact(
                    dpb.AddContactRequest(username=other),
                    metadata=account.metadata,
                    timeout=RPC_TIMEOUT,
                )
        publish(mailbox, account)
    return accounts


def deposit(
    mailbox: MailboxStub, sender: Account, recipient: str, *envelopes: bytes
) -> mpb.DepositResponse:
    request = mpb.DepositRequest(recipient=recipient, envelopes=list(envelopes))
    reply: mpb.DepositResponse = mailbox.Deposit(
        request, metadata=sender.metadata, timeout=RPC_TIMEOUT
    )
    return reply


@dataclass
class Received:
    at: float  # time.perf_counter() when the response arrived
    response: mpb.CollectResponse


class CollectStream:
    """A Collect call read in a thread: each response is queued with its arrival time; the
    status it ends with is kept in `ended`."""

    def __init__(self, mailbox: MailboxStub, account: Account) -> None:
        self._call = mailbox.Collect(mpb.CollectRequest(), metadata=account.metadata)
        self.responses: queue.Queue[Received] = queue.Queue()
        self.ended: grpc.RpcError | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.responses.put(Received(time.perf_counter(), response))
        except grpc.RpcError as err:
            self.ended = err
        finally:
            self.done.set()

    def next(self, timeout: float = RPC_TIMEOUT) -> Received:
        return self.responses.get(timeout=timeout)

    def backlog(self, timeout: float = RPC_TIMEOUT) -> list[mpb.Envelope]:
        """The envelopes of every response up to the one with backlog_done."""
        envelopes: list[mpb.Envelope] = []
        while True:
            response = self.next(timeout).response
            envelopes.extend(response.envelopes)
            if response.backlog_done:
                return envelopes

    def envelopes(self, count: int, timeout: float = RPC_TIMEOUT) -> list[mpb.Envelope]:
        """The next `count` envelopes (live), however they are split into responses."""
        envelopes: list[mpb.Envelope] = []
        deadline = time.monotonic() + timeout
        while len(envelopes) < count:
            response = self.next(max(0.0, deadline - time.monotonic())).response
            assert not response.backlog_done
            envelopes.extend(response.envelopes)
        return envelopes

    def cancel(self) -> None:
        self._call.cancel()
        self._thread.join(RPC_TIMEOUT)

    def status(self, timeout: float = RPC_TIMEOUT) -> grpc.StatusCode | None:
        """The code the stream ended with (waiting for it to end)."""
        assert self.done.wait(timeout), "the stream did not end"
        return None if self.ended is None else self.ended.code()
