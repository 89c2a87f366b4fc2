"""Offline delivery, retries, receipts, multi-device and history, over real sockets."""

from __future__ import annotations

import aiohttp

from pigeon.server import Server
from tests.support import Api, connect, eventually


async def test_offline_recipient_gets_500_exactly_once_in_order(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    a, _ = await connect(http, server.url, alice)
    for i in range(500):
        await a.send({"type": "send", "conv": conv, "client_id": f"m{i}", "body": f"n{i}"})
    sents = await a.collect("sent", 500)
    assert sorted(s["seq"] for s in sents) == list(range(1, 501))

    b, _ = await connect(http, server.url, bob)  # fan-out may still be running: replay + live
    msgs = await b.collect("msg", 500)
    assert [m["body"] for m in msgs] == [f"n{i}" for i in range(500)]
    assert [m["seq"] for m in msgs] == list(range(1, 501))
    positions = [m["inbox_seq"] for m in msgs]
    assert positions == list(range(positions[0], positions[0] + 500))
    await b.send({"type": "ping"})
    await b.expect("pong")
    assert not [fr for fr in b.frames if fr["type"] == "msg"]  # no duplicate followed

    # and after a reconnect from the acked position, nothing is replayed again
    await b.send({"type": "ack", "up_to": positions[-1]})

    async def cursor_saved() -> bool:
        _, body = await api.call("GET", "/v1/devices", bob.token)
        return bool(body["devices"][0]["cursor"] == positions[-1])

    await eventually(cursor_saved)
    await b.close()
    b, welcome = await connect(http, server.url, bob)
    assert welcome["resume_from"] == positions[-1]
    assert not [fr for fr in b.frames if fr["type"] == "msg"]


async def test_retry_after_drop_before_sent_makes_one_message(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    a, _ = await connect(http, server.url, alice)
    frame = {"type": "send", "conv": conv, "client_id": "once", "body": "only one"}
    await a.send(frame)
    await a.close()  # gone before reading `sent`

    a2, _ = await connect(http, server.url, alice)
    await a2.send(frame)
    sent = await a2.expect("sent")
    assert sent["seq"] == 1
    _, history = await api.call("GET", f"/v1/conversations/{conv}/messages", alice.token)
    assert [m["body"] for m in history["messages"]] == ["only one"]


async def test_receipts_reach_a_sender_who_was_offline(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    a, _ = await connect(http, server.url, alice)
    await a.send({"type": "send", "conv": conv, "client_id": "r1", "body": "did you get it?"})
    seq = (await a.expect("sent"))["seq"]
    own = await a.expect("msg")
    await a.send({"type": "ack", "up_to": own["inbox_seq"]})
    await a.close()

    b, _ = await connect(http, server.url, bob)
    msg = await b.expect("msg")
    await b.send({"type": "ack", "up_to": msg["inbox_seq"]})
    await b.send({"type": "read", "conv": conv, "up_to_seq": seq})

    async def bob_state() -> dict[str, int] | None:
        _, body = await api.call("GET", f"/v1/conversations/{conv}/receipts", bob.token)
        state = next(m for m in body["members"] if m["user_id"] == bob.user_id)
        return state if state["read_seq"] == seq else None

    state = await eventually(bob_state)
    assert state["delivered_seq"] == seq

    a, _ = await connect(http, server.url, alice)
    receipts = [fr for fr in a.frames if fr["type"] == "receipt"]
    assert receipts, a.frames
    last = receipts[-1]
    assert (last["user"], last["delivered_seq"], last["read_seq"]) == (bob.user_id, seq, seq)
    assert last["all_read_seq"] == seq


async def test_two_devices_of_one_user_both_receive(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob = await api.account(), await api.account()
    phone = alice
    laptop = await api.login(alice.username, alice.password, "laptop")
    conv = await api.direct(alice, bob)
    p, _ = await connect(http, server.url, phone)
    lap, _ = await connect(http, server.url, laptop)
    b, _ = await connect(http, server.url, bob)

    await b.send({"type": "send", "conv": conv, "client_id": "b", "body": "to both"})
    assert (await p.expect("msg"))["body"] == "to both"
    assert (await lap.expect("msg"))["body"] == "to both"

    await p.send({"type": "send", "conv": conv, "client_id": "p", "body": "from phone"})
    mirrored = await lap.expect(lambda fr: fr.get("type") == "msg" and fr["body"] == "from phone")
    assert mirrored["sender_device"] == phone.device_id
    assert (await b.expect(lambda fr: fr.get("type") == "msg" and fr["seq"] == 2))[
        "body"
    ] == "from phone"


async def test_history_paging(server: Server, api: Api, http: aiohttp.ClientSession) -> None:
    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    a, _ = await connect(http, server.url, alice)
    for i in range(30):
        await a.send({"type": "send", "conv": conv, "client_id": str(i), "body": f"p{i}"})
    await a.collect("sent", 30)
    path = f"/v1/conversations/{conv}/messages"
    _, newest = await api.call("GET", f"{path}?limit=10", bob.token)
    assert [m["seq"] for m in newest["messages"]] == list(range(21, 31))
    _, older = await api.call("GET", f"{path}?before=21&limit=10", bob.token)
    assert [m["seq"] for m in older["messages"]] == list(range(11, 21))
    _, after = await api.call("GET", f"{path}?after=25&limit=10", bob.token)
    assert [m["seq"] for m in after["messages"]] == list(range(26, 31))
    status, _body = await api.call("GET", f"{path}?before=5&after=2", bob.token)
    assert status == 400
    _, listing = await api.call("GET", "/v1/conversations", bob.token)
    (summary,) = listing["conversations"]
    assert summary["unread"] == 30 and summary["last_message"]["body"] == "p29"


async def test_position_older_than_retention_is_told_explicitly(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    import time

    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    a, _ = await connect(http, server.url, alice)
    for i in range(5):
        await a.send({"type": "send", "conv": conv, "client_id": str(i), "body": f"old{i}"})
    await a.collect("msg", 5)  # fanned out to everyone
    assert await server.store.prune_inbox(time.time() + 1) >= 10  # retention passed
    await a.send({"type": "send", "conv": conv, "client_id": "new", "body": "new"})
    await a.expect(lambda fr: fr.get("type") == "msg" and fr["body"] == "new")

    b, welcome = await connect(http, server.url, bob, resume_from=0)
    resync = await b.expect("resync")
    assert resync["reason"] == "retention" and resync["oldest"] == welcome["resume_from"] + 1
    assert [m["body"] for m in b.frames if m["type"] == "msg"] == ["new"]


async def test_a_nudge_makes_the_gateway_read_entries_that_were_never_pushed(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    from pigeon.bus.routing import Router

    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    b, _ = await connect(http, server.url, bob)
    for worker in server.workers:  # fan-out by hand below, as a worker that dies would
        worker.stop()
    a, _ = await connect(http, server.url, alice)
    await a.send({"type": "send", "conv": conv, "client_id": "lost", "body": "unpushed"})
    await a.expect("sent")
    batch = await server.store.fanout("doomed", 10, lease_s=10)
    assert batch.entries  # committed, and its worker "died" before pushing
    await Router(server.bus).nudge([bob.user_id])
    msg = await b.expect("msg")
    assert (msg["body"], msg["seq"]) == ("unpushed", 1)


async def test_a_gap_left_by_an_entry_never_pushed_is_filled_from_the_store(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    """An entry committed without a push (here a receipt written behind the gateway's
    back), then a pushed one: the socket gets both, in inbox order, once the gateway has
    read the missing one."""
    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    b, _ = await connect(http, server.url, bob)
    await b.send({"type": "send", "conv": conv, "client_id": "b1", "body": "read me"})
    await b.expect("sent")
    await b.expect("msg")  # its own copy
    [receipt] = await server.store.mark_read(alice.user_id, conv, 1)  # not pushed
    a, _ = await connect(http, server.url, alice)
    await a.send({"type": "send", "conv": conv, "client_id": "a1", "body": "after"})
    entry = lambda fr: fr["type"] in ("msg", "receipt")  # noqa: E731
    first, second = await b.expect(entry), await b.expect(entry)
    assert (first["type"], first["inbox_seq"], first["read_seq"]) == (
        "receipt",
        receipt.inbox_seq,
        1,
    )
    assert (second["type"], second["inbox_seq"], second["body"]) == (
        "msg",
        receipt.inbox_seq + 1,
        "after",
    )
