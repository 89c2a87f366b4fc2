"""The in-process bus of the embedded default: dictionaries and the event loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from pigeon.bus.base import EnvelopeHandler, FanoutHandler, PresenceState
from pigeon.bus.envelope import Envelope

log = logging.getLogger(__name__)


class MemoryBus:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._handlers: dict[str, EnvelopeHandler] = {}
        # (user, device) -> (gateway, expires_at)
        self._devices: dict[tuple[int, int], tuple[str, float]] = {}
        self._by_user: dict[int, set[int]] = {}
        self._last_seen: dict[int, float] = {}
        self._fanout_handlers: list[FanoutHandler] = []
        self._counters: dict[str, tuple[int, int]] = {}  # key -> (window number, count)
        self._fanout_scheduled = False

    async def open(self) -> None:
        pass

    async def count(self, key: str, window_s: float) -> int:
        window = int(self._clock() // window_s)
        current, hits = self._counters.get(key, (window, 0))
        hits = hits + 1 if current == window else 1
        if len(self._counters) > 100_000:  # old windows of idle keys: drop them all
            self._counters.clear()
        self._counters[key] = (window, hits)
        return hits

    async def close(self) -> None:
        self._handlers.clear()
        self._fanout_handlers.clear()

    async def subscribe(self, gateway_id: str, handler: EnvelopeHandler) -> None:
        self._handlers[gateway_id] = handler

    async def unsubscribe(self, gateway_id: str) -> None:
        self._handlers.pop(gateway_id, None)

    async def publish(self, gateway_id: str, envelope: Envelope) -> None:
        handler = self._handlers.get(gateway_id)
        if handler is None:
            return
        # Now, not at the loop's next turn: a push is one turn of the loop sooner (at
        # 2 000 msg/s a turn is 0.1-0.3 ms). A subscriber's failure stays its own.
        try:
            handler(envelope)
        except Exception:
            log.exception("memory bus: handler for %s failed", gateway_id)

    async def register(self, gateway_id: str, user_id: int, device_id: int, ttl_s: float) -> None:
        self._devices[(user_id, device_id)] = (gateway_id, self._clock() + ttl_s)
        self._by_user.setdefault(user_id, set()).add(device_id)

    async def unregister(self, gateway_id: str, user_id: int, device_id: int) -> None:
        entry = self._devices.get((user_id, device_id))
        if entry is None or entry[0] != gateway_id:
            return
        del self._devices[(user_id, device_id)]
        devices = self._by_user.get(user_id)
        if devices is not None:
            devices.discard(device_id)
            if not devices:
                del self._by_user[user_id]
        self._last_seen[user_id] = self._clock()

    async def refresh(
        self, gateway_id: str, devices: Iterable[tuple[int, int]], ttl_s: float
    ) -> None:
        now = self._clock()
        expires = now + ttl_s
        for key in devices:
            entry = self._devices.get(key)
            # A missing or lapsed entry is re-created: the socket is still here. One that
            # points at another gateway belongs to the device's newer connection.
            if entry is None or entry[0] == gateway_id or entry[1] <= now:
                self._devices[key] = (gateway_id, expires)
                self._by_user.setdefault(key[0], set()).add(key[1])

    async def locate(self, user_ids: Iterable[int]) -> dict[str, list[int]]:
        now = self._clock()
        found: dict[str, list[int]] = {}
        for user_id in user_ids:
            gateways = {gw for gw, _ in self._live_devices(user_id, now)}
            for gateway_id in gateways:
                found.setdefault(gateway_id, []).append(user_id)
        return found

    async def presence(self, user_ids: Iterable[int]) -> list[PresenceState]:
        now = self._clock()
        return [
            PresenceState(
                user_id, bool(self._live_devices(user_id, now)), self._last_seen.get(user_id)
            )
            for user_id in user_ids
        ]

    async def notify_fanout(self) -> None:
        # Coalesced: a burst of commits before the handlers run wakes them once.
        if self._fanout_handlers and not self._fanout_scheduled:
            self._fanout_scheduled = True
            asyncio.get_running_loop().call_soon(self._run_fanout_handlers)

    async def on_fanout(self, handler: FanoutHandler) -> None:
        self._fanout_handlers.append(handler)

    def _run_fanout_handlers(self) -> None:
        self._fanout_scheduled = False
        for handler in list(self._fanout_handlers):
            handler()

    def _live_devices(self, user_id: int, now: float) -> list[tuple[str, int]]:
        live = []
        for device_id in list(self._by_user.get(user_id, ())):
            gateway_id, expires = self._devices[(user_id, device_id)]
            if expires > now:
                live.append((gateway_id, device_id))
            else:  # lapsed: its gateway stopped refreshing
                del self._devices[(user_id, device_id)]
                self._by_user[user_id].discard(device_id)
                self._last_seen[user_id] = expires
        if user_id in self._by_user and not self._by_user[user_id]:
            del self._by_user[user_id]
        return live
