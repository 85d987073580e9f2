"""The benchmarks of issues 6 and 12. Each takes the run's context and world and returns its
figures for that run (its baseline, when it has one, measured right next to it in the same run)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.bare import OWN_CONNECTION, BareServer, bare_unary_rate, stream_rate, unary_rate
from bench.bare import ping_pong as bare_ping_pong
from bench.cluster import PASSWORD, Agent, World, cpu_seconds, rss_mb, wait_for
from bench.directory_load import FULL_LOAD, QUICK_LOAD, LoadParams, directory_load
from bench.mailbox import mailbox_relay
from bench.peers import PeerLinks, make_identities
from bench.prefill import Corpus, fill_history, fill_history_v2, fill_outbox, v2_schema_hash
from bench.streams import (
    ChatClient,
    StreamsChild,
    burst_body,
    frames_delta,
    link_frames,
    tcp_counters,
    tcp_delta,
)
from p2pchat.v1 import agent_pb2 as apb
from p2pchat.v1 import agent_pb2_grpc, directory_pb2_grpc
from p2pchat.v1 import directory_pb2 as dpb

Figures = dict[str, Any]


@dataclass(frozen=True)
class Params:
    outbox_messages: int = 50_000
    outbox_timeout: float = 100.0
    stream_baseline_messages: int = 50_000
    latency_rate: int = 1000
    latency_seconds: float = 10.0
    latency_grace: float = 5.0  # how long late messages are waited for
    latency_probe_rate: float = 50.0  # first, a few messages at a gentle rate
    latency_probe_count: int = 100
    concurrency: int = 8
    unary_seconds: float = 3.0
    unary_max_calls: int = 100_000
    history_rows: int = 1_000_000
    history_peers: int = 10
    history_queries: int = 200  # of each kind, through the API (half as many on the store)
    migration_pending: int = 300  # of the history_rows of the version 2 file: its outbox
    memory_links: int = 200
    idle_settle: float = 3.0
    burst_messages: int = 20_000  # chat_burst: texts per burst
    bursts: int = 10
    burst_batch: int = 500  # texts per ChatInput at most
    burst_body: int = 100  # bytes per text
    burst_timeout: float = 30.0  # a burst not acked by then has stalled
    burst_seconds: float = 40.0  # no further burst starts once it would end later than this
    ping_rounds: int = 2_000  # per control transport (half on each pair of agents)
    ping_warmup: int = 20
    ping_block: int = 100  # round trips on one pair before the other's turn
    ping_timeout: float = 5.0  # a round trip not back by then is lost
    ping_seconds: float = 40.0  # no further round trip starts after this (half of it per phase)
    relay_messages: int = 2_000  # mailbox_relay: the burst, per pair
    relay_latency_count: int = 200  # mailbox_relay: paced messages timed one way, per pair
    relay_seal_count: int = 2_000  # mailbox_relay: messages sealed and opened in-process
    load: LoadParams = FULL_LOAD  # directory_load


FULL = Params()
QUICK = Params(
    outbox_messages=3_000,
    outbox_timeout=30.0,
    stream_baseline_messages=3_000,
    latency_seconds=2.0,
    latency_grace=3.0,
    latency_probe_count=40,
    unary_seconds=1.0,
    history_rows=30_000,
    history_queries=40,
    memory_links=20,
    idle_settle=1.0,
    burst_messages=2_000,
    bursts=2,
    burst_timeout=15.0,
    burst_seconds=15.0,
    ping_rounds=200,
    ping_block=25,
    ping_seconds=15.0,
    relay_messages=300,
    relay_latency_count=40,
    relay_seal_count=200,
    load=QUICK_LOAD,
)

HISTORY_USER = "hist"  # the owner of the history databases
HISTORY_PEER = "peer0"  # the conversation the history benchmark reads
BODY = "benchmark message with a body of a typical chat length: hello there, how are you?"


@dataclass
class Context:
    params: Params
    root: Path  # work dir of this invocation
    results_dir: Path
    history_db: Path | None = None  # the pre-filled template, made once per invocation
    migration_db: Path | None = None  # the version 2 template of store_migration, likewise
    profile: set[str] = field(default_factory=set)
    profile_mode: str = "gil"  # or "wall"
    profile_files: list[str] = field(default_factory=list)


# -- helpers ---------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def summary_ms(seconds: list[float], prefix: str = "") -> Figures:
    values = sorted(s * 1000 for s in seconds)
    return {
        f"{prefix}p50_ms": percentile(values, 50),
        f"{prefix}p99_ms": percentile(values, 99),
        f"{prefix}max_ms": values[-1] if values else float("nan"),
        f"{prefix}mean_ms": statistics.fmean(values) if values else float("nan"),
    }


@contextlib.contextmanager
def profiled(ctx: Context, bench: str, pids: dict[str, int]) -> Iterator[None]:
    """py-spy records each process in `pids` while the block runs (when `bench` is profiled).
    Writes <results>/profile-<bench>-<label>.txt (collapsed stacks) and a summary of the
    functions that take the time."""
    if bench not in ctx.profile:
        yield
        return
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = []
    for label, pid in pids.items():
        raw = ctx.results_dir / f"profile-{bench}-{label}-{ctx.profile_mode}.txt"
        cmd = [py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw"]
        # --gil: only the thread holding the GIL is sampled, so every sample is Python at work
        # (for a Python process on a busy machine, that is where the time goes).
        # --profile-mode wall: every thread, waiting included (--idle --threads): where the wall
        # clock goes, e.g. threads queued for a lock.
        mode = ["--gil"] if ctx.profile_mode == "gil" else ["--idle", "--threads"]
        cmd += ["--output", str(raw), "--nonblocking", *mode]
        procs.append(
            (label, raw, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        )
    time.sleep(0.5)  # let py-spy attach
    try:
        yield
    finally:
        for label, raw, proc in procs:
            proc.send_signal(signal.SIGINT)
            try:
                _out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                continue
            if raw.exists():
                from bench.profile_summary import summarize

                summary = raw.with_suffix(".summary.txt")
                summary.write_text(summarize(raw.read_text()))
                ctx.profile_files += [str(raw), str(summary)]
            else:
                print(f"  py-spy wrote nothing for {label}: {err.decode()[-500:]}", file=sys.stderr)


def agent_stub(agent: Agent, own_connection: bool = False) -> tuple[grpc.aio.Channel, Any]:
    options = OWN_CONNECTION if own_connection else None
    ch = grpc.aio.insecure_channel(agent.control_target, options=options)
    return ch, agent_pb2_grpc.AgentServiceStub(ch)


async def wait_pending(agent: Agent, timeout: float) -> bool:
    """Until the agent has nothing pending (True) or `timeout` passes (False)."""
    ch, stub = agent_stub(agent)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await stub.Status(apb.StatusRequest(), timeout=10)
            if status.pending_messages == 0:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await ch.close()


class Lazy:
    """What several benchmarks of one run share: alice and bob (control API on loopback TCP),
    carol and dave (on their Unix control sockets, for ping_pong), the bare servers."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._pairs: dict[tuple[str, str], tuple[Agent, Agent]] = {}
        self._pair_errors: dict[tuple[str, str], str] = {}
        self._bare: BareServer | None = None
        self._bare_tls: BareServer | None = None

    def pair(self) -> tuple[Agent, Agent]:
        """alice and bob, running, contacts of each other, one message already delivered
        (so each has pinned the other's key); their control API on loopback TCP."""
        return self._pair("alice", "bob", unix_control=False)

    def unix_pair(self) -> tuple[Agent, Agent]:
        """carol and dave, as alice and bob are, but each serving its control API on its Unix
        socket (DATA_DIR/control.sock, the CLI's default) instead of loopback TCP."""
        return self._pair("carol", "dave", unix_control=True)

    def _pair(self, first: str, second: str, unix_control: bool) -> tuple[Agent, Agent]:
        key = (first, second)
        if key in self._pair_errors:
            raise RuntimeError(
                f"{first} and {second} could not be set up: {self._pair_errors[key]}"
            )
        if key not in self._pairs:
            try:
                a, b = self.world.users(first, second, unix_control=unix_control)
                with a.sync_client() as c:
                    sent = c.send(second, f"hello {second}", wait=15)
                    if sent.status != apb.MESSAGE_STATUS_DELIVERED:
                        raise RuntimeError(f"{first}'s first message to {second} was not delivered")
            except Exception as exc:
                self._pair_errors[key] = f"{type(exc).__name__}: {exc}"[:300]
                raise
            self._pairs[key] = (a, b)
        pair = self._pairs[key]
        for agent in pair:
            if agent.unix_control != unix_control:  # ping_pong swaps them: back as they were
                agent.stop()
                agent.unix_control = unix_control
            if agent.child is None or not agent.child.running:
                agent.start()
        return pair

    def bare(self, tls: bool = False) -> BareServer:
        if tls:
            if self._bare_tls is None:
                self._bare_tls = BareServer(self.world.root, tls=True)
            return self._bare_tls
        if self._bare is None:
            self._bare = BareServer(self.world.root)
        return self._bare

    def stop_pair(self) -> None:
        """Stops alice and bob, and carol and dave (so they take no CPU from later benchmarks)."""
        for pair in self._pairs.values():
            for agent in pair:
                agent.stop()

    def close(self) -> None:
        for server in (self._bare, self._bare_tls):
            if server is not None:
                server.stop()


