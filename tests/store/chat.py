"""Alice writing to Bob on an embedded store: the set-up the store's own tests share."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

from pigeon.store.models import Conversation, Device, SendRequest, SendResult, User
from pigeon.store.sqlite import SqliteStore


@dataclasses.dataclass(frozen=True)
class DirectChat:
    store: SqliteStore
    alice: User
    phone: Device  # Alice's
    conv: Conversation

    def send(self, i: int, body: str = "") -> asyncio.Future[SendResult]:
        """Alice's message number ``i`` (client id ``c{i}``), queued; await it for `sent`."""
        request = SendRequest(
            self.conv.id, self.alice.id, self.phone.id, f"c{i}", "text", body or f"m{i}"
        )
        return self.store.send_message(request, 4096)


@contextlib.asynccontextmanager
async def alice_writing_to_bob(store: SqliteStore) -> AsyncIterator[DirectChat]:
    """The store open, with Alice and Bob's direct conversation. Closes the store after."""
    await store.open()
    try:
        alice = await store.create_user("alice", "Alice", "x")
        bob = await store.create_user("bob", "Bob", "x")
        phone = await store.create_device(alice.id, "phone", "token-hash")
        conv = await store.direct_conversation(alice.id, bob.id)
        yield DirectChat(store, alice, phone, conv)
    finally:
        await store.close()
