"""Typing and presence reach the right people, expire, and never leak to outsiders."""

from __future__ import annotations

import aiohttp

from pigeon.server import Server
from tests.support import Api, connect


async def test_typing_reaches_members_only(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob, eve = await api.account(), await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    a, _ = await connect(http, server.url, alice)
    b, _ = await connect(http, server.url, bob)
    e, _ = await connect(http, server.url, eve)

    await a.send({"type": "typing", "conv": conv})
    typing = await b.expect("typing")
    assert (typing["conv"], typing["user"]) == (conv, alice.user_id)
    assert typing["ttl_ms"] > 0  # it expires by itself on the client after ttl_ms

    await e.send({"type": "typing", "conv": conv, "ref": "t1"})
    error = await e.expect("error")
    assert (error["code"], error["ref"]) == ("not_member", "t1")
    # a round trip on each socket proves nothing else was queued for them
    for sock in (a, b):
        await sock.send({"type": "ping"})
        await sock.expect("pong")
        assert not [fr for fr in sock.frames if fr["type"] == "typing"]


async def test_presence_online_offline_and_last_seen(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob, eve = await api.account(), await api.account(), await api.account()
    await api.direct(alice, bob)
    a, _ = await connect(http, server.url, alice)
    b, _ = await connect(http, server.url, bob)
    online = await a.expect(lambda fr: fr.get("type") == "presence" and fr["user"] == bob.user_id)
    assert online["online"] is True

    await a.send({"type": "presence_query", "users": [bob.user_id, eve.user_id]})
    answer = await a.expect(lambda fr: fr.get("type") == "presence")
    assert answer["user"] == bob.user_id and answer["online"]  # eve shares nothing: not told

    await b.close()
    offline = await a.expect(lambda fr: fr.get("type") == "presence" and not fr["online"])
    assert offline["user"] == bob.user_id and offline["last_seen"] > 0

    e, _ = await connect(http, server.url, eve)
    await e.send({"type": "presence_query", "users": [alice.user_id, bob.user_id]})
    await e.send({"type": "ping"})
    await e.expect("pong")
    assert not [fr for fr in e.frames if fr["type"] == "presence"]


async def test_presence_expires_when_a_gateway_stops_refreshing(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob = await api.account(), await api.account()
    await api.direct(alice, bob)
    _b, _ = await connect(http, server.url, bob)
    # the registry entry lapses unless refreshed: register with a TTL already past
    await server.bus.register("gw-dead", alice.user_id, alice.device_id, ttl_s=-1.0)
    (state,) = await server.bus.presence([alice.user_id])
    assert not state.online and state.last_seen is not None


async def test_outsiders_cannot_read_or_write(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob, eve = await api.account(), await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    group = await api.group(alice, [bob], "private")
    e, _ = await connect(http, server.url, eve)
    for target in (conv, group):
        await e.send(
            {"type": "send", "conv": target, "client_id": f"x{target}", "body": "let me in"}
        )
        assert (await e.expect("error"))["code"] == "not_member"
        await e.send({"type": "read", "conv": target, "up_to_seq": 0})
        assert (await e.expect("error"))["code"] == "not_member"
        for path in ("", "/messages", "/receipts"):
            status, body = await api.call("GET", f"/v1/conversations/{target}{path}", eve.token)
            assert (status, body["code"]) == (404, "not_member")
    status, body = await api.call(
        "POST", f"/v1/conversations/{group}/members", eve.token, {"users": [eve.user_id]}
    )
    assert status == 404
    status, body = await api.call(
        "POST", f"/v1/conversations/{group}/members", bob.token, {"users": [eve.user_id]}
    )
    assert (status, body["code"]) == (403, "forbidden")  # bob is a member, not an admin
    _, history = await api.call("GET", f"/v1/conversations/{group}/messages", alice.token)
    assert [m["kind"] for m in history["messages"]] == ["system"]


async def test_profiles_by_id_only_for_people_i_share_a_conversation_with(
    server: Server, api: Api
) -> None:
    alice, bob, eve = await api.account(), await api.account(), await api.account()
    await api.direct(alice, bob)
    ids = f"{alice.user_id},{bob.user_id},{eve.user_id}"
    _, body = await api.call("GET", f"/v1/users?ids={ids}", alice.token)
    assert sorted(u["username"] for u in body["users"]) == sorted([alice.username, bob.username])
    _, body = await api.call("GET", f"/v1/users?ids={ids}", eve.token)
    assert [u["username"] for u in body["users"]] == [eve.username]
    status, body = await api.call("GET", "/v1/users?ids=1,x", eve.token)
    assert (status, body["code"]) == (400, "bad_request")