async def unary_baseline(ctx: Context, lazy: Lazy) -> Figures:
    """The bare unary baseline, for 2/3 of the measuring time: taken once before and once after
    the measured benchmark, so that a change of load on the machine meanwhile evens out."""
    p = ctx.params
    seconds = p.unary_seconds * 2 / 3
    return await bare_unary_rate(lazy.bare(), p.concurrency, seconds, p.unary_max_calls)


def mean_rate(before: Figures, after: Figures) -> float:
    return float(before["calls_per_s"] + after["calls_per_s"]) / 2


def baseline_figures(before: Figures, after: Figures) -> Figures:
    return {
        "baseline_calls_per_s": mean_rate(before, after),
        "baseline_calls_per_s_before": before["calls_per_s"],
        "baseline_calls_per_s_after": after["calls_per_s"],
        "baseline_call_p50_ms": (before["call_p50_ms"] + after["call_p50_ms"]) / 2,
        "baseline_server_cpu_us_per_call": (
            before.get("server_cpu_us_per_call", 0.0) + after.get("server_cpu_us_per_call", 0.0)
        )
        / 2,
    }


# -- send_rate -------------------------------------------------------------------------------------


async def send_rate(ctx: Context, lazy: Lazy) -> Figures:
    p = ctx.params
    alice, bob = lazy.pair()
    before = await unary_baseline(ctx, lazy)
    pairs = [agent_stub(alice, own_connection=True) for _ in range(p.concurrency)]
    stubs = {id(ch): stub for ch, stub in pairs}
    request = apb.SendRequest(peer="bob", body=BODY)

    async def once(ch: grpc.aio.Channel) -> None:
        await stubs[id(ch)].Send(request, timeout=30)

    try:
        with profiled(ctx, "send_rate", {"alice": alice.pid}):
            got = await unary_rate(
                [ch for ch, _ in pairs],
                once,
                p.unary_seconds,
                p.unary_max_calls,
                server_pids=[alice.pid, bob.pid],
            )
    finally:
        for ch, _ in pairs:
            await ch.close()
    drained = await wait_pending(alice, 120)
    after = await unary_baseline(ctx, lazy)
    return {
        "concurrency": p.concurrency,
        **got,
        **baseline_figures(before, after),
        "ratio": got["calls_per_s"] / mean_rate(before, after),
        "note": "Send without wait, bob online (delivery runs meanwhile)",
        "delivered_after": drained,
    }


# -- directory_lookup ------------------------------------------------------------------------------


async def directory_lookup(ctx: Context, lazy: Lazy) -> Figures:
    p = ctx.params
    directory = lazy.world.directory
    ch, stub = directory.sync_stub()
    try:
        for name in ("looker", "lookee"):
            stub.Register(dpb.RegisterRequest(username=name, password=PASSWORD), timeout=30)
        token = stub.Login(
            dpb.LoginRequest(username="looker", password=PASSWORD), timeout=30
        ).session_token
        auth = (("authorization", f"Bearer {token}"),)
        stub.AddContact(dpb.AddContactRequest(username="lookee"), metadata=auth, timeout=30)
        # Contact consent: Lookup answers only between accepted contacts; lookee asks back.
        lookee = stub.Login(
            dpb.LoginRequest(username="lookee", password=PASSWORD), timeout=30
        ).session_token
        back = (("authorization", f"Bearer {lookee}"),)
        stub.AddContact(dpb.AddContactRequest(username="looker"), metadata=back, timeout=30)
    finally:
        ch.close()
    before = await unary_baseline(ctx, lazy)
    base_tls = await bare_unary_rate(
        lazy.bare(tls=True), p.concurrency, p.unary_seconds * 2 / 3, p.unary_max_calls
    )
    creds = grpc.ssl_channel_credentials(directory.ca_pem)
    channels = [
        grpc.aio.secure_channel(directory.target, creds, options=OWN_CONNECTION)
        for _ in range(p.concurrency)
    ]
    stubs = {id(c): directory_pb2_grpc.DirectoryServiceStub(c) for c in channels}
    request = dpb.LookupRequest(username="lookee")

    async def once(c: grpc.aio.Channel) -> None:
        await stubs[id(c)].Lookup(request, metadata=auth, timeout=30)

    try:
        with profiled(ctx, "directory_lookup", {"directory": directory.child.pid}):
            got = await unary_rate(
                channels,
                once,
                p.unary_seconds,
                p.unary_max_calls,
                server_pids=[directory.child.pid],
            )
    finally:
        for c in channels:
            await c.close()
    after = await unary_baseline(ctx, lazy)
    return {
        "concurrency": p.concurrency,
        **got,
        **baseline_figures(before, after),
        "baseline_tls_calls_per_s": base_tls["calls_per_s"],
        "baseline_tls_server_cpu_us_per_call": base_tls["server_cpu_us_per_call"],
        "ratio": got["calls_per_s"] / mean_rate(before, after),
        "ratio_vs_tls_baseline": got["calls_per_s"] / base_tls["calls_per_s"],
    }


