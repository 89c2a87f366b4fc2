"""One live WebSocket: its protocol session and a bounded send buffer.

Nothing is awaited on behalf of one client by code serving others: `push` only appends to
the buffer; a short-lived writer task drains it, packing everything queued into one
WebSocket message (a JSON array). A client that stops reading lets the buffer grow past
its bound: it is then cut off as a slow consumer, and the dropped pushes stay in its inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import msgspec
from aiohttp import WSMsgType, web

from pigeon.protocol import frames as f
from pigeon.protocol.codes import CloseCode
from pigeon.protocol.session import Session

log = logging.getLogger(__name__)


class Connection:
    __slots__ = (
        "_closer",
        "_out",
        "_out_bytes",
        "_writer",
        "buffer_limit",
        "closing",
        "session",
        "ws",
    )

    def __init__(self, ws: web.WebSocketResponse, session: Session, buffer_limit: int) -> None:
        self.ws = ws
        self.session = session
        self.buffer_limit = buffer_limit
        self.closing = False
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

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
        self._out.extend(encoded)
        self._out_bytes += sum(len(e) for e in encoded)
        if self._out_bytes > self.buffer_limit:
            self.close(CloseCode.SLOW_CONSUMER, "send buffer full: resume to catch up")
            return
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain())

    @property
    def buffered(self) -> int:
        return self._out_bytes

    async def wait_drained(self) -> None:
        while self._writer is not None and not self.closing:
            await asyncio.shield(self._writer)

    async def _drain(self) -> None:
        try:
            while self._out and not self.closing:
                batch, self._out, self._out_bytes = self._out, [], 0
                data = batch[0] if len(batch) == 1 else b"[" + b",".join(batch) + b"]"
                await self.ws.send_frame(data, WSMsgType.TEXT)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("send failed, dropping connection: %s", exc)
            self.closing = True
        finally:
            self._writer = None

    def close(self, code: CloseCode, reason: str) -> None:
        """Close without waiting; pending output is dropped (it stays in the inbox)."""
        if self.closing:
            return
        self.closing = True
        self.session.closed()
        self._out.clear()
        self._out_bytes = 0
        self._closer = asyncio.create_task(self._close(code, reason))

    async def close_after_flush(self, code: CloseCode, reason: str) -> None:
        """Deliver what is buffered (e.g. an error), then close."""
        if self._writer is not None:
            await asyncio.shield(self._writer)
        self.close(code, reason)

    async def _close(self, code: CloseCode, reason: str) -> None:
        writer = self._writer
        if writer is not None:
            writer.cancel()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=int(code), message=reason.encode()[:120], drain=False)
