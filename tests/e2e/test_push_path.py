"""The push path: what a loop iteration pushes is written straight to the transport as one
message and arrives intact, and frames stay in order when that direct write and the queued
(drain-waiting) write alternate."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest

from pigeon.config import Limits
from pigeon.gateway.connection import Connection, frame_header
from pigeon.protocol.codes import CloseCode
from pigeon.protocol.session import Session
from pigeon.server import Server, build_server
from tests.conftest import fast_passwords, make_config
from tests.e2e.test_slow_consumer import stalled_client
from tests.support import Api, connect, eventually


@pytest.fixture
async def roomy_server(tmp_path: Path) -> AsyncIterator[Server]:
    # A send buffer big enough that the test's backlog never trips the slow-consumer bound.
    srv = build_server(make_config(tmp_path, send_buffer_bytes=256 * 1024 * 1024), fast_passwords())
    await srv.start()
    yield srv
    await srv.stop()


def server_conn(server: Server, user_id: int) -> Connection:
    (conn,) = [c for c in server.hub.connections if c.user_id == user_id]
    return conn


def sized_frame(n: int, total: int) -> bytes:
    """A JSON object of exactly ``total`` bytes carrying the number ``n``."""
    head = b'{"type":"t","n":%d,"pad":"' % n
    return head + b"y" * (total - len(head) - 2) + b'"}'


@pytest.mark.parametrize("length", [0, 1, 125, 126])
def test_frame_header_lengths(length: int) -> None:
    header = frame_header(length)
    assert header[0] == 0x81  # FIN, TEXT, no RSV bits
    assert header[1] & 0x80 == 0  # server frames are not masked
    assert header[1] == length if length < 126 else header[1:] == bytes([126, 0, length])


def test_frame_header_extended_lengths() -> None:
    assert frame_header(65535) == bytes([0x81, 126]) + struct.pack("!H", 65535)
    assert frame_header(65536) == bytes([0x81, 127]) + struct.pack("!Q", 65536)
    assert frame_header(5 * 2**32) == bytes([0x81, 127]) + struct.pack("!Q", 5 * 2**32)


async def test_direct_writes_of_every_length_class_arrive_intact(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    alice = await api.account()
    sock, _ = await connect(http, server.url, alice)
    conn = server_conn(server, alice.user_id)
    assert not conn.ws.compress  # the direct write builds uncompressed frames only
    # 7-bit, 16-bit and 64-bit lengths, around each boundary, and well past 64 KiB
    sizes = [40, 125, 126, 127, 65535, 65536, 65537, 300_000, 2_000_000]
    for n, size in enumerate(sizes):
        payload = sized_frame(n, size)
        conn.send_encoded([payload])
        message = await sock.ws.receive(timeout=10)
        assert message.type is aiohttp.WSMsgType.TEXT
        assert message.data.encode() == payload, size
    # frames pushed separately in one loop iteration travel as one message, in order
    for i in range(5):
        conn.send_encoded([sized_frame(i, 100 + i)])
    message = await sock.ws.receive(timeout=10)
    assert [fr["n"] for fr in json.loads(message.data)] == list(range(5))
    await sock.close()


async def test_order_holds_when_direct_and_queued_writes_alternate(
    roomy_server: Server, http: aiohttp.ClientSession
) -> None:
    server = roomy_server
    api = Api(http, server.url)
    bob = await api.account()
    # A raw client with a tiny receive buffer that reads only when told to: the server's
    # transport fills up (queued path), then drains as the client reads (direct path again).
    raw = await stalled_client(server.url, bob.token, bob.device_id)
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await eventually(
            lambda: _true(any(c.user_id == bob.user_id for c in server.hub.connections))
        )
        conn = server_conn(server, bob.user_id)
        reader = FrameReader(raw, loop)
        await reader.until_type("caught_up")

        sent, paths = 0, list[str]()

        async def push() -> None:
            """One frame per loop iteration; its flush runs before this resumes."""
            nonlocal sent
            conn.send_encoded([sized_frame(sent, 8_000)])
            sent += 1
            await asyncio.sleep(0)
            paths.append("queued" if conn.buffered else "direct")

        for _ in range(3):
            for _ in range(3):  # the client keeps up: written directly
                await push()
            while paths[-1] == "direct" and sent < 20_000:  # until the transport pushes back
                await push()
            for _ in range(10):  # queued behind the ones waiting for the drain
                await push()
            # The client catches up while pushes keep coming, one per loop turn: some land
            # while the queue waits for the drain, some just after it, then direct again.
            catch_up = asyncio.create_task(reader.read_until(sent + 300))
            for _ in range(300):
                await push()
            await catch_up
        total = sent
        await reader.read_until(total)
        numbers = reader.numbers
        assert numbers == list(range(total))
        assert "queued" in paths and "direct" in paths
        switches = sum(1 for pair in itertools.pairwise(paths) if pair == ("queued", "direct"))
        assert switches == 2, "the direct path did not come back after each backlog"
        assert not conn.closing
    finally:
        raw.close()


class FrameReader:
    """Reads server frames (unmasked) from a raw non-blocking socket."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.data = bytearray()
        self.numbers: list[int] = []  # the "n" of each test frame read so far, in order

    async def _frame(self) -> bytes:
        while True:
            parsed = self._parse()
            if parsed is not None:
                return parsed
            chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), 10)
            assert chunk, "server closed the socket"
            self.data += chunk

    def _parse(self) -> bytes | None:
        data = self.data
        if len(data) < 2:
            return None
        assert data[0] == 0x81, data[:2]  # FIN + TEXT: nothing else is expected here
        assert data[1] & 0x80 == 0
        length, pos = data[1] & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                return None
            length, pos = struct.unpack_from("!H", data, 2)[0], 4
        elif length == 127:
            if len(data) < 10:
                return None
            length, pos = struct.unpack_from("!Q", data, 2)[0], 10
        if len(data) < pos + length:
            return None
        payload = bytes(data[pos : pos + length])
        del data[: pos + length]
        return payload

    def _record(self, payload: bytes) -> list[dict[str, object]]:
        decoded = json.loads(payload)
        frames = decoded if isinstance(decoded, list) else [decoded]
        for fr in frames:
            if fr.get("type") == "t":
                self.numbers.append(int(fr["n"]))
        return frames

    async def until_type(self, kind: str) -> None:
        while not any(fr.get("type") == kind for fr in self._record(await self._frame())):
            pass

    async def read_until(self, count: int) -> None:
        """Read whole messages until at least ``count`` test frames have arrived."""
        while len(self.numbers) < count:
            self._record(await self._frame())


