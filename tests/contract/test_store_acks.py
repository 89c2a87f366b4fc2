"""Store contract: acks applied together (many sockets' acks batched in one write).

Both stores batch the acks queued at the same time (`SqliteStore` per commit round,
`PostgresStore` per ``pigeon_ack`` call); these cases pin what a batch records and returns,
whatever its mix. Assertions hold however the acks happen to be split into batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pytest

from pigeon.store.base import Store
from pigeon.store.errors import NotFound
from pigeon.store.models import Device, InboxEntry, SendResult
from pigeon.store.postgres import PostgresStore
from pigeon.store.receipts import AGGREGATE_USER, DEFAULT_DETAIL_MAX_GROUP

from .conftest import FakeClock
from .helpers import drain, make_device, make_users, send


async def head(store: Store, user_id: int) -> int:
    return (await store.inbox_bounds(user_id)).head


async def cursor(store: Store, device: Device) -> int:
    (saved,) = [d for d in await store.list_devices(device.user_id) if d.id == device.id]
    return saved.cursor


async def receipt_entries(store: Store, user_id: int, after: int = 0) -> list[InboxEntry]:
    return [e for e in await store.inbox_after(user_id, after, 10_000) if e.receipt is not None]


def flat(results: Sequence[object]) -> list[InboxEntry]:
    """The entries returned by a gather of acks (exceptions left out)."""
    return [e for r in results if isinstance(r, list) for e in r]


def key(entry: InboxEntry) -> tuple[int, int]:
    return entry.user_id, entry.inbox_seq


class RevokedSetup(NamedTuple):
    alice: int
    bob: int
    carol: int
    dave: int
    b_phone: Device
    c_phone: Device  # revoked
    d_phone: Device
    group_id: int
    sent: SendResult  # alice's message, seq 2
    alice_head: int  # before any ack


async def group_with_a_revoked_device(store: Store) -> RevokedSetup:
    """Alice's group of four has her message; carol's phone is then revoked."""
    alice, bob, carol, dave = await make_users(store, "alice", "bob", "carol", "dave")
    a_phone = await make_device(store, alice)
    b_phone, c_phone, d_phone = [await make_device(store, u) for u in (bob, carol, dave)]
    group = await store.create_group(alice, "G", [bob, carol, dave], 10)
    sent = await send(store, group.id, alice, a_phone.id)  # 2
    await drain(store)
    assert await store.revoke_device(carol, c_phone.id)
    return RevokedSetup(
        alice,
        bob,
        carol,
        dave,
        b_phone,
        c_phone,
        d_phone,
        group.id,
        sent,
        await head(store, alice),
    )


async def test_big_group_all_acks_at_once_tell_every_sender_once(store: Store) -> None:
    """Every member of a big group acks at once: the aggregate moves once, and each sender
    of a message it passed hears of it once, an acking sender included."""
    names = [f"b{i}" for i in range(DEFAULT_DETAIL_MAX_GROUP + 5)]
    owner, talker, *quiet = await make_users(store, *names)
    devices = {u: await make_device(store, u) for u in [owner, talker, *quiet]}
    group = await store.create_group(owner, "big", [talker, *quiet], max_members=1000)
    await send(store, group.id, owner, devices[owner].id)  # 2
    last = await send(store, group.id, talker, devices[talker].id)  # 3
    await drain(store)
    heads = {u: await head(store, u) for u in devices}
    results = await asyncio.gather(*(store.ack(d.id, heads[u]) for u, d in devices.items()))
    told = flat(results)
    assert sorted(e.user_id for e in told) == sorted([owner, talker])
    for entry in told:
        assert entry.conv_id == group.id and entry.receipt is not None
        assert entry.receipt.user_id == AGGREGATE_USER
        assert entry.receipt.all_delivered_seq == last.seq
        # durable: the same entry is in the sender's inbox
        assert entry in await receipt_entries(store, entry.user_id)
    members = {m.user_id: m for m in await store.receipts(group.id, owner)}
    assert all(m.delivered_seq == last.seq for m in members.values())
    for user, device in devices.items():
        assert await cursor(store, device) == heads[user]


async def test_ack_batch_with_revoked_and_unknown_devices(store: Store, clock: FakeClock) -> None:
    """A revoked or unknown device fails its own ack only; the others in the same batch
    move and tell their senders."""
    g = await group_with_a_revoked_device(store)
    clock.advance(3)
    results = await asyncio.gather(
        store.ack(g.b_phone.id, 2),
        store.ack(g.c_phone.id, 2),  # revoked
        store.ack(10_000_000, 2),  # unknown
        store.ack(g.d_phone.id, 2),
        return_exceptions=True,
    )
    assert isinstance(results[1], NotFound) and isinstance(results[2], NotFound)
    assert isinstance(results[0], list) and isinstance(results[3], list)
    told = sorted(flat(results), key=key)
    assert told == await receipt_entries(store, g.alice, g.alice_head)
    assert [e.inbox_seq for e in told] == [g.alice_head + 1, g.alice_head + 2]  # no gap
    states = {e.receipt.user_id: e.receipt for e in told if e.receipt is not None}
    assert set(states) == {g.bob, g.dave}
    for state in states.values():
        assert (state.delivered_seq, state.read_seq) == (g.sent.seq, 0)
        assert state.all_delivered_seq == 0  # carol has nothing
        assert state.ts == clock.now
    assert await cursor(store, g.b_phone) == 2 and await cursor(store, g.d_phone) == 2
    assert await cursor(store, g.c_phone) == 0
    members = {m.user_id: m for m in await store.receipts(g.group_id, g.alice)}
    assert members[g.carol].delivered_seq == 0 and members[g.bob].delivered_seq == g.sent.seq


async def test_ack_many_answers_each_pair_in_order(store: Store) -> None:
    """One `ack_many` call: each pair gets its own outcome, in order; the failing ones
    (revoked, unknown, impossible ids) change nothing, the others move and tell."""
    g = await group_with_a_revoked_device(store)
    outcomes = await store.ack_many(
        [(g.b_phone.id, 2), (g.c_phone.id, 2), (-1, 2), (10_000_000, 2), (g.d_phone.id, 99)]
    )
    assert len(outcomes) == 5
    assert [type(o) for o in outcomes[1:4]] == [NotFound, NotFound, NotFound]
    assert isinstance(outcomes[0], list) and isinstance(outcomes[4], list)
    told = sorted(flat(outcomes), key=key)
    assert told == await receipt_entries(store, g.alice, g.alice_head)
    assert {e.receipt.user_id for e in told if e.receipt is not None} == {g.bob, g.dave}
    assert await cursor(store, g.b_phone) == 2 and await cursor(store, g.d_phone) == 2  # clamped
    assert await cursor(store, g.c_phone) == 0
    members = {m.user_id: m for m in await store.receipts(g.group_id, g.alice)}
    assert members[g.bob].delivered_seq == members[g.dave].delivered_seq == g.sent.seq
    assert members[g.carol].delivered_seq == 0
    assert await store.ack_many([]) == []


async def test_small_group_acks_at_once_tell_each_sender_per_member(store: Store) -> None:
    alice, bob, carol, dave = await make_users(store, "alice", "bob", "carol", "dave")
    devices = {u: await make_device(store, u) for u in (alice, bob, carol, dave)}
    group = await store.create_group(alice, "G", [bob, carol, dave], 10)
    await send(store, group.id, alice, devices[alice].id)  # 2
    await send(store, group.id, bob, devices[bob].id)  # 3
    await drain(store)
    heads = {u: await head(store, u) for u in devices}
    results = await asyncio.gather(*(store.ack(d.id, heads[u]) for u, d in devices.items()))
    told = flat(results)
    pairs = sorted((e.user_id, e.receipt.user_id) for e in told if e.receipt is not None)
    # bob's own send moved him past alice's message: nothing new to tell of him.
    assert pairs == sorted([(alice, carol), (alice, dave), (bob, alice), (bob, carol), (bob, dave)])
    for entry in told:
        assert entry.receipt is not None and entry.receipt.delivered_seq == 3
    assert max(e.receipt.all_delivered_seq for e in told if e.receipt) == 3
    for user in (alice, bob):
        stored = await receipt_entries(store, user, heads[user])
        assert stored == sorted([e for e in told if e.user_id == user], key=key)
        assert [e.inbox_seq for e in stored] == list(
            range(heads[user] + 1, heads[user] + 1 + len(stored))
        )
    members = {m.user_id: m for m in await store.receipts(group.id, alice)}
    assert all(m.delivered_seq == 3 for m in members.values())


async def test_one_users_devices_and_repeated_acks_in_one_batch(store: Store) -> None:
    """Two acks of one device and one of its sibling in a batch: each cursor takes its
    highest ack, and the member's delivered position the highest message."""
    alice, bob = await make_users(store, "alice", "bob")
    a_phone = await make_device(store, alice)
    b_phone, b_laptop = await make_device(store, bob), await make_device(store, bob, "laptop")
    conv = await store.direct_conversation(alice, bob)
    for _ in range(3):
        await send(store, conv.id, alice, a_phone.id)
    await drain(store)
    results = await asyncio.gather(
        store.ack(b_phone.id, 1), store.ack(b_phone.id, 3), store.ack(b_laptop.id, 2)
    )
    told = flat(results)
    assert told and all(e.user_id == alice and e.receipt is not None for e in told)
    assert max(e.receipt.delivered_seq for e in told if e.receipt) == 3
    assert sorted(told, key=key) == await receipt_entries(store, alice)
    assert await cursor(store, b_phone) == 3 and await cursor(store, b_laptop) == 2
    members = {m.user_id: m for m in await store.receipts(conv.id, alice)}
    assert (members[bob].delivered_seq, members[bob].read_seq) == (3, 0)
    # and nothing more to tell
    assert await asyncio.gather(store.ack(b_phone.id, 3), store.ack(b_laptop.id, 3)) == [[], []]


