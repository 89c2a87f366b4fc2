"""Store contract: sends committed together (many sockets' sends batched in one write).

Both stores batch the sends queued at the same time (`SqliteStore` per commit round,
`PostgresStore` per ``pigeon_send`` call); these cases pin what a batch records and returns,
whatever its mix. Assertions hold however the sends happen to be split into batches.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable, Coroutine
from typing import Any

from pigeon.store.base import Store
from pigeon.store.errors import Invalid, LimitExceeded, NotMember
from pigeon.store.models import Device, InboxEntry, SendRequest, SendResult

from .helpers import MAX_BODY, MAX_MEMBERS, drain, make_device, make_users

_client_ids = itertools.count()


def send(
    store: Store,
    conv_id: int,
    device: Device,
    body: str = "hi",
    client_id: str | None = None,
) -> asyncio.Future[SendResult]:
    cid = client_id if client_id is not None else f"s{next(_client_ids)}"
    request = SendRequest(conv_id, device.user_id, device.id, cid, "text", body)
    return store.send_message(request, MAX_BODY)


async def message_keys(store: Store, user_id: int) -> list[tuple[int, int]]:
    """(conv_id, seq) of every message entry in the user's inbox, in inbox order."""
    entries: list[InboxEntry] = await store.inbox_after(user_id, 0, 10_000)
    return [(e.conv_id, e.message.seq) for e in entries if e.message is not None]


async def positions(store: Store, conv_id: int, user_id: int) -> dict[int, tuple[int, int]]:
    return {
        m.user_id: (m.delivered_seq, m.read_seq) for m in await store.receipts(conv_id, user_id)
    }


async def test_batch_mixing_duplicates_non_members_and_good_sends(store: Store) -> None:
    """One batch (when the store takes it as one): retries of committed sends (one by a
    sender who has left since), in-batch repeats, non-members, a body too long, and good
    sends in two conversations. Each request gets its own outcome; only the good ones
    write, in request order per conversation."""
    alice, bob, carol, eve = await make_users(store, "alice", "bob", "carol", "eve")
    pa, pb, pc, pe = [await make_device(store, u) for u in (alice, bob, carol, eve)]
    direct = await store.direct_conversation(alice, bob)
    group = await store.create_group(alice, "G", [bob, carol], MAX_MEMBERS)  # 1: created
    original = await send(store, group.id, pa, "orig", "dup-a")  # 2
    carols = await send(store, group.id, pc, "carol's", "dup-c")  # 3
    await store.leave(carol, group.id)  # 4: left
    results = await asyncio.gather(
        send(store, direct.id, pa, "d1", "rep"),  # 0: direct 1
        send(store, group.id, pa, "again", "dup-a"),  # 1: duplicate of 2
        send(store, group.id, pe, "intrusion"),  # 2: not a member
        send(store, group.id, pb, "g1"),  # 3: group 5
        send(store, group.id, pc, "carol's", "dup-c"),  # 4: duplicate of 3, left since
        send(store, group.id, pc, "new"),  # 5: not a member any more
        send(store, direct.id, pa, "x" * (MAX_BODY + 1)),  # 6: too long
        send(store, direct.id, pb, "d2"),  # 7: direct 2
        send(store, group.id, pa, "g2"),  # 8: group 6
        send(store, direct.id, pa, "d1", "rep"),  # 9: repeat of 0
        send(store, 999_999, pe, "nowhere"),  # 10: no such conversation
        send(store, group.id, pb, "g3"),  # 11: group 7
        send(store, group.id, pa, "x" * (MAX_BODY + 1), "dup-a"),  # 12: too long first
        return_exceptions=True,
    )
    for index in (2, 5, 10):
        assert isinstance(results[index], NotMember), index
    for index in (6, 12):
        assert isinstance(results[index], LimitExceeded), index
    good = {i: r for i, r in enumerate(results) if isinstance(r, SendResult)}
    assert sorted(good) == [0, 1, 3, 4, 7, 8, 9, 11]
    assert [(good[i].conv_id, good[i].seq, good[i].duplicate) for i in (0, 7, 9)] == [
        (direct.id, 1, False),
        (direct.id, 2, False),
        (direct.id, 1, True),
    ]
    assert [(good[i].conv_id, good[i].seq, good[i].duplicate) for i in (3, 8, 11)] == [
        (group.id, 5, False),
        (group.id, 6, False),
        (group.id, 7, False),
    ]
    assert good[9].ts == good[0].ts and good[9].client_id == "rep"
    assert good[1] == SendResult(group.id, 2, original.ts, "dup-a", duplicate=True)
    assert good[4] == SendResult(group.id, 3, carols.ts, "dup-c", duplicate=True)

    history = await store.history(direct.id, alice)
    assert [(m.seq, m.sender_id, m.body, m.client_id) for m in history] == [
        (1, alice, "d1", "rep"),
        (2, bob, "d2", good[7].client_id),
    ]
    assert all(m.ts == good[0].ts for m in history)
    group_history = await store.history(group.id, alice)
    assert [m.seq for m in group_history] == [1, 2, 3, 4, 5, 6, 7]
    assert [m.body for m in group_history[4:]] == ["g1", "g2", "g3"]
    assert (await store.get_conversation(direct.id, alice)).last_seq == 2
    assert (await store.get_conversation(group.id, alice)).last_seq == 7

    # The senders' own positions moved to their last new message, nobody else's.
    assert await positions(store, direct.id, alice) == {alice: (1, 1), bob: (2, 2)}
    assert await positions(store, group.id, alice) == {alice: (6, 6), bob: (7, 7)}

    # Fan-out: every member of the time of sending has each message once, in order.
    await drain(store)
    assert await message_keys(store, eve) == []
    carol_keys = await message_keys(store, carol)
    assert carol_keys == [(group.id, s) for s in (1, 2, 3, 4)]
    for user in (alice, bob):
        keys = await message_keys(store, user)
        assert len(keys) == len(set(keys))
        assert [s for c, s in keys if c == direct.id] == [1, 2]
        assert [s for c, s in keys if c == group.id] == [1, 2, 3, 4, 5, 6, 7]


