"""Routing: frames addressed to users go to the gateways holding their devices, one
envelope per gateway (never one bus message per recipient)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from pigeon.bus.base import Bus
from pigeon.bus.envelope import Envelope, RoutedFrame, Target
from pigeon.protocol.frames import Msg, Receipt
from pigeon.store.models import InboxEntry


def entry_frame(entry: InboxEntry) -> Msg | Receipt:
    """The frame a device receives for one inbox entry."""
    if entry.message is not None:
        m = entry.message
        return Msg(
            inbox_seq=entry.inbox_seq,
            conv=m.conv_id,
            seq=m.seq,
            sender=m.sender_id,
            kind=m.kind,
            body=m.body,
            ts=m.ts,
            sender_device=m.sender_device,
            client_id=m.client_id,
        )
    r = entry.receipt
    assert r is not None, "an inbox entry holds a message or a receipt"
    return Receipt(
        inbox_seq=entry.inbox_seq,
        conv=r.conv_id,
        user=r.user_id,
        delivered_seq=r.delivered_seq,
        read_seq=r.read_seq,
        all_delivered_seq=r.all_delivered_seq,
        all_read_seq=r.all_read_seq,
        ts=r.ts,
    )


class Router:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def _route(self, user_ids: Iterable[int], target: Callable[[int], Target]) -> None:
        """One envelope per gateway holding any of the users, with a target per user."""
        located = await self._bus.locate(user_ids)
        for gateway_id, users in located.items():
            await self._bus.publish(gateway_id, Envelope([target(user) for user in users]))

    async def deliver(self, frames_by_user: Mapping[int, list[RoutedFrame]]) -> None:
        if frames_by_user:
            await self._route(frames_by_user, lambda user: Target(user, frames_by_user[user]))

    async def deliver_entries(self, entries: Iterable[InboxEntry]) -> None:
        by_user: dict[int, list[RoutedFrame]] = {}
        for entry in entries:
            by_user.setdefault(entry.user_id, []).append(entry_frame(entry))
        await self.deliver(by_user)

    async def broadcast(
        self, user_ids: Iterable[int], frame: RoutedFrame, skip_device: int = 0
    ) -> None:
        """The same ephemeral frame (typing, presence) to several users."""
        await self._route(user_ids, lambda user: Target(user, [frame], skip_device))

    async def nudge(self, user_ids: Iterable[int]) -> None:
        """Make the users' gateways read their inboxes (pushes were lost)."""
        await self._route(user_ids, lambda user: Target(user, [], nudge=True))

    async def revoke(self, user_id: int, device_id: int) -> None:
        """Close a revoked device's sockets on whichever gateway holds them."""
        await self._route([user_id], lambda user: Target(user, [], revoke_device=device_id))
