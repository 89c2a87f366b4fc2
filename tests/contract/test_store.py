"""The Store contract (see `pigeon.store.base`), run against every backend in conftest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from pigeon.store.base import Store
from pigeon.store.errors import (
    BadPosition,
    Conflict,
    Forbidden,
    LimitExceeded,
    NotFound,
    NotMember,
)
from pigeon.store.models import InboxEntry, Message

from .conftest import FakeClock
from .helpers import MAX_BODY, MAX_MEMBERS, drain, inbox, make_device, make_users, send


def messages_of(entries: list[InboxEntry]) -> list[Message]:
    return [e.message for e in entries if e.message is not None]


def event(message: Message) -> dict[str, object]:
    assert message.kind == "system"
    assert message.sender_device == 0
    body = json.loads(message.body)
    assert isinstance(body, dict)
    return body


# -- users and devices ------------------------------------------------------------------------


async def test_users(store: Store, clock: FakeClock) -> None:
    alice = await store.create_user("Alice", "Alice A.", "h1")
    assert alice.username == "Alice"
    assert alice.display_name == "Alice A."
    assert alice.created_at == clock.now
    with pytest.raises(Conflict):
        await store.create_user("aLiCe", "Other", "h2")
    assert await store.find_user("ALICE") == alice
    assert await store.find_user("bob") is None
    assert await store.get_user(alice.id) == alice
    assert await store.get_user(alice.id + 1000) is None
    bob = await store.create_user("bob", "Bob", "h3")
    assert await store.list_users() == [alice, bob]
    assert await store.password_hash(alice.id) == "h1"
    await store.set_password_hash(alice.id, "h1-new")
    assert await store.password_hash(alice.id) == "h1-new"
    with pytest.raises(NotFound):
        await store.password_hash(9999)


async def test_devices(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone = await store.create_device(alice, "phone", "tok-a")
    assert (phone.user_id, phone.name, phone.revoked, phone.cursor) == (alice, "phone", False, 0)
    assert await store.device_for_token("tok-a") == phone
    assert await store.device_for_token("nope") is None
    assert not await store.revoke_device(bob, phone.id)  # not bob's
    assert await store.revoke_device(alice, phone.id)
    assert not await store.revoke_device(alice, phone.id)  # already revoked
    assert await store.device_for_token("tok-a") is None
    [listed] = await store.list_devices(alice)
    assert listed.id == phone.id and listed.revoked


async def test_new_device_cursor_starts_at_inbox_head(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    for _ in range(3):
        await send(store, conv.id, alice, phone.id)
    await drain(store)
    assert (await store.inbox_bounds(bob)).head == 3
    laptop = await make_device(store, bob, "laptop")
    assert laptop.cursor == 3


# -- conversations ----------------------------------------------------------------------------


async def test_direct_conversation_is_one_per_pair(store: Store) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    conv = await store.direct_conversation(alice, bob)
    assert conv.kind == "direct"
    assert conv.last_seq == 0
    assert sorted(m.user_id for m in conv.members) == [alice, bob]
    assert (await store.direct_conversation(bob, alice)).id == conv.id
    assert (await store.direct_conversation(alice, bob)).id == conv.id
    assert (await store.direct_conversation(alice, carol)).id != conv.id
    myself = await store.direct_conversation(alice, alice)
    assert [m.user_id for m in myself.members] == [alice]
    with pytest.raises(NotFound):
        await store.direct_conversation(alice, 9999)


async def test_create_group(store: Store) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    conv = await store.create_group(alice, "Trip", [bob, carol, bob], MAX_MEMBERS)
    assert (conv.kind, conv.title, conv.last_seq) == ("group", "Trip", 1)
    roles = {m.user_id: m.role for m in conv.members}
    assert roles == {alice: "admin", bob: "member", carol: "member"}
    [created] = await store.history(conv.id, bob)
    assert created.seq == 1 and created.sender_id == alice
    assert event(created)["event"] == "created"
    assert event(created)["title"] == "Trip"
    with pytest.raises(LimitExceeded):
        await store.create_group(alice, "Big", [bob, carol], 2)
    with pytest.raises(NotFound):
        await store.create_group(alice, "Ghost", [bob, 9999], MAX_MEMBERS)


async def test_add_and_remove_members(store: Store) -> None:
    alice, bob, carol, dave = await make_users(store, "alice", "bob", "carol", "dave")
    conv = await store.create_group(alice, "G", [bob], 3)
    with pytest.raises(Forbidden):
        await store.add_members(bob, conv.id, [carol], 3)  # not an admin
    with pytest.raises(NotMember):
        await store.add_members(carol, conv.id, [dave], 3)
    conv = await store.add_members(alice, conv.id, [carol, bob], 3)  # bob is skipped
    assert sorted(m.user_id for m in conv.members) == sorted([alice, bob, carol])
    carol_member = next(m for m in conv.members if m.user_id == carol)
    assert carol_member.delivered_seq == carol_member.read_seq == 1  # last seq at join
    with pytest.raises(LimitExceeded):
        await store.add_members(alice, conv.id, [dave], 3)
    with pytest.raises(NotFound):
        await store.add_members(alice, conv.id, [9999], 10)
    with pytest.raises(Forbidden):
        await store.remove_member(bob, conv.id, carol)
    conv = await store.remove_member(alice, conv.id, carol)
    assert sorted(m.user_id for m in conv.members) == sorted([alice, bob])
    history = await store.history(conv.id, alice)
    assert [event(m)["event"] for m in history] == ["created", "added", "removed"]
    assert event(history[1])["users"] == [carol]
    assert event(history[2]) == {"event": "removed", "user": carol, "by": alice}
    with pytest.raises(NotMember):
        await store.history(conv.id, carol)

    direct = await store.direct_conversation(alice, bob)
    with pytest.raises(Forbidden):
        await store.add_members(alice, direct.id, [carol], 10)


async def test_removed_member_learns_of_removal_and_new_member_starts_at_join(
    store: Store,
) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    phone = await make_device(store, alice)
    conv = await store.create_group(alice, "G", [bob], MAX_MEMBERS)
    await send(store, conv.id, alice, phone.id, "before carol")
    # Fan-out lags behind: bob is removed before his messages were fanned out.
    await store.add_members(alice, conv.id, [carol], MAX_MEMBERS)
    await store.remove_member(alice, conv.id, bob)
    await send(store, conv.id, alice, phone.id, "after bob")
    await drain(store)
    bob_messages = messages_of(await inbox(store, bob))
    bob_events = [m.body if m.kind == "text" else event(m)["event"] for m in bob_messages]
    assert bob_events == ["created", "before carol", "added", "removed"]
    carol_seen = [m.seq for m in messages_of(await inbox(store, carol))]
    assert carol_seen == [3, 4, 5]  # from her "added" message on
    bob_phone = await make_device(store, bob)
    with pytest.raises(NotMember):
        await send(store, conv.id, bob, bob_phone.id)


async def test_fanout_follows_membership_at_send_time(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.create_group(alice, "G", [bob], MAX_MEMBERS)  # 1
    await send(store, conv.id, alice, phone.id, "m2")
    await store.remove_member(alice, conv.id, bob)  # 3
    await send(store, conv.id, alice, phone.id, "m4")  # bob is out
    await store.add_members(alice, conv.id, [bob], MAX_MEMBERS)  # 5
    await send(store, conv.id, alice, phone.id, "m6")
    await drain(store)  # only now, after all the changes
    assert [m.seq for m in messages_of(await inbox(store, bob))] == [1, 2, 3, 5, 6]
    assert [m.seq for m in messages_of(await inbox(store, alice))] == [1, 2, 3, 4, 5, 6]


async def test_leave_hands_admin_over(store: Store, clock: FakeClock) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    conv = await store.create_group(alice, "G", [], MAX_MEMBERS)
    clock.advance(1)
    await store.add_members(alice, conv.id, [bob], MAX_MEMBERS)
    clock.advance(1)
    await store.add_members(alice, conv.id, [carol], MAX_MEMBERS)
    await store.leave(alice, conv.id)
    after = await store.get_conversation(conv.id, bob)
    assert {m.user_id: m.role for m in after.members} == {bob: "admin", carol: "member"}
    last = (await store.history(conv.id, bob))[-1]
    assert event(last)["event"] == "left" and event(last)["user"] == alice
    with pytest.raises(NotMember):
        await store.leave(alice, conv.id)
    with pytest.raises(NotMember):
        await store.get_conversation(conv.id, alice)
    # remove_member on oneself is leave: carol (not admin) may do it
    await store.remove_member(carol, conv.id, carol)
    assert await store.member_ids(conv.id) == [bob]


async def test_rename(store: Store) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    conv = await store.create_group(alice, "Old", [bob], MAX_MEMBERS)
    renamed = await store.rename(bob, conv.id, "New")  # any member may
    assert renamed.title == "New"
    assert event((await store.history(conv.id, alice))[-1]) == {
        "event": "renamed",
        "title": "New",
        "by": bob,
    }
    with pytest.raises(NotMember):
        await store.rename(carol, conv.id, "Mine")
    direct = await store.direct_conversation(alice, bob)
    with pytest.raises(Forbidden):
        await store.rename(alice, direct.id, "Us")


async def test_get_conversation_requires_membership(store: Store) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    conv = await store.direct_conversation(alice, bob)
    assert (await store.get_conversation(conv.id, bob)).id == conv.id
    with pytest.raises(NotMember):
        await store.get_conversation(conv.id, carol)
    with pytest.raises(NotMember):
        await store.get_conversation(9999, alice)
    with pytest.raises(NotMember):
        await store.receipts(conv.id, carol)
    assert sorted(await store.member_ids(conv.id)) == sorted([alice, bob])


async def test_history_paging(store: Store) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    for i in range(1, 11):
        await send(store, conv.id, alice, phone.id, f"m{i}")

    async def seqs(**kwargs: int) -> list[int]:
        return [m.seq for m in await store.history(conv.id, bob, **kwargs)]

    assert await seqs() == list(range(1, 11))
    assert await seqs(limit=3) == [8, 9, 10]
    assert await seqs(before=5, limit=3) == [2, 3, 4]
    assert await seqs(before=3, limit=5) == [1, 2]
    assert await seqs(after=4, limit=3) == [5, 6, 7]
    assert await seqs(after=9, limit=3) == [10]
    assert await seqs(after=10) == []
    [m5] = await store.history(conv.id, bob, after=4, limit=1)
    assert (m5.body, m5.sender_id, m5.sender_device, m5.kind) == ("m5", alice, phone.id, "text")
    with pytest.raises(NotMember):
        await store.history(conv.id, carol)


# -- sending ----------------------------------------------------------------------------------


async def test_concurrent_sends_get_gapless_seqs(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone_a, phone_b = await make_device(store, alice), await make_device(store, bob)
    conv = await store.create_group(alice, "G", [bob], MAX_MEMBERS)  # seq 1: created
    sends = [
        send(store, conv.id, *((alice, phone_a.id) if i % 2 else (bob, phone_b.id)), f"m{i}")
        for i in range(200)
    ]
    results = await asyncio.gather(*sends)
    assert sorted(r.seq for r in results) == list(range(2, 202))
    assert not any(r.duplicate for r in results)
    history = await store.history(conv.id, alice, limit=1000)
    assert [m.seq for m in history] == list(range(1, 202))
    assert (await store.get_conversation(conv.id, alice)).last_seq == 201
    by_seq = {m.seq: m for m in history}
    assert all(by_seq[r.seq].client_id == r.client_id for r in results)


async def test_sender_positions_move_with_own_messages(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    await send(store, conv.id, alice, phone.id)
    result = await send(store, conv.id, alice, phone.id)
    members = {m.user_id: m for m in await store.receipts(conv.id, alice)}
    assert (members[alice].delivered_seq, members[alice].read_seq) == (result.seq, result.seq)
    assert (members[bob].delivered_seq, members[bob].read_seq) == (0, 0)


async def test_send_result_holds_the_messages_place_in_the_senders_inbox(
    store: Store, request: pytest.FixtureRequest
) -> None:
    """What lets the gateway hand the sending device its `sent` in place of its own `msg`:
    the position, when the send wrote the inboxes; 0 when fan-out comes later, and for a
    retry (its entry went out with the first send)."""
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    first = await send(store, conv.id, alice, phone.id, "one", client_id="p1")
    second = await send(store, conv.id, alice, phone.id, "two", client_id="p2")
    again = await send(store, conv.id, alice, phone.id, "one", client_id="p1")
    group = await store.create_group(alice, "G", [carol], MAX_MEMBERS)  # a queued job
    queued = await send(store, group.id, alice, phone.id, "three")
    await drain(store)
    own = {(e.conv_id, e.message.seq): e.inbox_seq for e in await inbox(store, alice) if e.message}
    assert again.duplicate and again.inbox_seq == 0
    assert queued.inbox_seq == 0
    if fans_out_with_send(request):
        assert (first.inbox_seq, second.inbox_seq) == (own[(conv.id, 1)], own[(conv.id, 2)])
        assert 0 < first.inbox_seq < second.inbox_seq
    else:
        assert first.inbox_seq == second.inbox_seq == 0


async def test_send_is_idempotent(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    first = await send(store, conv.id, alice, phone.id, "hello", client_id="x1")
    again = await send(store, conv.id, alice, phone.id, "hello", client_id="x1")
    assert again.duplicate and not first.duplicate
    assert (again.seq, again.ts, again.client_id) == (first.seq, first.ts, "x1")
    # Concurrently, so both may land in one batch: still one message.
    both = await asyncio.gather(
        send(store, conv.id, alice, phone.id, "yo", client_id="x2"),
        send(store, conv.id, alice, phone.id, "yo", client_id="x2"),
    )
    assert both[0].seq == both[1].seq
    assert sorted(r.duplicate for r in both) == [False, True]
    # The key is per device: another device may use the same client_id.
    laptop = await make_device(store, alice, "laptop")
    other = await send(store, conv.id, alice, laptop.id, "hello", client_id="x1")
    assert not other.duplicate and other.seq == 3
    assert [m.seq for m in await store.history(conv.id, alice)] == [1, 2, 3]


async def test_body_too_long_fails_only_that_send(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    with pytest.raises(LimitExceeded):
        await send(store, conv.id, alice, phone.id, "x" * (MAX_BODY + 1))
    results = await asyncio.gather(
        send(store, conv.id, alice, phone.id, "ok1"),
        send(store, conv.id, alice, phone.id, "x" * (MAX_BODY + 1)),
        send(store, conv.id, alice, phone.id, "ok2"),
        return_exceptions=True,
    )
    assert isinstance(results[1], LimitExceeded)
    assert [m.body for m in await store.history(conv.id, alice)] == ["ok1", "ok2"]
    assert await send(store, conv.id, alice, phone.id, "x" * MAX_BODY)  # at the limit: fine


async def test_non_member_send_writes_nothing(store: Store) -> None:
    alice, bob, eve = await make_users(store, "alice", "bob", "eve")
    eve_phone = await make_device(store, eve)
    conv = await store.direct_conversation(alice, bob)
    results = await asyncio.gather(
        send(store, conv.id, eve, eve_phone.id, "intrusion"),
        send(store, 9999, eve, eve_phone.id, "nowhere"),
        return_exceptions=True,
    )
    assert all(isinstance(r, NotMember) for r in results)
    assert await store.history(conv.id, alice) == []
    assert (await store.get_conversation(conv.id, alice)).last_seq == 0
    assert await drain(store) == []


# -- fan-out ----------------------------------------------------------------------------------


async def test_fanout_reaches_every_member_once_in_order(store: Store) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    phone = await make_device(store, alice)
    group = await store.create_group(alice, "G", [bob, carol], MAX_MEMBERS)
    direct = await store.direct_conversation(alice, bob)
    for i in range(5):
        await send(store, group.id, alice, phone.id, f"g{i}")
        await send(store, direct.id, alice, phone.id, f"d{i}")
    entries = await drain(store, max_messages=3)
    assert len(entries) == 6 * 3 + 5 * 2
    for user, convs in ((alice, {group.id: 6, direct.id: 5}), (bob, {group.id: 6, direct.id: 5})):
        got = await inbox(store, user)
        assert [e.inbox_seq for e in got] == list(range(1, len(got) + 1))  # gapless
        for conv_id, count in convs.items():
            seqs = [e.message.seq for e in got if e.message and e.conv_id == conv_id]
            assert seqs == list(range(1, count + 1))  # each once, in seq order
    carol_got = await inbox(store, carol)
    assert [e.message.seq for e in carol_got if e.message] == list(range(1, 7))
    assert (await store.inbox_bounds(carol)).head == 6
    # Returned entries are the ones stored, with their messages.
    stored = {
        (e.user_id, e.inbox_seq): e for u in (alice, bob, carol) for e in await inbox(store, u)
    }
    assert all(stored[(e.user_id, e.inbox_seq)] == e for e in entries)
    again = await store.fanout("w1", 100, 30)
    assert again.entries == [] and not again.more


async def test_fanout_over_many_conversations_in_small_rounds(store: Store) -> None:
    """More conversations with work than a round serves, and a budget smaller than the
    backlog: rounds until done write every message once per member, each conversation in
    seq order, and every round stays within its budget."""
    users = await make_users(store, *(f"u{i}" for i in range(21)))
    phone = await make_device(store, users[0])
    convs = [await store.direct_conversation(users[0], other) for other in users[1:]]
    for i in range(4):
        for conv in convs:
            await send(store, conv.id, users[0], phone.id, f"m{i}")
    await drain(store)  # whatever went out with the sends, or queued before this point
    group = await store.create_group(users[0], "G", users[1:6], MAX_MEMBERS)
    for i in range(30):  # queued behind the group's creation: the leased rounds' work
        await send(store, group.id, users[0], phone.id, f"g{i}")
    rounds = 0
    while True:
        batch = await store.fanout("w1", 7, lease_s=30)
        await store.fanout_pushed("w1", batch.convs)
        assert len({(e.conv_id, e.message.seq) for e in batch.entries if e.message}) <= 7
        rounds += 1
        if not batch.more and not batch.entries:
            break
    assert rounds >= 31 // 7
    for user in users[1:6]:
        seqs = [
            e.message.seq for e in await inbox(store, user) if e.message and e.conv_id == group.id
        ]
        assert seqs == list(range(1, 32))
    for conv, other in zip(convs, users[1:], strict=True):
        got = [
            e.message.seq for e in await inbox(store, other) if e.message and e.conv_id == conv.id
        ]
        assert got == [1, 2, 3, 4]


async def test_fanout_batches_report_more(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    for _ in range(5):
        await send(store, conv.id, alice, phone.id)
    first = await store.fanout("w1", 2, 30)
    assert first.more
    assert [e.message.seq for e in first.entries if e.message and e.user_id == bob] == [1, 2]


async def test_concurrent_fanout_workers_never_duplicate(store: Store) -> None:
    users = await make_users(store, "alice", "bob", "carol", "dave")
    phone = await make_device(store, users[0])
    convs = [await store.create_group(users[0], f"G{i}", users[1:], MAX_MEMBERS) for i in range(4)]
    await asyncio.gather(*(send(store, c.id, users[0], phone.id) for c in convs for _ in range(25)))
    await asyncio.gather(*(drain(store, f"w{i}", max_messages=7) for i in range(3)))
    for user in users:
        got = await inbox(store, user)
        assert [e.inbox_seq for e in got] == list(range(1, len(got) + 1))
        keys = [(e.conv_id, e.message.seq) for e in got if e.message]
        assert len(keys) == len(set(keys)) == 4 * 26
        for conv in convs:
            assert [s for c, s in keys if c == conv.id] == list(range(1, 27))


def fans_out_with_send(request: pytest.FixtureRequest) -> bool:
    """The embedded default: messages reach the inboxes in their send's transaction."""
    return bool(request.node.callspec.params.get("make_store") == "sqlite")


