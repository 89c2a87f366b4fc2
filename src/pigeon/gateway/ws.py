"""The WebSocket endpoint: pumps bytes between aiohttp and the hub, nothing more.

An idle socket is the gateway's main cost, so the handler keeps as little alive as it can
while it waits: no per-socket timers (the hub's sweep does heartbeats), no last message
held between frames, no response headers once they are sent.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import WSMessage, WSMsgType, web

from pigeon.gateway.connection import Connection
from pigeon.gateway.hub import Hub

_DATA = (WSMsgType.TEXT, WSMsgType.BINARY)


def websocket_handler(hub: Hub) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    limits = hub.config.limits

    def dispatch(conn: Connection, message: WSMessage) -> bool:
        """Hand one message to the hub; False once the socket is done."""
        kind = message.type
        if kind in _DATA:
            hub.on_frame(conn, message.data)
            return True
        # CLOSE/CLOSING/CLOSED end the socket; ERROR is e.g. a frame above the hard
        # ceiling (aiohttp closes with 1009). PING/PONG are answered by aiohttp itself.
        return kind is WSMsgType.PING or kind is WSMsgType.PONG

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
        ws.headers.clear()  # sent with the 101; nothing reads them again
        _drop_http_parser(request)
        conn = Connection(ws, hub.new_session(), limits.send_buffer_bytes, request)
        del request
        hub.attach(conn)
        try:
            # `receive()` rather than `async for`: one coroutine less per idle socket, and
            # the message is only on the stack while dispatched, not kept until the next.
            while dispatch(conn, await ws.receive()):
                pass
        finally:
            await hub.detach(conn)
        return ws

    return handle


def _drop_http_parser(request: web.Request) -> None:
    """Let the HTTP request parser of an upgraded connection go (~2 KiB per socket).

    aiohttp keeps it for the connection's life although, once the WebSocket reader is
    installed, every byte goes to that reader; aiohttp itself sets the attribute to None
    when the connection is lost, and checks for None wherever it uses it. Private
    attribute: if a future aiohttp renames it, this does nothing (the WebSocket tests
    exercise the path either way).
    """
    protocol = request.protocol
    if getattr(protocol, "_payload_parser", None) is not None and hasattr(protocol, "_parser"):
        protocol._parser = None
