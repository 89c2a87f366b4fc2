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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from pigeon.bus.envelope import Envelope

EnvelopeHandler = Callable[[Envelope], None]


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
