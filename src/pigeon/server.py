"""Composition: build a whole Pigeon (store, bus, hub, HTTP, workers) from a Config.

This is the only place that picks concrete backends; everything else receives them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pigeon.auth import Passwords
from pigeon.bus.base import Bus
from pigeon.bus.memory import MemoryBus
from pigeon.bus.routing import Router
from pigeon.config import Config
from pigeon.gateway.http import HttpApi, problem_middleware
from pigeon.gateway.hub import Hub
from pigeon.gateway.openapi import openapi_document
from pigeon.gateway.ws import websocket_handler
from pigeon.store.base import Store
from pigeon.worker.fanout import FanoutWorker, RetentionPruner
from pigeon.worker.wakeup import FanoutNotifier

log = logging.getLogger(__name__)


def open_store(config: Config) -> Store:
    url = config.store_url
    detail = config.limits.receipt_detail_max_group
    if not url or url.startswith("sqlite:"):
        from pigeon.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://") if url else str(config.sqlite_path)
        if not url:
            config.data_dir.mkdir(parents=True, exist_ok=True)
        return SqliteStore(
            path,
            receipt_detail_max_group=detail,
            fsync=config.sqlite_fsync,
            # Entries fanned out with the send are pushed by this process's own workers; a
            # gateway without any leaves every message to the worker processes.
            fanout_with_send=config.workers > 0,
        )
    if url.startswith(("postgresql://", "postgres://")):
        from pigeon.store.postgres import PostgresStore  # asyncpg: the "scale" extra

        return PostgresStore(url, receipt_detail_max_group=detail)
    raise ValueError(f"unsupported store URL: {url!r}")


def open_bus(config: Config) -> Bus:
    if config.bus_url in ("", "memory://"):
        return MemoryBus()
    if config.bus_url.startswith(("redis://", "rediss://", "unix://")):
        from pigeon.bus.redis import RedisBus

        return RedisBus(config.bus_url)
    raise ValueError(f"unsupported bus URL: {config.bus_url!r}")


@dataclass
class Server:
    config: Config
    store: Store
    bus: Bus
    passwords: Passwords = field(default_factory=Passwords)
    gateway_id: str = ""
    hub: Hub = field(init=False)
    _notifier: FanoutNotifier = field(init=False)
    workers: list[FanoutWorker] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self.gateway_id = self.gateway_id or self.config.gateway_id or "gw-" + secrets.token_hex(4)
        router = Router(self.bus)
        self._notifier = FanoutNotifier(self.bus)
        self.workers = [
            FanoutWorker(
                self.store,
                router,
                f"{self.gateway_id}-w{i}",
                batch_messages=self.config.fanout_batch,
                lease_s=self.config.fanout_lease_s,
            )
            for i in range(self.config.workers)
        ]
        self.hub = Hub(
            self.config,
            self.gateway_id,
            self.store,
            self.bus,
            router,
            self._wake_workers,
        )

    def _wake_workers(self) -> None:
        for worker in self.workers:
            worker.wake()
        if not self.workers:  # the workers are `pigeon worker` processes: wake them
            self._notifier()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[problem_middleware], client_max_size=1024 * 1024)
        api = HttpApi(self.config, self.store, self.hub, self.passwords)
        app.add_routes(api.routes())
        app.router.add_get("/v1/ws", websocket_handler(self.hub))
        document = openapi_document()

        async def openapi(_: web.Request) -> web.Response:
            return web.json_response(document)

        app.router.add_get("/openapi.json", openapi)
        return app

    async def start(self) -> None:
        await self.store.open()
        await self.bus.open()
        await self.hub.start()
        for worker in self.workers:
            # Also woken by gateways in other processes that run no workers themselves.
            await self.bus.on_fanout(worker.wake)
            self._tasks.append(asyncio.create_task(worker.run()))
        if self.workers:
            pruner = RetentionPruner(self.store, self.config.inbox_retention_days)
            self._tasks.append(asyncio.create_task(pruner.run()))
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=self.config.listen_backlog,
        )
        await site.start()
        self.port = self._runner.addresses[0][1] if self._runner.addresses else self.config.port
        log.info(
            "gateway %s listening on http://%s:%d", self.gateway_id, self.config.host, self.port
        )

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def stop(self) -> None:
        """Graceful: clients are told to reconnect, in-flight commits finish, workers drain."""
        await self.hub.shutdown(self.config.shutdown_grace_s)
        if self._runner is not None:
            await self._runner.cleanup()
        for worker in self.workers:
            worker.stop()
        if self._tasks:
            for task in self._tasks[len(self.workers) :]:
                task.cancel()
            await asyncio.wait(self._tasks, timeout=self.config.shutdown_grace_s)
        await self._notifier.drain(self.config.shutdown_grace_s)
        await self.bus.close()
        await self.store.close()


def build_server(config: Config, passwords: Passwords | None = None) -> Server:
    return Server(config, open_store(config), open_bus(config), passwords or Passwords())
