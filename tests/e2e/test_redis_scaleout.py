"""Scaled out on the Redis bus: a gateway with no workers, fan-out in a worker "process".

The gateway and the worker share nothing but the store's file and Redis, as separate
processes would. The worker polls only every 30 s, so a prompt delivery proves the gateway
woke it through the bus (`notify_fanout`).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import aiohttp

from pigeon.bus.redis import RedisBus
from pigeon.server import Server
from pigeon.store.sqlite import SqliteStore
from pigeon.worker.process import WorkerProcess
from tests.conftest import fast_passwords, make_config
from tests.support import Api, connect


async def test_gateway_without_workers_is_served_by_a_worker_process(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    prefix = f"e2e-{uuid.uuid4().hex[:12]}"
    config = replace(make_config(tmp_path), workers=0, bus_url=redis_url)
    db = tmp_path / "pigeon.sqlite3"
    store = SqliteStore(db, fanout_with_send=False)  # as `open_store` makes it with workers=0
    gateway = Server(config, store, RedisBus(redis_url, prefix), fast_passwords())
    worker = WorkerProcess(config, SqliteStore(db), RedisBus(redis_url, prefix), 2, poll_s=30.0)
    await gateway.start()
    await worker.start()
    try:
        assert gateway.workers == []
        api = Api(http, gateway.url)
        alice, bob = await api.account("alice"), await api.account("bob")
        conv = await api.direct(alice, bob)
        a, _ = await connect(http, gateway.url, alice)
        b, _ = await connect(http, gateway.url, bob)

        await a.send({"type": "send", "conv": conv, "client_id": "a1", "body": "via redis"})
        seq = (await a.expect("sent"))["seq"]
        got = await b.expect(lambda fr: fr.get("type") == "msg" and fr["seq"] == seq)
        assert (got["body"], got["sender"]) == ("via redis", alice.user_id)
    finally:
        await gateway.stop()
        await worker.stop()


async def test_logout_on_one_gateway_closes_the_socket_held_by_another(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    prefix = f"e2e-{uuid.uuid4().hex[:12]}"
    db = tmp_path / "pigeon.sqlite3"
    gateways = [
        Server(
            replace(make_config(tmp_path), gateway_id=f"gw-{i}", bus_url=redis_url),
            SqliteStore(db),
            RedisBus(redis_url, prefix),
            fast_passwords(),
        )
        for i in range(2)
    ]
    for gateway in gateways:
        await gateway.start()
    try:
        alice = await Api(http, gateways[0].url).account("alice")
        sock, _ = await connect(http, gateways[0].url, alice)
        status, _ = await Api(http, gateways[1].url).call("DELETE", "/v1/sessions", alice.token)
        assert status == 204
        assert await sock.closed() == 4004  # closed on gw-0, revoked through gw-1
    finally:
        for gateway in gateways:
            await gateway.stop()
