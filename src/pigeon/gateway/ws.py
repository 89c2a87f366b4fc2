"""The WebSocket endpoint: pumps bytes between aiohttp and the hub, nothing more."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

from pigeon.gateway.connection import Connection
from pigeon.gateway.hub import Hub


def websocket_handler(hub: Hub) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    limits = hub.config.limits

    async def handle(request: web.Request) -> web.StreamResponse:
        if not hub.accepting:
            raise web.HTTPServiceUnavailable(text="shutting down")
        # No compression: permessage-deflate costs 40-100 KiB per socket (docs/architecture.md).
        ws = web.WebSocketResponse(
            compress=False,
            max_msg_size=limits.hard_frame_bytes,
            autoping=True,
            timeout=2.0,
        )
        await ws.prepare(request)
        conn = Connection(ws, hub.new_session(), limits.send_buffer_bytes)
        hub.attach(conn)
        try:
            async for message in ws:
                if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    hub.on_frame(conn, message.data)
                elif message.type is WSMsgType.ERROR:
                    break  # e.g. a frame above the hard ceiling: aiohttp closes with 1009
        finally:
            await hub.detach(conn)
        return ws

    return handle