async def test_ack_batch_records_nothing_where_the_user_left(store: Store) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    a_phone, b_phone, c_phone = [await make_device(store, u) for u in (alice, bob, carol)]
    group = await store.create_group(alice, "G", [bob, carol], 10)
    direct = await store.direct_conversation(alice, bob)
    await send(store, group.id, alice, a_phone.id)  # G 2
    await send(store, direct.id, alice, a_phone.id)  # D 1
    await drain(store)
    await store.leave(bob, group.id)  # G 3, which bob still gets
    await drain(store)
    alice_head = await head(store, alice)
    results = await asyncio.gather(
        store.ack(b_phone.id, await head(store, bob)),
        store.ack(c_phone.id, await head(store, carol)),
    )
    told = sorted(flat(results), key=key)
    assert told == await receipt_entries(store, alice, alice_head)
    about = sorted(
        (e.conv_id, e.receipt.user_id, e.receipt.delivered_seq) for e in told if e.receipt
    )
    assert about == sorted([(direct.id, bob, 1), (group.id, carol, 3)])
    assert await cursor(store, b_phone) == await head(store, bob)
    assert bob not in {m.user_id for m in await store.receipts(group.id, alice)}


async def test_acks_sends_and_fanout_interleaved(store: Store) -> None:
    """Members of two groups send, fan out and ack at once, round after round: no
    deadlock, no lost move (PostgreSQL: lock order of acks, sends and fan-out)."""
    users = await make_users(store, *[f"i{i}" for i in range(6)])
    devices = {u: await make_device(store, u) for u in users}
    first = await store.create_group(users[0], "one", users[1:], 10)
    second = await store.create_group(users[5], "two", users[:5], 10)
    last = {first.id: 1, second.id: 1}
    for _ in range(4):
        sends = [send(store, g.id, u, devices[u].id) for g in (first, second) for u in users]
        heads = {u: await head(store, u) for u in users}
        acks = [store.ack(d.id, heads[u]) for u, d in devices.items()]
        done = await asyncio.gather(*sends, *acks, drain(store))
        for result in done[: len(sends)]:
            assert isinstance(result, SendResult)
            last[result.conv_id] = max(last[result.conv_id], result.seq)
    await drain(store)
    heads = {u: await head(store, u) for u in users}
    await asyncio.gather(*(store.ack(d.id, heads[u]) for u, d in devices.items()))
    for conv_id, seq in last.items():
        members = await store.receipts(conv_id, users[0])
        assert all(m.delivered_seq == seq for m in members)
    for user, device in devices.items():
        assert await cursor(store, device) >= heads[user]


async def test_big_group_acks_from_two_processes_move_the_aggregate_once(
    make_store: Callable[[], Store],
) -> None:
    """Half of a big group acks through one store instance, half through another, at the
    same time (two gateways): the aggregate's move is told exactly once, not zero times."""
    first, second = make_store(), make_store()
    if not isinstance(first, PostgresStore):
        pytest.skip("embedded: one process holds the store")
    await first.open()
    await second.open()
    try:
        names = [f"p{i}" for i in range(DEFAULT_DETAIL_MAX_GROUP + 20)]
        owner, *others = await make_users(first, *names)
        phone = await make_device(first, owner)
        devices = {u: await make_device(first, u) for u in others}
        group = await first.create_group(owner, "big", others, max_members=1000)
        for _ in range(5):
            sent = await send(first, group.id, owner, phone.id)
            await drain(first)
            acks = [
                (first if i % 2 else second).ack(devices[u].id, await head(first, u))
                for i, u in enumerate(others)
            ]
            told = flat(await asyncio.gather(*acks))
            assert [e.receipt.all_delivered_seq for e in told if e.receipt] == [sent.seq]
            assert [e.user_id for e in told] == [owner]
    finally:
        await first.close()
        await second.close()
