"""What a scenario is: the accounts it needs, a parent-side driver and a shard-side load."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pigeon.bench.generator import Coordinator, Link, ShardSpec
from pigeon.bench.metrics import CpuMeter, rss_bytes, service_pids
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
    server_pids: list[int]  # every Pigeon process (gateways and workers): summed
    progress: Callable[[str], None]
    extra: dict[str, Any] = field(default_factory=dict)  # samples for plots, not recorded
    #: Main pids of services (e.g. "postgresql", "redis"); their children count too.
    services: dict[str, int] = field(default_factory=dict)
    #: CPU of each service over the scenario's last server_cpu() window (read()).
    services_cpu: dict[str, float | None] = field(default_factory=dict)

    def server_cpu(self) -> ServerMeter:
        meter = ServerMeter(self)
        meter.start()
        return meter

    def every_server_pid(self) -> list[int]:
        """The Pigeon processes and their children (the embedded store's send writer)."""
        return [child for pid in self.server_pids for child in service_pids(pid)]

    def server_rss(self) -> int:
        """RSS summed over the Pigeon processes (gateways and workers) and their children."""
        total = 0
        for pid in self.every_server_pid():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += rss_bytes(pid)
        return total


class ServerMeter:
    """CPU of the Pigeon processes and their children (summed; 1.0 = one core), and on the
    side that of each service (PostgreSQL with all its backends, Redis), stored in
    ``run.services_cpu``."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.server = CpuMeter(run.every_server_pid())
        self.services = {name: CpuMeter(service_pids(pid)) for name, pid in run.services.items()}

    def start(self) -> None:
        self.server.start()
        for meter in self.services.values():
            meter.start()

    def read(self) -> float | None:
        self.run.services_cpu = {name: m.read() for name, m in self.services.items()}
        return self.server.read()


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