# -- outbox_flush ----------------------------------------------------------------------------------


async def outbox_flush(ctx: Context, lazy: Lazy) -> Figures:
    p = ctx.params
    n = p.outbox_messages
    alice, bob = lazy.pair()
    if not await wait_pending(alice, 120):
        raise RuntimeError("alice still has messages pending from an earlier benchmark")
    base = await stream_rate(lazy.bare(), p.stream_baseline_messages, BODY.encode(), 120)

    bob.stop()
    alice.stop()
    prefill_s = await asyncio.to_thread(fill_outbox, alice.db_path, "alice", "bob", n, len(BODY))
    alice.start()
    await asyncio.sleep(0.5)  # alice finds bob offline and keeps retrying (--retry-max 1)
    ch, stub = agent_stub(alice)
    t_link = t_done = None
    pending = n
    with contextlib.ExitStack() as profiles:
        profiles.enter_context(profiled(ctx, "outbox_flush", {"alice": alice.pid}))
        bob.start()
        assert bob.child is not None
        t_ready = bob.child.ready_at
        profiles.enter_context(profiled(ctx, "outbox_flush", {"bob": bob.pid}))
        deadline = time.perf_counter() + p.outbox_timeout
        try:
            while time.perf_counter() < deadline:
                status = await stub.Status(apb.StatusRequest(), timeout=10)
                now = time.perf_counter()
                pending = status.pending_messages
                if t_link is None and "bob" in status.linked_peers:
                    t_link = now
                if pending == 0:
                    t_done = now
                    break
                await asyncio.sleep(0.02)
        finally:
            await ch.close()
    check = _check_received(bob.db_path, "alice", "outbox %")
    delivered = n - pending
    end = t_done if t_done is not None else time.perf_counter()
    start = t_link if t_link is not None else t_ready
    figures: Figures = {
        "messages": n,
        "delivered": delivered,
        "complete": t_done is not None,
        "seconds": end - start,
        "msgs_per_s": delivered / (end - start),
        "msgs_per_s_from_receiver_start": delivered / (end - t_ready),
        "link_after_receiver_start_s": (t_link - t_ready) if t_link is not None else None,
        "baseline_msgs_per_s": base["msgs_per_s"],
        "baseline_messages": base["messages"],
        "prefill_s": prefill_s,
        **check,
    }
    figures["ratio"] = figures["msgs_per_s"] / base["msgs_per_s"]
    if not figures["complete"]:
        figures["note"] = f"timed out after {p.outbox_timeout:.0f} s with {pending} still pending"
    return figures


def _check_received(db: Path, peer: str, like: str) -> Figures:
    """What the receiver committed: count, duplicates, order (read-only, beside the agent)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        ids = [
            row[0]
            for row in conn.execute(
                "SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation "
                "WHERE c.kind = 'direct' AND c.peer = ? AND m.direction = 'in' "
                "AND m.body LIKE ? ORDER BY m.seq",
                (peer, like),
            )
        ]
    finally:
        conn.close()
    return {
        "received_rows": len(ids),
        "received_distinct": len(set(ids)),
        "received_in_order": ids == sorted(ids),
    }


# -- live_latency ----------------------------------------------------------------------------------


async def live_latency(ctx: Context, lazy: Lazy) -> Figures:
    p = ctx.params
    alice, bob = lazy.pair()
    await wait_pending(alice, 60)
    count = int(p.latency_rate * p.latency_seconds)
    run_dir = lazy.world.root
    out = run_dir / "latency-arrivals.json"
    log = run_dir / "logs" / "latency-recv.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as log_f:
        receiver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.latency_recv",
                "--port",
                str(bob.control_port),
                "--count",
                str(count + p.latency_probe_count),
                "--timeout",
                str(p.latency_seconds + 2 * p.latency_grace + 60),
                "--out",
                str(out),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_f,
        )
    try:
        wait_for(lambda: b"receiver started" in log.read_bytes(), 30, 0.01, "receiver start")
        ch, stub = agent_stub(alice)
        chat = stub.Chat()
        events = 0

        async def drain() -> None:
            nonlocal events
            async for _event in chat:
                events += 1

        await chat.write(apb.ChatInput(open=apb.ChatOpen(peer="bob", history_limit=1)))
        drainer = asyncio.create_task(drain())
        # Warm up until the receiver's Serve subscription is live.
        deadline = time.monotonic() + 20
        i = 0
        while b"warm" not in log.read_bytes():
            if time.monotonic() > deadline:
                raise TimeoutError("bob's Serve stream saw no warm-up message")
            await chat.write(apb.ChatInput(text=apb.ChatText(body=f"warm {i}")))
            i += 1
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)

        async def paced(prefix: str, rate: float, n: int, seconds: float) -> dict[str, float]:
            """Writes n texts at `rate` on the Chat stream (for `seconds` at most); returns
            their bodies with the time each was handed to the stream."""
            sent: dict[str, float] = {}
            t0 = time.monotonic()
            stop_sending = t0 + seconds
            for k in range(n):
                delay = t0 + k / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = f"lat {prefix}{k:07d} {BODY}"
                at = time.monotonic()
                if at >= stop_sending:
                    break
                sent[body] = at
                try:  # a write blocks when alice stops reading (HTTP/2 flow control)
                    await asyncio.wait_for(
                        chat.write(apb.ChatInput(text=apb.ChatText(body=body))), stop_sending - at
                    )
                except TimeoutError:
                    break
            return sent

        # First a gentle probe: the latency of one message when nothing queues.
        probe = await paced("p", p.latency_probe_rate, p.latency_probe_count, 10)
        await asyncio.sleep(1.0)
        with profiled(ctx, "live_latency", {"alice": alice.pid, "bob": bob.pid}):
            cpu0 = {a.name: cpu_seconds(a.pid) for a in (alice, bob)}
            cpu0["bench"], cpu0["receiver"] = time.process_time(), cpu_seconds(receiver.pid)
            t0 = time.monotonic()
            sent = await paced("m", p.latency_rate, count, p.latency_seconds + p.latency_grace)
            send_seconds = time.monotonic() - t0
            cpu = {a.name: (cpu_seconds(a.pid) - cpu0[a.name]) / send_seconds for a in (alice, bob)}
            cpu["bench"] = (time.process_time() - cpu0["bench"]) / send_seconds
            cpu["receiver"] = (cpu_seconds(receiver.pid) - cpu0["receiver"]) / send_seconds
            cutoff = max(time.monotonic(), t0 + p.latency_seconds) + p.latency_grace
            try:
                await asyncio.to_thread(receiver.wait, max(0.1, cutoff - time.monotonic()))
            except subprocess.TimeoutExpired:
                receiver.terminate()  # it writes what has arrived so far
                await asyncio.to_thread(receiver.wait, 30)
            ended = time.monotonic()
        chat.cancel()
        drainer.cancel()
        await ch.close()
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(10)
    arrived: dict[str, list[float]] = json.loads(out.read_text()) if out.exists() else {}
    probe_latencies = [arrived[b][0] - t for b, t in probe.items() if b in arrived]
    latencies = [arrived[b][0] - t for b, t in sent.items() if b in arrived]
    # A message that never arrived counts with the time it had waited when the wait ended: the
    # percentiles are then lower bounds, never flattered by leaving the slowest messages out.
    missing = [ended - t for b, t in sent.items() if b not in arrived]
    # Wall clock: arrival on Serve - the sent_at alice's agent gave the message (when its Send
    # began): the part of the latency after the message left alice's Chat input queue.
    agent_to_agent = [arrived[b][1] - arrived[b][2] for b in sent if b in arrived]
    (ctx.results_dir / "latency-samples").mkdir(exist_ok=True)
    samples = ctx.results_dir / "latency-samples" / f"{run_dir.name}.json"
    samples.write_text(
        json.dumps({"sent": len(sent), "latencies_ms": sorted(x * 1000 for x in latencies)})
    )
    figures: Figures = {
        "rate_per_s": p.latency_rate,
        "seconds": p.latency_seconds,
        "to_send": count,
        "sent": len(sent),
        "received": len(latencies),
        "not_received": len(missing),
        "achieved_send_rate": len(sent) / send_seconds,
        "alice_cpu_percent": cpu["alice"] * 100,
        "bob_cpu_percent": cpu["bob"] * 100,
        "sender_cpu_percent": cpu["bench"] * 100,  # this process: the Chat stream's client
        "receiver_cpu_percent": cpu["receiver"] * 100,
        "alice_chat_events": events,
        **summary_ms(latencies + missing),
        "probe_rate_per_s": p.latency_probe_rate,
        "probe_received": len(probe_latencies),
        **{k: v for k, v in summary_ms(probe_latencies, "probe_").items() if "mean" not in k},
        **{
            k: v
            for k, v in summary_ms(agent_to_agent, "sent_at_to_serve_").items()
            if "p5" in k or "p99" in k
        },
    }
    if missing or len(sent) < count:
        figures["note"] = (
            f"{count - len(sent)} not sent within {p.latency_seconds + p.latency_grace:.0f} s, "
            f"{len(missing)} sent but not received within {p.latency_grace:.0f} s after the end: "
            "percentiles are lower bounds"
        )
    return figures


# -- chat_burst and ping_pong (issue 12) ----------------------------------------------------------


def _cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process in `pids`, and of this one ("bench")."""
    now: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            now[name] = cpu_seconds(pid)
        except OSError:  # it has ended
            now[name] = float("nan")
    now["bench"] = time.process_time()
    return now


