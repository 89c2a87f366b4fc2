"""Failure tests on a real cluster: kill -9 and SIGTERM processes, restart Redis, take
PostgreSQL away, while several SDK clients on several gateways exchange 1:1 and group
messages. The checker (tests/failure/checker.py) then proves nothing acknowledged was lost,
nothing was duplicated or reordered, and every device saw its conversations' history.
"""

from __future__ import annotations

import signal

import aiohttp

from pigeon.devcluster.cluster import LocalCluster
from tests.failure.checker import Traffic, build_world, finish


async def test_kill_9_gateway_clients_move_and_resume(
    cluster: LocalCluster, session: aiohttp.ClientSession
) -> None:
    world = await build_world(cluster.urls, session)
    traffic = Traffic(world.devices)
    try:
        traffic.start()
        await world.checker.wait_sends(40)
        victims = world.homed_on(0)
        await cluster.signal(cluster.gateway_members[0], signal.SIGKILL)
        # every client of the dead gateway reconnects to another one and resumes there
        await world.checker.changed.until(
            lambda: all(d.connects >= 2 and d.connected for d in victims),
            20,
            "the dead gateway's clients to reconnect",
        )
        assert all(d.connects == 1 and not d.disconnects for d in world.devices if d not in victims)
        sent = len(world.checker.sends)
        await world.checker.wait_sends(sent + 60)  # traffic goes on after the move
        await finish(world, traffic, cluster.urls[1], session)
    finally:
        await traffic.cancel()
        await world.checker.close()
