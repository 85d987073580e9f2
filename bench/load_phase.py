"""One measured window of `directory_load`: simulated agents (bench/load_agents.py, a few
processes) against one server for a number of seconds, with the CPU of the server (and of
PostgreSQL) over the window, the latency of every call, and presence read from the database
while the agents are still connected and again once they have gone."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.cluster import Child, cpu_seconds, rss_mb
from bench.directory_fill import Presence, SimUser, read_presence
from bench.load_agents import BEAT, LOOKUP, write_json

Figures = dict[str, Any]
STARTED = re.compile(r"loadgen started")
PRESENCE_SLACK = 1.0  # s: online_until may exceed an agent's last answered beat + TTL by this


@dataclass(frozen=True)
class LoadParams:
    agents: int = 2_000  # the main runs (--agents)
    users: int = 10_000  # registered (at least the most agents of any step)
    seconds: float = 30.0  # each main run
    period: float = 10.0  # an agent's beat and lookup interval (also each call's deadline)
    presence_ttl: float = 30.0  # the directory's --presence-ttl
    procs: int = 3  # load generator processes
    agents_per_channel: int = 1  # 1: every agent its own connection, as real agents
    knee_steps: tuple[int, ...] = (1_000, 2_000, 5_000, 7_500, 10_000)
    knee_seconds: float = 10.0
    knee_p99_ms: float = 50.0
    burst_logins: int = 200  # also the connections of the storm
    burst_seconds: float = 75.0  # the PostgreSQL phase with the burst: long enough to hold it
    burst_at: float = 3.0  # s into that phase (and into the storm's)
    storm_seconds: float = 10.0  # the PostgreSQL phase with a storm of new connections
    bare_seconds: float = 10.0  # the paced bare baseline (same agents, the bare TLS server)
    saturated_seconds: float = 2.0  # the saturated bare baseline, before and after
    settle: float = 2.0  # s after the agents are gone before presence is read again


FULL_LOAD = LoadParams()
QUICK_LOAD = LoadParams(
    agents=200,
    users=1_000,
    seconds=5.0,
    period=2.0,
    presence_ttl=6.0,
    knee_steps=(100, 400),
    knee_seconds=4.0,
    burst_logins=20,
    burst_seconds=10.0,
    burst_at=1.0,
    storm_seconds=4.0,
    bare_seconds=4.0,
    saturated_seconds=1.0,
    settle=1.0,
)


@dataclass
class Server:
    """What the agents talk to: a directory (users_url set) or the bare server."""

    label: str
    target: str
    ca_path: Path
    pid: int
    users_url: str | None = None
    postmaster: int | None = None  # PostgreSQL behind it


def _stat(pid: int | str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None  # gone meanwhile


def postgres_cpu(postmaster: int) -> float:
    """CPU seconds of the postmaster and all its processes: its own time, the time of its
    children that have exited (its cutime/cstime) and that of the live ones."""
    ticks = os.sysconf("SC_CLK_TCK")
    own = _stat(postmaster)
    if own is None:
        return math.nan
    total = sum(int(own[i]) for i in (11, 12, 13, 14))
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(entry.name)
            if fields is not None and int(fields[1]) == postmaster:
                total += int(fields[11]) + int(fields[12])
    return total / ticks


@dataclass
class Phase:
    label: str
    agents: int
    seconds: float
    samples: list[tuple[int, float, float, str, float]]
    server_cpu: float  # over the window, s
    postgres_cpu: float | None
    loadgen_cpu: float
    ready: list[Figures]
    server_rss_mb: float
    connected: Presence | None = None  # read while every agent was still connected
    gone: Presence | None = None  # read `settle` s after they left
    last_beat: dict[str, float] = field(default_factory=dict)
    stopped_at: float = 0.0  # time.time() once every agent had gone
    extra: Figures = field(default_factory=dict)  # what `during` returned
    error_details: dict[str, str] = field(default_factory=dict)  # the first, per code

    def over_ttl(self, ttl: float) -> int:
        """Agents online past their last answered beat + TTL once gone (0 when correct)."""
        if self.gone is None:
            return 0
        over = 0
        for name, until in self.gone.online_until.items():
            beat = self.last_beat.get(name, 0.0)
            if until is None or not beat:
                continue
            if until > datetime.fromtimestamp(beat, UTC) + timedelta(seconds=ttl + PRESENCE_SLACK):
                over += 1
        return over


async def until(t: float) -> None:
    """Sleeps until time.monotonic() is `t` (at once if it has passed)."""
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _wait_json(path: Path, child: Child, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    error = path.parent / "error.txt"
    while not path.exists():
        if error.exists() or not child.running or time.monotonic() > deadline:
            why = error.read_text() if error.exists() else f"no {path.name} in {timeout:.0f} s"
            raise RuntimeError(f"load generator {path.parent.name}: {why}\n{child.log_tail(10)}")
        await asyncio.sleep(0.05)
    return json.loads(path.read_text())


async def run_phase(
    root: Path,
    server: Server,
    users: Sequence[SimUser],
    agents: int,
    seconds: float,
    lp: LoadParams,
    label: str,
    during: Callable[[float], Coroutine[Any, Any, Figures]] | None = None,
) -> Phase:
    """`agents` simulated agents (the first of `users`) for `seconds` against `server`.
    `during(t0)` runs alongside the window (the login burst)."""
    print(f"  directory_load: {label}, {agents} agents ...", file=sys.stderr, flush=True)
    bare = server.users_url is None
    dirs = [root / label / f"gen{i}" for i in range(lp.procs)]
    children: list[Child] = []
    try:
        for i, work in enumerate(dirs):
            work.mkdir(parents=True)
            mine = users[i : agents : lp.procs]
            config = {
                "dir": str(work),
                "target": server.target,
                "ca": str(server.ca_path),
                "period": lp.period,
                "timeout": lp.period,
                "agents_per_channel": lp.agents_per_channel,
                "bare": bare,
                "seed": f"{label}-{i}",
                "agents": [[u.name, u.token, list(u.contacts)] for u in mine],
            }
            (work / "config.json").write_text(json.dumps(config))
        argv = [sys.executable, "-m", "bench.load_agents"]
        children = await asyncio.gather(
            *(
                asyncio.to_thread(Child, [*argv, str(w / "config.json")], w / "log.txt", STARTED)
                for w in dirs
            )
        )
        ready = await asyncio.gather(
            *(_wait_json(w / "ready.json", c, 180) for w, c in zip(dirs, children, strict=True))
        )
        t0 = time.monotonic() + 0.5
        for work in dirs:
            write_json(work / "go.json", {"t0": t0, "seconds": seconds})
        pg = server.postmaster
        await until(t0)
        cpu0 = [cpu_seconds(server.pid), *(cpu_seconds(c.pid) for c in children)]
        pg0 = postgres_cpu(pg) if pg is not None else 0.0
        task = asyncio.create_task(during(t0)) if during is not None else None
        await until(t0 + seconds)
        cpu1 = [cpu_seconds(server.pid), *(cpu_seconds(c.pid) for c in children)]
        pg1 = postgres_cpu(pg) if pg is not None else 0.0
        server_rss = rss_mb(server.pid)
        results = await asyncio.gather(
            *(
                _wait_json(w / "results.json", c, lp.period + 60)
                for w, c in zip(dirs, children, strict=True)
            )
        )
        extra = await asyncio.wait_for(task, 120) if task is not None else {}
        phase = Phase(
            label,
            agents,
            seconds,
            [tuple(s) for r in results for s in r["samples"]],
            cpu1[0] - cpu0[0],
            pg1 - pg0 if pg is not None else None,
            sum(cpu1[1:]) - sum(cpu0[1:]),
            list(ready),
            server_rss,
            extra=extra,
        )
        for r in results:
            phase.last_beat.update(r["last_beat"])
            for code, said in r.get("error_details", {}).items():
                phase.error_details.setdefault(code, said)
        if server.users_url is not None:
            phase.connected = await asyncio.to_thread(read_presence, server.users_url, agents)
        for work in dirs:
            (work / "stop").touch()
        for child in children:
            await asyncio.to_thread(child.proc.wait, 30)
        phase.stopped_at = time.time()
        if server.users_url is not None:
            await asyncio.sleep(lp.settle)
            phase.gone = await asyncio.to_thread(read_presence, server.users_url, agents)
        return phase
    finally:
        for child in children:
            child.kill()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted `values` (NaN when empty)."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def latency(samples: Sequence[tuple[int, float, float, str, float]], prefix: str) -> Figures:
    """p50/p99/max in ms of the calls (failed ones with the time they took)."""
    ms = sorted(s[2] * 1000 for s in samples)
    return {
        f"{prefix}p50_ms": percentile(ms, 50),
        f"{prefix}p99_ms": percentile(ms, 99),
        f"{prefix}max_ms": ms[-1] if ms else math.nan,
    }


def phase_figures(phase: Phase, lp: LoadParams) -> Figures:
    """What one window measured (unprefixed: the caller prefixes them)."""
    calls = len(phase.samples)
    per_call = 1e6 / calls if calls else math.nan
    codes = Counter(s[3] for s in phase.samples if s[3])
    modes = sorted({r["mode"] for r in phase.ready})
    figures: Figures = {
        "agents": phase.agents,
        "seconds": phase.seconds,
        "calls": calls,
        "calls_per_s": calls / phase.seconds,
        "offered_calls_per_s": 2 * phase.agents / lp.period,
        **latency(phase.samples, ""),
        **latency([s for s in phase.samples if s[0] == BEAT], "beat_"),
        **latency([s for s in phase.samples if s[0] == LOOKUP], "lookup_"),
        "errors": sum(codes.values()),
        "errors_by_code": dict(codes),
        "error_details": phase.error_details,
        "server_cpu_us_per_call": phase.server_cpu * per_call,
        "server_cpu_percent": phase.server_cpu / phase.seconds * 100,
        "loadgen_cpu_us_per_call": phase.loadgen_cpu * per_call,
        "loadgen_lag_p99_ms": percentile(sorted(s[4] * 1000 for s in phase.samples), 99),
        "server_rss_mb": phase.server_rss_mb,
        "setup_s": max(r["setup_s"] for r in phase.ready),
        "setup_errors": sum(r.get("setup_errors", 0) for r in phase.ready),
        "channels": sum(r["channels"] for r in phase.ready),
        "beat_rpc": "/".join(modes),
    }
    if phase.postgres_cpu is not None:
        figures["postgres_cpu_us_per_call"] = phase.postgres_cpu * per_call
        figures["postgres_cpu_percent"] = phase.postgres_cpu / phase.seconds * 100
    if phase.connected is not None:
        figures["online_missing"] = phase.connected.missing(phase.agents)
        figures["online_past_ttl_after_stop"] = phase.over_ttl(lp.presence_ttl)
    return figures
