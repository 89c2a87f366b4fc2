"""The real `pigeon serve` process: starts, serves, and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from tests.support import Api, connect


async def start_process(data_dir: Path, port: int) -> asyncio.subprocess.Process:
    env = {**os.environ, "PIGEON_SENDS_PER_SECOND": "1000", "PIGEON_SEND_BURST": "1000"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pigeon.cli", "serve",
        "--port", str(port), "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while b"listening on" not in (line := await proc.stdout.readline()):
            assert line, "server exited before listening"
    return proc


async def test_serve_then_sigterm_drains_and_exits_zero(
    tmp_path: Path, free_port: int, http: aiohttp.ClientSession
) -> None:
    proc = await start_process(tmp_path, free_port)
    url = f"http://127.0.0.1:{free_port}"
    try:
        api = Api(http, url)
        alice, bob = await api.account(), await api.account()
        conv = await api.direct(alice, bob)
        a, _ = await connect(http, url, alice)
        for i in range(50):
            await a.send({"type": "send", "conv": conv, "client_id": str(i), "body": f"m{i}"})
        proc.send_signal(signal.SIGTERM)
        code = await a.closed(timeout=20)
        assert code == 1001  # going away: reconnect elsewhere and resume
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # every send the server answered `sent` to is durable
    sent = sorted(fr["seq"] for fr in a.frames if fr["type"] == "sent")
    proc = await start_process(tmp_path, free_port)
    try:
        _, history = await Api(http, url).call(
            "GET", f"/v1/conversations/{conv}/messages?limit=100", alice.token
        )
        seqs = [m["seq"] for m in history["messages"]]
        assert set(sent) <= set(seqs)
        assert seqs == list(range(1, len(seqs) + 1))
        b, _ = await connect(http, url, bob)
        msgs = await b.collect("msg", len(seqs))
        assert [m["seq"] for m in msgs] == seqs
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
