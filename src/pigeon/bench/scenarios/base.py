"""What a scenario is: the accounts it needs, a parent-side driver and a shard-side load."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pigeon.bench.generator import Coordinator, Link, ShardSpec
from pigeon.bench.metrics import CpuMeter, rss_bytes
from pigeon.bench.target import Needs, Population


@dataclass
class Params:
    n: int = 200  # connections / users
    rate: float = 0.0  # offered msg/s; 0 = closed-loop max
    duration_s: float = 20.0
    members: int = 100
    count: int = 1000  # messages (offline)
    paced: int = 50
    burst: int = 50
    hold_s: float = 10.0
    window: int = 10  # in flight per sender (closed loop)
    procs: int = 1  # generator processes


@dataclass
class Run:
    """Parent-side context of one point."""

    params: Params
    population: Population
    coordinator: Coordinator
    server_pid: int | None
    progress: Callable[[str], None]
    extra: dict[str, Any] = field(default_factory=dict)  # samples for plots, not recorded

    def server_cpu(self) -> CpuMeter:
        meter = CpuMeter([self.server_pid] if self.server_pid else [])
        meter.start()
        return meter

    def server_rss(self) -> int:
        return rss_bytes(self.server_pid) if self.server_pid else 0


@dataclass(frozen=True)
class Scenario:
    name: str
    needs: Callable[[Params], Needs]
    drive: Callable[[Run], Awaitable[dict[str, Any]]]
    shard: Callable[[ShardSpec, Link], Awaitable[dict[str, Any]]]
    single_shard: bool = False


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """(start, stop) ranges of accounts per shard, boundaries even (pairs stay together)."""
    parts = max(1, min(parts, max(1, total // 2)))
    bounds = [round(total * i / parts / 2) * 2 for i in range(parts)] + [total]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


async def wait_until(check: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
