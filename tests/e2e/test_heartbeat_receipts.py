"""Heartbeats close dead sockets; group receipts carry per-member state and the aggregate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from pigeon.server import Server, build_server
from tests.conftest import fast_passwords, make_config
from tests.support import Api, connect, open_socket


@pytest.fixture
async def quick_heartbeat_server(tmp_path: Path) -> AsyncIterator[Server]:
    config = replace(make_config(tmp_path), heartbeat_s=0.3, hello_timeout_s=0.3)
    srv = build_server(config, fast_passwords())
    await srv.start()
    yield srv
    await srv.stop()


async def test_silent_and_helloless_sockets_are_closed(
    quick_heartbeat_server: Server, http: aiohttp.ClientSession
) -> None:
    server = quick_heartbeat_server
    alice = await Api(http, server.url).account()
    silent, _ = await connect(http, server.url, alice)
    mute = await open_socket(http, server.url)
    assert await mute.closed(timeout=10) == 4002
    assert await silent.closed(timeout=10) == 4009


async def test_pinging_socket_stays_open(
    quick_heartbeat_server: Server, http: aiohttp.ClientSession
) -> None:
    server = quick_heartbeat_server
    api = Api(http, server.url)
    sock, _ = await connect(http, server.url, await api.account())
    silent, _ = await connect(http, server.url, await api.account())

    async def keep_pinging() -> None:
        while True:
            await sock.send({"type": "ping"})
            await sock.expect("pong")
            await asyncio.sleep(0.05)  # the client's heartbeat period, not a sync point

    pinger = asyncio.create_task(keep_pinging())
    try:
        assert await silent.closed(timeout=10) == 4009  # > 2 heartbeats have passed
        assert not sock.ws.closed and not pinger.done()
    finally:
        pinger.cancel()


async def test_group_receipts_per_member_and_aggregate(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob, carol = await api.account(), await api.account(), await api.account()
    conv = await api.group(alice, [bob, carol])
    a, _ = await connect(http, server.url, alice)
    b, _ = await connect(http, server.url, bob)
    c, _ = await connect(http, server.url, carol)
    await a.send({"type": "send", "conv": conv, "client_id": "q", "body": "lunch?"})
    seq = (await a.expect("sent"))["seq"]

    def receipt_from(user: int, field: str):  # type: ignore[no-untyped-def]
        return lambda fr: fr.get("type") == "receipt" and fr["user"] == user and fr[field] >= seq

    for sock in (b, c):
        msg = await sock.expect(lambda fr: fr.get("type") == "msg" and fr["seq"] == seq)
        await sock.send({"type": "ack", "up_to": msg["inbox_seq"]})
    await a.expect(receipt_from(bob.user_id, "delivered_seq"))
    last = await a.expect(receipt_from(carol.user_id, "delivered_seq"))
    await b.send({"type": "read", "conv": conv, "up_to_seq": seq})
    bob_read = await a.expect(receipt_from(bob.user_id, "read_seq"))
    assert bob_read["all_read_seq"] < seq  # carol has not read it yet
    await c.send({"type": "read", "conv": conv, "up_to_seq": seq})
    carol_read = await a.expect(receipt_from(carol.user_id, "read_seq"))
    assert carol_read["all_read_seq"] >= seq and carol_read["all_delivered_seq"] >= seq
    assert last["conv"] == conv
    # receipts go to the sender only: bob and carol got none about each other
    for sock in (b, c):
        await sock.send({"type": "ping"})
        await sock.expect("pong")
        assert not [fr for fr in sock.frames if fr["type"] == "receipt"]
