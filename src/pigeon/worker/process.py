"""The `pigeon worker` process: fan-out workers and the retention pruner, no gateway.

Gateways started with ``--workers 0`` commit messages and wake these workers through the
bus (`Bus.notify_fanout`); the workers also poll, so a lost wake-up costs only latency.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from typing import Any

from pigeon.bus.base import Bus
from pigeon.bus.routing import Router
from pigeon.config import Config
from pigeon.runtime import tune_gc_for_serving
from pigeon.store.base import Store
from pigeon.worker.fanout import FanoutWorker, RetentionPruner

log = logging.getLogger(__name__)


class WorkerProcess:
    def __init__(
        self, config: Config, store: Store, bus: Bus, workers: int, *, poll_s: float = 0.5
    ) -> None:
        if workers < 1:
            raise ValueError("a worker process needs at least one fan-out worker")
        self.config = config
        self.store = store
        self.bus = bus
        self.process_id = config.gateway_id or "wk-" + secrets.token_hex(4)
        router = Router(bus)
        self.workers = [
            FanoutWorker(
                store,
                router,
                f"{self.process_id}-w{i}",
                batch_messages=config.fanout_batch,
                lease_s=config.fanout_lease_s,
                poll_s=poll_s,
            )
            for i in range(workers)
        ]
        self._pruner = RetentionPruner(store, config.inbox_retention_days)
        self._worker_tasks: list[asyncio.Task[None]] = []
        self._pruner_task: asyncio.Task[Any] | None = None

    async def start(self) -> None:
        await self.store.open()
        await self.bus.open()
        for worker in self.workers:
            await self.bus.on_fanout(worker.wake)
            self._worker_tasks.append(asyncio.create_task(worker.run()))
        self._pruner_task = asyncio.create_task(self._pruner.run())
        log.info("worker process %s running %d fan-out workers", self.process_id, len(self.workers))

    async def stop(self) -> None:
        """Graceful: each worker finishes the batch it holds, then the backends close."""
        for worker in self.workers:
            worker.stop()
        if self._pruner_task is not None:
            self._pruner_task.cancel()
        tasks: list[asyncio.Task[Any]] = [*self._worker_tasks]
        if self._pruner_task is not None:
            tasks.append(self._pruner_task)
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.shutdown_grace_s)
        await self.bus.close()
        await self.store.close()


async def run_worker_process(process: WorkerProcess) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    await process.start()
    tune_gc_for_serving()
    print(
        f"Pigeon worker {process.process_id} is running {len(process.workers)} fan-out workers",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("Pigeon worker is shutting down: finishing fan-out batches", flush=True)
    await process.stop()
