"""offline: B is offline, A sends K messages (all committed and fanned out), B reconnects.

Figures: time from B's reconnect (before the TCP connect) to the first and to the last of
the K messages, loss, duplicates, order violations.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pigeon.bench.generator import Client, In, Link, ShardSpec, stamp
from pigeon.bench.scenarios.base import Params, Run, Scenario, wait_until
from pigeon.bench.target import Needs

WINDOW = 200  # sends in flight from A (until `sent`)


def needs(p: Params) -> Needs:
    return Needs(users=2, pairs=1)


async def drive(run: Run) -> dict[str, Any]:
    coordinator, p = run.coordinator, run.params
    run.progress(f"offline: A sends {p.count} while B is offline")
    await coordinator.gather("stored")
    run.progress("offline: B reconnects")
    server_cpu = run.server_cpu()
    coordinator.start_cpu()
    coordinator.release("stored")
    await coordinator.gather("done")
    cpu = server_cpu.read()
    gen = coordinator.read_cpu()
    coordinator.release("done")
    (result,) = await coordinator.results()
    return {"messages": p.count, **result, "server_cpu": cpu, **gen}


class Offline:
    def __init__(self, spec: ShardSpec) -> None:
        self.conv: int = spec.plan["directs"][0]
        self.a = Client(0, spec.accounts[0], self.on_a)
        self.b = Client(1, spec.accounts[1], self.on_b)
        self.acked = self.own = self.next = 0
        self.seen: set[int] = set()
        self.last_seq = 0
        self.dups = self.order = 0
        self.first_at = self.last_at = 0.0

    def on_a(self, client: Client, frame: In, now: float) -> None:
        # A's own copy (a `msg`, or a `sent` in its place): that message is fanned out.
        if frame.type == "sent":
            self.acked += 1
            self.own += frame.inbox_seq > 0
        elif frame.type == "msg" and frame.kind == "text":
            self.own += 1

    def on_b(self, client: Client, frame: In, now: float) -> None:
        if frame.type != "msg" or frame.kind != "text":
            return
        if frame.seq in self.seen:
            self.dups += 1
            return
        if frame.seq < self.last_seq:
            self.order += 1
        self.last_seq = max(self.last_seq, frame.seq)
        self.seen.add(frame.seq)
        if len(self.seen) == 1:
            self.first_at = now
        self.last_at = now


async def shard(spec: ShardSpec, link: Link) -> dict[str, Any]:
    state = Offline(spec)
    count = int(spec.params["count"])
    for client in (state.a, state.b):
        await client.connect()
        await asyncio.wait_for(client.caught_up.wait(), 30)
    state.b.ack()
    await state.b.close()  # B goes offline
    for i in range(count):
        state.next = i
        if i - state.acked >= WINDOW:
            await wait_until(lambda: state.next - state.acked < WINDOW, 60.0, 0.001)
        state.a.send(state.conv, f"a{i}", stamp())
    await wait_until(lambda: state.own >= count, 120.0)
    await link.sync("stored")
    t0 = time.monotonic()
    await state.b.connect(resume=True)
    await wait_until(lambda: len(state.seen) >= count, 120.0, 0.001)
    caught_up = await asyncio.wait_for(state.b.caught_up.wait(), 30.0)
    t_end = time.monotonic()
    await link.sync("done")
    for client in (state.a, state.b):
        await client.close()
    return {
        "reconnect_to_first_ms": round((state.first_at - t0) * 1000, 2) if state.seen else None,
        "reconnect_to_last_ms": round((state.last_at - t0) * 1000, 2) if state.seen else None,
        "reconnect_to_caught_up_ms": round((t_end - t0) * 1000, 2) if caught_up else None,
        "received": len(state.seen),
        "loss": count - len(state.seen),
        "duplicates": state.dups,
        "order_violations": state.order + state.b.inbox_gaps,
        "errors": len(state.a.errors) + len(state.b.errors),
    }


SCENARIO = Scenario("offline", needs, drive, shard, single_shard=True)
