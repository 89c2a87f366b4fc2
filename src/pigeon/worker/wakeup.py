"""Waking fan-out workers in other processes, from a gateway that runs none itself."""

from __future__ import annotations

import asyncio
import logging

from pigeon.bus.base import Bus

log = logging.getLogger(__name__)


class FanoutNotifier:
    """A gateway's ``on_committed`` when its fan-out workers live in other processes.

    Called synchronously on every commit, so it only starts a task (fire-and-forget); and
    it is coalesced: while one ``notify_fanout`` is in flight, any number of further
    commits make exactly one more, so a burst of sends costs a couple of bus messages.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def __call__(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._notify())

    async def _notify(self) -> None:
        while True:
            self._again = False
            try:
                await self._bus.notify_fanout()
            except Exception as exc:
                # Workers still poll: a lost wake-up only delays delivery by their poll.
                log.warning("fan-out wake-up failed: %s", exc)
            if not self._again:
                return

    async def drain(self, timeout_s: float) -> None:
        """Let a wake-up in flight go out (at shutdown, before the bus closes)."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=timeout_s)
