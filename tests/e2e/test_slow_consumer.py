"""A client that stops reading is cut off with its reason and loses nothing on resume."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import pytest

from pigeon.server import Server, build_server
from tests.conftest import fast_passwords, make_config
from tests.support import Api, connect, eventually


@pytest.fixture
async def small_buffer_server(tmp_path: Path) -> AsyncIterator[Server]:
    config = make_config(
        tmp_path,
        send_buffer_bytes=1024 * 1024,
        sends_per_second=1e6,
        send_burst=1_000_000,
        frames_per_second=1e6,
        frame_burst=1_000_000,
    )
    srv = build_server(config, fast_passwords())
    await srv.start()
    yield srv
    await srv.stop()


def masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    header = bytes([0x81])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def stalled_client(url: str, token: str, device: int) -> socket.socket:
    """A WebSocket client that says hello and then never reads again."""
    parsed = urlparse(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parsed.hostname, parsed.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /v1/ws HTTP/1.1\r\nHost: {parsed.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += await asyncio.to_thread(sock.recv, 1)  # read exactly the headers
    assert b" 101 " in response.split(b"\r\n", 1)[0]
    hello = json.dumps({"type": "hello", "token": token, "device": device}).encode()
    sock.sendall(masked_text_frame(hello))
    return sock


async def test_slow_consumer_is_cut_off_and_resumes_without_loss(
    small_buffer_server: Server, http: aiohttp.ClientSession
) -> None:
    server = small_buffer_server
    api = Api(http, server.url)
    alice, bob = await api.account(), await api.account()
    conv = await api.direct(alice, bob)
    stalled = await stalled_client(server.url, bob.token, bob.device_id)
    try:
        await eventually(
            lambda: _async(any(c.user_id == bob.user_id for c in server.hub.connections))
        )
        a, _ = await connect(http, server.url, alice)
        body = "x" * 4000
        count, chunk = 3000, 100
        for start in range(0, count, chunk):  # paced by alice's own copies: she keeps up
            for i in range(start, start + chunk):
                await a.send({"type": "send", "conv": conv, "client_id": str(i), "body": body})
            await a.collect("sent", chunk, timeout=30)
            await a.collect("msg", chunk, timeout=30)
        # the server dropped the stalled socket rather than buffering without bound
        await eventually(
            lambda: _async(not any(c.user_id == bob.user_id for c in server.hub.connections)),
            timeout=30,
        )
        assert await asyncio.to_thread(close_code_after_backlog, stalled) == 4008
    finally:
        stalled.close()

    b, _ = await connect(http, server.url, bob)  # resumes from the durable cursor (nothing acked)
    msgs = await b.collect("msg", count, timeout=60)
    assert [m["seq"] for m in msgs] == list(range(1, count + 1))


def close_code_after_backlog(sock: socket.socket) -> int:
    """Read what the server had sent before it gave up; return the close frame's code."""
    sock.settimeout(10)
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    pos = 0
    while pos < len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if length == 126:
            length, pos = struct.unpack("!H", data[pos : pos + 2])[0], pos + 2
        elif length == 127:
            length, pos = struct.unpack("!Q", data[pos : pos + 8])[0], pos + 8
        if opcode == 0x8:
            return int(struct.unpack("!H", data[pos : pos + 2])[0])
        pos += length
    raise AssertionError("no close frame")


async def _async(value: bool) -> bool:
    return value
