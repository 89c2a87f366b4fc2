"""One live WebSocket: its protocol session and a bounded send buffer.

Nothing is awaited on behalf of one client by code serving others. Pushes are appended to
the connection's buffer; the first one of a loop iteration schedules a flush (a callback,
not a task) that writes everything pushed in that iteration as one WebSocket message (a
JSON array when it carries several frames) straight to the transport: one write, one
system call per socket per iteration however many frames it got. When the transport
pushes back (its buffer is over the high-water mark), the flush hands over to a
short-lived writer task that waits for the transport to drain and then writes everything
queued; what is pushed meanwhile counts against the buffer's bound. A client that stops
reading lets the buffer grow past that bound: it is then cut off as a slow consumer, and
the dropped pushes stay in its inbox.

Frames leave in the order they were pushed: one queue, emptied in order by whichever of
the flush or the writer task runs, never both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Iterable

import msgspec
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_protocol import RequestHandler

from pigeon.protocol import frames as f
from pigeon.protocol.codes import CloseCode
from pigeon.protocol.session import Session

log = logging.getLogger(__name__)

# Server-to-client frame header (RFC 6455 5.2): FIN + TEXT opcode, no mask, no RSV bits
# (no extension is negotiated: the endpoint turns compression off), then the length in
# 7, 7+16 or 7+64 bits.
_FIN_TEXT = 0x81
_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack
#: Above this, header and payload go to the transport separately (no copy of the payload).
_JOIN_MAX = 16 * 1024
#: Frames are packed into one message up to this size (a replay page of big messages
#: becomes several messages, not one of many MiB).
_PACK_MAX = 256 * 1024


def frame_header(length: int) -> bytes:
    """The header of an unmasked, final TEXT frame carrying ``length`` payload bytes."""
    if length < 126:
        return bytes((_FIN_TEXT, length))
    if length < 65536:
        return _HEADER_16(_FIN_TEXT, 126, length)
    return _HEADER_64(_FIN_TEXT, 127, length)


def _pack(batch: list[bytes]) -> list[bytes]:
    """The WebSocket messages carrying ``batch``: one frame, or a JSON array of frames of
    at most about ``_PACK_MAX`` bytes."""
    if len(batch) == 1:
        return batch
    messages: list[bytes] = []
    start, size = 0, 0
    for end, frame in enumerate(batch):
        if size and size + len(frame) > _PACK_MAX:
            messages.append(_array(batch[start:end]))
            start, size = end, 0
        size += len(frame) + 1
    messages.append(_array(batch[start:]))
    return messages


def _array(frames: list[bytes]) -> bytes:
    return frames[0] if len(frames) == 1 else b"[" + b",".join(frames) + b"]"


class Connection:
    # One per socket: no per-instance dict, and the queue exists only while used.
    __slots__ = (
        "_closer",
        "_flushing",
        "_loop",
        "_out",
        "_out_bytes",
        "_protocol",
        "_stream",
        "_writer",
        "buffer_limit",
        "closing",
        "session",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        session: Session,
        buffer_limit: int,
        request: web.BaseRequest,
    ) -> None:
        """``request`` (the upgraded one) gives the connection's protocol, whose transport
        pushes go to, and its writer, to wait for that transport to drain."""
        if ws.compress:
            raise ValueError("pushes are written as uncompressed frames: turn compression off")
        self.ws = ws
        self.session = session
        self.buffer_limit = buffer_limit
        self.closing = False
        self._out: list[bytes] | None = None
        self._out_bytes = 0
        self._flushing = False  # a flush callback is scheduled
        self._loop = asyncio.get_running_loop()  # once: each lookup is a system call on 3.11
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._protocol: RequestHandler = request.protocol
        self._stream: AbstractStreamWriter = request.writer

    @property
    def user_id(self) -> int:
        return self.session.user_id

    @property
    def device_id(self) -> int:
        return self.session.device_id

    def send(self, frame: msgspec.Struct) -> None:
        self.send_encoded([f.encode(frame)])

    def send_many(self, frames: Iterable[msgspec.Struct]) -> None:
        self.send_encoded([f.encode(frame) for frame in frames])

    def send_encoded(self, encoded: list[bytes]) -> None:
        if self.closing or not encoded:
            return
        out = self._out
        if out is None:
            out = self._out = []
        out.extend(encoded)
        self._out_bytes += sum(map(len, encoded))
        if self._writer is not None:  # waiting for the transport to drain
            if self._out_bytes > self.buffer_limit:
                self.close(CloseCode.SLOW_CONSUMER, "send buffer full: resume to catch up")
            return
        if self._out_bytes >= _PACK_MAX:  # enough for a full message: no need to wait
            self._write_out()
        elif not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        self._write_out()

    def _write_out(self) -> None:
        """Write what is queued, if the transport takes it now; else start the writer."""
        if self.closing or not self._out or self._writer is not None:
            return
        protocol = self._protocol
        if protocol.writing_paused or self.ws.closed:
            self._writer = asyncio.create_task(self._drain())
            return
        transport = protocol.transport
        if transport is None or transport.is_closing():
            self.closing = True  # the socket is gone; the handler cleans up
            return
        batch, self._out, self._out_bytes = self._out, None, 0
        for message in _pack(batch):
            self._write(transport, message)

    @staticmethod
    def _write(transport: asyncio.Transport, data: bytes) -> None:
        length = len(data)
        if length <= _JOIN_MAX:
            transport.write(frame_header(length) + data)
        else:
            transport.writelines((frame_header(length), data))

    @property
    def buffered(self) -> int:
        return self._out_bytes

    async def wait_drained(self) -> None:
        while not self.closing and (self._writer is not None or self._out):
            if self._writer is not None:
                await asyncio.shield(self._writer)
            else:
                await asyncio.sleep(0)  # the scheduled flush runs first

    async def _drain(self) -> None:
        try:
            while self._out and not self.closing:
                await self._stream.drain()  # until the transport is under its high-water mark
                if self.closing or not self._out:
                    break
                transport = self._protocol.transport
                if transport is None or transport.is_closing() or self.ws.closed:
                    raise ConnectionResetError("connection lost")
                batch, self._out, self._out_bytes = self._out, None, 0
                for message in _pack(batch):
                    self._write(transport, message)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("send failed, dropping connection: %s", exc)
            self.closing = True
        finally:
            self._writer = None
            if not self._out:
                self._out = None

    def close(self, code: CloseCode, reason: str) -> None:
        """Close without waiting; pending output is dropped (it stays in the inbox)."""
        if self.closing:
            return
        self.closing = True
        self.session.closed()
        self._out = None
        self._out_bytes = 0
        self._closer = asyncio.create_task(self._close(code, reason))

    async def close_after_flush(self, code: CloseCode, reason: str) -> None:
        """Deliver what is buffered (e.g. an error), then close."""
        await self.wait_drained()
        self.close(code, reason)

    async def _close(self, code: CloseCode, reason: str) -> None:
        writer = self._writer
        if writer is not None:
            writer.cancel()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=int(code), message=reason.encode()[:120], drain=False)
