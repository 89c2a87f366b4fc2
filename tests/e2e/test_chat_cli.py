"""`pigeon chat`, driven like a person at a terminal: a subprocess reading stdin."""

from __future__ import annotations

import asyncio
import sys

import aiohttp

from pigeon.server import Server
from tests.support import Api, connect


async def test_chat_cli_sends_and_shows_incoming(
    server: Server, api: Api, http: aiohttp.ClientSession
) -> None:
    bob = await api.account("bob")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pigeon.cli", "chat", "--url", server.url,
        "--username", "alice", "--password", "alice-password-1", "--register",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None

    async def read_until(text: str) -> str:
        async with asyncio.timeout(20):
            while text not in (line := (await proc.stdout.readline()).decode()):  # type: ignore[union-attr]
                assert line, f"chat exited before printing {text!r}"
        return line

    try:
        await read_until("logged in as alice")
        b, _ = await connect(http, server.url, bob)
        proc.stdin.write(b"/dm bob\nhello from the terminal\n")
        await proc.stdin.drain()
        await read_until("you: hello from the terminal")
        msg = await b.expect(lambda fr: fr.get("type") == "msg" and fr["kind"] == "text")
        assert msg["body"] == "hello from the terminal"
        await b.send({"type": "send", "conv": msg["conv"], "client_id": "r", "body": "hi alice"})
        line = await read_until("hi alice")
        assert "bob: hi alice" in line
        proc.stdin.write(b"/quit\n")
        await proc.stdin.drain()
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