async def test_any_text_but_nul_is_stored_exactly(store: Store) -> None:
    """Batches reach SQLite as JSON: what JSON escapes must come back as sent; NUL, which
    neither store can hold, is refused and writes nothing."""
    alice, bob = await make_users(store, "alice", "bob")
    pa = await make_device(store, alice)
    direct = await store.direct_conversation(alice, bob)
    odd = ['"quoted" \\ back\\slash', "\x01\x1f\t\n\r", "é 😀 \u2028\u2029 \ufeff", "  x  "]
    results = await asyncio.gather(
        *[send(store, direct.id, pa, body, f"{body}-{i}") for i, body in enumerate(odd)],
        send(store, direct.id, pa, "a\0b"),
        send(store, direct.id, pa, "ok", "c\0"),
        return_exceptions=True,
    )
    assert all(isinstance(r, Invalid) for r in results[-2:]), results[-2:]
    history = await store.history(direct.id, alice)
    assert [(m.body, m.client_id) for m in history] == [(b, f"{b}-{i}") for i, b in enumerate(odd)]
    await drain(store)
    assert await message_keys(store, bob) == [(direct.id, s) for s in (1, 2, 3, 4)]


async def test_repeat_in_batch_follows_the_first_accepted_request(store: Store) -> None:
    """The same (device, client_id) several times in one batch: the first request whose
    sender is a member is the original; an earlier one that fails stays failed; the later
    ones repeat the original's result, wherever they were sent (as a retry in a later
    batch would)."""
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    phone = await make_device(store, alice)
    mine = await store.direct_conversation(alice, bob)
    theirs = await store.direct_conversation(bob, carol)
    results = await asyncio.gather(
        send(store, theirs.id, phone, "no", "k1"),  # not a member, before any original
        send(store, mine.id, phone, "yes", "k1"),  # the original
        send(store, theirs.id, phone, "no", "k1"),  # a repeat: the original's result
        send(store, mine.id, phone, "again", "k1"),
        return_exceptions=True,
    )
    assert isinstance(results[0], NotMember)
    first = results[1]
    assert isinstance(first, SendResult) and not first.duplicate
    assert (first.conv_id, first.seq) == (mine.id, 1)
    for repeat in results[2:]:
        assert repeat == SendResult(mine.id, 1, first.ts, "k1", duplicate=True)
    assert [m.body for m in await store.history(mine.id, alice)] == ["yes"]
    assert await store.history(theirs.id, bob) == []


