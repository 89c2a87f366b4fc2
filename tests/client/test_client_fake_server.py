"""The Client against a scripted in-process fake server (the real one is not needed).

Every wait is on an event the fake server or client raises; no sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from pigeon.client import (
    Client,
    ConnectionEvent,
    Event,
    FatalError,
    MessageEvent,
    SendError,
)
from pigeon.protocol import frames
from pigeon.protocol.codes import CloseCode

Script = Callable[[web.WebSocketResponse, frames.Hello, int], Awaitable[None]]


def msg(inbox_seq: int, conv: int, seq: int) -> frames.Msg:
    return frames.Msg(
        inbox_seq=inbox_seq, conv=conv, seq=seq, sender=2, kind="text", body=f"m{seq}", ts=1.0
    )


WELCOME = frames.Welcome(
    user=1, device=1, resume_from=0, inbox_head=0, heartbeat_s=30, max_body=4096, max_frame=65536
)


class FakeServer:
    """Runs ``script(ws, hello, connection_number)`` per connection, then answers frames."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.hellos: list[frames.Hello] = []
        self.sockets: list[web.WebSocketResponse] = []
        self.acked = 0
        self.ack_changed = asyncio.Event()
        self.history: dict[int, list[frames.Msg]] = {}
        self.send_replies: list[frames.ServerFrame] = []  # consumed in order, then `sent`
        self.sends: list[frames.Send] = []

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        hello = frames.client_decoder.decode((await ws.receive()).data)
        assert isinstance(hello, frames.Hello)
        self.hellos.append(hello)
        self.sockets.append(ws)
        await self.script(ws, hello, len(self.hellos))
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                break
            await self.on_frame(ws, frames.client_decoder.decode(message.data))
        return ws

    async def on_frame(self, ws: web.WebSocketResponse, frame: frames.ClientFrame) -> None:
        if isinstance(frame, frames.Ack):
            assert frame.up_to > self.acked, "acks are cumulative and only move forward"
            self.acked = frame.up_to
            self.ack_changed.set()
        elif isinstance(frame, frames.Send):
            self.sends.append(frame)
            reply: frames.ServerFrame = frames.Sent(
                client_id=frame.client_id, conv=frame.conv, seq=len(self.sends), ts=2.0
            )
            if self.send_replies:
                reply = self.send_replies.pop(0)
            await ws.send_str(frames.encode(reply).decode())

    async def messages(self, request: web.Request) -> web.Response:
        conv = int(request.match_info["conv"])
        after = int(request.query.get("after", 0))
        before = int(request.query.get("before", 2**62))
        found = [
            {"conv": m.conv, "seq": m.seq, "sender": m.sender, "body": m.body, "ts": m.ts}
            for m in self.history.get(conv, [])
            if after < m.seq < before
        ]
        return web.json_response({"messages": found})

    async def wait_acked(self, up_to: int) -> None:
        while self.acked < up_to:
            self.ack_changed.clear()
            await self.ack_changed.wait()


async def push(ws: web.WebSocketResponse, *batch: frames.ServerFrame) -> None:
    payload: Any = list(batch) if len(batch) > 1 else batch[0]
    await ws.send_str(msgspec.json.encode(payload).decode())


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[FakeServer], Awaitable[str]]]:
    servers: list[TestServer] = []

    async def start(fake: FakeServer) -> str:
        app = web.Application()
        app.router.add_get("/v1/ws", fake.ws)
        app.router.add_get("/v1/conversations/{conv}/messages", fake.messages)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        return str(server.make_url(""))

    yield start
    for server in servers:
        await server.close()


def client_for(url: str) -> Client:
    return Client(url, "token", 1, backoff_initial=0.01, backoff_max=0.05, ack_interval=0.001)


async def take(client: Client, n: int) -> list[Event]:
    return [await anext(client) for _ in range(n)]


def seqs(events: list[Event]) -> list[tuple[int, int]]:
    return [(e.conv, e.seq) for e in events if isinstance(e, MessageEvent)]