async def test_fanout_with_send_hands_out_committed_entries_once_in_order(
    store: Store, request: pytest.FixtureRequest
) -> None:
    if not fans_out_with_send(request):
        pytest.skip("fans out in leased rounds after the send")
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    for _ in range(5):
        await send(store, conv.id, alice, phone.id)
    # Committed with the sends, before any worker ran:
    assert [e.message.seq for e in await inbox(store, bob) if e.message] == [1, 2, 3, 4, 5]
    first = await store.fanout("w1", 2, lease_s=10)
    assert first.more and [(e.user_id, e.message.seq) for e in first.entries if e.message] == [
        (alice, 1), (bob, 1), (alice, 2), (bob, 2)
    ]  # fmt: skip
    rest = await store.fanout("w2", 10, lease_s=10)
    assert not rest.more
    assert [e.message.seq for e in rest.entries if e.message] == [3, 3, 4, 4, 5, 5]
    assert (await store.fanout("w1", 10, lease_s=10)).entries == []
    # A conversation with queued jobs (here the group's creation) queues its sends behind them.
    group = await store.create_group(alice, "G", [carol], MAX_MEMBERS)
    await send(store, group.id, alice, phone.id)
    assert [e for e in await inbox(store, carol) if e.conv_id == group.id] == []
    entries = await drain(store)
    assert [e.message.seq for e in entries if e.message and e.user_id == carol] == [1, 2]
    assert messages_of(await inbox(store, carol))[1].seq == 2


