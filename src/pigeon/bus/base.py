"""The bus interface. Every implementation passes `tests/contract/test_bus.py`.

Contract:

* Presence registry: ``register`` maps a device to the gateway holding its socket, for
  ``ttl_s`` seconds; a gateway renews its devices with ``refresh`` (one batched call per
  heartbeat). An entry not renewed in time disappears by itself, so a dead gateway's
  devices fall out without anyone cleaning up.
* A user is online while at least one of their devices is registered; ``last_seen`` is
  when they last went offline (or were last refreshed).
* Routing: ``publish(gateway_id, envelope)`` hands the envelope to the handler that gateway
  passed to ``subscribe``, at most once, in publish order per publisher. Nothing is stored:
  an envelope for a gateway that is gone is dropped (the inbox is the truth).
* ``refresh`` also re-creates an entry of the gateway that is missing (lapsed, or lost when
  the bus restarted), so the registry heals within one heartbeat; it never takes over an
  entry that points at another gateway.
* Fan-out wake-ups: ``notify_fanout`` makes every handler passed to ``on_fanout``, in any
  process on the bus, run soon (at most once per burst of notifications), so fan-out
  workers start on a committed message without waiting for their poll.
* Rate-limit counters: ``count(key, window_s)`` adds one to ``key``'s counter for the
  current fixed window of ``window_s`` seconds and returns the new count, shared by every
  process on the bus (so a client cannot dodge a limit by switching gateways).
* A bus backend that is down must not take a gateway with it: pushes, registrations and
  wake-ups are shortcuts and may be dropped (logged); reads that answer a client
  (``presence``, ``count``) raise `BusUnavailable`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from pigeon.bus.envelope import Envelope

EnvelopeHandler = Callable[[Envelope], None]
FanoutHandler = Callable[[], None]


class BusUnavailable(Exception):
    """The bus backend cannot be reached; the caller may retry later."""


@dataclass(frozen=True, slots=True)
class PresenceState:
    user_id: int
    online: bool
    last_seen: float | None


class Bus(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def subscribe(self, gateway_id: str, handler: EnvelopeHandler) -> None:
        """Deliver envelopes published to ``gateway_id`` to ``handler`` (called on the loop)."""

    async def unsubscribe(self, gateway_id: str) -> None: ...

    async def publish(self, gateway_id: str, envelope: Envelope) -> None: ...

    async def register(
        self, gateway_id: str, user_id: int, device_id: int, ttl_s: float
    ) -> None: ...

    async def unregister(self, gateway_id: str, user_id: int, device_id: int) -> None:
        """Only removes the entry if it still points at ``gateway_id``."""

    async def refresh(
        self, gateway_id: str, devices: Iterable[tuple[int, int]], ttl_s: float
    ) -> None:
        """Renew (user_id, device_id) entries held by ``gateway_id``."""

    async def locate(self, user_ids: Iterable[int]) -> dict[str, list[int]]:
        """Gateways holding a live device of any of these users -> which of the users."""

    async def presence(self, user_ids: Iterable[int]) -> list[PresenceState]: ...

    async def count(self, key: str, window_s: float) -> int:
        """Count one hit on ``key`` in the current window; return the window's count."""

    async def notify_fanout(self) -> None:
        """A message was committed: wake the fan-out workers of every process."""

    async def on_fanout(self, handler: FanoutHandler) -> None:
        """Call ``handler`` (on the loop) after each burst of ``notify_fanout`` calls."""
