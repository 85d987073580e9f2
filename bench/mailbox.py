"""`mailbox_relay`: delivery through the directory's sealed mailbox beside the direct path, in
the same run and the same way: two agents that cannot dial each other (they advertise the
discard port) and two that can, each pair timed on one-way latency (paced sends, arrival at
the receiver's Serve stream) and on throughput (a burst of sends, first send to last arrival,
and to the last receipt back at the sender). Also the cost of sealing and opening one message
in this process, and an envelope's overhead in bytes."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.cluster import Agent, wait_for
from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import agent_pb2_grpc
from p2pchat_agent.identity import make_csr
from p2pchat_agent.ids import new_message_id
from p2pchat_agent.messages import IncomingMessage
from p2pchat_agent.sealing import MailboxPrivateKey, open_envelope, seal
from p2pchat_directory.ca import CertificateAuthority

if TYPE_CHECKING:
    from bench.benchmarks import Context, Figures, Lazy

BODY = "x" * 200  # the body the seal/open figure is quoted for
UNDIALLABLE = ["--advertise", "127.0.0.1:9", "--dial-timeout", "1"]
SEND_THREADS = 8


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def seal_open_cost(count: int) -> Figures:
    """Microseconds to seal and to open one 200-byte message, and the envelope's overhead."""
    with tempfile.TemporaryDirectory() as tmp:
        ca = CertificateAuthority.load_or_create(Path(tmp))
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        issued = ca.sign_agent_csr(make_csr(key_pem, "alice"), "alice", timedelta(hours=1))
        cert_der = x509.load_pem_x509_certificate(issued.pem).public_bytes(
            serialization.Encoding.DER
        )
        users_ca = x509.load_pem_x509_certificate(ca.users_cert_pem)
    bob = MailboxPrivateKey.generate()
    to = bob.public()
    now = datetime.now(UTC)
    messages = [IncomingMessage(new_message_id(), "alice", "bob", BODY, now) for _ in range(count)]
    started = time.perf_counter()
    envelopes = [seal(m, "direct:alice:bob", key_pem, cert_der, to) for m in messages]
    sealed = time.perf_counter()
    for envelope in envelopes:
        open_envelope(envelope, bob, "bob", users_ca)
    opened = time.perf_counter()
    return {
        "seal_us": (sealed - started) / count * 1e6,
        "open_us": (opened - sealed) / count * 1e6,
        "envelope_overhead_bytes": statistics.mean(len(e) for e in envelopes) - len(BODY),
    }


class _Arrivals:
    """The receiver's Serve stream, read in a thread: when each body arrived."""

    def __init__(self, agent: Agent) -> None:
        self.channel = grpc.insecure_channel(agent.control_target)
        self.stream = agent_pb2_grpc.AgentServiceStub(self.channel).Serve(apb.ServeRequest())
        self.at: dict[str, float] = {}
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                if event.WhichOneof("kind") == "message":
                    self.at.setdefault(event.message.body, time.perf_counter())
        except grpc.RpcError:
            pass

    def close(self) -> None:
        self.stream.cancel()
        self._thread.join(5)
        self.channel.close()


def _run_pair(sender: Agent, receiver: Agent, latency_count: int, burst: int) -> Figures:
    peer = receiver.name
    arrivals = _Arrivals(receiver)
    channel = grpc.insecure_channel(sender.control_target)
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    try:
        time.sleep(0.5)  # the Serve subscription is live
        sent: dict[str, float] = {}
        for i in range(latency_count):  # paced: one-way latency of a lone message
            body = f"latency {i} {sender.name}"
            sent[body] = time.perf_counter()
            stub.Send(apb.SendRequest(peer=peer, body=body), timeout=30)
            time.sleep(0.02)
        wait_for(lambda: all(b in arrivals.at for b in sent), 60, 0.01, "paced arrivals")
        latency = [(arrivals.at[b] - t) * 1000 for b, t in sent.items()]

        bodies = [f"burst {i} {sender.name}" for i in range(burst)]
        started = time.perf_counter()
        with ThreadPoolExecutor(SEND_THREADS) as pool:
            list(
                pool.map(
                    lambda b: stub.Send(apb.SendRequest(peer=peer, body=b), timeout=60), bodies
                )
            )
        wait_for(lambda: all(b in arrivals.at for b in bodies), 120, 0.01, "burst arrivals")
        last_arrival = max(arrivals.at[b] for b in bodies)

        def settled() -> bool:
            status = stub.Status(apb.StatusRequest(), timeout=10)
            return status.pending_messages == 0

        wait_for(settled, 120, 0.01, "burst receipts")
        acked = time.perf_counter()
        linked = list(stub.Status(apb.StatusRequest(), timeout=10).linked_peers)
    finally:
        arrivals.close()
        channel.close()
    return {
        "p50_ms": statistics.median(latency),
        "p99_ms": _percentile(latency, 0.99),
        "msgs_per_s": burst / (last_arrival - started),
        "acked_msgs_per_s": burst / (acked - started),
        "direct_link": bool(linked),
    }


async def mailbox_relay(ctx: Context, lazy: Lazy) -> Figures:
    p = ctx.params
    figures: Figures = dict(await asyncio.to_thread(seal_open_cost, p.relay_seal_count))
    lazy.stop_pair()  # alice and bob take no CPU from this one
    for mode, flags in (("relayed", UNDIALLABLE), ("direct", ["--no-mailbox"])):
        a, b = lazy.world.users(f"{mode}-a", f"{mode}-b", extra=flags)
        try:
            run: dict[str, Any] = await asyncio.to_thread(
                _run_pair, a, b, p.relay_latency_count, p.relay_messages
            )
        finally:
            a.stop()
            b.stop()
        if run.pop("direct_link") != (mode == "direct"):
            raise RuntimeError(f"the {mode} pair went the wrong way")
        figures.update({f"{mode}_{name}": value for name, value in run.items()})
    figures["messages"] = p.relay_messages
    figures["latency_messages"] = p.relay_latency_count
    figures["throughput_ratio"] = figures["relayed_msgs_per_s"] / figures["direct_msgs_per_s"]
    return figures
