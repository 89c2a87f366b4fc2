"""direct: users in pairs, each sending to its partner.

``rate > 0``: open loop at that total offered rate. ``rate == 0``: closed loop, each sender
keeping at most ``window`` messages in flight (sent, not yet received by the partner).
Latency is from send to receipt by the partner.
"""

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


def needs(p: Params) -> Needs:
    n = max(2, p.n - p.n % 2)
    return Needs(users=n, pairs=n // 2)


async def drive(run: Run) -> dict[str, Any]:
    coordinator, p = run.coordinator, run.params
    await coordinator.gather("connected")
    mode = f"{p.rate:g} msg/s" if p.rate else f"max (window {p.window})"
    run.progress(f"direct: {p.n} users, {mode}, {p.duration_s}s")
    server_cpu = run.server_cpu()
    coordinator.start_cpu()
    start = time.monotonic() + 0.1
    coordinator.release("connected", start)
    await coordinator.gather("sent")
    cpu = server_cpu.read()
    gen = coordinator.read_cpu()
    coordinator.release("sent")
    results = await coordinator.results()
    latencies = [x for r in results for x in r["latencies"]]
    times = [x for r in results for x in r["times"]]
    run.extra["latencies"] = latencies
    sent = sum(r["sent"] for r in results)
    received = len(latencies)
    in_window = sum(1 for t in times if t <= start + p.duration_s)
    return {
        "users": p.n,
        "offered_per_s": p.rate or None,
        "window": None if p.rate else p.window,
        "duration_s": p.duration_s,
        "sent": sent,
        "acked": sum(r["acked"] for r in results),
        "delivered": received,
        "delivered_per_s": round(in_window / p.duration_s, 1),
        "loss": sent - received - sum(r["errors"] for r in results),
        "duplicates": sum(r["dups"] for r in results),
        "order_violations": sum(r["order"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "error_samples": [e for r in results for e in r["error_samples"]][:5],
        "latency": latency_summary(latencies),
        "delivered_per_s_timeline": [2 * c for c in timeline(times, start, 0.5)],
        "server_cpu": cpu,
        **gen,
    }


class Pairs:
    """Shard state: pairs (2i, 2i+1) of local clients sending to each other."""

    def __init__(self, spec: ShardSpec) -> None:
        p = spec.params
        self.rate = float(p["rate"]) * len(spec.accounts) / int(p["n"])
        self.window = int(p["window"])
        self.directs: list[int] = spec.plan["directs"]
        self.first = spec.first
        self.clients = [
            Client(spec.first + i, a, self.on_frame) for i, a in enumerate(spec.accounts)
        ]
        self.in_flight = [0] * len(self.clients)
        self.counter = [0] * len(self.clients)
        self.seen: set[tuple[int, int]] = set()
        self.last_seq: dict[tuple[int, int], int] = {}
        self.latencies: list[float] = []
        self.times: list[float] = []
        self.dups = self.order = self.acked = self.sent = 0
        self.queue: list[int] = []  # local indexes with a send due (closed loop)
        self.wake = asyncio.Event()
        self.sending = True

    def conv(self, local: int) -> int:
        return self.directs[(self.first + local) // 2]

    def on_frame(self, client: Client, frame: In, now: float) -> None:
        if frame.type == "sent":
            self.acked += 1
            return
        if frame.type != "msg" or frame.kind != "text" or frame.sender == client.account.user_id:
            return
        key = (frame.conv, frame.seq)
        if key in self.seen:
            self.dups += 1
            return
        self.seen.add(key)
        last_key = (client.index, frame.conv)
        if frame.seq < self.last_seq.get(last_key, 0):
            self.order += 1
        self.last_seq[last_key] = max(frame.seq, self.last_seq.get(last_key, 0))
        self.latencies.append(now - sent_at(frame.body))
        self.times.append(now)
        sender = (client.index - self.first) ^ 1
        self.in_flight[sender] -= 1
        if not self.rate and self.sending:
            self.queue.append(sender)
            self.wake.set()

    def send(self, local: int) -> None:
        self.counter[local] += 1
        self.in_flight[local] += 1
        self.sent += 1
        client = self.clients[local]
        client.send(self.conv(local), f"{client.index}-{self.counter[local]}", stamp())

    async def closed_loop(self, until: float) -> None:
        for local in range(len(self.clients)):
            for _ in range(self.window):
                self.send(local)
        while time.monotonic() < until:
            self.wake.clear()
            with_timeout = asyncio.wait_for(self.wake.wait(), max(0.0, until - time.monotonic()))
            try:
                await with_timeout
            except TimeoutError:
                break
            queue, self.queue = self.queue, []
            for local in queue:
                if self.in_flight[local] < self.window:
                    self.send(local)

    async def open_loop(self, start: float, until: float) -> None:
        turn = 0
        while (now := time.monotonic()) < until:
            due = int(self.rate * (now - start)) - self.sent
            for _ in range(max(0, due)):
                self.send(turn)
                turn = (turn + 1) % len(self.clients)
            await asyncio.sleep(0.002)


async def shard(spec: ShardSpec, link: Link) -> dict[str, Any]:
    state = Pairs(spec)
    duration = float(spec.params["duration_s"])
    await connect_all(state.clients)
    background = Background(state.clients)
    background.start()
    start: float = await link.sync("connected")
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    if state.rate:
        await state.open_loop(start, start + duration)
    else:
        await state.closed_loop(start + duration)
    state.sending = False
    await link.sync("sent")
    await wait_until(lambda: len(state.latencies) + state.dups >= state.sent, 10.0)
    await wait_until(lambda: state.acked >= state.sent, 2.0)
    background.stop()
    for client in state.clients:
        await client.close()
    errors = [e for c in state.clients for e in c.errors]
    return {
        "sent": state.sent,
        "acked": state.acked,
        "latencies": state.latencies,
        "times": state.times,
        "dups": state.dups,
        "order": state.order + sum(c.inbox_gaps for c in state.clients),
        "errors": len(errors),
        "error_samples": errors[:5],
    }


SCENARIO = Scenario("direct", needs, drive, shard)
