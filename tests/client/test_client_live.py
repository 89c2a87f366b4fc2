"""The SDK against the real in-process server: login, direct chat, receipts, resume."""

from __future__ import annotations

from typing import Any

import pytest

from pigeon.client import Client, HttpApi, MessageEvent, ReceiptEvent
from pigeon.server import Server


async def _next_message(client: Client) -> MessageEvent:
    async for event in client:
        if isinstance(event, MessageEvent):
            return event
    raise AssertionError("stream ended")


async def _receipt(client: Client, read_seq: int) -> ReceiptEvent:
    async for event in client:
        if isinstance(event, ReceiptEvent) and event.read_seq >= read_seq:
            return event
    raise AssertionError("stream ended")


@pytest.mark.timeout(30)
async def test_direct_chat_with_receipts_over_the_real_server(server: Server) -> None:
    async with HttpApi(server.url) as api:
        await api.register("ana", "password-ana", "Ana")
        bob_user = await api.register("bob", "password-bob", "Bob")
    options: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.2}
    ana = await Client.login(server.url, "ana", "password-ana", "laptop", **options)
    bob = await Client.login(server.url, "bob", "password-bob", "phone", **options)
    async with ana, bob:
        conv = await ana.http.create_direct(bob_user.id)
        await ana.wait_caught_up()
        await bob.wait_caught_up()
        sent = await ana.send(conv.id, "hi bob")
        got = await _next_message(bob)
        assert (got.conv, got.seq, got.body, got.sender) == (
            conv.id,
            sent.seq,
            "hi bob",
            ana.user_id,
        )
        # Ana's own message reaches her stream too: from the server's `sent`, in inbox order
        # (the SDK says `echo: false`, so no `msg` comes back for it).
        mine = await _next_message(ana)
        assert (mine.seq, mine.body, mine.sender, mine.client_id) == (
            sent.seq,
            "hi bob",
            ana.user_id,
            sent.client_id,
        )
        assert mine.inbox_seq == sent.inbox_seq > 0 and ana.resume_position >= sent.inbox_seq
        await bob.mark_read(conv.id, got.seq)
        receipt = await _receipt(ana, got.seq)
        assert receipt.user == bob.user_id and receipt.delivered_seq >= got.seq
        history = await bob.http.messages(conv.id)
        assert [m.body for m in history][-1] == "hi bob"
