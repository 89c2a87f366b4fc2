"""A lean WebSocket client for the load generator: an asyncio protocol that parses frames
as the bytes arrive and hands each message to a callback.

A generator shard plays hundreds of devices in one process. With a general-purpose client
(aiohttp's), every message a socket gets wakes that socket's reader task through a queue:
on a 1000-member fan-out, the thousandth device heard its message only after the shard had
woken the 999 others, which put the generator's own cost into the latency it measured.
Here a message costs one callback, run when its bytes are read.

Only what the bench needs of RFC 6455: the opening handshake, messages from the server
(fragments joined), ping answered with pong, close. Client frames are masked with a
random key per connection, as the RFC requires.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

OnMessage = Callable[[bytes, float], None]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
_MAX_HANDSHAKE = 16 * 1024


class HandshakeError(ConnectionError):
    """The server did not switch protocols (status, or a wrong accept key)."""


def accept_key(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value a server must answer to ``key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def mask(key: bytes, payload: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (one big-integer XOR, in C)."""
    n = len(payload)
    if not n:
        return payload
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


def client_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """A final, masked client frame."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + _LENGTH_16.pack(n)
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + _LENGTH_64.pack(n)
    return header + key + mask(key, payload)


class RawWebSocket(asyncio.Protocol):
    """One client socket. ``on_message(data, now)`` gets every text or binary message, with
    the monotonic time its last bytes were read."""

    def __init__(self, host: str, path: str, on_message: OnMessage) -> None:
        self._on_message = on_message
        self._request_key = base64.b64encode(os.urandom(16))
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._request_key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self._key = os.urandom(4)
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._upgraded = False
        self._fragments: list[bytes] = []
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed_future: asyncio.Future[None] = loop.create_future()

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if not self._upgraded:
            self._buffer += data
            if not self._handshake():
                return
            data, self._buffer = bytes(self._buffer), bytearray()
        elif self._buffer:  # the rest of a frame that began in an earlier read
            self._buffer += data
            data, self._buffer = bytes(self._buffer), bytearray()
        try:
            used = self._frames(data, now)
        except ConnectionError:
            self.abort()
            return
        if used < len(data):
            self._buffer += data[used:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("closed during handshake"))
        if not self.closed_future.done():
            self.closed_future.set_result(None)

    # -- use ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._transport is None or self._transport.is_closing()

    def send(self, payload: bytes) -> None:
        """One text message; dropped if the socket is closed (as a phone losing signal)."""
        if not self.closed:
            assert self._transport is not None
            self._transport.write(client_frame(_TEXT, payload, self._key))

    async def close(self, timeout: float = 5.0) -> None:
        """The closing handshake: send close, wait for the server to end the connection."""
        if not self.closed:
            assert self._transport is not None
            self._transport.write(client_frame(_CLOSE, struct.pack("!H", 1000), self._key))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed_future), timeout)
        self.abort()

    def abort(self) -> None:
        """Drop the connection at once, no closing handshake."""
        if self._transport is not None:
            self._transport.abort()

    # -- parsing -------------------------------------------------------------------------

    def _handshake(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HANDSHAKE:
                self._fail(HandshakeError("no end of response headers"))
            return False
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in head[1:])
        )
        status = head[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            self._fail(HandshakeError(f"expected 101 Switching Protocols, got {head[0]!r}"))
            return False
        if headers.get("sec-websocket-accept", "").encode() != accept_key(self._request_key):
            self._fail(HandshakeError("wrong Sec-WebSocket-Accept"))
            return False
        self._upgraded = True
        self.opened.set_result(None)
        return True

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        self.abort()

    def _frames(self, data: bytes, now: float) -> int:
        """Handle every whole frame in ``data``; return how many bytes they took."""
        start, end = 0, len(data)
        while end - start >= 2:
            first, second = data[start], data[start + 1]
            length, at = second & 0x7F, start + 2
            if second & 0x80:
                raise ConnectionError("the server masked a frame")
            if length == 126:
                if end - at < 2:
                    break
                (length,) = _LENGTH_16.unpack_from(data, at)
                at += 2
            elif length == 127:
                if end - at < 8:
                    break
                (length,) = _LENGTH_64.unpack_from(data, at)
                at += 8
            if end - at < length:
                break
            start = at + length
            self._frame(first & 0x80 != 0, first & 0x0F, data[at:start], now)
        return start

    def _frame(self, final: bool, opcode: int, payload: bytes, now: float) -> None:
        if opcode in (_TEXT, _BINARY, _CONTINUATION):
            if not final:
                self._fragments.append(payload)
                return
            if self._fragments:
                payload = b"".join([*self._fragments, payload])
                self._fragments = []
            self._on_message(payload, now)
        elif opcode == _PING:
            assert self._transport is not None
            self._transport.write(client_frame(_PONG, payload, self._key))
        elif opcode == _CLOSE:
            self.abort()


async def connect(url: str, on_message: OnMessage, timeout: float = 30.0) -> RawWebSocket:
    """Open ``ws://`` (or ``http://``) ``url`` and complete the handshake."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"need host and port in {url!r}")
    path = parts.path or "/"
    host = f"{parts.hostname}:{parts.port}"
    loop = asyncio.get_running_loop()
    _, protocol = await asyncio.wait_for(
        loop.create_connection(
            lambda: RawWebSocket(host, path, on_message), parts.hostname, parts.port
        ),
        timeout,
    )
    try:
        await asyncio.wait_for(asyncio.shield(protocol.opened), timeout)
    except BaseException:
        protocol.abort()
        raise
    return protocol