async def test_fanout_lease_keeps_conversation_with_one_worker(
    store: Store, clock: FakeClock, request: pytest.FixtureRequest
) -> None:
    if fans_out_with_send(request):
        pytest.skip("no leases: fanned out with the send, only the push is left")
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    for _ in range(4):
        await send(store, conv.id, alice, phone.id)
    first = await store.fanout("w1", 1, lease_s=10)
    assert first.more and len(first.entries) == 2
    # w1 holds the conversation's lease: w2 must not interleave its messages.
    blocked = await store.fanout("w2", 10, lease_s=10)
    assert blocked.entries == [] and not blocked.more
    clock.advance(11)  # w1's lease expired: w2 takes over, in order
    taken = await store.fanout("w2", 10, lease_s=10)
    assert [e.message.seq for e in taken.entries if e.message and e.user_id == bob] == [2, 3, 4]
    assert (await store.fanout("w1", 10, lease_s=10)).entries == []


async def test_fanout_of_a_worker_that_died_before_pushing_is_nudged(
    store: Store, clock: FakeClock, request: pytest.FixtureRequest
) -> None:
    if "sqlite" in request.node.callspec.id:
        pytest.skip("embedded: workers share the gateways' process, no push tracking")
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    await send(store, conv.id, alice, phone.id)
    died = await store.fanout("w1", 10, lease_s=10)
    assert died.entries and died.convs == [conv.id]  # committed; w1 dies before pushing
    assert (await store.fanout("w2", 10, lease_s=10)).nudge_users == []  # lease still live
    clock.advance(11)
    taken = await store.fanout("w2", 10, lease_s=10)
    assert taken.nudge_users == sorted([alice, bob]) and taken.entries == []
    assert (await store.fanout("w3", 10, lease_s=10)).nudge_users == []  # nudged once
    # a worker that confirms its push leaves nothing to nudge
    await send(store, conv.id, alice, phone.id)
    batch = await store.fanout("w2", 10, lease_s=10)
    await store.fanout_pushed("w2", batch.convs)
    clock.advance(11)
    assert (await store.fanout("w3", 10, lease_s=10)).nudge_users == []


