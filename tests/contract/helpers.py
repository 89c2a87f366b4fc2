"""Helpers shared by the store contract suites."""

from __future__ import annotations

import itertools

from pigeon.store.base import Store
from pigeon.store.models import Device, InboxEntry, SendRequest, SendResult

MAX_BODY = 1000
MAX_MEMBERS = 10
_tokens = itertools.count()
_client_ids = itertools.count()


async def make_users(store: Store, *names: str) -> list[int]:
    return [(await store.create_user(n, n.title(), f"hash-{n}")).id for n in names]


async def make_device(store: Store, user_id: int, name: str = "phone") -> Device:
    return await store.create_device(user_id, name, f"token-{next(_tokens)}")


async def send(
    store: Store,
    conv_id: int,
    user_id: int,
    device_id: int,
    body: str = "hi",
    client_id: str | None = None,
) -> SendResult:
    cid = client_id if client_id is not None else f"c{next(_client_ids)}"
    request = SendRequest(conv_id, user_id, device_id, cid, "text", body)
    return await store.send_message(request, MAX_BODY)


async def drain(store: Store, worker: str = "w1", max_messages: int = 100) -> list[InboxEntry]:
    """Run fan-out until no work is left; return every entry written."""
    entries: list[InboxEntry] = []
    while True:
        batch = await store.fanout(worker, max_messages, lease_s=30)
        entries += batch.entries
        await store.fanout_pushed(worker, batch.convs)  # as a worker does after pushing
        if not batch.more and not batch.entries:
            return entries


async def inbox(store: Store, user_id: int, after: int = 0) -> list[InboxEntry]:
    return await store.inbox_after(user_id, after, 10_000)
