"""The generator's lean WebSocket client, against a raw socket server that speaks exact
frames (fragments, pings, close) and checks what the client writes."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest

from pigeon.bench import wsclient


def test_accept_key_matches_rfc_6455_example() -> None:
    assert wsclient.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 125, 126, 65535, 65536])
def test_mask_is_its_own_inverse_and_bytewise(size: int) -> None:
    key, payload = os.urandom(4), os.urandom(size)
    masked = wsclient.mask(key, payload)
    assert len(masked) == size
    assert all(masked[i] == payload[i] ^ key[i % 4] for i in range(min(size, 300)))
    assert wsclient.mask(key, masked) == payload


def server_frame(opcode: int, payload: bytes, final: bool = True) -> bytes:
    n = len(payload)
    first = (0x80 if final else 0) | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + struct.pack("!H", n) + payload
    return bytes((first, 127)) + struct.pack("!Q", n) + payload


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    assert second & 0x80, "client frames must be masked"
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    key = await reader.readexactly(4)
    return first & 0x0F, wsclient.mask(key, await reader.readexactly(length))


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    key = next(
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")
        if line.lower().startswith("sec-websocket-key:")
    )
    accept = wsclient.accept_key(key.encode()).decode()
    writer.write(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
    )


async def test_messages_fragments_ping_and_close_against_raw_server() -> None:
    seen: list[tuple[int, bytes]] = []  # what the server read: (opcode, payload)
    served = asyncio.get_running_loop().create_future()
    big = os.urandom(70_000)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handshake(reader, writer)
        # One write with a whole message, a split fragmented one, a ping and a 64-bit one:
        # the client must cut and join by frame, not by read.
        data = (
            server_frame(0x1, b"first")
            + server_frame(0x1, b"frag", final=False)
            + server_frame(0x0, b"men", final=False)
            + server_frame(0x0, b"ted")
            + server_frame(0x9, b"are you there")
            + server_frame(0x2, big)
        )
        for i in range(0, len(data), 7000):  # in pieces, splitting headers too
            writer.write(data[i : i + 7000])
            await writer.drain()
        seen.append(await read_client_frame(reader))  # the pong
        seen.append(await read_client_frame(reader))  # a text message
        seen.append(await read_client_frame(reader))  # close
        writer.write(server_frame(0x8, struct.pack("!H", 1000)))
        await writer.drain()
        writer.close()
        served.set_result(None)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    received: list[bytes] = []
    all_in = asyncio.Event()

    def on_message(data: bytes, now: float) -> None:
        received.append(data)
        if len(received) == 3:
            all_in.set()

    async with server:
        ws = await wsclient.connect(f"http://127.0.0.1:{port}/v1/ws", on_message)
        await asyncio.wait_for(all_in.wait(), 10)
        assert received == [b"first", b"fragmented", big]
        ws.send(b'{"type":"ping"}')
        await ws.close()
        await asyncio.wait_for(served, 10)
    assert seen == [(0xA, b"are you there"), (0x1, b'{"type":"ping"}'), (0x8, b"\x03\xe8")]
    assert ws.closed


async def test_refused_upgrade_is_a_handshake_error() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(wsclient.HandshakeError, match="503"):
            await wsclient.connect(f"http://127.0.0.1:{port}/v1/ws", lambda d, t: None, 10)