# -- inbox, acks and receipts -----------------------------------------------------------------


async def test_big_group_acks_in_one_batch_move_the_aggregate_once(store: Store) -> None:
    from pigeon.store.receipts import AGGREGATE_USER, DEFAULT_DETAIL_MAX_GROUP

    names = [f"a{i}" for i in range(DEFAULT_DETAIL_MAX_GROUP + 2)]
    owner, *others = await make_users(store, *names)
    phone = await make_device(store, owner)
    devices = {u: await make_device(store, u) for u in others}
    group = await store.create_group(owner, "big", others, max_members=1000)
    result = await send(store, group.id, owner, phone.id)
    await drain(store)
    heads = {u: (await store.inbox_bounds(u)).head for u in others}
    # all but one member ack at once (concurrently: one commit round where batched)
    told = await asyncio.gather(*(store.ack(devices[u].id, heads[u]) for u in others[:-1]))
    assert [e for batch in told for e in batch] == []
    (entry,) = await store.ack(devices[others[-1]].id, heads[others[-1]])
    assert entry.user_id == owner and entry.receipt is not None
    assert entry.receipt.user_id == AGGREGATE_USER
    assert entry.receipt.all_delivered_seq >= result.seq
    members = {m.user_id: m for m in await store.receipts(group.id, owner)}
    assert all(members[u].delivered_seq >= result.seq for u in others)
    for user, device in devices.items():
        (saved,) = [d for d in await store.list_devices(user) if d.id == device.id]
        assert saved.cursor == heads[user]


