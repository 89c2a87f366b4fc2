"""storm: N connected clients (in pairs) each send one message to their partner and drop
at once, before the `sent` answer; then all reconnect at once, resume, and resend what was
not answered (same client_id: the server must dedup). Figures: time until all have resumed
(caught up), time until every partner has its message, loss, duplicates."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pigeon.bench.generator import Client, In, Link, ShardSpec, connect_all, stamp
from pigeon.bench.scenarios.base import Params, Run, Scenario, wait_until
from pigeon.bench.target import Needs


def needs(p: Params) -> Needs:
    n = max(2, p.n - p.n % 2)
    return Needs(users=n, pairs=n // 2)


async def drive(run: Run) -> dict[str, Any]:
    coordinator, p = run.coordinator, run.params
    await coordinator.gather("connected")
    run.progress(f"storm: {p.n} clients drop")
    coordinator.release("connected")
    await coordinator.gather("dropped")
    run.progress(f"storm: {p.n} clients reconnect")
    server_cpu = run.server_cpu()
    coordinator.start_cpu()
    t0 = time.monotonic() + 0.05
    coordinator.release("dropped", t0)
    done = await coordinator.gather("done")
    cpu = server_cpu.read()
    gen = coordinator.read_cpu()
    coordinator.release("done")
    results = await coordinator.results()
    return {
        "clients": p.n,
        "all_resumed_s": round(max(d["resumed"] for d in done) - t0, 3),
        "all_delivered_s": round(max(d["delivered"] for d in done) - t0, 3),
        "connect_retries": sum(r["retries"] for r in results),
        "received_before_drop": sum(r["before"] for r in results),
        "loss": sum(r["loss"] for r in results),
        "duplicates": sum(r["dups"] for r in results),
        "order_violations": sum(r["order"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "server_cpu": cpu,
        **gen,
    }


class Storm:
    def __init__(self, spec: ShardSpec) -> None:
        self.directs: list[int] = spec.plan["directs"]
        self.clients = [
            Client(spec.first + i, a, self.on_frame) for i, a in enumerate(spec.accounts)
        ]
        self.answered = [False] * len(self.clients)
        self.got = [0] * len(self.clients)  # partner messages received
        self.first = spec.first
        self.dups = self.retries = 0

    def on_frame(self, client: Client, frame: In, now: float) -> None:
        local = client.index - self.first
        if frame.type == "sent":
            self.answered[local] = True
        elif (
            frame.type == "msg" and frame.kind == "text" and frame.sender != client.account.user_id
        ):
            self.got[local] += 1
            if self.got[local] > 1:
                self.dups += 1

    def send(self, local: int) -> None:
        client = self.clients[local]
        conv = self.directs[client.index // 2]
        client.send(conv, f"storm-{client.index}", stamp())

    async def reconnect(self, client: Client) -> float:
        for attempt in range(20):
            try:
                await client.connect(resume=True)
                await asyncio.wait_for(client.caught_up.wait(), 60)
                break
            except (OSError, TimeoutError):
                self.retries += 1
                await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
        resumed = time.monotonic()
        local = client.index - self.first
        if not self.answered[local]:
            self.send(local)  # the retry: same client_id
        return resumed


async def shard(spec: ShardSpec, link: Link) -> dict[str, Any]:
    state = Storm(spec)
    clients = state.clients
    await connect_all(clients)
    await link.sync("connected")
    for local in range(len(clients)):
        state.send(local)
    for client in clients:
        client.drop()
    for client in clients:
        await client.wait_closed()
    before = sum(state.got)
    t0: float = await link.sync("dropped")
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    resumed = await asyncio.gather(*(state.reconnect(c) for c in clients))
    await wait_until(lambda: all(state.got), 60.0)
    delivered = time.monotonic()
    await asyncio.sleep(0.2)  # a late duplicate would show here
    await link.sync("done", {"resumed": max(resumed), "delivered": delivered})
    for client in clients:
        await client.close()
    return {
        "before": before,
        "retries": state.retries,
        "loss": sum(1 for g in state.got if g == 0),
        "dups": state.dups,
        "order": sum(c.inbox_gaps for c in clients),
        "errors": sum(len(c.errors) for c in clients),
    }


SCENARIO = Scenario("storm", needs, drive, shard)
