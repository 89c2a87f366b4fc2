"""idle: N authenticated connections held open, heartbeats on.

Figures: server RSS per connection (delta over N), connect rate, server CPU while idle.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pigeon.bench.generator import Background, Client, Link, ShardSpec, connect_all
from pigeon.bench.scenarios.base import Params, Run, Scenario
from pigeon.bench.target import Needs


def needs(p: Params) -> Needs:
    return Needs(users=p.n)


async def drive(run: Run) -> dict[str, Any]:
    coordinator, p = run.coordinator, run.params
    await coordinator.gather("ready")
    rss_before = run.server_rss()
    run.progress(f"idle: connecting {p.n}")
    coordinator.release("ready")
    infos = await coordinator.gather("connected")
    start = min(i["t0"] for i in infos)
    end = max(i["t1"] for i in infos)
    await asyncio.sleep(2.0)  # let the server settle (presence, replay tasks finish)
    rss_after = run.server_rss()
    run.progress(f"idle: holding {p.n} for {p.hold_s}s")
    server_cpu = run.server_cpu()
    coordinator.start_cpu()
    await asyncio.sleep(p.hold_s)
    idle_cpu = server_cpu.read()
    gen = coordinator.read_cpu()
    coordinator.release("connected")
    results = await coordinator.results()
    dropped = sum(r["dropped"] for r in results)
    failed = sum(r["connect_failed"] for r in results)
    held = p.n - failed - dropped
    return {
        "connections": p.n,
        "connect_failed": failed,
        "connect_failure_samples": sorted(
            {s for r in results for s in r["connect_failure_samples"]}
        )[:5],
        "held": held,
        "connect_s": round(end - start, 3),
        "connect_per_s": round(p.n / (end - start), 1) if end > start else 0.0,
        "server_rss_before_mib": round(rss_before / 2**20, 1),
        "server_rss_after_mib": round(rss_after / 2**20, 1),
        "kib_per_connection": round((rss_after - rss_before) / 1024 / max(1, p.n - failed), 2),
        "hold_s": p.hold_s,
        "server_cpu_idle": idle_cpu,
        "dropped": dropped,
        "errors": sum(r["errors"] for r in results) + failed,
        "loss": 0,
        "duplicates": 0,
        "order_violations": sum(r["inbox_gaps"] for r in results),
        **gen,
    }


def _ignore(client: Client, frame: Any, now: float) -> None:
    pass


async def shard(spec: ShardSpec, link: Link) -> dict[str, Any]:
    clients = [Client(spec.first + i, a, _ignore) for i, a in enumerate(spec.accounts)]
    await link.sync("ready")
    # Pings run from the start: a big connect phase outlasts the server's 2x heartbeat.
    background = Background(clients, ping_s=float(spec.params.get("ping_s", 15.0)))
    background.start()
    t0 = time.monotonic()
    failures = await connect_all(clients, tolerate=True)
    t1 = time.monotonic()
    await link.sync("connected", {"t0": t0, "t1": t1, "failed": len(failures)})
    background.stop()
    dropped = sum(1 for c in clients if c.closed)
    for client in clients:
        await client.close()
    return {
        "dropped": dropped - len(failures),
        "connect_failed": len(failures),
        "connect_failure_samples": sorted(set(failures))[:5],
        "errors": sum(len(c.errors) for c in clients),
        "inbox_gaps": sum(c.inbox_gaps for c in clients),
    }


SCENARIO = Scenario("idle", needs, drive, shard)