def _cpu_add(total: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    for name in after:
        total[name] = total.get(name, 0.0) + after[name] - before[name]


async def _serve_live(client: ChatClient, child: StreamsChild, timeout: float = 20.0) -> int:
    """Warm-up texts on alice's Chat until bob's Serve client has seen one (his subscription is
    live); returns how many were written."""
    deadline = time.monotonic() + timeout
    i = 0
    while True:
        await client.write_text(f"warm {i} {BODY}")
        i += 1
        try:
            line = await child.line(0.2)
        except TimeoutError:
            line = ""
        if line is None:
            raise RuntimeError("bob's Serve client ended during the warm-up")
        if line == "warm":
            return i
        if time.monotonic() > deadline:
            raise TimeoutError("bob's Serve stream saw no warm-up message")


async def _one_burst(
    p: Params,
    client: ChatClient,
    child: StreamsChild,
    k: int,
    pids: dict[str, int],
    cpu: dict[str, float],
    link_ports: set[int],
    status_stubs: dict[str, Any],
) -> Figures:
    """Burst k: p.burst_messages texts written on alice's Chat as fast as it takes them, until
    alice's Chat has shown every delivery update and bob's Serve every message (or it stalls)."""
    n = p.burst_messages
    prefix = f"cb{k:02d}-"
    burst = client.start_burst(prefix, n)
    inputs0, events0 = client.inputs, client.events
    frames0 = await link_frames(status_stubs)
    link0 = tcp_counters(pids["alice"], link_ports)
    cpu0 = _cpu_now(pids)
    t0 = time.monotonic()
    deadline = t0 + p.burst_timeout

    async def writer() -> None:
        size = p.burst_body
        for start in range(0, n, p.burst_batch):
            end = min(n, start + p.burst_batch)
            await client.write_texts([burst_body(prefix, i, size) for i in range(start, end)])

    writing = asyncio.create_task(writer())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(burst.done.wait(), p.burst_timeout)
    t_serve: float | None = None
    serve_events = duplicates = bob_got = 0
    bob_failed: list[str] = []
    while t_serve is None:
        try:
            line = await child.line(deadline - time.monotonic())
        except TimeoutError:
            break
        if line is None:
            bob_failed.append("bob's Serve client ended")
            break
        words = line.split()
        if words[:1] == ["done"] and int(words[1]) == k:
            t_serve, serve_events, duplicates = float(words[2]), int(words[3]), int(words[4])
            bob_got = n
        elif words[:1] == ["at"] and int(words[1]) == k:
            bob_got = int(words[2])
        elif words[:1] == ["failed"]:
            bob_failed.append(words[1])
    cpu1 = _cpu_now(pids)
    link1 = tcp_counters(pids["alice"], link_ports)
    frames1 = await link_frames(status_stubs)
    write_error = None
    if not writing.done():
        writing.cancel()
        write_error = "writer still held back"
    elif not writing.cancelled() and writing.exception() is not None:
        exc = writing.exception()
        write_error = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
    ok = burst.t_acked is not None and t_serve is not None and not bob_failed
    figures: Figures = {"burst": k, "ok": ok}
    if ok:
        assert burst.t_acked is not None and t_serve is not None
        _cpu_add(cpu, cpu0, cpu1)
        figures.update(
            msgs_per_s=n / (t_serve - t0),
            acked_msgs_per_s=n / (burst.t_acked - t0),
            serve_s=t_serve - t0,
            acked_s=burst.t_acked - t0,
            inputs=client.inputs - inputs0,
            events=client.events - events0,
            serve_events=serve_events,
            serve_duplicates=duplicates,
            link=tcp_delta(link0, link1),
            link_frames=frames_delta(frames0, frames1),
        )
    else:
        state = (
            f"alice's Chat: {burst.echoed} echoed, {burst.acked} acked; bob's Serve: {bob_got}"
            f" received (of {n}) after {time.monotonic() - t0:.1f} s"
        )
        figures.update(
            chat_error=client.error if client.ended.is_set() else None,
            write_error=write_error,
            serve_errors=bob_failed,
            state=state,
        )
    return figures


async def chat_burst(ctx: Context, lazy: Lazy) -> Figures:
    """Bursts of texts written on alice's Chat(batches=True), as a client with that many
    queued would; bob's Serve(batches=True) in his own process (see bench/README.md)."""
    p = ctx.params
    n = p.burst_messages
    alice, bob = lazy.pair()
    if not await wait_pending(alice, 60):
        raise RuntimeError("alice still has messages pending from an earlier benchmark")
    bare = lazy.bare()
    base_body = burst_body("bare-", 0, p.burst_body - 26).encode()  # + the 26-byte id: 100 B
    base_before = await stream_rate(bare, n, base_body, 120)
    child = await StreamsChild.start(
        lazy.world.root / "logs" / "chat-burst-bob.log",
        "count",
        "--agent",
        bob.control_target,
        "--peer",
        "alice",
        "--messages",
        str(n),
        "--timeout",
        str(p.burst_seconds + p.burst_timeout + 60),
    )
    ch, stub = agent_stub(alice)
    bob_ch, bob_stub = agent_stub(bob)
    status_stubs = {"alice": stub, "bob": bob_stub}  # their Status: the link frames
    pids = {
        "alice": alice.pid,
        "bob": bob.pid,
        "directory": lazy.world.directory.child.pid,
        "bob_client": child.pid,
    }
    link_ports = {alice.peer_port, bob.peer_port}
    bursts: list[Figures] = []
    cpu: dict[str, float] = {}
    client = ChatClient(stub, "bob")
    reopened = 0
    stats: dict[str, str] = {}
    try:
        await client.open()
        warm = await _serve_live(client, child)
        if not await wait_pending(alice, 30):
            raise RuntimeError("the warm-up texts were not delivered")
        started = time.monotonic()
        with profiled(ctx, "chat_burst", {"alice": alice.pid, "bob": bob.pid}):
            for k in range(p.bursts):
                longest = max((b.get("acked_s", p.burst_timeout) for b in bursts), default=0.0)
                if time.monotonic() - started + longest > p.burst_seconds:
                    break
                if client.ended.is_set() or (bursts and not bursts[-1]["ok"]):
                    # the stream failed or stalled: a new one, as a client would reconnect
                    await client.close()
                    client = ChatClient(stub, "bob")
                    await client.open()
                    reopened += 1
                    await wait_pending(alice, p.burst_timeout)
                bursts.append(
                    await _one_burst(p, client, child, k, pids, cpu, link_ports, status_stubs)
                )
    finally:
        await client.close()
        await ch.close()
        await bob_ch.close()
        stats = await child.stop()
    base_after = await stream_rate(bare, n, base_body, 120)
    baseline = (base_before["msgs_per_s"] + base_after["msgs_per_s"]) / 2
    good = [b for b in bursts if b["ok"]]
    done = n * len(good)
    figures: Figures = {
        "messages_per_burst": n,
        "texts_per_input": p.burst_batch,
        "body_bytes": p.burst_body,
        "bursts": len(bursts),
        "bursts_ok": len(good),
        "dropped": len(bursts) - len(good),
        "streams_reopened": reopened,
        "warmup_texts": warm,
        "baseline_msgs_per_s": baseline,
        "baseline_msgs_per_s_before": base_before["msgs_per_s"],
        "baseline_msgs_per_s_after": base_after["msgs_per_s"],
        "baseline_server_cpu_us_per_msg": base_before["server_cpu_us_per_msg"],
        "baseline_client_cpu_us_per_msg": base_before["client_cpu_us_per_msg"],
        "bob_client_stats": stats,
        "per_burst": bursts,
    }
    if good:
        acked = statistics.median(b["acked_msgs_per_s"] for b in good)
        figures.update(
            msgs_per_s=statistics.median(b["msgs_per_s"] for b in good),
            acked_msgs_per_s=acked,
            acked_msgs_per_s_min=min(b["acked_msgs_per_s"] for b in good),
            acked_msgs_per_s_max=max(b["acked_msgs_per_s"] for b in good),
            ratio=acked / baseline,
            client_in_msgs_per_msg=sum(b["inputs"] for b in good) / done,
            client_out_events_per_msg=sum(b["events"] for b in good) / done,
            serve_events_per_msg=sum(b["serve_events"] for b in good) / done,
            serve_duplicates=sum(b["serve_duplicates"] for b in good),
            **{f"cpu_us_per_msg_{name}": seconds / done * 1e6 for name, seconds in cpu.items()},
        )
        links = [b["link"] for b in good if b["link"] is not None]
        if links:
            sent = sum(link["bytes_sent"] for link in links) / (n * len(links))
            received = sum(link["bytes_received"] for link in links) / (n * len(links))
            segs_out = sum(link["data_segs_out"] for link in links) / (n * len(links))
            segs_in = sum(link["data_segs_in"] for link in links) / (n * len(links))
            figures.update(
                link_bytes_per_msg=sent,
                link_ack_bytes_per_msg=received,
                link_tcp_segs_per_msg=segs_out,
                link_ack_tcp_segs_per_msg=segs_in,
            )
        # The link hop's gRPC messages (PeerService.Link frames), from alice's and bob's Status.
        frames = [b["link_frames"] for b in good if b["link_frames"] is not None]
        if frames:
            for key in frames[0]:  # alice_sent, alice_received, bob_sent, bob_received
                total = sum(f[key] for f in frames)
                figures[f"link_frames_per_msg_{key}"] = total / (n * len(frames))
    failed = [b for b in bursts if not b["ok"]]
    if failed:
        figures["failures"] = failed
    if len(bursts) < p.bursts:
        figures["note"] = (
            f"{len(bursts)} of {p.bursts} bursts: the next would have ended after "
            f"{p.burst_seconds:.0f} s"
        )
    return figures


@dataclass
class _PingTally:
    """What one control transport of ping_pong measured, over both phases (both pairs).
    `prefix` starts its figures' names: "" for the Unix control sockets (the CLI's default),
    "tcp_" for loopback TCP."""

    prefix: str
    rtts: list[float] = field(default_factory=list)
    lost: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # by role, see _PingSide.pids
    events: int = 0  # ChatEvents read on the sender's Chat
    inputs: int = 0  # ChatInputs written on it
    # Link frames (PeerService.Link gRPC messages) from the agents' Status, by "ROLE_sent" and
    # "ROLE_received" (sender, echo), over `frame_rounds` round trips (blocks with a count).
    frames: dict[str, int] = field(default_factory=dict)
    frame_rounds: int = 0
    echo_stats: dict[str, int] = field(default_factory=dict)  # summed over the echo clients
    by_pair: dict[str, list[float]] = field(default_factory=dict)  # rtts by sender
    pairs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def figures(self, p: Params, base_p50: float) -> Figures:
        pre, rounds = self.prefix, len(self.rtts) + self.lost
        # A lost round trip counts with the time it was waited for: percentiles are then lower
        # bounds.
        halves = [r / 2 for r in self.rtts] + [p.ping_timeout / 2] * self.lost
        half = summary_ms(halves, f"{pre}half_rtt_")
        figures: Figures = {
            f"{pre}pairs": ", then ".join(self.pairs),
            f"{pre}round_trips": rounds,
            f"{pre}answered": len(self.rtts),
            f"{pre}lost": self.lost,
            **half,
            f"{pre}rtt_p50_ms": half[f"{pre}half_rtt_p50_ms"] * 2,
            f"{pre}ratio": half[f"{pre}half_rtt_p50_ms"] / base_p50,
            **{
                f"{pre}half_rtt_p50_ms_{sender}": percentile(sorted(rtts), 50) / 2 * 1000
                for sender, rtts in self.by_pair.items()
            },
            f"{pre}client_in_msgs_per_rtt": self.inputs / max(1, rounds),
            f"{pre}client_out_events_per_rtt": self.events / max(1, rounds),
            f"{pre}echo_client_stats": self.echo_stats,
            **{f"{pre}cpu_us_per_rtt_{k}": s / max(1, rounds) * 1e6 for k, s in self.cpu.items()},
        }
        for key, count in self.frames.items():
            figures[f"{pre}link_frames_per_rtt_{key}"] = count / max(1, self.frame_rounds)
        echoed = self.echo_stats.get("echoed", 0)
        if echoed:  # the echo clients' streams over all their echoes (the warm-ups' included)
            for kind in ("chat_events", "chat_inputs"):
                figures[f"{pre}echo_{kind}_per_rtt"] = self.echo_stats.get(kind, 0) / echoed
        if rounds < p.ping_rounds:
            figures[f"{pre}note"] = (
                f"{rounds} of {p.ping_rounds} round trips ({self.lost} lost): a phase stopped at "
                f"{p.ping_seconds / 2:.0f} s, after 5 lost in a row, or as a Chat ended"
            )
        if self.errors:
            figures[f"{pre}chat_errors"] = self.errors
        return figures


@dataclass
class _PingSide:
    """One pair of agents in one phase of ping_pong: the sender's Chat client in this process, the
    echo client in its own; what it measures goes to its transport's tally."""

    tally: _PingTally
    sender: Agent
    echo: Agent
    child: StreamsChild
    channel: grpc.aio.Channel
    client: ChatClient
    pids: dict[str, int]
    echo_channel: grpc.aio.Channel  # the echo agent's control API, for its Status
    status_stubs: dict[str, Any]  # by role: sender, echo
    in_a_row: int = 0  # lost round trips in a row: after 5, the echo is gone, stop
    warm: int = 0

    @classmethod
    async def start(
        cls, tally: _PingTally, lazy: Lazy, pair: tuple[Agent, Agent], timeout: float
    ) -> _PingSide:
        sender, echo = pair
        child = await StreamsChild.start(
            lazy.world.root / "logs" / f"ping-pong-{echo.name}.log",
            "echo",
            "--agent",
            echo.control_target,
            "--peer",
            sender.name,
            "--timeout",
            str(timeout),
        )
        ch, stub = agent_stub(sender)
        echo_ch, echo_stub = agent_stub(echo)
        pids = {
            "sender": sender.pid,
            "echo": echo.pid,
            "directory": lazy.world.directory.child.pid,
            "echo_client": child.pid,
        }
        tally.pairs.append(f"{sender.name} -> {echo.name}")
        tally.by_pair.setdefault(sender.name, [])
        client = ChatClient(stub, echo.name)
        stubs = {"sender": stub, "echo": echo_stub}
        return cls(tally, sender, echo, child, ch, client, pids, echo_ch, stubs)

    @property
    def active(self) -> bool:
        return not self.client.ended.is_set() and self.in_a_row < 5

    async def round_trip(self, body: str, timeout: float) -> float | None:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.client.expect = ("pong " + body, future)
        t = time.monotonic()
        await self.client.write_text(body)
        try:
            return await asyncio.wait_for(future, timeout) - t
        except TimeoutError:
            self.client.expect = None
            return None

    async def warm_up(self, rounds: int) -> None:
        """Opens the Chat and waits for the echo client, then `rounds` answered round trips."""
        await self.client.open()
        line = await self.child.line(20)
        if line != "ready":
            raise RuntimeError(f"{self.echo.name}'s echo client said {line!r}")
        deadline = time.monotonic() + 20
        answered = 0
        while answered < rounds:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{answered} of {rounds} warm-up pings answered")
            self.warm += 1
            if await self.round_trip(f"warm {self.warm} {BODY}", 1.0) is not None:
                answered += 1
        await wait_pending(self.sender, 10)

    async def block(self, first: int, n: int, timeout: float) -> None:
        """Round trips `first` .. `first + n - 1`, with the CPU, the client's gRPC messages and
        the link frames of both agents."""
        tally = self.tally
        events0, inputs0 = self.client.events, self.client.inputs
        frames0 = await link_frames(self.status_stubs)
        cpu0 = _cpu_now(self.pids)
        done = 0
        for i in range(first, first + n):
            if not self.active:
                break
            done += 1
            rtt = await self.round_trip(f"ping {i:07d} {BODY}", timeout)
            if rtt is None:
                tally.lost += 1
                self.in_a_row += 1
            else:
                tally.rtts.append(rtt)
                tally.by_pair[self.sender.name].append(rtt)
                self.in_a_row = 0
        _cpu_add(tally.cpu, cpu0, _cpu_now(self.pids))
        tally.events += self.client.events - events0
        tally.inputs += self.client.inputs - inputs0
        frames = frames_delta(frames0, await link_frames(self.status_stubs))
        if frames is not None:
            for key, count in frames.items():
                tally.frames[key] = tally.frames.get(key, 0) + count
            tally.frame_rounds += done

    async def close(self) -> None:
        try:
            await self.client.close()
            await self.channel.close()
            await self.echo_channel.close()
        finally:
            stats = await self.child.stop()
            for k, v in stats.items():
                self.tally.echo_stats[k] = self.tally.echo_stats.get(k, 0) + int(v)
            error = self.client.error
            if error is not None and not error.startswith("CANCELLED"):
                self.tally.errors.append(f"{self.sender.name}: {error}")


async def _ping_phase(
    p: Params, lazy: Lazy, tallies: dict[bool, _PingTally], pairs: list[tuple[Agent, Agent]]
) -> None:
    """One phase of ping_pong: p.ping_rounds / 2 round trips on each pair (each to the tally of
    its transport), in alternating blocks of p.ping_block (ABBA: drifts of the load even out),
    for p.ping_seconds / 2 at most."""
    rounds = p.ping_rounds // 2
    sides: list[_PingSide] = []
    try:
        for pair in pairs:
            tally = tallies[pair[0].unix_control]
            sides.append(await _PingSide.start(tally, lazy, pair, p.ping_seconds + 60))
        for side in sides:
            await side.warm_up(p.ping_warmup)
        stop = time.monotonic() + p.ping_seconds / 2
        for k, first in enumerate(range(0, rounds, p.ping_block)):
            n = min(p.ping_block, rounds - first)
            for side in sides if k % 2 == 0 else sides[::-1]:
                if time.monotonic() < stop:
                    await side.block(first, n, p.ping_timeout)
            if time.monotonic() > stop or not any(s.active for s in sides):
                break
    finally:
        for side in sides:
            await side.close()


def _bare_p50_ms(run: Figures) -> float:
    return percentile(sorted(run["rtts"]), 50) / 2 * 1000


async def ping_pong(ctx: Context, lazy: Lazy) -> Figures:
    """Sequential round trips sender -> echo -> sender through two agents, the echo client in its
    own process (Serve to read, a Chat with the sender to answer), with the clients reaching their
    agents over the agents' Unix control sockets and over loopback TCP: two pairs at once,
    alice -> bob and carol -> dave, one on each transport, in alternating blocks; then every
    agent is restarted on the other transport and it is done again, so that each transport has
    both pairs (which pair it is moves the p50 more than the transport does)."""
    p = ctx.params
    tcp_pair, unix_pair = lazy.pair(), lazy.unix_pair()
    for sender, _ in (tcp_pair, unix_pair):
        await wait_pending(sender, 60)
    bare = lazy.bare()
    sample = f"ping {0:07d} {BODY}"
    base_body = sample.encode()[: len(sample) - 26].ljust(len(sample) - 26, b"x")
    base: dict[str, list[Figures]] = {"tcp": [], "unix": []}
    for transport in ("tcp", "unix"):
        got = await bare_ping_pong(bare, p.ping_rounds, base_body, 60, unix=transport == "unix")
        base[transport].append(got)
    tallies = {True: _PingTally(""), False: _PingTally("tcp_")}
    agents = [*unix_pair, *tcp_pair]
    with profiled(ctx, "ping_pong", {a.name: a.pid for a in agents}):
        await _ping_phase(p, lazy, tallies, [unix_pair, tcp_pair])
    t = time.perf_counter()
    for agent in agents:
        agent.stop()
    for agent in agents:  # each on the other transport, the same data dir and ports
        agent.unix_control = not agent.unix_control
        agent.start()
    swap_s = time.perf_counter() - t
    with profiled(ctx, "ping_pong", {a.name + "-2": a.pid for a in agents}):
        await _ping_phase(p, lazy, tallies, [tcp_pair, unix_pair])  # alice and bob on Unix now
    for transport in ("unix", "tcp"):
        got = await bare_ping_pong(bare, p.ping_rounds, base_body, 60, unix=transport == "unix")
        base[transport].append(got)
    base_tcp = statistics.fmean(_bare_p50_ms(b) for b in base["tcp"])
    base_unix = statistics.fmean(_bare_p50_ms(b) for b in base["unix"])
    figures: Figures = {
        **tallies[True].figures(p, base_unix),
        **tallies[False].figures(p, base_tcp),
        "baseline_half_rtt_p50_ms": base_tcp,
        "baseline_half_rtt_p50_ms_before": _bare_p50_ms(base["tcp"][0]),
        "baseline_half_rtt_p50_ms_after": _bare_p50_ms(base["tcp"][1]),
        "baseline_half_rtt_p99_ms": percentile(
            sorted(r / 2 * 1000 for b in base["tcp"] for r in b["rtts"]), 99
        ),
        "baseline_round_trips": sum(len(b["rtts"]) for b in base["tcp"]),
        "baseline_unix_half_rtt_p50_ms": base_unix,
        "baseline_unix_half_rtt_p50_ms_before": _bare_p50_ms(base["unix"][0]),
        "baseline_unix_half_rtt_p50_ms_after": _bare_p50_ms(base["unix"][1]),
        "baseline_unix_half_rtt_p99_ms": percentile(
            sorted(r / 2 * 1000 for b in base["unix"] for r in b["rtts"]), 99
        ),
        "baseline_unix_round_trips": sum(len(b["rtts"]) for b in base["unix"]),
        "block_round_trips": p.ping_block,
        "swap_s": swap_s,
    }
    # What TCP costs over the Unix socket: per bare hop, and per chat half trip (two control
    # hops: the sender's client -> its agent, the echo's agent -> its client).
    figures["tcp_minus_unix_half_rtt_p50_ms"] = (
        figures["tcp_half_rtt_p50_ms"] - figures["half_rtt_p50_ms"]
    )
    figures["baseline_tcp_minus_unix_half_rtt_p50_ms"] = base_tcp - base_unix
    return figures


# -- history ---------------------------------------------------------------------------------------


def history_queries() -> list[str]:
    vocab = Corpus().vocab
    return [
        vocab[0],  # the most frequent word: many hits, the first 50 for this peer come fast
        vocab[2],
        vocab[10],
        vocab[50],
        vocab[200],
        vocab[1000],
        vocab[4000],  # rare
        f"{vocab[1]} {vocab[20]}",  # two terms, both required
        vocab[5][:3],  # a prefix
        "qqqzzzxx",  # no hit at all
    ]


def build_history_template(ctx: Context, cache_dir: Path | None) -> tuple[Path, float, bool]:
    """The 1M-row database, from the cache when one for this schema and size exists."""
    p = ctx.params
    peers = [f"peer{i}" for i in range(p.history_peers)]
    key = _schema_key(ctx.root) + f"-{p.history_rows}-{p.history_peers}-v3"
    if cache_dir is not None:
        cached = cache_dir / f"history-{key}.db"
        if cached.exists():
            return cached, 0.0, True
    target = (cache_dir or ctx.root) / f"history-{key}.db"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    seconds = fill_history(tmp, HISTORY_USER, peers, p.history_rows)
    os.replace(tmp, target)
    return target, seconds, False


def _schema_key(root: Path) -> str:
    """A hash of the agent's current schema, so that a cached database is never stale."""
    import hashlib

    from p2pchat_agent.store import MessageStore

    probe = root / "schema-probe.db"
    MessageStore.open(probe).close()
    conn = sqlite3.connect(probe)
    try:
        sql = "\n".join(
            r[0] or "" for r in conn.execute("SELECT sql FROM sqlite_master ORDER BY name")
        )
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    return f"s{version}-" + hashlib.sha256(sql.encode()).hexdigest()[:12]


async def history(ctx: Context, lazy: Lazy) -> Figures:
    p = ctx.params
    assert ctx.history_db is not None
    agent = lazy.world.agent(HISTORY_USER)
    agent.data_dir.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(shutil.copyfile, ctx.history_db, agent.db_path)
    agent.start()
    with agent.sync_client() as c:
        c.register(HISTORY_USER)
        c.login(HISTORY_USER)
    queries = history_queries()
    ch, stub = agent_stub(agent)
    last50: list[float] = []
    search: list[float] = []
    by_query: dict[str, list[float]] = {q: [] for q in queries}
    try:
        for _ in range(5):  # warm the page cache like a user who has the app open
            await stub.History(apb.HistoryRequest(peer=HISTORY_PEER, limit=50), timeout=30)
        with profiled(ctx, "history", {"hist": agent.pid}):
            for i in range(p.history_queries):
                t = time.perf_counter()
                got = await stub.History(
                    apb.HistoryRequest(peer=HISTORY_PEER, limit=50), timeout=30
                )
                last50.append(time.perf_counter() - t)
                if len(got.messages) != 50:
                    raise RuntimeError(f"History returned {len(got.messages)} messages, not 50")
                q = queries[i % len(queries)]
                t = time.perf_counter()
                await stub.History(
                    apb.HistoryRequest(peer=HISTORY_PEER, limit=50, query=q), timeout=30
                )
                elapsed = time.perf_counter() - t
                search.append(elapsed)
                by_query[q].append(elapsed)
    finally:
        await ch.close()
    store_last50, store_search = await asyncio.to_thread(
        _store_direct, agent.db_path, queries, max(10, p.history_queries // 2)
    )
    agent.stop()
    slowest = max(by_query.items(), key=lambda kv: max(kv[1]) if kv[1] else 0)
    return {
        "rows": p.history_rows,
        "peers": p.history_peers,
        "queries_each": p.history_queries,
        **summary_ms(last50, "last50_"),
        **summary_ms(search, "search_"),
        **{
            k: v
            for k, v in summary_ms(store_last50, "store_last50_").items()
            if "p5" in k or "p99" in k
        },
        **{
            k: v
            for k, v in summary_ms(store_search, "store_search_").items()
            if "p5" in k or "p99" in k
        },
        "search_slowest_query": slowest[0],
        "search_slowest_query_p50_ms": statistics.median(slowest[1]) * 1000,
        "search_p50_ms_by_query": {
            q: statistics.median(v) * 1000 for q, v in by_query.items() if v
        },
    }


def _store_direct(db: Path, queries: list[str], n: int) -> tuple[list[float], list[float]]:
    """The same queries through MessageStore in this process: the store's share of the time."""
    from p2pchat_agent.store import MessageStore

    store = MessageStore.open(db)
    last50: list[float] = []
    search: list[float] = []
    try:
        for i in range(n):
            t = time.perf_counter()
            store.history(HISTORY_PEER, 50)
            last50.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.history(HISTORY_PEER, 50, query=queries[i % len(queries)])
            search.append(time.perf_counter() - t)
    finally:
        store.close()
    return last50, search


# -- store_migration -----------------------------------------------------------------------------


def build_migration_template(ctx: Context, cache_dir: Path | None) -> tuple[Path, float, bool]:
    """The version 2 database of store_migration (the history of `history`, as an agent of
    version 2 left it, with an outbox), from the cache when one for this size and the SQL of
    versions 1 and 2 exists."""
    p = ctx.params
    peers = [f"peer{i}" for i in range(p.history_peers)]
    key = f"{v2_schema_hash()}-{p.history_rows}-{p.history_peers}-{p.migration_pending}"
    if cache_dir is not None:
        cached = cache_dir / f"history-v2-{key}.db"
        if cached.exists():
            return cached, 0.0, True
    target = (cache_dir or ctx.root) / f"history-v2-{key}.db"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    seconds = fill_history_v2(tmp, HISTORY_USER, peers, p.history_rows, p.migration_pending)
    os.replace(tmp, target)
    return target, seconds, False


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6 if path.exists() else 0.0


def _migrate(template: Path, path: Path, rows: int, pending: int) -> Figures:
    """Opens a copy of the version 2 `template` at `path` with MessageStore.open (which
    migrates it to the current schema), timed, then checks it through the store's API."""
    from p2pchat_agent import schema
    from p2pchat_agent.store import MessageStore

    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)  # also leaves it in the page cache: a warm start
    with open(path, "rb+") as f:
        os.fsync(f.fileno())  # but not its writing back to disk, during the measurement
    wal = Path(f"{path}-wal")
    before = _mb(path)
    t = time.perf_counter()
    store = MessageStore.open(path)
    migration_s = time.perf_counter() - t
    try:
        wal_mb = _mb(wal)  # the WAL is never truncated while the store is open: its peak
        still_pending = store.count_pending()
        t = time.perf_counter()
        recent, _ = store.history(HISTORY_PEER, 50)
        history_ms = (time.perf_counter() - t) * 1000
        word = Corpus().vocab[0]
        t = time.perf_counter()
        found, _ = store.history(HISTORY_PEER, 50, query=word)
        search_ms = (time.perf_counter() - t) * 1000
    finally:
        store.close()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (free_pages,) = conn.execute("PRAGMA freelist_count").fetchone()
    finally:
        conn.close()
    failed = []
    if version != len(schema.MIGRATIONS):
        failed.append(f"schema version {version} after open")
    if still_pending != pending:
        failed.append(f"{still_pending} pending after migration, not {pending}")
    if len(recent) != 50:
        failed.append(f"history({HISTORY_PEER}, 50) returned {len(recent)} messages")
    if not found or not all(word in m.body.split() for m in found):
        failed.append(f"a search of {word!r} found {len(found)} messages")
    if failed:
        raise RuntimeError("store_migration check failed: " + "; ".join(failed))
    return {
        "rows": rows,
        "pending": pending,
        "migration_s": migration_s,
        "rows_per_s": rows / migration_s,
        "db_mb_before": before,
        "db_mb_after": _mb(path),
        "free_mb_after": free_pages * page_size / 1e6,
        "wal_mb_peak": wal_mb,
        "first_history_ms": history_ms,
        "first_search_ms": search_ms,
        "note": (
            "MessageStore.open of a copy of a version 2 file (warm page cache), migrations run "
            "in one transaction, the commit's WAL checkpoint included"
        ),
    }


async def store_migration(ctx: Context, lazy: Lazy) -> Figures:
    p = ctx.params
    assert ctx.migration_db is not None
    path = lazy.world.root / "store-migration" / f"{HISTORY_USER}.db"
    return await asyncio.to_thread(
        _migrate, ctx.migration_db, path, p.history_rows, p.migration_pending
    )


# -- memory ----------------------------------------------------------------------------------------


async def memory(ctx: Context, lazy: Lazy) -> Figures:
    p = ctx.params
    world = lazy.world
    (agent,) = world.users("idle", befriend=False)
    await asyncio.sleep(p.idle_settle)
    idle = rss_mb(agent.pid)
    identities = await asyncio.to_thread(
        make_identities, world.directory.data_dir, p.memory_links, "peer", agent.name
    )
    links = PeerLinks(
        identities, world.directory.users_ca_pem, f"127.0.0.1:{agent.peer_port}", agent.name
    )
    ch, stub = agent_stub(agent)
    try:
        t = time.perf_counter()
        await asyncio.wait_for(links.open_all(), 120)
        open_s = time.perf_counter() - t
        deadline = time.monotonic() + 60
        while True:
            status = await stub.Status(apb.StatusRequest(), timeout=10)
            if len(status.linked_peers) >= p.memory_links:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(status.linked_peers)} links open")
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        with_links = rss_mb(agent.pid)
        peak = rss_mb(agent.pid, "VmHWM")
    finally:
        await links.close()
        await ch.close()
    return {
        "idle_rss_mb": idle,
        "links": p.memory_links,
        "links_rss_mb": with_links,
        "links_peak_rss_mb": peak,
        "per_link_kb": (with_links - idle) * 1024 / p.memory_links,
        "links_open_s": open_s,
        "directory_rss_mb": rss_mb(world.directory.child.pid),
        # The floor: a Python process serving bare grpc.aio (no protobuf, SQLAlchemy, crypto).
        "bare_grpc_server_rss_mb": rss_mb(lazy.bare().child.pid),
        "method": (
            f"{p.memory_links} peers in the bench process, each with its own key and a client "
            "certificate signed by the directory CA, each holding one PeerService.Link (Hello "
            "exchanged) to one fresh logged-in agent"
        ),
    }


BENCHMARKS: dict[str, Callable[[Context, Lazy], Awaitable[Figures]]] = {
    "outbox_flush": outbox_flush,
    "live_latency": live_latency,
    "chat_burst": chat_burst,
    "ping_pong": ping_pong,
    "send_rate": send_rate,
    "directory_lookup": directory_lookup,
    "history": history,
    "store_migration": store_migration,
    "memory": memory,
    "mailbox_relay": mailbox_relay,
    "directory_load": directory_load,
}
