"""Failure tests on a real cluster: kill -9 and SIGTERM processes, restart Redis, take
PostgreSQL away, while several SDK clients on several gateways exchange 1:1 and group
messages. The checker (tests/failure/checker.py) then proves nothing acknowledged was lost,
nothing was duplicated or reordered, and every device saw its conversations' history.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import asyncpg

from pigeon.bus.base import BusUnavailable
from pigeon.bus.redis import RedisBus
from pigeon.client import Client, ErrorEvent, MessageEvent
from pigeon.devcluster.cluster import LocalCluster, Member
from tests.failure.checker import CLIENT_OPTIONS, Traffic, World, build_world, finish
from tests.failure.conftest import StartCluster
from tests.support import Api, RawSocket, connect, eventually


async def test_kill_9_gateway_clients_move_and_resume(
    cluster: LocalCluster, session: aiohttp.ClientSession
) -> None:
    world = await build_world(cluster.urls, session)
    traffic = Traffic(world.devices)
    try:
        traffic.start()
        await world.checker.wait_sends(40)
        victims = world.homed_on(0)
        # sends on their way through the gateway as it dies: retried elsewhere, same client_id
        in_flight = [
            asyncio.create_task(d.send(world.group, f"{d.name}-at-kill-{n}", "at the kill"))
            for d in victims
            for n in range(3)
        ]
        await asyncio.sleep(0)  # let them reach their sockets
        await cluster.signal(cluster.gateway_members[0], signal.SIGKILL)
        # every client of the dead gateway reconnects to another one and resumes there
        await world.checker.changed.until(
            lambda: all(d.connects >= 2 and d.connected for d in victims),
            20,
            "the dead gateway's clients to reconnect",
        )
        assert all(d.connects == 1 and not d.disconnects for d in world.devices if d not in victims)
        async with asyncio.timeout(20):
            records = await asyncio.gather(*in_flight)
        by_name = {d.name: d for d in victims}
        retried = [r for r in records if r.acked > by_name[r.device].connected_at[1]]
        assert retried, "no send was in flight at the kill"  # answered on the new gateway
        sent = len(world.checker.sends)
        await world.checker.wait_sends(sent + 60)  # traffic goes on after the move
        await finish(world, traffic, cluster.urls[1], session)
        await _fill_gap_with_first_gateway_dead(cluster, world, session)
    finally:
        await traffic.cancel()
        await world.checker.close()


async def _fill_gap_with_first_gateway_dead(
    cluster: LocalCluster, world: World, session: aiohttp.ClientSession
) -> None:
    """An app that lost its messages but kept its resume position starts while its first
    gateway is dead: the SDK fills the group's missing head from another gateway's history."""
    user = world.accounts[1]
    resume_from = next(d for d in world.devices if d.user_id == user.user_id).client
    assert resume_from is not None
    fresh = await Api(session, cluster.urls[1]).login(user.username, user.password, "reinstall")
    history = [
        m.seq for m in (await world.checker.histories(cluster.urls[1], session))[world.group]
    ]
    seen: list[int] = []
    errors: list[ErrorEvent] = []
    client = Client(
        cluster.urls, fresh.token, fresh.device_id, session=session,
        resume_from=resume_from.resume_position // 2, known_positions={world.group: 0},
        **CLIENT_OPTIONS,
    )  # fmt: skip
    try:
        async with asyncio.timeout(20):
            await client.connect()
            async for event in client:
                if isinstance(event, MessageEvent) and event.conv == world.group:
                    seen.append(event.seq)
                    if len(seen) >= len(history):
                        break
                elif isinstance(event, ErrorEvent):
                    errors.append(event)
    except TimeoutError:
        raise AssertionError(f"group seqs seen: {seen[:5]}.. of {len(history)}; {errors}") from None
    finally:
        await client.close()
    assert seen == history


BIG_GROUP_SILENT = 300  # members with no device: fan-out targets only
BIG_SENDS_PER_DEVICE = 20


async def _silent_users(store_url: str, count: int) -> list[int]:
    """Users that never log in, inserted straight into PostgreSQL: registering them over
    HTTP would cost an argon2 hash each, seconds on this machine for nothing under test."""
    conn = await asyncpg.connect(store_url)
    try:
        rows = await conn.fetch(
            "INSERT INTO users (username, display_name, password_hash, created_at)"
            " SELECT 'silent' || g, 'silent ' || g, '!', extract(epoch FROM now())"
            " FROM generate_series(1, $1) AS g RETURNING id",
            count,
        )
    finally:
        await conn.close()
    return [int(r[0]) for r in rows]


def _worker_named(cluster: LocalCluster, owner: str) -> Member:
    """The worker member whose process id prefixes a fan-out lease owner (wk-xxxx-w0)."""
    process_id = owner.rpartition("-w")[0]
    for member in cluster.worker_members:
        if f"Pigeon worker {process_id} is running" in member.log.read_text(errors="replace"):
            return member
    raise AssertionError(f"no worker runs {owner}")


async def test_kill_9_worker_mid_fanout_job_is_reclaimed_once(
    start_cluster: StartCluster, session: aiohttp.ClientSession
) -> None:
    # small fan-out transactions, so a large group's backlog takes many of them
    cluster = await start_cluster(PIGEON_FANOUT_BATCH="4")
    world = await build_world(cluster.urls, session)
    traffic: Traffic | None = None
    db = await asyncpg.connect(cluster.store_url)
    try:
        silent = await _silent_users(cluster.store_url, BIG_GROUP_SILENT)
        admin = world.accounts[0]
        others = [a.user_id for a in world.accounts[1:6]]
        status, body = await Api(session, cluster.urls[0]).call(
            "POST", "/v1/conversations", admin.token,
            {"kind": "group", "title": "big", "members": others + silent},
        )  # fmt: skip
        assert status == 201, body
        big = int(body["id"])
        for device in world.devices:
            device.convs.add(big)
        traffic = Traffic(world.devices, exclude=frozenset({big}))
        traffic.start()
        await world.checker.wait_sends(20)

        # a burst into the big group from devices on every gateway
        burst = [
            asyncio.create_task(device.send(big, f"big-{device.name}-{n}", f"big {n}"))
            for n in range(BIG_SENDS_PER_DEVICE)
            for device in world.devices
        ]

        async def leased() -> str:
            owner = await db.fetchval(
                "SELECT owner FROM fanout_leases WHERE conv_id = $1 AND owner <> ''"
                " AND EXISTS (SELECT 1 FROM fanout_jobs WHERE conv_id = $1)"
                " AND EXISTS (SELECT 1 FROM inbox WHERE conv_id = $1 AND msg_seq IS NOT NULL)",
                big,
            )
            return str(owner or "")

        owner = await eventually(leased, timeout=20, interval=0.01)  # fan-out under way
        victim = _worker_named(cluster, owner)
        await cluster.signal(victim, signal.SIGKILL)
        left = await db.fetchval("SELECT count(*) FROM fanout_jobs WHERE conv_id = $1", big)
        assert left > 0, "the fan-out finished before the kill: nothing to reclaim"
        print(f"killed {victim.name} holding {owner}: {left} messages left to fan out")

        async with asyncio.timeout(30):
            await asyncio.gather(*burst)

        async def drained() -> bool:
            return not await db.fetchval(
                "SELECT EXISTS (SELECT 1 FROM fanout_jobs WHERE conv_id = $1)", big
            )

        await eventually(drained, timeout=30)
        # exactly once: one inbox entry per member per message, in seq order in each inbox
        messages = await db.fetchval("SELECT last_seq FROM conversations WHERE id = $1", big)
        members = await db.fetchval("SELECT count(*) FROM members WHERE conv_id = $1", big)
        assert members == BIG_GROUP_SILENT + 6
        assert messages >= BIG_SENDS_PER_DEVICE * len(world.devices)
        doubled = await db.fetch(
            "SELECT user_id, msg_seq, count(*) FROM inbox WHERE conv_id = $1"
            " AND msg_seq IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1 LIMIT 10",
            big,
        )
        assert not doubled, f"inbox entries written twice: {doubled}"
        entries = await db.fetchval(
            "SELECT count(*) FROM inbox WHERE conv_id = $1 AND msg_seq IS NOT NULL", big
        )
        assert entries == members * messages
        disordered = await db.fetch(
            "SELECT user_id FROM (SELECT user_id, msg_seq, lag(msg_seq) OVER"
            " (PARTITION BY user_id ORDER BY inbox_seq) AS prev FROM inbox"
            " WHERE conv_id = $1 AND msg_seq IS NOT NULL) t WHERE prev >= msg_seq LIMIT 10",
            big,
        )
        assert not disordered, f"inboxes out of seq order: {disordered}"
        # and every connected device, on every gateway, saw the big group complete
        await finish(world, traffic, cluster.urls[0], session)
    finally:
        await db.close()
        if traffic is not None:
            await traffic.cancel()
        await world.checker.close()


async def test_redis_restart_presence_rebuilt_pushes_resume(
    cluster: LocalCluster, session: aiohttp.ClientSession
) -> None:
    world = await build_world(cluster.urls, session)
    traffic = Traffic(world.devices)
    assert cluster.redis is not None
    bus = RedisBus(cluster.redis.url)
    users = sorted({d.user_id for d in world.devices})

    async def everyone_online() -> bool:
        try:
            return all(state.online for state in await bus.presence(users))
        except BusUnavailable:
            return False

    try:
        await bus.open()
        await eventually(everyone_online, timeout=10)  # registered after each welcome
        traffic.start()
        await world.checker.wait_sends(40)
        await cluster.restart_redis()  # a new, empty Redis on the same port
        # nobody reconnects: the gateways' heartbeat sweeps register their devices again
        await eventually(everyone_online, timeout=15)
        sent = len(world.checker.sends)
        await world.checker.wait_sends(sent + 60)
        await finish(world, traffic, cluster.urls[0], session)
        # every delivery came over the sockets opened at the start: pushes resumed
        assert all(d.connects == 1 and not d.disconnects for d in world.devices)
    finally:
        await traffic.cancel()
        await world.checker.close()
        await bus.close()


OUTAGE_S = 2.0  # how long PostgreSQL stays down once the outage has been seen


async def _send_raw(sock: RawSocket, conv: int, client_id: str, body: str) -> dict[str, Any]:
    """One raw `send`; return its answer (`sent` or `error`)."""
    await sock.send({"type": "send", "conv": conv, "client_id": client_id, "body": body})
    return await sock.expect(
        lambda fr: (
            (fr.get("type") == "sent" and fr.get("client_id") == client_id)
            or (fr.get("type") == "error" and fr.get("ref") == client_id)
        )
    )


async def test_postgres_outage_retryable_errors_then_every_message_once(
    cluster: LocalCluster, session: aiohttp.ClientSession
) -> None:
    world = await build_world(cluster.urls, session)
    traffic = Traffic(world.devices)
    api = Api(session, cluster.urls[2])
    probe = await api.account("probe")
    status, body = await api.call(
        "POST", f"/v1/conversations/{world.group}/members", world.accounts[0].token,
        {"users": [probe.user_id]},
    )  # fmt: skip
    assert status in (200, 201), body
    sock, _ = await connect(session, cluster.urls[2], probe)
    loop = asyncio.get_running_loop()
    try:
        traffic.start()
        await world.checker.wait_sends(40)
        await cluster.stop_postgres()
        down_at = loop.time()
        # a raw socket sees the typed, retryable error (a first attempt may race the
        # pool noticing the outage; the same frame is sent again)
        codes: list[str] = []
        async with asyncio.timeout(15):
            while "unavailable" not in codes:
                answer = await _send_raw(sock, world.group, "probe-1", "sent into an outage")
                assert answer["type"] == "error", f"accepted while PostgreSQL is down: {answer}"
                codes.append(answer["code"])
                if answer["code"] == "unavailable":
                    assert answer["retryable"] is True, answer
                else:
                    await asyncio.sleep(0.1)  # retry pacing
        await asyncio.sleep(OUTAGE_S)  # the outage lasts; the SDK clients keep retrying
        up_at = loop.time()  # nothing may be acknowledged before this
        await cluster.start_postgres()
        # the same client_id, again, until it is accepted: one message
        async with asyncio.timeout(20):
            while (answer := await _send_raw(sock, world.group, "probe-1", "sent into an outage"))[
                "type"
            ] != "sent":
                assert answer["code"] == "unavailable", answer
                await asyncio.sleep(0.1)  # retry pacing
        world.checker.record_raw_send(world.group, "probe-1", "sent into an outage", answer["seq"])
        sent = len(world.checker.sends)
        await world.checker.wait_sends(sent + 60)
        await finish(world, traffic, cluster.urls[0], session)
        # the SDK retried through the outage: sends in flight while it was down got their
        # seq after it, and none was acknowledged while it was down. (Not "sends begun
        # during the outage": when stopping PostgreSQL is slow, every device's few slots
        # are taken by sends begun before `down_at`, and none can begin until it is back.)
        sends = list(world.checker.sends.values())
        through = [r for r in sends if r.started < up_at < r.acked]
        assert through, "no SDK send was in flight during the outage"
        early = [r for r in sends if down_at < r.acked < up_at]
        assert not early, f"acknowledged while PostgreSQL was down: {early}"
        print(f"probe errors before recovery: {codes}; {len(through)} SDK sends waited it out")
    finally:
        await sock.close()
        await traffic.cancel()
        await world.checker.close()


async def test_rolling_sigterm_restart_clients_move_without_loss(
    cluster: LocalCluster, session: aiohttp.ClientSession
) -> None:
    world = await build_world(cluster.urls, session)
    traffic = Traffic(world.devices)
    checker = world.checker
    try:
        traffic.start()
        await checker.wait_sends(30)
        for member in cluster.gateway_members:
            moved = sum(len(d.disconnects) for d in world.devices)
            assert await cluster.signal(member, signal.SIGTERM) == 0  # drained, clean exit
            await cluster.start_member(member)
            await checker.wait_connected(world.devices)
            assert sum(len(d.disconnects) for d in world.devices) > moved, member.name
            sent = len(checker.sends)
            await checker.wait_sends(sent + 30)  # traffic flows before the next one goes
        await finish(world, traffic, cluster.urls[0], session)
        # every device was moved at least once, each time by a "going away" close
        for device in world.devices:
            assert device.disconnects, device.name
            assert set(device.disconnects) == {"closed 1001"}, (device.name, device.disconnects)
    finally:
        await traffic.cancel()
        await world.checker.close()
