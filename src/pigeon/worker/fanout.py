"""The fan-out worker: committed messages -> one inbox entry per member -> pushes."""

from __future__ import annotations

import asyncio
import logging
import time

from pigeon.bus.routing import Router
from pigeon.store.base import Store
from pigeon.store.errors import StoreError

log = logging.getLogger(__name__)


class FanoutWorker:
    """Runs `Store.fanout` in a loop and pushes what it wrote.

    Woken by `wake()` after a commit in the same process; otherwise it polls, so jobs left
    by another process (or by a worker that died) are picked up within ``poll_s``.
    """

    def __init__(
        self,
        store: Store,
        router: Router,
        worker_id: str,
        *,
        batch_messages: int = 256,
        lease_s: float = 10.0,
        poll_s: float = 0.5,
    ) -> None:
        self._store = store
        self._router = router
        self.worker_id = worker_id
        self._batch = batch_messages
        self._lease_s = lease_s
        self._poll_s = poll_s
        self._woken = False  # since the current step began
        self._waiter: asyncio.Future[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        self._woken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    async def run(self) -> None:
        while not self._stopping:
            self._woken = False
            try:
                more = await self.step()
            except StoreError as exc:
                log.warning("fan-out failed, retrying: %s", exc)
                more = False
            if more:
                await asyncio.sleep(0)  # let sends and pushes interleave with a backlog
            elif not self._woken:
                await self._idle()

    async def _idle(self) -> None:
        """Until `wake`, or ``poll_s``. A future and a timer: a commit's push waits one
        turn of the event loop for this, where ``wait_for(event.wait())`` took three and
        a task per wait."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._poll_s, self.wake)  # the poll
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def step(self) -> bool:
        """One batch; True if more work is pending."""
        batch = await self._store.fanout(self.worker_id, self._batch, self._lease_s)
        if batch.nudge_users:
            await self._router.nudge(batch.nudge_users)
        if batch.entries:
            await self._router.deliver_entries(batch.entries)
        if batch.convs:
            await self._store.fanout_pushed(self.worker_id, batch.convs)
        return batch.more


class RetentionPruner:
    """Deletes inbox entries older than the retention period, once per ``every_s``."""

    def __init__(self, store: Store, retention_days: float, every_s: float = 3600.0) -> None:
        self._store = store
        self._retention_s = retention_days * 86400
        self._every_s = every_s

    async def run(self) -> None:
        while True:
            try:
                removed = await self._store.prune_inbox(time.time() - self._retention_s)
                if removed:
                    log.info("pruned %d inbox entries past retention", removed)
            except StoreError as exc:
                log.warning("inbox pruning failed: %s", exc)
            await asyncio.sleep(self._every_s)
