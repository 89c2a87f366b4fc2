"""Test helpers that talk to a real server over real sockets (raw frames, no SDK)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

TIMEOUT = 10.0


@dataclass
class Account:
    user_id: int
    username: str
    token: str
    device_id: int
    password: str = ""


class Api:
    """Bare HTTP calls; returns (status, json)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base = base_url

    async def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if raw is not None:
            headers["Content-Type"] = "application/json"
        async with self.session.request(
            method, self.base + path, json=body if raw is None else None, data=raw, headers=headers
        ) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)

    async def account(self, username: str | None = None, device_name: str = "test") -> Account:
        username = username or "u" + secrets.token_hex(4)
        password = "correct horse " + username
        status, user = await self.call(
            "POST", "/v1/users", body={"username": username, "password": password}
        )
        assert status == 201, user
        return await self.login(username, password, device_name)

    async def login(self, username: str, password: str, device_name: str = "test") -> Account:
        status, body = await self.call(
            "POST",
            "/v1/sessions",
            body={"username": username, "password": password, "device_name": device_name},
        )
        assert status == 201, body
        return Account(body["user"]["id"], username, body["token"], body["device"]["id"], password)

    async def direct(self, a: Account, b: Account) -> int:
        status, conv = await self.call(
            "POST", "/v1/conversations", a.token, {"kind": "direct", "user": b.user_id}
        )
        assert status == 201, conv
        return int(conv["id"])

    async def group(self, admin: Account, members: list[Account], title: str = "group") -> int:
        status, conv = await self.call(
            "POST",
            "/v1/conversations",
            admin.token,
            {"kind": "group", "title": title, "members": [m.user_id for m in members]},
        )
        assert status == 201, conv
        return int(conv["id"])


@dataclass
class RawSocket:
    """One WebSocket speaking raw protocol frames; received frames are flattened in order."""

    ws: aiohttp.ClientWebSocketResponse
    frames: list[dict[str, Any]] = field(default_factory=list)  # received, not yet consumed

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))

    async def _read_one(self, timeout: float) -> None:
        message = await self.ws.receive(timeout=timeout)
        if message.type is aiohttp.WSMsgType.TEXT:
            data = json.loads(message.data)
            self.frames.extend(data if isinstance(data, list) else [data])
        elif message.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.CLOSING,
        ):
            raise ConnectionResetError(f"closed: {self.ws.close_code}")
        elif message.type is aiohttp.WSMsgType.ERROR:
            raise ConnectionResetError(str(message.data))

    async def expect(
        self, predicate: Callable[[dict[str, Any]], bool] | str, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """Consume and return the first pending frame matching ``predicate`` (or that type)."""
        test = (lambda fr: fr.get("type") == predicate) if isinstance(predicate, str) else predicate
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for index, frame in enumerate(self.frames):
                if test(frame):
                    del self.frames[index]
                    return frame
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame; pending: {self.frames[-5:]}")
            await self._read_one(remaining)

    async def collect(
        self, kind: str, count: int, timeout: float = TIMEOUT
    ) -> list[dict[str, Any]]:
        return [await self.expect(kind, timeout) for _ in range(count)]

    async def closed(self, timeout: float = TIMEOUT) -> int | None:
        """Wait for the server to close the socket; return the close code."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.ws.closed:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError("socket still open")
            try:
                await self._read_one(remaining)
            except ConnectionResetError:
                break
        return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()


async def open_socket(session: aiohttp.ClientSession, base_url: str) -> RawSocket:
    ws = await session.ws_connect(base_url + "/v1/ws", autoping=True)
    return RawSocket(ws)


async def connect(
    session: aiohttp.ClientSession,
    base_url: str,
    account: Account,
    resume_from: int | None = None,
    *,
    echo: bool = True,
) -> tuple[RawSocket, dict[str, Any]]:
    """Open, say hello, wait for welcome and the end of replay."""
    sock = await open_socket(session, base_url)
    hello: dict[str, Any] = {"type": "hello", "token": account.token, "device": account.device_id}
    if resume_from is not None:
        hello["resume_from"] = resume_from
    if not echo:
        hello["echo"] = False
    await sock.send(hello)
    welcome = await sock.expect("welcome")
    await sock.expect("caught_up")
    return sock, welcome


async def eventually(
    check: Callable[[], Any], timeout: float = TIMEOUT, interval: float = 0.02
) -> Any:
    """Poll an async condition until it returns a truthy value (for state with no event,
    e.g. a durable cursor written in the background)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"condition not met: last {result!r}")
        await asyncio.sleep(interval)
