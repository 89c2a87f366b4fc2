"""1:1 and group exchange over real sockets, raw protocol frames."""

from __future__ import annotations

import aiohttp

from pigeon.bus.envelope import Envelope, Target
from pigeon.protocol import frames as f
from pigeon.server import Server
from tests.support import Api, connect


async def test_direct_exchange_both_ways(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice, bob = await api.account("alice"), await api.account("bob")
    conv = await api.direct(alice, bob)
    a, _ = await connect(http, server.url, alice)
    b, _ = await connect(http, server.url, bob)

    await a.send({"type": "send", "conv": conv, "client_id": "a1", "body": "hi bob"})
    sent = await a.expect("sent")
    assert (sent["client_id"], sent["conv"], sent["seq"]) == ("a1", conv, 1)
    got = await b.expect(lambda fr: fr.get("type") == "msg" and fr["seq"] == 1)
    assert (got["body"], got["sender"], got["conv"]) == ("hi bob", alice.user_id, conv)
    # the sender's own inbox gets it too (for their other devices)
    own = await a.expect("msg")
    assert own["seq"] == 1 and own["client_id"] == "a1"

    await b.send({"type": "send", "conv": conv, "client_id": "b1", "body": "hi alice"})
    assert (await b.expect("sent"))["seq"] == 2
    reply = await a.expect("msg")
    assert (reply["body"], reply["sender"], reply["seq"]) == ("hi alice", bob.user_id, 2)


async def test_without_echo_the_sent_takes_the_own_messages_place(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    """A device that says `echo: false` gets no `msg` for what it sent: its `sent` carries
    the message's inbox position, in inbox order. Its other devices get the `msg`, and a
    replay from the store still has it."""
    alice, bob = await api.account("alice"), await api.account("bob")
    laptop = await api.login("alice", alice.password, "laptop")
    conv = await api.direct(alice, bob)
    phone, _ = await connect(http, server.url, alice, echo=False)
    other, _ = await connect(http, server.url, laptop)
    b, _ = await connect(http, server.url, bob)

    await phone.send({"type": "send", "conv": conv, "client_id": "a1", "body": "hi bob"})
    sent = await phone.expect("sent")
    copy = await other.expect("msg")
    assert (copy["seq"], copy["client_id"], copy["sender_device"]) == (1, "a1", alice.device_id)
    assert (sent["seq"], sent["inbox_seq"]) == (1, copy["inbox_seq"])

    await b.send({"type": "send", "conv": conv, "client_id": "b1", "body": "hi alice"})
    reply = await phone.expect("msg")  # the first msg on this socket is bob's
    assert (reply["seq"], reply["inbox_seq"]) == (2, sent["inbox_seq"] + 1)
    await phone.send({"type": "ack", "up_to": reply["inbox_seq"], "ref": "ack"})
    await phone.send({"type": "ping", "ts": 1.0})
    await phone.expect("pong")
    assert [fr for fr in phone.frames if fr["type"] in ("msg", "error")] == []

    again, _ = await connect(http, server.url, alice, resume_from=sent["inbox_seq"] - 1, echo=False)
    replayed = [fr for fr in again.frames if fr["type"] == "msg"]
    assert [(fr["seq"], fr["inbox_seq"]) for fr in replayed] == [
        (1, sent["inbox_seq"]), (2, reply["inbox_seq"])
    ]  # fmt: skip


async def test_without_echo_a_burst_of_sends_gets_no_msg_back(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    """Sends that share commit rounds, with the fan-out worker busy: every `sent` still
    reaches the sequencer before its entry's push."""
    alice, bob = await api.account("alice"), await api.account("bob")
    conv = await api.direct(alice, bob)
    phone, _ = await connect(http, server.url, alice, echo=False)
    b, _ = await connect(http, server.url, bob)
    count = 300
    for i in range(count):
        await phone.send({"type": "send", "conv": conv, "client_id": f"c{i}", "body": "hi"})
    sent = await phone.collect("sent", count)
    await b.collect("msg", count)
    assert [fr["seq"] for fr in sent] == list(range(1, count + 1))
    positions = [fr.get("inbox_seq", 0) for fr in sent]
    assert positions == list(range(positions[0], positions[0] + count))
    await phone.send({"type": "ping", "ts": 1.0})
    await phone.expect("pong")
    assert [fr for fr in phone.frames if fr["type"] == "msg"] == []


async def test_without_echo_a_msg_that_came_first_keeps_its_place(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    """If the entry's `msg` reaches the socket before the `sent` (another process's push),
    the `sent` comes without `inbox_seq`: no position twice, and the `sent` is not lost."""
    alice, bob = await api.account("alice"), await api.account("bob")
    conv = await api.direct(alice, bob)
    phone, welcome = await connect(http, server.url, alice, echo=False)
    for worker in server.workers:  # the pushes below are ours
        worker.stop()
    own = welcome["inbox_head"] + 1
    early = f.Msg(own, conv, 1, alice.user_id, "text", "hi", 0.0, alice.device_id, "a1")
    server.hub.on_envelope(Envelope([Target(alice.user_id, [early])]))
    await phone.send({"type": "send", "conv": conv, "client_id": "a1", "body": "hi"})
    sent = await phone.expect("sent")
    assert (sent["seq"], sent.get("inbox_seq")) == (1, None)
    assert (await phone.expect("msg"))["inbox_seq"] == own
    await phone.send({"type": "ack", "up_to": own, "ref": "ack"})
    await phone.send({"type": "ping", "ts": 1.0})
    await phone.expect("pong")
    assert [fr for fr in phone.frames if fr["type"] == "error"] == []


async def test_group_of_fifty(server: Server, api: Api, http: aiohttp.ClientSession) -> None:
    accounts = [await api.account() for _ in range(50)]
    conv = await api.group(accounts[0], accounts[1:], title="fifty")
    sockets = [(await connect(http, server.url, acc))[0] for acc in accounts]
    for sock in sockets:  # the creation notice reached everyone
        assert (await sock.expect("msg"))["kind"] == "system"

    await sockets[7].send({"type": "send", "conv": conv, "client_id": "x", "body": "hello all"})
    seq = (await sockets[7].expect("sent"))["seq"]
    for sock in sockets:
        msg = await sock.expect("msg")
        assert (msg["seq"], msg["body"], msg["sender"]) == (seq, "hello all", accounts[7].user_id)
