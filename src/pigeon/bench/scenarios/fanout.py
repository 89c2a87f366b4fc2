"""fanout: one group of M members, all connected; the first member sends ``paced``
messages at 10/s, then ``burst`` back to back. Per message: time until every other member
has it. Burst: deliveries/s from the first send to the last delivery."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pigeon.bench.generator import (
    Background,
    Client,
    In,
    Link,
    ShardSpec,
    connect_all,
    sent_at,
    stamp,
)
from pigeon.bench.metrics import latency_summary, timeline
from pigeon.bench.scenarios.base import Params, Run, Scenario, wait_until
from pigeon.bench.target import Needs

PACE_S = 0.1


def needs(p: Params) -> Needs:
    return Needs(users=p.members, group_members=p.members)


def _merge(results: list[dict[str, Any]], phase: str) -> dict[str, list[float]]:
    """client_id -> [send time, last delivery time, deliveries, first delivery time] over
    all shards."""
    merged: dict[str, list[float]] = {}
    for r in results:
        for cid, (sent, last, count, first) in r[phase].items():
            entry = merged.setdefault(cid, [sent, last, 0, first])
            entry[1] = max(entry[1], last)
            entry[2] += count
            entry[3] = min(entry[3], first)
    return merged


async def drive(run: Run) -> dict[str, Any]:
    coordinator, p = run.coordinator, run.params
    await coordinator.gather("connected")
    run.progress(f"fanout: {p.members} members, {p.paced} paced at 10/s, {p.burst} burst")
    coordinator.release("connected")
    await coordinator.gather("paced")
    server_cpu = run.server_cpu()
    coordinator.start_cpu()
    coordinator.release("paced")
    await coordinator.gather("burst")
    cpu = server_cpu.read()
    gen = coordinator.read_cpu()
    coordinator.release("burst")
    results = await coordinator.results()
    others = p.members - 1
    record: dict[str, Any] = {"members": p.members, "paced": p.paced, "burst": p.burst}
    for phase, expected in (("paced_stats", p.paced), ("burst_stats", p.burst)):
        merged = _merge(results, phase)
        complete = [last - sent for sent, last, count, _ in merged.values() if count >= others]
        deliveries = sum(int(count) for _, _, count, _ in merged.values())
        name = phase.split("_")[0]
        record[name] = {
            "messages": expected,
            "all_members": latency_summary(complete),
            # the server's part shows here; all_members adds the spread over the sockets
            "first_member": latency_summary(
                [first - sent for sent, _, _, first in merged.values()]
            ),
            "deliveries": deliveries,
            "loss": expected * others - deliveries,
        }
        if merged:
            first = min(s for s, _, _, _ in merged.values())
            last = max(t for _, t, _, _ in merged.values())
            record[name]["deliveries_per_s"] = round(deliveries / max(last - first, 1e-6), 1)
        run.extra[f"{name}_latencies"] = complete
    burst_times = [t for r in results for t in r["burst_times"]]
    if burst_times:
        record["burst_deliveries_per_s_timeline"] = [
            c * 10 for c in timeline(burst_times, min(burst_times), 0.1)
        ]
    record["loss"] = record["paced"]["loss"] + record["burst"]["loss"]
    record["duplicates"] = sum(r["dups"] for r in results)
    record["order_violations"] = sum(r["order"] for r in results)
    record["errors"] = sum(r["errors"] for r in results)
    record["server_cpu_burst"] = cpu
    return {**record, **gen}


class Group:
    def __init__(self, spec: ShardSpec) -> None:
        self.conv: int = spec.plan["groups"][0]
        self.clients = [
            Client(spec.first + i, a, self.on_frame) for i, a in enumerate(spec.accounts)
        ]
        self.sender = self.clients[0] if spec.first == 0 else None
        self.receivers = len(self.clients) - (1 if self.sender else 0)
        self.phase = "paced_stats"
        self.stats: dict[str, dict[str, list[float]]] = {"paced_stats": {}, "burst_stats": {}}
        self.seen: set[tuple[int, int]] = set()
        self.last_seq: dict[int, int] = {}
        self.burst_times: list[float] = []
        self.dups = self.order = self.received = 0

    def on_frame(self, client: Client, frame: In, now: float) -> None:
        if frame.type != "msg" or frame.kind != "text" or frame.sender == client.account.user_id:
            return
        key = (client.index, frame.seq)
        if key in self.seen:
            self.dups += 1
            return
        self.seen.add(key)
        if frame.seq < self.last_seq.get(client.index, 0):
            self.order += 1
        self.last_seq[client.index] = max(frame.seq, self.last_seq.get(client.index, 0))
        phase = "burst_stats" if frame.client_id.startswith("b") else "paced_stats"
        entry = self.stats[phase].get(frame.client_id)
        if entry is None:
            entry = self.stats[phase][frame.client_id] = [sent_at(frame.body), now, 0, now]
        entry[1] = max(entry[1], now)
        entry[2] += 1
        self.received += 1
        if phase == "burst_stats":
            self.burst_times.append(now)

    async def send_paced(self, count: int) -> None:
        assert self.sender is not None
        start = time.monotonic()
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i * PACE_S - time.monotonic()))
            self.sender.send(self.conv, f"p{i}", stamp())

    async def send_burst(self, count: int) -> None:
        assert self.sender is not None
        for i in range(count):
            self.sender.send(self.conv, f"b{i}", stamp())


async def shard(spec: ShardSpec, link: Link) -> dict[str, Any]:
    group = Group(spec)
    paced, burst = int(spec.params["paced"]), int(spec.params["burst"])
    await connect_all(group.clients)
    background = Background(group.clients)
    background.start()
    await link.sync("connected")
    if group.sender:
        await group.send_paced(paced)
    await wait_until(lambda: group.received >= paced * group.receivers, 10.0 + paced * PACE_S)
    await link.sync("paced")
    if group.sender:
        await group.send_burst(burst)
    total = (paced + burst) * group.receivers
    await wait_until(lambda: group.received >= total, 30.0)
    await link.sync("burst")
    background.stop()
    for client in group.clients:
        await client.close()
    return {
        "paced_stats": group.stats["paced_stats"],
        "burst_stats": group.stats["burst_stats"],
        "burst_times": group.burst_times,
        "dups": group.dups,
        "order": group.order + sum(c.inbox_gaps for c in group.clients),
        "errors": sum(len(c.errors) for c in group.clients),
    }


SCENARIO = Scenario("fanout", needs, drive, shard)
