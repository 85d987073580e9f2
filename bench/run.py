"""`python -m bench`: runs the benchmarks of issues 6 and 12, prints a table, writes
bench/results/latest.json and bench/results/live_latency.png.

Every run starts a fresh directory and fresh agents (real processes, mTLS, SQLite) in a temporary
work dir; each ratio is taken within one run (baseline measured right next to it) and the figures
reported are the medians over the runs. A time budget keeps the whole thing under 5 minutes:
a further run starts only if the slowest run so far still fits.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from bench.benchmarks import (
    BENCHMARKS,
    FULL,
    QUICK,
    Context,
    Lazy,
    build_history_template,
    build_migration_template,
)
from bench.cluster import World

HERE = Path(__file__).resolve().parent
RUN_ORDER = [
    "send_rate",
    "directory_lookup",
    "outbox_flush",
    "live_latency",
    "chat_burst",
    "ping_pong",
    "history",
    "store_migration",
    "mailbox_relay",
    "memory",
    "directory_load",
]
# How long one benchmark may run (s); 240 unless named here.
TIMEOUTS = {"directory_load": 900.0}
# Run once, in the first run, whatever --runs says, and outside --budget: directory_load takes
# about 4 minutes by itself (its figures are each taken over thousands of calls).
ONCE = {"directory_load"}

# (benchmark, figure, comparison, threshold, what the target says) — issue 6, item 3, and
# issue 12 (chat_burst, ping_pong). Comparisons: ">=", "<=", "==".
TARGETS = [
    ("outbox_flush", "ratio", ">=", 10.0, ">= 10x baseline"),
    ("live_latency", "p99_ms", "<=", 5.0, "p99 <= 5 ms"),
    ("chat_burst", "ratio", ">=", 1.5, "chat_burst acked >= 1.5x bare stream"),
    ("chat_burst", "dropped", "==", 0, "no burst dropped"),
    ("ping_pong", "ratio", "<=", 4.0, "ping_pong RTT/2 p50 <= 4x bare hop (Unix socket)"),
    ("send_rate", "ratio", ">=", 0.6, ">= 0.6x baseline"),
    ("directory_lookup", "ratio", ">=", 0.8, ">= 0.8x baseline"),
    ("history", "last50_p99_ms", "<=", 10.0, "last-50 p99 <= 10 ms"),
    ("history", "search_p99_ms", "<=", 50.0, "search p99 <= 50 ms"),
    ("store_migration", "migration_s", "<=", 10.0, "1M-row v2 -> v3 migration <= 10 s"),
    ("memory", "idle_rss_mb", "<=", 80.0, "idle <= 80 MB"),
    ("memory", "links_rss_mb", "<=", 150.0, "200 links <= 150 MB"),
    # issue 15, item 5: the directory under simulated online agents
    ("directory_load", "sqlite_cpu_ratio", "<=", 2.0, "CPU/call <= 2x bare unary (SQLite)"),
    ("directory_load", "pg_cpu_ratio", "<=", 2.0, "CPU/call <= 2x bare unary (PostgreSQL)"),
    ("directory_load", "pg_postgres_cpu_us_per_call", "<=", 250.0, "PostgreSQL <= 0.25 ms/call"),
    ("directory_load", "knee_agents_pg", ">=", 10_000, "10,000 agents on PG: p99 <= 50 ms"),
    ("directory_load", "burst_p99_ratio", "<=", 2.0, "200 logins: p99 <= 2x without"),
    ("directory_load", "presence_ok", "==", True, "presence right for every agent"),
]

# What the table shows per benchmark: (figure, label, baseline figure or None). A row with a
# baseline shows the benchmark's "ratio" (and its target), or the figure named in RATIO_OF.
COLUMNS: dict[str, list[tuple[str, str, str | None]]] = {
    "outbox_flush": [("msgs_per_s", "msg/s", "baseline_msgs_per_s")],
    "live_latency": [
        ("p50_ms", "p50 ms", None),
        ("p99_ms", "p99 ms", None),
        ("max_ms", "max ms", None),
    ],
    "chat_burst": [
        ("msgs_per_s", "msg/s to bob's Serve", None),
        ("acked_msgs_per_s", "acked msg/s", "baseline_msgs_per_s"),
        ("dropped", "dropped bursts", None),
    ],
    "ping_pong": [  # unprefixed: over the Unix control sockets (the CLI's default); tcp_*: TCP
        ("half_rtt_p50_ms", "RTT/2 p50 ms, Unix socket", "baseline_unix_half_rtt_p50_ms"),
        ("half_rtt_p99_ms", "RTT/2 p99 ms, Unix socket", None),
        ("tcp_half_rtt_p50_ms", "RTT/2 p50 ms, loopback TCP", "baseline_half_rtt_p50_ms"),
        ("tcp_half_rtt_p99_ms", "RTT/2 p99 ms, loopback TCP", None),
    ],
    "send_rate": [("calls_per_s", "calls/s", "baseline_calls_per_s")],
    "directory_lookup": [("calls_per_s", "calls/s", "baseline_calls_per_s")],
    "history": [
        ("last50_p50_ms", "last-50 p50 ms", None),
        ("last50_p99_ms", "last-50 p99 ms", None),
        ("search_p50_ms", "search p50 ms", None),
        ("search_p99_ms", "search p99 ms", None),
    ],
    "store_migration": [
        ("migration_s", "migration s", None),
        ("rows_per_s", "rows/s", None),
        ("db_mb_before", "db MB before", None),
        ("db_mb_after", "db MB after", None),
        ("wal_mb_peak", "WAL MB peak", None),
    ],
    "memory": [("idle_rss_mb", "idle RSS MB", None), ("links_rss_mb", "200-link RSS MB", None)],
    "mailbox_relay": [  # relayed_*: through the mailbox; direct_*: the same runs on a link
        ("relayed_p50_ms", "relayed one-way p50 ms", None),
        ("relayed_p99_ms", "relayed one-way p99 ms", None),
        ("direct_p50_ms", "direct one-way p50 ms", None),
        ("direct_p99_ms", "direct one-way p99 ms", None),
        ("relayed_msgs_per_s", "relayed msg/s", None),
        ("relayed_acked_msgs_per_s", "relayed acked msg/s", None),
        ("direct_msgs_per_s", "direct msg/s", None),
        ("seal_us", "seal us/message", None),
        ("open_us", "open us/message", None),
    ],
    "directory_load": [  # sqlite_*, pg_*: the main runs (--agents agents, 30 s each)
        ("agents", "agents (main runs)", None),
        ("beat_rpc", "beat RPC", None),  # Presence, or Heartbeat while it is UNIMPLEMENTED
        ("sqlite_calls_per_s", "SQLite calls/s", None),
        ("sqlite_p50_ms", "SQLite p50 ms", None),
        ("sqlite_p99_ms", "SQLite p99 ms", None),
        ("sqlite_errors", "SQLite errors", None),
        (
            "sqlite_server_cpu_us_per_call",
            "SQLite directory CPU us/call",
            "baseline_server_cpu_us_per_call",
        ),
        ("pg_calls_per_s", "PostgreSQL calls/s", None),
        ("pg_p50_ms", "PostgreSQL p50 ms", None),
        ("pg_p99_ms", "PostgreSQL p99 ms", None),
        ("pg_errors", "PostgreSQL errors", None),
        (
            "pg_server_cpu_us_per_call",
            "PostgreSQL directory CPU us/call",
            "baseline_server_cpu_us_per_call",
        ),
        ("pg_postgres_cpu_us_per_call", "PostgreSQL server CPU us/call", None),
        ("burst_p99_ms", "p99 ms during the login burst", "pg_p99_ms"),
        ("burst_s", "login burst: s until the last session", None),
        ("storm_p99_ms", "p99 ms during 200 new connections", "pg_p99_ms"),
        ("knee_agents_sqlite", "knee (agents) SQLite", None),
        ("knee_agents_pg", "knee (agents) PostgreSQL", None),
        ("knee_agents_bare", "knee (agents) bare server: the machine's", None),
        ("presence_ok", "presence right", None),
    ],
}
RATIO_OF: dict[tuple[str, str], str] = {
    ("ping_pong", "tcp_half_rtt_p50_ms"): "tcp_ratio",
    ("directory_load", "sqlite_server_cpu_us_per_call"): "sqlite_cpu_ratio",
    ("directory_load", "pg_server_cpu_us_per_call"): "pg_cpu_ratio",
    ("directory_load", "burst_p99_ms"): "burst_p99_ratio",
    ("directory_load", "storm_p99_ms"): "storm_p99_ratio",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small counts, one run: a smoke test")
    p.add_argument(
        "--runs", type=int, default=None, help="runs to take medians of (default 3; quick 1)"
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated benchmarks (default all): " + ",".join(RUN_ORDER),
    )
    p.add_argument(
        "--budget", type=float, default=285.0, help="seconds for the whole bench (default 285)"
    )
    p.add_argument(
        "--profile",
        default="",
        help="comma-separated benchmarks to record with py-spy (results/profile-*.txt)",
    )
    p.add_argument(
        "--profile-mode",
        choices=["gil", "wall"],
        default="gil",
        help="gil: Python CPU time (default); wall: all threads, waiting included",
    )
    p.add_argument(
        "--agents",
        type=int,
        default=None,
        help="directory_load: simulated agents of its main runs (default 2000; quick 200)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results" / "latest.json")
    p.add_argument(
        "--cache",
        type=Path,
        default=HERE / ".cache",
        help="where the 1M-row history dbs (current schema and version 2) are kept",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="build the history dbs afresh, keep them nowhere"
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, databases)")
    p.add_argument(
        "--report",
        action="store_true",
        help="run nothing: print the table (Markdown) of the results file given by --out",
    )
    return p.parse_args(argv)


def git_describe() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=HERE,
            timeout=10,
        )
        return out.stdout.strip()
    except OSError:
        return ""


async def one_run(ctx: Context, names: list[str], index: int) -> dict[str, Any]:
    world = World(ctx.root / f"run{index}")
    lazy = Lazy(world)
    results: dict[str, Any] = {}
    try:
        for name in names:
            if name in ("history", "store_migration", "memory"):
                lazy.stop_pair()
            started = time.perf_counter()
            print(f"  run {index}: {name} ...", file=sys.stderr, flush=True)
            try:
                figures = await asyncio.wait_for(
                    BENCHMARKS[name](ctx, lazy), TIMEOUTS.get(name, 240.0)
                )
            except Exception as exc:  # one failure must not hide the other results
                traceback.print_exc()
                figures = {"error": f"{type(exc).__name__}: {exc}"}
            figures["wall_s"] = time.perf_counter() - started
            figures["load_avg_1m"] = os.getloadavg()[0]
            results[name] = figures
            print(
                f"  run {index}: {name} done in {figures['wall_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        lazy.close()
        world.close()
    return results


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in runs if "error" not in r]
    if not good:
        return {"error": runs[-1].get("error", "no run"), "runs": runs}
    merged: dict[str, Any] = {}
    for key, value in good[0].items():
        values = [r.get(key) for r in good]
        if isinstance(value, bool):
            merged[key] = all(values)
        elif isinstance(value, int | float) and all(isinstance(v, int | float) for v in values):
            merged[key] = statistics.median(values)  # type: ignore[type-var]
        else:
            merged[key] = value
    merged["runs_ok"] = len(good)
    merged["runs"] = runs
    if len(good) < len(runs):
        merged["errors"] = [r["error"] for r in runs if "error" in r]
    return merged


def judge(results: dict[str, Any]) -> list[dict[str, Any]]:
    verdicts = []
    for bench, figure, op, threshold, text in TARGETS:
        entry = results.get(bench)
        if entry is None:
            continue
        value = entry.get(figure)
        met = None
        if isinstance(value, int | float):
            if op == ">=":
                met = value >= threshold
            elif op == "<=":
                met = value <= threshold
            else:
                met = value == threshold
        verdict = {"figure": figure, "target": text, "value": value, "met": met}
        if isinstance(value, int | float) and value and threshold:
            verdict["off_by"] = f"{value / threshold:.2f}x the limit"
        entry.setdefault("targets", []).append(verdict)
        verdicts.append({"benchmark": bench, **verdict})
    return verdicts


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table(results: dict[str, Any], quick: bool = False) -> str:
    rows = [("benchmark", "figure", "value", "baseline", "ratio", "target", "met")]
    for bench in BENCHMARKS:
        entry = results.get(bench)
        if entry is None:
            continue
        if "error" in entry and "runs_ok" not in entry:
            rows.append((bench, "ERROR", entry["error"][:60], "", "", "", ""))
            continue
        targets = {t["figure"]: t for t in entry.get("targets", [])}
        for figure, label, base in COLUMNS[bench]:
            if figure == "links_rss_mb" and isinstance(entry.get("links"), int | float):
                label = f"{entry['links']:.0f}-link RSS MB"
            ratio_key = RATIO_OF.get((bench, figure), "ratio")
            target = targets.get(figure) or (targets.get(ratio_key) if base else None)
            ratio = entry.get(ratio_key) if base else None
            met = "" if target is None else ("yes" if target["met"] else "NO")
            if met and quick:
                met = f"({met})"  # small counts: not what the targets are about
            rows.append(
                (
                    bench,
                    label,
                    fmt(entry.get(figure)),
                    fmt(entry.get(base)) if base else "",
                    f"{ratio:.2f}x" if isinstance(ratio, float) else "",
                    target["target"] if target else "",
                    met,
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plot_latency(results_dir: Path, out: Path) -> str | None:
    samples_dir = results_dir / "latency-samples"
    files = sorted(samples_dir.glob("*.json")) if samples_dir.exists() else []
    if not files:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG (pip install matplotlib)"
    fig, (hist_ax, cdf_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    everything: list[float] = []
    sent_total = 0
    for f in files:
        sample = json.loads(f.read_text())
        values, sent = sample["latencies_ms"], sample["sent"]
        everything += values
        sent_total += sent
        if values and sent:
            # Over all messages sent: a curve that stops below 1 means messages never arrived.
            fractions = [(i + 1) / sent for i in range(len(values))]
            label = f"{f.stem} ({len(values)}/{sent} arrived)"
            cdf_ax.plot(values, fractions, label=label, linewidth=1.2)
    if everything:
        low, high = max(min(everything), 0.05), max(everything)
        bins = [low * (high / low) ** (i / 80) for i in range(81)] if high > low else 20
        hist_ax.hist(everything, bins=bins, color="#4477aa")
        hist_ax.set_xscale("log")
    hist_ax.axvline(5.0, color="red", linestyle="--", linewidth=1)
    hist_ax.set_xlabel("end-to-end latency (ms, log)")
    hist_ax.set_ylabel("messages")
    hist_ax.set_title(f"live_latency: {len(everything)} of {sent_total} messages arrived")
    cdf_ax.set_xscale("log")
    cdf_ax.set_xlabel("end-to-end latency (ms, log)")
    cdf_ax.set_ylabel("fraction of messages sent")
    cdf_ax.set_title("CDF per run (alice Chat -> bob Serve)")
    cdf_ax.axvline(5.0, color="red", linestyle="--", linewidth=1, label="p99 target 5 ms")
    cdf_ax.axhline(0.99, color="grey", linestyle=":", linewidth=1)
    cdf_ax.legend(fontsize=8)
    cdf_ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return None


async def amain(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    params = QUICK if args.quick else FULL
    if args.agents:
        params = dataclasses.replace(
            params, load=dataclasses.replace(params.load, agents=args.agents)
        )
    runs = args.runs or (1 if args.quick else 3)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(RUN_ORDER)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    names = [n for n in RUN_ORDER if n in names]
    results_dir = args.out.parent
    results_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(results_dir / "latency-samples", ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix="p2pchat-bench-"))
    ctx = Context(
        params=params,
        root=root,
        results_dir=results_dir,
        profile={n.strip() for n in args.profile.split(",") if n.strip()},
        profile_mode=args.profile_mode,
    )
    meta: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "git": git_describe(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "work_dir": str(root) if args.keep else None,
    }
    print(f"p2pchat bench ({'quick' if args.quick else 'full'}), work dir {root}", file=sys.stderr)
    try:
        cache = None if args.no_cache else args.cache
        for bench, label, build in (
            ("history", "history_db", build_history_template),
            ("store_migration", "migration_db", build_migration_template),
        ):
            if bench not in names:
                continue
            t = time.perf_counter()
            print(f"  {label}: {params.history_rows:,} rows ...", file=sys.stderr, flush=True)
            db, fill_s, cached = await asyncio.to_thread(build, ctx, cache)
            if bench == "history":
                ctx.history_db = db
            else:
                ctx.migration_db = db
            meta[label] = {
                "rows": params.history_rows,
                "path": str(db),
                "from_cache": cached,
                "fill_s": fill_s,
                "prepare_s": time.perf_counter() - t,
            }
            print(
                f"  {label}: {params.history_rows:,} rows "
                f"({'cached' if cached else f'built in {fill_s:.1f} s'})",
                file=sys.stderr,
            )
        per_run: list[dict[str, Any]] = []
        durations: list[float] = []
        once_s = 0.0  # spent in the ONCE benchmarks: outside the budget
        for index in range(1, runs + 1):
            elapsed = time.perf_counter() - began - once_s
            if durations and elapsed + max(durations) > args.budget:
                print(f"  time budget: stopping after {index - 1} run(s)", file=sys.stderr)
                break
            t = time.perf_counter()
            run_names = names if index == 1 else [n for n in names if n not in ONCE]
            if not run_names:
                break
            done = await one_run(ctx, run_names, index)
            per_run.append(done)
            spent = sum(done[n]["wall_s"] for n in run_names if n in ONCE)
            once_s += spent
            durations.append(time.perf_counter() - t - spent)
        meta["runs"] = len(per_run)
        meta["run_seconds"] = durations
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    results: dict[str, Any] = {}
    for name in BENCHMARKS:
        if name in names:
            results[name] = median_figures([r[name] for r in per_run if name in r])
    verdicts = judge(results)
    note = plot_latency(results_dir, results_dir / "live_latency.png")
    meta["total_s"] = time.perf_counter() - began
    meta["load_avg_at_end"] = os.getloadavg()
    if ctx.profile_files:
        meta["profiles"] = ctx.profile_files
    if note:
        meta["plot"] = note
    document = {**results, "meta": meta, "verdicts": verdicts}
    args.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print()
    print(table(results, args.quick))
    print()
    if args.quick:
        print("quick run: small counts; the targets hold for the full run only, hence (yes)/(NO)")
    met = sum(1 for v in verdicts if v["met"])
    runs_done, total = meta["runs"], meta["total_s"]
    print(f"{met}/{len(verdicts)} targets met; medians of {runs_done} run(s) in {total:.0f} s")
    print(f"wrote {args.out}" + ("" if note else f" and {results_dir / 'live_latency.png'}"))
    if note:
        print(note)
    return 0


def report(path: Path) -> int:
    document = json.loads(path.read_text())
    meta = document.get("meta", {})
    results = {k: v for k, v in document.items() if k in BENCHMARKS}
    print(table(results, bool(meta.get("quick"))))
    print()
    print(
        f"Medians of {meta.get('runs')} run(s), {meta.get('started')}, git {meta.get('git')}, "
        f"{meta.get('cpus')} CPUs, Python {meta.get('python')}, grpcio {meta.get('grpcio')}."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.out)
    return asyncio.run(amain(args))
