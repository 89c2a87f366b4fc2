"""What a run talks to: a Pigeon server started here as a subprocess, or given URLs.

Accounts are seeded straight into the embedded store before the server starts (fast: no
argon2 per user, one token per device), or over HTTP when only URLs are known.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pigeon.auth import new_token, token_hash
from pigeon.bench.metrics import raise_nofile

#: Limits raised so that the benchmark measures the server, not its flood protection.
BENCH_ENV = {
    "PIGEON_SENDS_PER_SECOND": "1000000",
    "PIGEON_SEND_BURST": "1000000",
    "PIGEON_FRAMES_PER_SECOND": "1000000",
    "PIGEON_FRAME_BURST": "1000000",
    "PIGEON_SEND_BUFFER_BYTES": str(64 * 1024 * 1024),
}


@dataclass(frozen=True, slots=True)
class Account:
    user_id: int
    device_id: int
    token: str
    url: str  # the gateway this client connects to


@dataclass
class Population:
    accounts: list[Account] = field(default_factory=list)
    directs: list[int] = field(default_factory=list)  # conv id of pair i (accounts 2i, 2i+1)
    groups: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Needs:
    users: int
    pairs: int = 0  # direct conversations between accounts (0,1), (2,3), ...
    group_members: int = 0  # one group of the first N accounts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _preexec() -> None:
    raise_nofile()


class ServerProcess:
    """`python -m pigeon.cli serve` on a fresh data dir, with raised limits."""

    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 30.0) -> None:
        env = {**os.environ, **BENCH_ENV, **self.extra_env}
        log = open(self.data_dir / "server.log", "wb")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pigeon.cli", "serve", "--port", str(self.port),
             "--data-dir", str(self.data_dir)],
            stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_preexec,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not listen in {timeout_s}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.data_dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def seed_store(data_dir: Path, needs: Needs, urls: Sequence[str]) -> Population:
    """Write users, devices and conversations into the embedded SQLite store directly."""
    from pigeon.store.sqlite import SqliteStore

    store = SqliteStore(str(data_dir / "pigeon.sqlite3"))
    await store.open()
    try:
        return await seed_into(store, needs, urls)
    finally:
        await store.close()


async def seed_postgres(store_url: str, needs: Needs, urls: Sequence[str]) -> Population:
    """The same, straight into a cluster's PostgreSQL database. The seeding connections run
    with ``synchronous_commit=off`` (their own session setting, as a DSN parameter): the
    accounts are set-up, not measured; the servers' connections keep the durable default."""
    from pigeon.store.postgres import PostgresStore

    sep = "&" if "?" in store_url else "?"
    store = PostgresStore(f"{store_url}{sep}synchronous_commit=off", pool_size=20)
    await store.open()
    try:
        return await seed_into(store, needs, urls)
    finally:
        await store.close()


async def seed_into(store: Any, needs: Needs, urls: Sequence[str]) -> Population:
    """Users (one shared password hash, never used: logins are not measured), one device
    and token each, the pairs' direct conversations and the group, via the store's API."""
    pw = "$argon2id$v=19$m=1024,t=1,p=1$YmVuY2hiZW5jaA$bench"
    tag = secrets.token_hex(3)

    async def one(i: int) -> Account:
        user = await store.create_user(f"b{tag}_{i}", f"bench {i}", pw)
        token = new_token()
        device = await store.create_device(user.id, "bench", token_hash(token))
        return Account(user.id, device.id, token, urls[i % len(urls)])

    population = Population()
    for start in range(0, needs.users, 500):
        batch = range(start, min(needs.users, start + 500))
        population.accounts += await asyncio.gather(*(one(i) for i in batch))
    acc = population.accounts
    for start in range(0, needs.pairs, 500):
        batch = range(start, min(needs.pairs, start + 500))
        convs = await asyncio.gather(
            *(store.direct_conversation(acc[2 * i].user_id, acc[2 * i + 1].user_id)
              for i in batch)
        )  # fmt: skip
        population.directs += [c.id for c in convs]
    if needs.group_members:
        members = [a.user_id for a in acc[1 : needs.group_members]]
        group = await store.create_group(acc[0].user_id, "bench", members, 1 << 30)
        population.groups.append(group.id)
    return population


class ClusterTarget:
    """A `LocalCluster` started for one point: durable PostgreSQL (fsync on), Redis, G
    gateways and W workers, each with the bench limits (and any PIGEON_* of the caller's
    environment, which every process inherits)."""

    def __init__(self, root: Path, gateways: int, workers: int) -> None:
        from pigeon.devcluster.cluster import LocalCluster

        self.cluster = LocalCluster(
            root, gateways=gateways, workers=workers, durable=True, env=dict(BENCH_ENV)
        )

    async def start(self) -> None:
        try:
            await self.cluster.start()
        except BaseException:
            await self.cluster.stop()
            raise

    @property
    def urls(self) -> list[str]:
        return self.cluster.urls

    @property
    def pids(self) -> list[int]:
        return [m.proc.pid for m in self.cluster.members if m.proc is not None]

    @property
    def services(self) -> dict[str, int]:
        """Main pids of PostgreSQL (postmaster) and Redis, when known."""
        out: dict[str, int] = {}
        for name, service in (("postgresql", self.cluster.postgres), ("redis", self.cluster.redis)):
            proc = getattr(service, "_proc", None)
            if proc is not None and proc.poll() is None:
                out[name] = proc.pid
        return out

    async def stop(self) -> int | None:
        """Stop every member (TERM); the first non-zero exit code, or 0."""
        members = self.cluster.members
        dead = [m.proc.returncode for m in members if m.proc is not None and not m.running]
        codes = dead + list(
            await asyncio.gather(*(self.cluster.signal(m, signal.SIGTERM) for m in members))
        )
        await self.cluster.stop()
        bad = [c for c in codes if c not in (0, None)]
        return bad[0] if bad else 0


async def seed_http(urls: Sequence[str], needs: Needs) -> Population:
    """Register and log in over HTTP (slow: argon2 on the server for every account)."""
    tag = secrets.token_hex(3)
    base = urls[0]
    population = Population()
    async with aiohttp.ClientSession() as http:

        async def call(path: str, body: dict[str, Any], token: str = "") -> Any:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.post(base + path, json=body, headers=headers) as resp:
                data = await resp.json()
                if resp.status >= 300:
                    raise RuntimeError(f"{path}: {resp.status} {data}")
                return data

        async def one(i: int) -> Account:
            name, password = f"b{tag}_{i}", "bench-" + secrets.token_hex(8)
            await call("/v1/users", {"username": name, "password": password})
            login = await call(
                "/v1/sessions", {"username": name, "password": password, "device_name": "bench"}
            )
            return Account(
                login["user"]["id"], login["device"]["id"], login["token"], urls[i % len(urls)]
            )

        for start in range(0, needs.users, 50):
            batch = range(start, min(needs.users, start + 50))
            population.accounts += await asyncio.gather(*(one(i) for i in batch))
        acc = population.accounts
        for i in range(needs.pairs):
            conv = await call(
                "/v1/conversations", {"kind": "direct", "user": acc[2 * i + 1].user_id},
                acc[2 * i].token,
            )  # fmt: skip
            population.directs.append(int(conv["id"]))
        if needs.group_members:
            members = [a.user_id for a in acc[1 : needs.group_members]]
            conv = await call(
                "/v1/conversations", {"kind": "group", "title": "bench", "members": members},
                acc[0].token,
            )  # fmt: skip
            population.groups.append(int(conv["id"]))
    return population


def temp_data_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pigeon-bench-"))
