"""A local cluster: PostgreSQL, Redis, N gateway processes and M worker processes.

Used by the failure tests, the benchmarks and `pigeon cluster up`. Every process is a real
`pigeon serve` / `pigeon worker` started with ``python -m pigeon.cli``, and each can be
killed (-9 or TERM) and started again, as can the database and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from pigeon.devcluster.services import PostgresServer, RedisServer, free_port

READY_TIMEOUT_S = 30.0


@dataclass
class Member:
    """One process of the cluster."""

    name: str
    args: list[str]
    log: Path
    port: int = 0  # gateways only
    proc: asyncio.subprocess.Process | None = None
    log_offset: int = 0  # where this run's output starts in the (appended) log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


@dataclass
class LocalCluster:
    root: Path
    gateways: int = 3
    workers: int = 2
    durable: bool = True  # False: PostgreSQL with fsync off (tests)
    base_port: int | None = None  # gateways on base_port, base_port+1...; None: free ports
    env: dict[str, str] = field(default_factory=dict)  # PIGEON_* settings for every process
    postgres: PostgresServer | None = None
    redis: RedisServer | None = None
    members: list[Member] = field(default_factory=list)
    store_url: str = ""

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.postgres = PostgresServer(durable=self.durable)
        self.redis = RedisServer()
        await asyncio.gather(
            asyncio.to_thread(self.postgres.start), asyncio.to_thread(self.redis.start)
        )
        self.store_url = await _create_database(self.postgres.dsn, "pigeon")
        for i in range(self.gateways):
            port = self.base_port + i if self.base_port else free_port()
            self.members.append(self._gateway(i, port))
        for i in range(self.workers):
            self.members.append(self._worker(i))
        # The first process applies the migrations (under an advisory lock); start it first
        # so the others do not all wait on the lock at once.
        await self.start_member(self.members[0])
        await asyncio.gather(*(self.start_member(m) for m in self.members[1:]))

    async def stop(self) -> None:
        await asyncio.gather(
            *(self.signal(m, signal.SIGTERM) for m in self.members), return_exceptions=True
        )
        for service in (self.redis, self.postgres):
            if service is not None:
                await asyncio.to_thread(service.close)

    async def __aenter__(self) -> LocalCluster:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # -- members -------------------------------------------------------------------------

    @property
    def gateway_members(self) -> list[Member]:
        return [m for m in self.members if m.name.startswith("gateway")]

    @property
    def worker_members(self) -> list[Member]:
        return [m for m in self.members if m.name.startswith("worker")]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.gateway_members]

    def _common(self) -> list[str]:
        assert self.redis is not None
        return ["--store", self.store_url, "--bus", self.redis.url]

    def _gateway(self, index: int, port: int) -> Member:
        args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "0",
                "--gateway-id", f"gw-{index}", *self._common()]  # fmt: skip
        return Member(f"gateway-{index}", args, self.root / f"gateway-{index}.log", port)

    def _worker(self, index: int) -> Member:
        args = ["worker", "--workers", "1", *self._common()]
        return Member(f"worker-{index}", args, self.root / f"worker-{index}.log")

    async def start_member(self, member: Member) -> None:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        member.log_offset = member.log.stat().st_size if member.log.exists() else 0
        with member.log.open("ab") as log:
            member.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pigeon.cli", *member.args,
                stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
                start_new_session=True,  # a Ctrl-C in the terminal goes to the supervisor only
            )  # fmt: skip
        await self._wait_ready(member)

    async def _wait_ready(self, member: Member) -> None:
        marker = "listening on" if member.port else "is running"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while marker not in _read_from(member.log, member.log_offset):
            if not member.running:
                raise RuntimeError(f"{member.name} exited: see {member.log}")
            if loop.time() > deadline:
                raise TimeoutError(f"{member.name} not ready: see {member.log}")
            await asyncio.sleep(0.05)
        if member.port:
            async with aiohttp.ClientSession() as http, http.get(member.url + "/healthz") as r:
                r.raise_for_status()

    async def signal(self, member: Member, sig: int, *, wait: bool = True) -> int | None:
        """Send ``sig`` (e.g. SIGKILL for kill -9, SIGTERM for a graceful stop)."""
        if not member.running:
            return None
        assert member.proc is not None
        with contextlib.suppress(ProcessLookupError):
            member.proc.send_signal(sig)
        if not wait:
            return None
        try:
            async with asyncio.timeout(30):
                return await member.proc.wait()
        except TimeoutError:
            member.proc.kill()
            return await member.proc.wait()

    async def restart_redis(self) -> None:
        assert self.redis is not None
        await asyncio.to_thread(self.redis.restart)

    async def stop_postgres(self) -> None:
        assert self.postgres is not None
        await asyncio.to_thread(self.postgres.stop)

    async def start_postgres(self) -> None:
        assert self.postgres is not None
        await asyncio.to_thread(self.postgres.start)


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def _create_database(server_dsn: str, name: str) -> str:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await conn.close()
    base, _, _ = server_dsn.rpartition("/")
    return f"{base}/{name}"
