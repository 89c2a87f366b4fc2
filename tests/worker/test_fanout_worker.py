"""The fan-out worker pushes a commit when woken, polls when nobody wakes it, and stops
when told: a real embedded store and the in-process bus."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pigeon.bus.envelope import Envelope
from pigeon.bus.memory import MemoryBus
from pigeon.bus.routing import Router
from pigeon.protocol.frames import Msg
from pigeon.store.sqlite import SqliteStore
from pigeon.worker.fanout import FanoutWorker
from tests.store.chat import DirectChat, alice_writing_to_bob

POLL_NEVER_S = 60.0  # beyond every wait below: only a wake-up can deliver in time
WAIT_S = 5.0


class Pushes:
    """What the bus hands the gateway: the client ids of the messages pushed."""

    def __init__(self) -> None:
        self.client_ids: list[str] = []
        self._changed = asyncio.Event()

    def __call__(self, envelope: Envelope) -> None:
        for target in envelope.targets:
            self.client_ids += [f.client_id for f in target.frames if isinstance(f, Msg)]
        self._changed.set()

    async def wait_for(self, client_id: str) -> None:
        async with asyncio.timeout(WAIT_S):
            while client_id not in self.client_ids:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def chat(tmp_path: Path) -> AsyncIterator[DirectChat]:
    async with alice_writing_to_bob(SqliteStore(tmp_path / "w.db", fsync=False)) as chat:
        yield chat


async def started(chat: DirectChat, pushes: Pushes, poll_s: float) -> FanoutWorker:
    bus = MemoryBus()
    await bus.subscribe("gw", pushes)
    await bus.register("gw", chat.alice.id, chat.phone.id, ttl_s=600)
    return FanoutWorker(chat.store, Router(bus), "w1", poll_s=poll_s)


class IdleWatch:
    """Tells when the worker has gone idle (waits for a wake-up or its poll)."""

    def __init__(self, worker: FanoutWorker) -> None:
        self._entered = asyncio.Event()
        idle = worker._idle

        async def watched() -> None:
            self._entered.set()
            await idle()

        worker._idle = watched  # type: ignore[method-assign]

    async def wait(self) -> None:
        """Until the worker goes idle after the previous `wait`."""
        await asyncio.wait_for(self._entered.wait(), WAIT_S)
        self._entered.clear()


@contextlib.asynccontextmanager
async def running(worker: FanoutWorker) -> AsyncIterator[None]:
    """The worker's loop as a task; stopped, and awaited, on the way out."""
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.stop()
        await asyncio.wait_for(task, WAIT_S)


async def test_a_commit_is_pushed_when_the_worker_is_woken(chat: DirectChat) -> None:
    pushes = Pushes()
    worker = await started(chat, pushes, POLL_NEVER_S)
    idle = IdleWatch(worker)
    async with running(worker):
        for i in range(3):  # each time from idle: the wake-up, not the poll, delivers
            await idle.wait()
            await chat.send(i)
            worker.wake()
            await pushes.wait_for(f"c{i}")
    assert pushes.client_ids == ["c0", "c1", "c2"]  # Alice's own inbox: each once


async def test_a_wake_up_during_a_step_is_not_lost(chat: DirectChat) -> None:
    pushes = Pushes()
    worker = await started(chat, pushes, POLL_NEVER_S)
    step = worker.step

    async def commit_during_step() -> bool:
        more = await step()
        if not pushes.client_ids:  # the first step: a send commits (and wakes) meanwhile
            await chat.send(0)
            worker.wake()
        return more

    worker.step = commit_during_step  # type: ignore[method-assign]
    async with running(worker):
        await pushes.wait_for("c0")


async def test_without_a_wake_up_the_poll_finds_the_commit(chat: DirectChat) -> None:
    pushes = Pushes()
    worker = await started(chat, pushes, poll_s=0.05)
    idle = IdleWatch(worker)
    async with running(worker):
        await idle.wait()
        await chat.send(0)
        await pushes.wait_for("c0")


async def test_stop_ends_an_idle_worker_at_once(chat: DirectChat) -> None:
    worker = await started(chat, Pushes(), POLL_NEVER_S)
    idle = IdleWatch(worker)
    task = asyncio.create_task(worker.run())
    await idle.wait()
    worker.stop()
    await asyncio.wait_for(task, WAIT_S)
