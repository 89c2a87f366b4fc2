"""The SDK across a retention gap: told `resync`, it refills from history, exactly once."""

from __future__ import annotations

import time
from typing import Any

from pigeon.client import Client, HttpApi, MessageEvent, ResyncEvent
from pigeon.server import Server

OPTIONS: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.1}


async def messages(client: Client, count: int) -> list[MessageEvent]:
    got: list[MessageEvent] = []
    async for event in client:
        if isinstance(event, MessageEvent):
            got.append(event)
            if len(got) == count:
                return got
    raise AssertionError("stream ended")


async def test_resync_after_retention_refills_from_history(server: Server) -> None:
    async with HttpApi(server.url) as api:
        await api.register("ana", "password-ana")
        bo = await api.register("bo", "password-bo")
        phone = await api.login("bo", "password-bo", "phone")  # bob's app keeps its token
    ana = await Client.login(server.url, "ana", "password-ana", "laptop", **OPTIONS)
    bob = Client(server.url, phone.token, phone.device.id, **OPTIONS)
    async with ana:
        conv = (await ana.http.create_direct(bo.id)).id
        async with bob:
            await ana.send(conv, "one")
            first = await messages(bob, 1)
            assert [m.body for m in first] == ["one"]
            position, known = bob.resume_position, {conv: first[-1].seq}
        # bob is away for longer than the retention: his inbox entries are pruned
        for body in ("two", "three"):
            await ana.send(conv, body)
        await server.store.prune_inbox(time.time() + 1)
        await ana.send(conv, "four")

        assert bob.resume_position == position
        again = Client(
            server.url, phone.token, phone.device.id, resume_from=position,
            known_positions=known, **OPTIONS,
        )  # fmt: skip
        async with again:
            resync = None
            got: list[MessageEvent] = []
            async for event in again:
                if isinstance(event, ResyncEvent):
                    resync = event
                elif isinstance(event, MessageEvent):
                    got.append(event)
                    if len(got) == 3:
                        break
            assert resync is not None and resync.reason == "retention"
            assert [(m.seq, m.body) for m in got] == [(2, "two"), (3, "three"), (4, "four")]