async def _true(value: bool) -> bool:
    return value


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.written += chunk


class FakeProtocol:
    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.writing_paused = False


class FakeStream:
    def __init__(self) -> None:
        self.drained = asyncio.Event()

    async def drain(self) -> None:
        await self.drained.wait()


class FakeWs:
    compress = 0
    closed = False
    close_code: int | None = None

    async def close(self, *, code: int, message: bytes, drain: bool) -> bool:
        self.close_code = code
        return True


def messages(data: bytearray) -> list[list[int]]:
    """The test frames' numbers, message by message."""
    out = []
    reader = FrameReader.__new__(FrameReader)
    reader.data = bytearray(data)
    while (payload := reader._parse()) is not None:
        decoded = json.loads(payload)
        out.append([fr["n"] for fr in (decoded if isinstance(decoded, list) else [decoded])])
    return out


async def test_a_push_never_overtakes_the_queue_even_after_the_transport_resumes() -> None:
    protocol, stream = FakeProtocol(), FakeStream()
    request = SimpleNamespace(protocol=protocol, writer=stream)
    session = Session(Limits(), 0.0)
    conn = Connection(FakeWs(), session, 1 << 20, request)  # type: ignore[arg-type]
    written = protocol.transport.written

    conn.send_encoded([sized_frame(0, 100)])  # keeping up: written by this iteration's flush
    await conn.wait_drained()
    assert messages(written) == [[0]] and conn.buffered == 0
    protocol.writing_paused = True  # the transport is over its high-water mark
    conn.send_encoded([sized_frame(1, 100)])
    conn.send_encoded([sized_frame(2, 100)])
    await asyncio.sleep(0)  # the flush hands over to a writer task, which awaits the drain
    assert messages(written) == [[0]] and conn.buffered > 0
    protocol.writing_paused = False  # resumed, but the writer has not run yet
    conn.send_encoded([sized_frame(3, 100)])  # must queue behind 1 and 2
    assert messages(written) == [[0]]
    stream.drained.set()
    await conn.wait_drained()
    assert messages(written) == [[0], [1, 2, 3]] and conn.buffered == 0
    conn.send_encoded([sized_frame(4, 70_000)])  # direct again, 64-bit length
    await conn.wait_drained()
    assert messages(written) == [[0], [1, 2, 3], [4]]


async def test_the_queue_bound_still_cuts_off_a_slow_consumer() -> None:
    protocol, stream = FakeProtocol(), FakeStream()
    request = SimpleNamespace(protocol=protocol, writer=stream)
    session = Session(Limits(), 0.0)
    ws = FakeWs()
    conn = Connection(ws, session, 10_000, request)  # type: ignore[arg-type]
    protocol.writing_paused = True
    conn.send_encoded([sized_frame(0, 6_000)])
    await asyncio.sleep(0)  # its flush finds the transport paused: a writer waits to drain
    assert not conn.closing and conn.buffered == 6_000
    conn.send_encoded([sized_frame(1, 6_000)])  # over the bound: cut off, queue dropped
    assert conn.closing and conn.buffered == 0
    await eventually(lambda: _true(ws.close_code == CloseCode.SLOW_CONSUMER))
    assert protocol.transport.written == b""  # nothing of the backlog went out


def test_packing_keeps_order_and_bounds_each_message() -> None:
    from pigeon.gateway.connection import _PACK_MAX, _pack

    frames = [json.dumps({"n": i, "pad": "x" * (i % 7) * 9000}).encode() for i in range(200)]
    frames.insert(50, json.dumps({"n": "big", "pad": "y" * (_PACK_MAX * 2)}).encode())
    messages = _pack(frames)
    assert len(messages) > 2
    unpacked: list[object] = []
    for message in messages:
        decoded = json.loads(message)
        items = decoded if isinstance(decoded, list) else [decoded]
        # Only a frame over the bound on its own may exceed it.
        assert len(message) <= _PACK_MAX + 16 or len(items) == 1
        unpacked += items
    assert unpacked == [json.loads(frame) for frame in frames]
    assert _pack([frames[0]]) == [frames[0]]
