"""`pigeon bench`: run scenarios point by point, print one JSON line each, append to JSONL.

Each point gets a fresh deployment: a data dir, accounts seeded into it, and a `pigeon
serve` subprocess with raised limits (or, with ``--url``, the given gateways, seeded over
HTTP; clients are spread over the URLs round-robin).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pigeon.bench.generator import Coordinator, ShardSpec
from pigeon.bench.metrics import machine_info, raise_nofile, speed_probe
from pigeon.bench.scenarios import SCENARIOS, Params, Run
from pigeon.bench.scenarios.base import split
from pigeon.bench.summary import summarize
from pigeon.bench.target import (
    ClusterTarget,
    ServerProcess,
    seed_http,
    seed_postgres,
    seed_store,
    temp_data_dir,
)

#: Connections one generator process holds at most (the open-file limit is per process).
CONNS_PER_PROC = 15_000
#: A point whose generator saturated is run again with twice the processes, up to this.
MAX_AUTO_PROCS = 8

FULL: dict[str, list[Params]] = {
    "idle": [Params(n=n, hold_s=30.0) for n in (1000, 5000, 10000)],
    "direct": [Params(n=200, rate=r) for r in (500.0, 2000.0, 5000.0, 0.0)],
    "fanout": [Params(members=m) for m in (100, 1000)],
    "offline": [Params(count=k) for k in (1000, 100_000)],
    "storm": [Params(n=5000)],
}

SMOKE: dict[str, list[Params]] = {
    "idle": [Params(n=20, hold_s=0.5)],
    "direct": [Params(n=10, rate=r, duration_s=1.0) for r in (200.0, 0.0)],
    "fanout": [Params(members=10, paced=5, burst=5)],
    "offline": [Params(count=50)],
    "storm": [Params(n=20)],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    p.add_argument("--n", type=int, action="append", help="connections/users (repeatable)")
    p.add_argument("--rate", type=float, action="append", help="offered msg/s; 0 = max")
    p.add_argument("--members", type=int, action="append", help="fanout group size")
    p.add_argument("--count", type=int, action="append", help="offline: messages")
    p.add_argument("--duration", type=float, help="direct: seconds of load (20)")
    p.add_argument("--hold", type=float, help="idle: seconds held open (30)")
    p.add_argument("--window", type=int, help="direct max: in flight per sender (10)")
    p.add_argument("--procs", type=int, help="generator processes (default: auto)")
    p.add_argument("--url", action="append", help="target these gateways (repeatable)")
    p.add_argument(
        "--server-pid", type=int, action="append", help="with --url: measure these processes"
    )
    p.add_argument(
        "--cluster", type=_cluster_size, metavar="G,W",
        help="start a LocalCluster per point: G gateways + W workers, durable PostgreSQL, Redis",
    )  # fmt: skip
    p.add_argument("--results", default="bench-results/results.jsonl", help="JSONL to append")
    p.add_argument("--plots", help="write PNG plots into this directory")
    p.add_argument("--label", default="", help="free text stored in each record")
    p.add_argument(
        "--repeat", type=_positive, default=1, metavar="K",
        help="run each point K times, then write a summary (median, min, max)",
    )  # fmt: skip
    p.add_argument("--keep-data", action="store_true", help="keep the temp data dirs")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _cluster_size(text: str) -> tuple[int, int]:
    try:
        gateways, workers = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected G,W, e.g. 2,2") from None
    if gateways < 1 or workers < 0:
        raise argparse.ArgumentTypeError("need at least one gateway")
    return gateways, workers


def pigeon_env() -> dict[str, str]:
    """The PIGEON_* settings of this environment (every server process inherits them)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("PIGEON_")}