async def test_batches_from_two_instances_on_shared_conversations(
    make_store: Callable[[], Store],
) -> None:
    """Two store instances (two gateways) send many batches at once into the same
    conversations, with retries of one send through both, group changes and acks in
    between: every conversation's seqs stay gapless, each client_id is stored once, and
    each instance's sends to a conversation are numbered in the order it was asked."""
    first, second = make_store(), make_store()
    await first.open()
    await second.open()
    try:
        names = ["u0", "u1", "u2", "u3", "u4", "u5"]
        users = await make_users(first, *names)
        phones = {u: await make_device(first, u) for u in users}
        g1 = await first.create_group(users[0], "one", users[1:4], MAX_MEMBERS)
        g2 = await second.create_group(users[3], "two", [users[0], *users[4:]], MAX_MEMBERS)
        direct = await first.direct_conversation(users[0], users[3])
        convs = {
            g1.id: users[:4],
            g2.id: [users[3], users[0], *users[4:]],
            direct.id: [users[0], users[3]],
        }
        rng = random.Random(7)
        asked: list[tuple[int, int, int, str]] = []  # (instance, conv, position, client id)
        results: list[SendResult] = []
        for round_ in range(8):
            calls: list[asyncio.Future[SendResult]] = []
            plan: list[tuple[int, int, str]] = []
            for _ in range(60):
                conv = rng.choice(list(convs))
                sender = rng.choice(convs[conv])
                which = rng.randrange(2)
                cid = f"c{next(_client_ids)}"
                plan.append((which, conv, cid))
                calls.append(send((first, second)[which], conv, phones[sender], "m", cid))
            # One send retried through both instances at once.
            retry = f"r{round_}"
            for which in (0, 1):
                plan.append((which, direct.id, retry))
                calls.append(send((first, second)[which], direct.id, phones[users[3]], "r", retry))
            # Group changes and acks meanwhile, through either instance.
            extras: list[Coroutine[Any, Any, Any]] = [
                (second if round_ % 2 else first).rename(users[0], g1.id, f"one {round_}"),
                first.ack(phones[users[1]].id, 10_000),
                second.ack(phones[users[0]].id, 10_000),
                second.ack(phones[users[3]].id, 10_000),
            ]
            done = await asyncio.gather(*calls, *extras)
            sent = done[: len(calls)]
            for position, ((which, conv, cid), result) in enumerate(zip(plan, sent, strict=True)):
                assert isinstance(result, SendResult)
                assert (result.conv_id, result.client_id) == (conv, cid)
                asked.append((which, conv, round_ * 1000 + position, cid))
                results.append(result)
            retried = sent[-2:]
            assert retried[0].seq == retried[1].seq
            assert sorted(r.duplicate for r in retried) == [False, True]
            await drain(first if round_ % 2 else second)

        for conv, members in convs.items():
            history = await second.history(conv, members[0], limit=10_000)
            assert [m.seq for m in history] == list(range(1, len(history) + 1))
            stored = [m.client_id for m in history if m.kind != "system"]
            assert len(stored) == len(set(stored))
            wanted = {cid for _, c, _, cid in asked if c == conv}
            assert set(stored) == wanted
            assert (await first.get_conversation(conv, members[0])).last_seq == len(history)
        for which in (0, 1):
            for conv in convs:
                # A retry may have been the other instance's original: originals only.
                mine = [
                    r.seq
                    for (w, c, _, _), r in zip(asked, results, strict=True)
                    if w == which and c == conv and not r.duplicate
                ]
                assert mine == sorted(mine)
        # Fan-out delivered each message once to each member.
        await drain(first)
        for user in users:
            keys = await message_keys(first, user)
            assert len(keys) == len(set(keys))
    finally:
        await first.close()
        await second.close()


async def test_one_key_in_two_conversations_at_once_through_two_instances(
    make_store: Callable[[], Store],
) -> None:
    """A device reuses a client_id in two conversations, the two sends racing through two
    store instances (two gateways): one is stored, the other answers with its result as a
    duplicate; neither fails."""
    first, second = make_store(), make_store()
    await first.open()
    await second.open()
    try:
        alice, bob, carol = await make_users(first, "alice", "bob", "carol")
        phone = await make_device(first, alice)
        one = await first.direct_conversation(alice, bob)
        two = await first.direct_conversation(alice, carol)
        for i in range(40):
            cid = f"race{i}"
            results = await asyncio.gather(
                send(first, one.id, phone, "a", cid), send(second, two.id, phone, "b", cid)
            )
            assert sorted(r.duplicate for r in results) == [False, True], results
            assert {(r.conv_id, r.seq) for r in results} == {
                (r.conv_id, r.seq) for r in results if not r.duplicate
            }
        stored = [
            m.client_id
            for conv in (one, two)
            for m in await first.history(conv.id, alice, limit=1_000)
        ]
        assert sorted(stored) == sorted(f"race{i}" for i in range(40))
    finally:
        await first.close()
        await second.close()
