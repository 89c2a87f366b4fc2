"""A real local cluster per test: PostgreSQL, Redis, 3 gateway and 2 worker processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from pigeon.devcluster.cluster import LocalCluster
from pigeon.devcluster.services import ServiceUnavailable

#: Every process of the cluster gets these (see pigeon.config).
CLUSTER_ENV = {
    "PIGEON_FANOUT_LEASE_S": "2",  # a dead worker's conversations are reclaimed after 2 s
    "PIGEON_SENDS_PER_SECOND": "10000",
    "PIGEON_SEND_BURST": "10000",
    "PIGEON_FRAMES_PER_SECOND": "10000",
    "PIGEON_FRAME_BURST": "10000",
    "PIGEON_HEARTBEAT_S": "3",  # presence is renewed every 1.5 s
    "PIGEON_PRESENCE_TTL_S": "6",
    "PIGEON_SHUTDOWN_GRACE_S": "3",
}

StartCluster = Callable[..., Awaitable[LocalCluster]]


@pytest.fixture
async def start_cluster(tmp_path: Path) -> AsyncIterator[StartCluster]:
    """Start a cluster (``env`` adds or overrides settings); every one started is stopped
    at teardown, whatever the test did to it."""
    started: list[LocalCluster] = []

    async def start(gateways: int = 3, workers: int = 2, **env: str) -> LocalCluster:
        cluster = LocalCluster(
            tmp_path / f"cluster{len(started)}",
            gateways=gateways,
            workers=workers,
            durable=False,
            env={**CLUSTER_ENV, **env},
        )
        started.append(cluster)
        try:
            await cluster.start()
        except ServiceUnavailable as exc:
            pytest.skip(f"cannot start the cluster's services: {exc}")
        return cluster

    try:
        yield start
    finally:
        for cluster in started:
            await cluster.stop()


@pytest.fixture
async def cluster(start_cluster: StartCluster) -> LocalCluster:
    return await start_cluster()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http
