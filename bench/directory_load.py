"""`directory_load` (issue 15, item 5): simulated online agents against the directory, on
SQLite and on a throwaway PostgreSQL.

Each backend's databases are filled directly before its directory starts (bench/directory_fill.py:
10,000 users with a session, a certificate, a mailbox key and 20-50 accepted contacts each).
Then, one window at a time (bench/load_phase.py), a few load generator processes
(bench/load_agents.py) run the agents: a beat every period (Presence, or Heartbeat while the
directory has no Presence) and a Lookup of a random contact every period, each agent on its
own connection. Measured: calls/s, latency, errors, the directory's CPU per call and
PostgreSQL's, beside the bare TLS unary server under the same agents and rates (and the
saturated bare server of the other benchmarks); the knee (most agents with p99 <= 50 ms and no
errors); a burst of Logins in the middle of a PostgreSQL window; presence in the database while
the agents are connected and after they have gone."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psycopg

from bench.bare import OWN_CONNECTION, bare_unary_rate
from bench.cluster import PASSWORD, Child
from bench.directory_fill import SimUser, fill, online_anywhere, username
from bench.load_phase import (
    FULL_LOAD,
    QUICK_LOAD,
    LoadParams,
    Phase,
    Server,
    latency,
    phase_figures,
    run_phase,
    until,
)
from p2pchat.v1 import common_pb2, directory_pb2_grpc
from p2pchat.v1 import directory_pb2 as dpb
from tests.support.postgres import PostgresServer, postgres_server

if TYPE_CHECKING:
    from bench.benchmarks import Context, Figures, Lazy

__all__ = ["FULL_LOAD", "QUICK_LOAD", "LoadParams", "directory_load"]

_READY = re.compile(r"directory serving on port (\d+)")
SATURATED_CALLERS = 8  # as the other unary benchmarks
LOGIN_GIVE_UP = 60.0  # s after the burst's start: a refused login is not tried again
_RETRY_IN = re.compile(r"retry in (\d+) s")


def _log(text: str) -> None:
    print(f"  directory_load: {text}", file=sys.stderr, flush=True)


def _verify(server: Server, users: Sequence[SimUser], agents: int) -> None:
    """A few Lookups that must succeed: the prefilled sessions and pairs are what the
    directory reads."""
    channel = grpc.secure_channel(
        server.target, grpc.ssl_channel_credentials(server.ca_path.read_bytes())
    )
    try:
        stub = directory_pb2_grpc.DirectoryServiceStub(channel)
        for user in (users[0], users[agents // 2], users[agents - 1]):
            for contact in (user.contacts[0], user.contacts[-1]):
                auth = (("authorization", f"Bearer {user.token}"),)
                got = stub.Lookup(dpb.LookupRequest(username=contact), metadata=auth, timeout=30)
                if (
                    got.contact.username != contact
                    or got.contact.state != common_pb2.CONTACT_STATE_ACCEPTED
                ):
                    raise RuntimeError(f"prefill: {user.name} looked up {contact}: {got.contact}")
    finally:
        channel.close()


async def _backend(
    root: Path,
    label: str,
    urls: tuple[str, str],
    lp: LoadParams,
    users: int,
    postmaster: int | None = None,
) -> tuple[Server, list[SimUser], Child, float]:
    """Fills the databases at `urls`, then starts a directory on them; verified."""
    started = time.perf_counter()
    sim = await asyncio.to_thread(fill, urls[0], urls[1], users)
    fill_s = time.perf_counter() - started
    _log(f"{label}: {users:,} users filled in {fill_s:.1f} s")
    data_dir = root / f"directory-{label}"
    argv = [
        sys.executable,
        "-m",
        "p2pchat_directory",
        "--data-dir",
        str(data_dir),
        "--listen",
        "127.0.0.1:0",
        "--users-db",
        urls[0],
        "--contacts-db",
        urls[1],
        "--presence-ttl",
        str(lp.presence_ttl),
    ]
    child = await asyncio.to_thread(Child, argv, root / f"directory-{label}.log", _READY)
    server = Server(
        label,
        f"localhost:{child.match.group(1)}",
        data_dir / "ca.pem",
        child.pid,
        urls[0],
        postmaster,
    )
    await asyncio.to_thread(_verify, server, sim, lp.agents)
    return server, sim, child, fill_s


def _postmaster(pg: PostgresServer) -> int:
    """The pid of the postmaster: the parent of a backend."""
    with psycopg.connect(host="127.0.0.1", port=pg.port, user=pg.user, dbname="postgres") as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    stat = Path(f"/proc/{row[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[1])


async def _connections(server: Server, count: int) -> list[grpc.aio.Channel]:
    """`count` new TLS connections to `server`, each its own, all of them ready."""
    creds = grpc.ssl_channel_credentials(server.ca_path.read_bytes())
    channels = [
        grpc.aio.secure_channel(server.target, creds, options=OWN_CONNECTION) for _ in range(count)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), 60)
    except BaseException:
        await _close(channels)
        raise
    return channels


async def _close(channels: Sequence[grpc.aio.Channel]) -> None:
    await asyncio.gather(*(c.close() for c in channels))


async def _login_burst(
    channels: Sequence[grpc.aio.Channel], names: Sequence[str], t0: float, at: float
) -> Figures:
    """Logins of all `names` at once, at t0 + `at`, each on its own connection, opened before
    the window (real scrypt: every user's password is PASSWORD). A login refused with
    RESOURCE_EXHAUSTED (the directory's bound on waiting hashes) is tried again after the N s
    its message asks for ("retry in N s", plus up to half that again of jitter), as a user
    would, until LOGIN_GIVE_UP s after the burst."""
    await until(t0 + at)
    began = time.monotonic()
    codes: Counter[str] = Counter()  # every answer that was not a session
    rng = random.Random(15)

    async def one(channel: grpc.aio.Channel, name: str) -> tuple[float, str]:
        stub = directory_pb2_grpc.DirectoryServiceStub(channel)
        request = dpb.LoginRequest(username=name, password=PASSWORD)
        while True:
            try:
                await stub.Login(request, timeout=60)
                return time.monotonic() - began, ""
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                late = time.monotonic() - began > LOGIN_GIVE_UP
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or late:
                    return time.monotonic() - began, exc.code().name
                asked = _RETRY_IN.search(exc.details() or "")
                wait = float(asked.group(1)) if asked else 1.0
            await asyncio.sleep(wait + rng.uniform(0, wait / 2))

    done = await asyncio.gather(*(one(c, n) for c, n in zip(channels, names, strict=True)))
    ended = time.monotonic()
    ms = sorted(d * 1000 for d, _ in done)
    return {
        "start": began - t0,
        "end": ended - t0,
        "burst_logins": len(names),
        "burst_s": ended - began,
        "burst_login_p50_ms": ms[len(ms) // 2],  # from the burst's start to a session
        "burst_login_max_ms": ms[-1],
        "burst_login_attempts": len(names) + codes["RESOURCE_EXHAUSTED"],
        "burst_login_refusals": dict(codes),
        "burst_login_errors": sum(1 for _, code in done if code),  # never got a session
    }


async def _connection_storm(server: Server, count: int, t0: float, at: float) -> Figures:
    """`count` new TLS connections opened at once at t0 + `at` (each handshake, no call),
    kept open to the window's end: what a storm of new clients costs everyone else."""
    await until(t0 + at)
    began = time.monotonic()
    cpu = time.process_time()
    channels = await _connections(server, count)
    ended = time.monotonic()
    figures: Figures = {
        "start": began - t0,
        "end": ended - t0,
        "storm_connections": count,
        "storm_connect_s": ended - began,
        "storm_client_cpu_s": time.process_time() - cpu,  # this process: the clients' side
    }
    await asyncio.sleep(1.0)
    await _close(channels)
    return figures


def _during_figures(phase: Phase, reference_p99: float, prefix: str) -> Figures:
    """The calls that started during what ran alongside the window (from its start until 1 s
    after its end: the last Login returned, the last connection ready) against the PostgreSQL
    run without it, and against the rest of this window. `<prefix>cut_short`: it ended after
    the window, so its last part went unmeasured."""
    start, end = phase.extra["start"], phase.extra["end"] + 1.0
    during = [s for s in phase.samples if start <= s[1] <= end]
    quiet = [s for s in phase.samples if not start <= s[1] <= end]
    figures = {k: v for k, v in phase.extra.items() if k.startswith(prefix)}
    figures.update(latency(during, prefix))
    figures.update(latency([s for s in during if s[0] == 0], f"{prefix}beat_"))
    figures.update(latency([s for s in during if s[0] == 1], f"{prefix}lookup_"))
    figures[f"{prefix}calls"] = len(during)
    figures[f"{prefix}cut_short"] = end > phase.seconds
    figures[f"{prefix}errors"] = sum(1 for s in phase.samples if s[3])
    figures[f"{prefix}quiet_p99_ms"] = latency(quiet, "")["p99_ms"]
    figures[f"{prefix}p99_ratio"] = figures[f"{prefix}p99_ms"] / reference_p99
    figures[f"{prefix}p99_ratio_in_window"] = (
        figures[f"{prefix}p99_ms"] / figures[f"{prefix}quiet_p99_ms"]
    )
    return figures


KNEE_KEEP = (
    "calls_per_s",
    "p50_ms",
    "p99_ms",
    "beat_p99_ms",
    "lookup_p99_ms",
    "errors",
    "errors_by_code",
    "error_details",
    "server_cpu_us_per_call",
    "postgres_cpu_us_per_call",
    "loadgen_lag_p99_ms",
    "online_missing",
    "setup_s",
    "seconds",
)


async def _knee(
    root: Path, server: Server, users: Sequence[SimUser], lp: LoadParams, main: Figures
) -> tuple[int, list[Figures]]:
    """Agents stepped up (knee_steps and the main runs' count, whose run, `main`, stands for
    its step) until a step misses p99 <= knee_p99_ms with no errors: the most that made it
    (0: not even the first step)."""
    best, steps = 0, []
    for agents in sorted({*lp.knee_steps, lp.agents}):
        if agents > len(users):
            break
        f = main
        if agents != lp.agents:
            label = f"{server.label}-knee-{agents}"
            try:
                phase = await run_phase(root, server, users, agents, lp.knee_seconds, lp, label)
            except RuntimeError as exc:  # e.g. the agents could not all connect in time
                steps.append({"agents": agents, "ok": False, "error": str(exc)[:300]})
                _log(f"{label} failed: {exc}")
                break
            f = phase_figures(phase, lp)
        ok = f["p99_ms"] <= lp.knee_p99_ms and f["errors"] == 0
        steps.append({"agents": agents, "ok": ok, **{k: f[k] for k in KNEE_KEEP if k in f}})
        _log(f"{server.label} knee step {agents}: p99 {f['p99_ms']:.1f} ms, {f['errors']} errors")
        if not ok:
            break
        best = agents
    return best, steps


async def _offline_after_ttl(server: Server, since: float, lp: LoadParams) -> int:
    """Users still online once the TTL has passed since the agents left at `since` (0 is
    correct). Waits out what is left of the TTL."""
    delay = since + lp.presence_ttl + 1.0 - time.time()
    if delay > 0:
        await asyncio.sleep(min(delay, lp.presence_ttl + 1.0))
    assert server.users_url is not None
    return await asyncio.to_thread(online_anywhere, server.users_url)


def _prefixed(prefix: str, figures: Figures) -> Figures:
    return {f"{prefix}{k}": v for k, v in figures.items()}


async def directory_load(ctx: Context, lazy: Lazy) -> Figures:
    lp: LoadParams = ctx.params.load
    lazy.stop_pair()  # alice and bob take no CPU from this one
    root = lazy.world.root / "directory_load"
    root.mkdir(parents=True, exist_ok=True)
    users = max(lp.users, lp.agents + lp.burst_logins, *lp.knee_steps)
    figures: Figures = {
        "agents": lp.agents,
        "users": users,
        "period_s": lp.period,
        "presence_ttl_s": lp.presence_ttl,
        "load_generators": lp.procs,
        "agents_per_channel": lp.agents_per_channel,
    }
    directories: list[Child] = []
    stack = contextlib.ExitStack()
    try:
        saturated = [
            await bare_unary_rate(lazy.bare(), SATURATED_CALLERS, lp.saturated_seconds, 100_000)
        ]
        bare_tls = lazy.bare(tls=True)
        bare = Server(
            "bare", f"localhost:{bare_tls.port}", root / "bare-ca.pem", bare_tls.child.pid
        )
        assert bare_tls.root_pem is not None
        bare.ca_path.write_bytes(bare_tls.root_pem)
        most = max(lp.agents, *lp.knee_steps)
        nobody = [SimUser(username(i), "-", (username(0),)) for i in range(most)]
        paced = phase_figures(
            await run_phase(root, bare, nobody, lp.agents, lp.bare_seconds, lp, "bare"), lp
        )
        # The machine's own ceiling: the bare server (no work at all) through the same steps.
        figures["knee_agents_bare"], figures["knee_steps_bare"] = await _knee(
            root, bare, nobody, lp, paced
        )
        figures["baseline_server_cpu_us_per_call"] = paced["server_cpu_us_per_call"]
        figures.update(_prefixed("baseline_", {k: paced[k] for k in ("p50_ms", "p99_ms")}))
        figures["baseline_errors"] = paced["errors"]

        lite_dir = root / "sqlite"
        lite_urls = (f"sqlite:///{lite_dir}/users.db", f"sqlite:///{lite_dir}/contacts.db")
        lite, lite_users, child, fill_s = await _backend(root, "sqlite", lite_urls, lp, users)
        directories.append(child)
        figures["sqlite_fill_s"] = fill_s
        lite_phase = await run_phase(root, lite, lite_users, lp.agents, lp.seconds, lp, "sqlite")
        lite_main = phase_figures(lite_phase, lp)
        figures.update(_prefixed("sqlite_", lite_main))

        pg_server = await asyncio.to_thread(stack.enter_context, postgres_server())
        pg_url = await asyncio.to_thread(stack.enter_context, pg_server.database())
        postmaster = await asyncio.to_thread(_postmaster, pg_server)
        pg, pg_users, child, fill_s = await _backend(
            root, "pg", (pg_url, pg_url), lp, users, postmaster
        )
        directories.append(child)
        figures["pg_fill_s"] = fill_s
        pg_main = phase_figures(
            await run_phase(root, pg, pg_users, lp.agents, lp.seconds, lp, "pg"), lp
        )
        figures.update(_prefixed("pg_", pg_main))

        logins = [u.name for u in pg_users[len(pg_users) - lp.burst_logins :]]
        # The logins' connections are opened before their window: a client's TLS handshake
        # is its own machine's work, and here it would take the same two cores (the storm
        # below measures what new connections cost the rest).
        channels = await _connections(pg, len(logins))
        try:
            pg_burst = await run_phase(
                root,
                pg,
                pg_users,
                lp.agents,
                lp.burst_seconds,
                lp,
                "pg-burst",
                lambda t0: _login_burst(channels, logins, t0, lp.burst_at),
            )
        finally:
            await _close(channels)
        figures.update(_during_figures(pg_burst, figures["pg_p99_ms"], "burst_"))
        burst_phase = phase_figures(pg_burst, lp)
        figures["burst_window"] = burst_phase
        pg_storm = await run_phase(
            root,
            pg,
            pg_users,
            lp.agents,
            lp.storm_seconds,
            lp,
            "pg-storm",
            lambda t0: _connection_storm(pg, lp.burst_logins, t0, lp.burst_at),
        )
        figures.update(_during_figures(pg_storm, figures["pg_p99_ms"], "storm_"))

        figures["knee_agents_pg"], figures["knee_steps_pg"] = await _knee(
            root, pg, pg_users, lp, pg_main
        )
        pg_left = time.time()
        figures["sqlite_online_after_ttl"] = await _offline_after_ttl(
            lite, lite_phase.stopped_at, lp
        )
        figures["knee_agents_sqlite"], figures["knee_steps_sqlite"] = await _knee(
            root, lite, lite_users, lp, lite_main
        )
        figures["pg_online_after_ttl"] = await _offline_after_ttl(pg, pg_left, lp)
        saturated.append(
            await bare_unary_rate(lazy.bare(), SATURATED_CALLERS, lp.saturated_seconds, 100_000)
        )
    finally:
        for child in directories:
            child.kill()
        await asyncio.to_thread(stack.close)

    sat = sum(s["server_cpu_us_per_call"] for s in saturated) / len(saturated)
    figures["baseline_saturated_cpu_us_per_call"] = sat
    figures["baseline_saturated_calls_per_s"] = sum(s["calls_per_s"] for s in saturated) / len(
        saturated
    )
    for prefix in ("sqlite_", "pg_"):
        cpu = figures[f"{prefix}server_cpu_us_per_call"]
        figures[f"{prefix}cpu_ratio"] = cpu / figures["baseline_server_cpu_us_per_call"]
        figures[f"{prefix}cpu_ratio_saturated"] = cpu / sat
    checks = [
        figures[f"{backend}_{check}"]
        for backend in ("sqlite", "pg")
        for check in ("online_missing", "online_past_ttl_after_stop", "online_after_ttl")
    ]
    checks += [burst_phase["online_missing"], burst_phase["online_past_ttl_after_stop"]]
    figures["presence_ok"] = all(c == 0 for c in checks)
    figures["beat_rpc"] = "/".join(sorted({figures["sqlite_beat_rpc"], figures["pg_beat_rpc"]}))
    return figures