def git_state() -> dict[str, Any]:
    """The commit measured, and the files that differed from it (the working tree runs)."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
            text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"], cwd=root,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.split("\n")  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head, "dirty": [line[3:] for line in dirty if line.strip()]}


def points(args: argparse.Namespace, name: str) -> list[Params]:
    base = (SMOKE if args.smoke else FULL)[name]
    sweeps: dict[str, list[Any] | None] = {
        "idle": args.n, "direct": args.rate, "fanout": args.members,
        "offline": args.count, "storm": args.n,
    }  # fmt: skip
    field = {"idle": "n", "direct": "rate", "fanout": "members", "offline": "count", "storm": "n"}
    values = sweeps[name]
    chosen = [replace(base[0], **{field[name]: v}) for v in values] if values else base
    out = []
    for params in chosen:
        if args.duration is not None:
            params = replace(params, duration_s=args.duration)
        if args.hold is not None:
            params = replace(params, hold_s=args.hold)
        if args.window is not None:
            params = replace(params, window=args.window)
        if name == "direct" and args.n:
            params = replace(params, n=args.n[0])
        auto = max(1, math.ceil(max(params.n, params.members) / CONNS_PER_PROC))
        out.append(replace(params, procs=args.procs or auto))
    return out


def _progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def run_point(
    name: str, params: Params, urls: list[str] | None, server_pids: list[int] | None = None,
    keep_data: bool = False, cluster: tuple[int, int] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """One point: (the record, extra samples for plots)."""
    scenario = SCENARIOS[name]
    needs = scenario.needs(params)
    data_dir = temp_data_dir()
    server: ServerProcess | None = None
    target: ClusterTarget | None = None
    services: dict[str, int] = {}
    pids = list(server_pids or [])
    probe = speed_probe(data_dir)  # before anything of the point runs
    started = time.time()
    try:
        if cluster:
            _progress(f"{name}: starting a cluster of {cluster[0]} gateways + {cluster[1]} workers")
            target = ClusterTarget(data_dir / "cluster", *cluster)
            await target.start()
            urls = target.urls
            _progress(f"{name}: seeding {needs.users} accounts into PostgreSQL")
            population = await seed_postgres(target.cluster.store_url, needs, urls)
            pids, services = target.pids, target.services
            description = (
                f"cluster: {cluster[0]} gateways + {cluster[1]} workers, "
                "PostgreSQL (durable) + Redis"
            )
        elif urls:
            _progress(f"{name}: seeding {needs.users} accounts over HTTP")
            population = await seed_http(urls, needs)
            description = "urls"
        else:
            _progress(f"{name}: seeding {needs.users} accounts into {data_dir}")
            server = ServerProcess(data_dir)
            population = await seed_store(data_dir, needs, [server.url])
            server.start()
            pids = [server.pid]
            urls = [server.url]
            description = "embedded (one server and its send writer, SQLite)"
        procs = 1 if scenario.single_shard else params.procs
        plan = {"directs": population.directs, "groups": population.groups}
        specs = [
            ShardSpec(name, i, procs, asdict(params), population.accounts[a:b], a, plan)
            for i, (a, b) in enumerate(split(len(population.accounts), procs))
        ]
        coordinator = Coordinator(specs)
        try:
            run = Run(params, population, coordinator, pids, _progress, services=services)
            result = await scenario.drive(run)
        finally:
            coordinator.close()
        if server:
            exit_code = server.stop()
        elif target:
            exit_code = await target.stop()
            target = None
        else:
            exit_code = None
        record: dict[str, Any] = {
            "scenario": name,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "elapsed_s": round(time.time() - started, 1),
            "target": description,
            "urls": urls,
            "params": asdict(params),
            **result,
            "server_procs": len(pids),
            "services_cpu": run.services_cpu,
            "server_exit": exit_code,
            "pigeon_env": pigeon_env(),
            "git": git_state(),
            "machine": {**machine_info(), "speed_probe": probe},
        }
        return record, run.extra
    finally:
        if server is not None:
            server.stop()
            if server.proc is not None and server.proc.returncode not in (0, None, -15):
                _progress(f"server exited {server.proc.returncode}: {server.log_tail()}")
        if target is not None:
            await target.stop()
        if not keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)


def _write(record: dict[str, Any], results: Path) -> None:
    line = json.dumps(record, separators=(",", ":"))
    print(line, flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as fh:
        fh.write(line + "\n")


def more_procs(record: dict[str, Any], params: Params, fixed: bool, single: bool) -> int | None:
    """How many generator processes to run a point with again, if its generator may have
    limited it (a process at >= 90 % of a core) and the count is ours to choose."""
    if fixed or single or not record.get("generator_saturated"):
        return None
    if params.procs >= MAX_AUTO_PROCS:
        return None
    return min(params.procs * 2, MAX_AUTO_PROCS)


async def _run_unsaturated(
    args: argparse.Namespace, name: str, params: Params
) -> tuple[dict[str, Any], dict[str, Any], Params]:
    """Run a point, again with more generator processes while one saturates; return the
    last run's record and samples, and the parameters it ran with (for the repeats)."""
    saturated_with: list[int] = []
    while True:
        record, extra = await run_point(
            name, params, args.url, args.server_pid, args.keep_data, args.cluster
        )
        single = SCENARIOS[name].single_shard
        procs = more_procs(record, params, args.procs is not None, single)
        if procs is None:
            break
        _progress(f"{name}: a generator process saturated; again with {procs}")
        saturated_with.append(params.procs)
        params = replace(params, procs=procs)
    if saturated_with:  # the figure is the last run's; say it took more processes
        record["generator_saturated_with_procs"] = saturated_with
    return record, extra, params


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    raise_nofile()
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    records = []
    for name in names:
        for params in points(args, name):
            runs: list[dict[str, Any]] = []
            for _ in range(args.repeat):
                record, extra, params = await _run_unsaturated(args, name, params)
                if args.label:
                    record["label"] = args.label
                _write(record, Path(args.results))
                runs.append(record)
                if args.plots:
                    from pigeon.bench.plots import plot_point

                    for path in plot_point(record, extra, Path(args.plots)):
                        _progress(f"plot: {path}")
            records += runs
            if len(runs) > 1:
                summary = summarize(runs)
                if args.label:
                    summary["label"] = args.label
                _write(summary, Path(args.results))
    return records


def main(args: argparse.Namespace) -> int:
    if args.plots:
        from pigeon.bench.plots import require_matplotlib

        require_matplotlib()
    try:
        import uvloop

        records = uvloop.run(run(args))
    except ImportError:
        records = asyncio.run(run(args))
    bad = [r for r in records if r.get("loss") or r.get("duplicates") or r.get("order_violations")]
    return 1 if bad else 0