async def test_big_group_senders_get_aggregate_receipts_only(store: Store) -> None:
    from pigeon.store.receipts import AGGREGATE_USER, DEFAULT_DETAIL_MAX_GROUP

    names = [f"u{i}" for i in range(DEFAULT_DETAIL_MAX_GROUP + 2)]
    owner, *others = await make_users(store, *names)
    phone = await make_device(store, owner)
    group = await store.create_group(owner, "big", others, max_members=1000)
    result = await send(store, group.id, owner, phone.id)
    await drain(store)
    told: list[InboxEntry] = []
    for member in others[:-1]:  # everyone but one has read it: the minimum has not moved
        told += await store.mark_read(member, group.id, result.seq)
    assert told == []
    told = await store.mark_read(others[-1], group.id, result.seq)
    (entry,) = told
    assert entry.user_id == owner and entry.receipt is not None
    state = entry.receipt
    assert state.user_id == AGGREGATE_USER
    assert state.all_read_seq >= result.seq and state.all_delivered_seq >= result.seq
    # each member's own positions stay readable
    members = {m.user_id: m for m in await store.receipts(group.id, owner)}
    assert all(members[u].read_seq >= result.seq for u in others)


async def test_inbox_after_pages(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    for i in range(7):
        await send(store, conv.id, alice, phone.id, f"m{i}")
    await drain(store)
    page = await store.inbox_after(bob, 2, 3)
    assert [e.inbox_seq for e in page] == [3, 4, 5]
    assert [e.message.body for e in page if e.message] == ["m2", "m3", "m4"]
    assert all(e.user_id == bob and e.conv_id == conv.id and e.receipt is None for e in page)
    assert [e.inbox_seq for e in await store.inbox_after(bob, 5, 10)] == [6, 7]
    assert await store.inbox_after(bob, 7, 10) == []


async def test_ack_moves_cursor_and_sends_delivered_receipt(store: Store, clock: FakeClock) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    a_phone, b_phone = await make_device(store, alice), await make_device(store, bob)
    conv = await store.create_group(alice, "G", [bob, carol], MAX_MEMBERS)  # bob: seq 1
    await send(store, conv.id, alice, a_phone.id)  # 2
    await send(store, conv.id, alice, a_phone.id)  # 3
    await drain(store)
    assert (await store.inbox_bounds(bob)).head == 3
    alice_head = (await store.inbox_bounds(alice)).head

    clock.advance(5)
    receipts = await store.ack(b_phone.id, 2)  # bob acks seqs 1..2
    [entry] = receipts
    assert entry.user_id == alice and entry.conv_id == conv.id and entry.message is None
    assert entry.inbox_seq == alice_head + 1
    state = entry.receipt
    assert state is not None
    assert (state.conv_id, state.user_id) == (conv.id, bob)
    assert (state.delivered_seq, state.read_seq) == (2, 0)
    assert (state.all_delivered_seq, state.all_read_seq) == (0, 0)  # carol has nothing yet
    assert state.ts == clock.now
    assert await store.inbox_after(alice, alice_head, 10) == receipts  # durable, same entry
    [b_dev] = await store.list_devices(bob)
    assert b_dev.cursor == 2

    assert await store.ack(b_phone.id, 1) == []  # never backwards
    assert (await store.list_devices(bob))[0].cursor == 2
    await store.ack(b_phone.id, 99)  # clamped to the head
    assert (await store.list_devices(bob))[0].cursor == 3
    members = {m.user_id: m for m in await store.receipts(conv.id, alice)}
    assert (members[bob].delivered_seq, members[bob].read_seq) == (3, 0)

    # A second device's ack of what is already delivered moves the cursor, sends nothing.
    b_laptop = await store.create_device(bob, "laptop", "tok-laptop")
    assert b_laptop.cursor == 3
    assert await store.ack(b_phone.id, 3) == []


async def test_receipt_aggregate_is_min_over_members(store: Store) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    a_phone = await make_device(store, alice)
    conv = await store.create_group(alice, "G", [bob, carol], MAX_MEMBERS)
    await send(store, conv.id, alice, a_phone.id)  # 2
    await drain(store)
    await store.mark_read(bob, conv.id, 2)
    [entry] = await store.mark_read(carol, conv.id, 2)
    assert entry.user_id == alice and entry.receipt is not None
    assert (entry.receipt.delivered_seq, entry.receipt.read_seq) == (2, 2)
    assert (entry.receipt.all_delivered_seq, entry.receipt.all_read_seq) == (2, 2)


async def test_receipts_go_to_each_sender_once(store: Store) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    a_phone, b_phone = await make_device(store, alice), await make_device(store, bob)
    conv = await store.create_group(alice, "G", [bob, carol], MAX_MEMBERS)
    for _ in range(2):
        await send(store, conv.id, alice, a_phone.id)
        await send(store, conv.id, bob, b_phone.id)
    entries = await store.mark_read(carol, conv.id, 5)
    assert sorted(e.user_id for e in entries) == [alice, bob]
    assert all(e.receipt and e.receipt.user_id == carol for e in entries)
    # Only carol sent in the range that moved for bob (his own sends moved him to 5).
    await send(store, conv.id, carol, (await make_device(store, carol)).id)  # 6
    [entry] = await store.mark_read(bob, conv.id, 6)
    assert entry.user_id == carol


async def test_mark_read(store: Store) -> None:
    alice, bob, eve = await make_users(store, "alice", "bob", "eve")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    for _ in range(3):
        await send(store, conv.id, alice, phone.id)
    [entry] = await store.mark_read(bob, conv.id, 2)
    assert entry.user_id == alice and entry.receipt is not None
    assert (entry.receipt.delivered_seq, entry.receipt.read_seq) == (2, 2)  # read => delivered
    assert (entry.receipt.all_delivered_seq, entry.receipt.all_read_seq) == (2, 2)
    assert await store.mark_read(bob, conv.id, 1) == []  # never backwards
    members = {m.user_id: m for m in await store.receipts(conv.id, bob)}
    assert (members[bob].delivered_seq, members[bob].read_seq) == (2, 2)
    with pytest.raises(BadPosition):
        await store.mark_read(bob, conv.id, 4)
    with pytest.raises(NotMember):
        await store.mark_read(eve, conv.id, 1)
    # Only the one receipt so far (the messages may be in the inbox already: fan-out).
    assert [e for e in await inbox(store, alice) if e.receipt is not None] == [entry]


async def test_ack_then_read_moves_read_only(store: Store) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    a_phone, b_phone = await make_device(store, alice), await make_device(store, bob)
    conv = await store.direct_conversation(alice, bob)
    await send(store, conv.id, alice, a_phone.id)
    await send(store, conv.id, alice, a_phone.id)
    await drain(store)
    [delivered] = await store.ack(b_phone.id, 2)
    assert delivered.receipt is not None and delivered.receipt.delivered_seq == 2
    [read] = await store.mark_read(bob, conv.id, 1)
    assert read.receipt is not None
    assert (read.receipt.delivered_seq, read.receipt.read_seq) == (2, 1)
    assert read.inbox_seq == delivered.inbox_seq + 1


# -- listings ---------------------------------------------------------------------------------


async def test_list_conversations(store: Store, clock: FakeClock) -> None:
    alice, bob, carol = await make_users(store, "alice", "bob", "carol")
    a_phone, b_phone = await make_device(store, alice), await make_device(store, bob)
    direct = await store.direct_conversation(alice, bob)
    clock.advance(1)
    group = await store.create_group(carol, "G", [alice], MAX_MEMBERS)
    clock.advance(1)
    await send(store, direct.id, bob, b_phone.id, "one")
    await send(store, direct.id, bob, b_phone.id, "two")
    await send(store, direct.id, alice, a_phone.id, "mine")
    summaries = await store.list_conversations(alice)
    assert [s.conversation.id for s in summaries] == [direct.id, group.id]
    first = summaries[0]
    assert first.last_message is not None and first.last_message.body == "mine"
    assert first.unread == 0  # her own send moved her read position past everything
    assert sorted(m.user_id for m in first.conversation.members) == [alice, bob]
    assert summaries[1].unread == 1  # carol's "created" system message
    assert summaries[1].last_message is not None and summaries[1].last_message.seq == 1

    bob_view = {s.conversation.id: s for s in await store.list_conversations(bob)}
    assert set(bob_view) == {direct.id}
    assert bob_view[direct.id].unread == 1  # alice's "mine"

    clock.advance(1)
    await store.rename(alice, group.id, "G2")
    assert [s.conversation.id for s in await store.list_conversations(alice)] == [
        group.id,
        direct.id,
    ]
    empty = await store.direct_conversation(carol, bob)
    assert (
        next(
            s for s in await store.list_conversations(carol) if s.conversation.id == empty.id
        ).last_message
        is None
    )


async def test_contacts_and_shared_with(store: Store) -> None:
    alice, bob, carol, dave, eve = await make_users(store, "alice", "bob", "carol", "dave", "eve")
    await store.direct_conversation(alice, bob)
    await store.create_group(alice, "small", [carol], MAX_MEMBERS)
    await store.create_group(dave, "big", [alice, bob, carol, eve], MAX_MEMBERS)
    assert await store.contacts(alice, max_group_size=2) == sorted([bob, carol])
    assert await store.contacts(alice, max_group_size=5) == sorted([bob, carol, dave, eve])
    assert await store.contacts(eve, max_group_size=2) == []
    assert sorted(await store.shared_with(alice, [bob, eve, 9999])) == sorted([bob, eve])
    assert await store.shared_with(eve, [dave]) == [dave]
    assert await store.shared_with(bob, []) == []


# -- retention and durability -----------------------------------------------------------------


async def test_prune_inbox(store: Store, clock: FakeClock) -> None:
    alice, bob = await make_users(store, "alice", "bob")
    phone = await make_device(store, alice)
    conv = await store.direct_conversation(alice, bob)
    for _ in range(3):
        await send(store, conv.id, alice, phone.id)
    await drain(store)
    clock.advance(100)
    cutoff = clock.now
    await send(store, conv.id, alice, phone.id)
    await drain(store)
    assert await store.prune_inbox(cutoff) == 6  # 3 old entries each for alice and bob
    bounds = await store.inbox_bounds(bob)
    assert (bounds.floor, bounds.head) == (3, 4)
    assert [e.inbox_seq for e in await store.inbox_after(bob, 0, 10)] == [4]
    assert await store.prune_inbox(cutoff) == 0
    assert (await store.inbox_bounds(bob)).floor == 3


async def test_reopen_keeps_everything(make_store: Callable[[], Store]) -> None:
    store = make_store()
    await store.open()
    try:
        alice, bob = await make_users(store, "alice", "bob")
        phone = await store.create_device(alice, "phone", "tok-reopen")
        conv = await store.create_group(alice, "G", [bob], MAX_MEMBERS)
        await send(store, conv.id, alice, phone.id, "persisted", client_id="p1")
        await drain(store)
    finally:
        await store.close()

    reopened = make_store()
    await reopened.open()  # migrations must not be applied again
    try:
        assert await reopened.find_user("ALICE") is not None
        assert await reopened.device_for_token("tok-reopen") is not None
        history = await reopened.history(conv.id, bob)
        assert [m.seq for m in history] == [1, 2] and history[1].body == "persisted"
        assert [e.inbox_seq for e in await reopened.inbox_after(bob, 0, 10)] == [1, 2]
        retry = await send(reopened, conv.id, alice, phone.id, "persisted", client_id="p1")
        assert retry.duplicate and retry.seq == 2
        assert (await send(reopened, conv.id, alice, phone.id)).seq == 3
    finally:
        await reopened.close()


# -- several processes on one database ----------------------------------------------------------
# Two store instances on the same data stand for two processes: each has its own connections
# (and, for SQLite, its own writer thread), so only the database keeps them consistent.


async def test_two_instances_send_into_one_conversation(make_store: Callable[[], Store]) -> None:
    first, second = make_store(), make_store()
    await first.open()
    await second.open()
    try:
        alice, bob = await make_users(first, "alice", "bob")
        phone_a, phone_b = await make_device(first, alice), await make_device(second, bob)
        conv = await first.create_group(alice, "G", [bob], MAX_MEMBERS)  # seq 1
        sends = [send(first, conv.id, alice, phone_a.id, f"a{i}") for i in range(100)] + [
            send(second, conv.id, bob, phone_b.id, f"b{i}") for i in range(100)
        ]
        # The same retry through both instances at once: still one message.
        retries = [
            send(s, conv.id, alice, phone_a.id, "r", client_id="r1") for s in (first, second)
        ]
        results = await asyncio.gather(*sends, *retries)
        fresh = [r for r in results if not r.duplicate]
        assert sorted(r.seq for r in fresh) == list(range(2, 203))  # gapless, no duplicate
        assert len({r.seq for r in results[-2:]}) == 1
        assert sorted(r.duplicate for r in results[-2:]) == [False, True]
        history = await second.history(conv.id, alice, limit=1000)
        assert [m.seq for m in history] == list(range(1, 203))
        by_seq = {m.seq: m for m in history}
        assert all(by_seq[r.seq].client_id == r.client_id for r in results)
        assert (await first.get_conversation(conv.id, bob)).last_seq == 202
    finally:
        await first.close()
        await second.close()


async def test_two_instances_fan_out_concurrently(make_store: Callable[[], Store]) -> None:
    first, second = make_store(), make_store()
    await first.open()
    await second.open()
    try:
        users = await make_users(first, "alice", "bob", "carol", "dave")
        phone = await make_device(first, users[0])
        convs = [
            await first.create_group(users[0], f"G{i}", users[1:], MAX_MEMBERS) for i in range(4)
        ]
        direct = await second.direct_conversation(users[1], users[2])
        bob_phone = await make_device(second, users[1])
        await asyncio.gather(
            *(send(first, c.id, users[0], phone.id) for c in convs for _ in range(20)),
            *(send(second, direct.id, users[1], bob_phone.id) for _ in range(20)),
        )
        # Two workers per instance, all at once, in small batches: many lease hand-overs.
        await asyncio.gather(
            *(drain(s, f"{name}-w{i}", max_messages=5) for s, name in ((first, "a"), (second, "b"))
              for i in range(2))
        )  # fmt: skip
        expected = {c.id: 21 for c in convs}
        for user in users:
            got = await inbox(second, user)
            assert [e.inbox_seq for e in got] == list(range(1, len(got) + 1))  # gapless
            mine = dict(expected)
            if user in (users[1], users[2]):
                mine[direct.id] = 20
            for conv_id, count in mine.items():
                seqs = [e.message.seq for e in got if e.message and e.conv_id == conv_id]
                assert seqs == list(range(1, count + 1))  # each exactly once, in seq order
            assert len(got) == sum(mine.values())
        assert (await first.fanout("a-w0", 100, 30)).entries == []
    finally:
        await first.close()
        await second.close()