async def test_replay_with_duplicate_and_gap_is_filled_in_order(
    serve: Callable[[FakeServer], Awaitable[str]],
) -> None:
    async def script(ws: web.WebSocketResponse, hello: frames.Hello, n: int) -> None:
        await push(ws, WELCOME)
        await push(ws, msg(1, 7, 1), msg(2, 7, 1), msg(3, 7, 3), msg(4, 8, 10))
        await push(ws, frames.CaughtUp(up_to=4))

    fake = FakeServer(script)
    fake.history[7] = [msg(0, 7, s) for s in (1, 2, 3)]
    async with client_for(await serve(fake)) as client:
        await client.wait_caught_up()
        events = await take(client, 5)
        assert events[0] == ConnectionEvent("connected")
        assert seqs(events) == [(7, 1), (8, 10), (7, 2), (7, 3)]
        filled = [e for e in events if isinstance(e, MessageEvent) and e.inbox_seq is None]
        assert [(e.conv, e.seq) for e in filled] == [(7, 2)]
        await fake.wait_acked(4)
    assert fake.hellos[0].resume_from == 0


async def test_reconnect_resumes_from_ack_and_drops_replayed_duplicates(
    serve: Callable[[FakeServer], Awaitable[str]],
) -> None:
    async def script(ws: web.WebSocketResponse, hello: frames.Hello, n: int) -> None:
        await push(ws, WELCOME)
        if n == 1:
            await push(ws, msg(1, 7, 1), frames.CaughtUp(up_to=1))
        else:  # replays entry 1 again although it was acked: the client must drop it
            await push(ws, msg(1, 7, 1), msg(2, 7, 2), frames.CaughtUp(up_to=2))

    fake = FakeServer(script)
    async with client_for(await serve(fake)) as client:
        events = await take(client, 2)
        await fake.wait_acked(1)
        await fake.sockets[0].close(code=CloseCode.SLOW_CONSUMER)
        events += await take(client, 3)
        assert [type(e).__name__ for e in events] == [
            "ConnectionEvent",
            "MessageEvent",
            "ConnectionEvent",
            "ConnectionEvent",
            "MessageEvent",
        ]
        assert seqs(events) == [(7, 1), (7, 2)]
        assert events[2] == ConnectionEvent("disconnected", f"closed {CloseCode.SLOW_CONSUMER}")
        await fake.wait_acked(2)
    assert [h.resume_from for h in fake.hellos] == [0, 1]


async def test_a_sent_with_a_position_is_the_own_message_in_order(
    serve: Callable[[FakeServer], Awaitable[str]],
) -> None:
    async def script(ws: web.WebSocketResponse, hello: frames.Hello, n: int) -> None:
        await push(ws, WELCOME, msg(1, 7, 1), frames.CaughtUp(up_to=1))

    fake = FakeServer(script)
    fake.send_replies = [frames.Sent(client_id="c1", conv=7, seq=2, ts=2.0, inbox_seq=2)]
    async with client_for(await serve(fake)) as client:
        await client.send(7, "mine", client_id="c1")
        events = await take(client, 3)
        assert seqs(events) == [(7, 1), (7, 2)]
        own = events[2]
        assert isinstance(own, MessageEvent)
        assert (own.body, own.sender, own.sender_device, own.inbox_seq) == ("mine", 1, 1, 2)
        await fake.wait_acked(2)  # the position counts as handed over
    assert not fake.hellos[0].echo


async def test_send_retries_retryable_errors_with_the_same_client_id(
    serve: Callable[[FakeServer], Awaitable[str]],
) -> None:
    async def script(ws: web.WebSocketResponse, hello: frames.Hello, n: int) -> None:
        await push(ws, WELCOME, frames.CaughtUp(up_to=0))

    fake = FakeServer(script)
    fake.send_replies = [
        frames.Error(code="unavailable", message="db down", ref="c1", retryable=True),
    ]
    async with client_for(await serve(fake)) as client:
        sent = await client.send(7, "hi", client_id="c1")
        assert (sent.client_id, sent.conv, sent.seq) == ("c1", 7, 2)
        assert [s.client_id for s in fake.sends] == ["c1", "c1"]

        fake.send_replies = [frames.Error(code="not_member", message="no", ref="c2")]
        with pytest.raises(SendError) as caught:
            await client.send(9, "hi", client_id="c2")
        assert caught.value.code == "not_member"


async def test_auth_failure_is_fatal_and_not_retried(
    serve: Callable[[FakeServer], Awaitable[str]],
) -> None:
    async def script(ws: web.WebSocketResponse, hello: frames.Hello, n: int) -> None:
        await push(ws, frames.Error(code="auth_failed", message="bad token"))
        await ws.close(code=CloseCode.AUTH_FAILED)

    fake = FakeServer(script)
    client = client_for(await serve(fake))
    with pytest.raises(FatalError) as caught:
        await client.connect()
    assert caught.value.code == "auth_failed"
    await client.close()
    assert len(fake.hellos) == 1
