"""Acks, read marks and receipts.

Acks (`PendingAck`) queue up and `ack_loop` applies them in bulk: one call of the
``pigeon_ack`` function (0004 migration) per batch of up to ``MAX_ACK_BATCH``, which moves
device cursors and members' receipt positions and writes the receipts, all in SQL. A read
mark (`mark_read`) moves one member's positions here in Python, with the same rules
(`pigeon.store.receipts`) and the same lock on a big group's aggregate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import deque
from collections.abc import Sequence

from pigeon.store import receipts
from pigeon.store.errors import BadPosition, NotFound
from pigeon.store.models import InboxEntry, ReceiptState
from pigeon.store.postgres.queries import last_seq, require_member
from pigeon.store.postgres.schema import Clock, Conn, Statement, fresh
from pigeon.store.postgres.sending import InboxAppender

#: Most acks applied together by one call of the ``pigeon_ack`` function (0004 migration).
MAX_ACK_BATCH = 256
#: First key of the transaction advisory lock on a big group's aggregate receipt ("ackc");
#: the second is the conversation id modulo 2**31. Also in the 0004 migration.
AGGREGATE_LOCK_CLASS = 0x61636B63
MAX_BIGINT = 2**63 - 1


@dataclasses.dataclass(slots=True)
class PendingAck:
    device_id: int
    up_to: int
    future: asyncio.Future[list[InboxEntry]]


async def ack_loop(
    queue: deque[PendingAck], call: Statement, clock: Clock, detail_max_group: int
) -> None:
    """Apply queued acks, many per call, until the queue is empty.

    A batch is one call of the ``pigeon_ack`` function (0004 migration): one round trip
    and one short transaction, whose row locks last only while the function runs. While
    it runs, new acks pile up and become the next batch. A revoked or unknown device
    fails its own ack only. The receipt entries of the batch go to the first waiting
    caller whose cursor moved (it pushes them); the others get an empty list.
    """
    while queue:
        count = min(len(queue), MAX_ACK_BATCH)
        batch = [queue.popleft() for _ in range(count)]
        try:
            moved, entries = await _apply_acks(call, clock, detail_max_group, batch)
        except Exception as exc:  # whole batch failed; never leave a caller hanging
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(fresh(exc))
            continue
        except asyncio.CancelledError:
            for pending in [*batch, *queue]:
                pending.future.cancel()
            queue.clear()
            raise
        waiting = [p for p in batch if not p.future.done() and p.device_id in moved]
        takers = [p for p in waiting if moved[p.device_id]] or waiting
        taker = takers[0] if takers else None
        for pending in batch:
            if pending.future.done():  # the caller was cancelled
                continue
            if pending.device_id not in moved:
                pending.future.set_exception(NotFound(f"no device {pending.device_id}"))
            else:
                pending.future.set_result(entries if pending is taker else [])


async def _apply_acks(
    call: Statement, clock: Clock, detail_max_group: int, batch: Sequence[PendingAck]
) -> tuple[dict[int, bool], list[InboxEntry]]:
    """Apply a batch of acks; return whether each device found moved its cursor, and
    the receipt entries written."""
    now = clock()
    rows = await call(
        "SELECT * FROM pigeon_ack($1::bigint[], $2::bigint[], $3::integer, $4::float8, $5::text)",
        [p.device_id for p in batch],
        [p.up_to for p in batch],
        detail_max_group,
        float(now),
        json.dumps(now),  # stored receipts read back exactly as written by Python
    )
    moved: dict[int, bool] = {}
    entries: list[InboxEntry] = []
    for row in rows:
        if row[0] is not None:
            moved[int(row[0])] = bool(row[1])
            continue
        user_id, inbox_seq, conv_id, member, delivered, read, all_delivered, all_read = row[2:]
        state = ReceiptState(
            int(conv_id),
            int(member),
            int(delivered),
            int(read),
            int(all_delivered),
            int(all_read),
            now,
        )
        entries.append(InboxEntry(int(user_id), int(inbox_seq), int(conv_id), now, receipt=state))
    return moved, entries


async def mark_read(
    conn: Conn, clock: Clock, detail_max_group: int, user_id: int, conv_id: int, up_to_seq: int
) -> list[InboxEntry]:
    await require_member(conn, conv_id, user_id)
    last = await last_seq(conn, conv_id)
    if not 0 <= up_to_seq <= last:
        raise BadPosition(f"seq {up_to_seq} is beyond the last message ({last})")
    inbox = InboxAppender()
    # Read implies delivered: both move.
    await _advance(conn, inbox, conv_id, user_id, up_to_seq, up_to_seq, clock(), detail_max_group)
    return await inbox.flush(conn)


async def _advance(
    conn: Conn,
    inbox: InboxAppender,
    conv_id: int,
    user_id: int,
    delivered_to: int,
    read_to: int,
    now: float,
    detail_max_group: int,
) -> None:
    """Move a member's receipt positions forward (never back) and tell the senders of the
    messages in the moved ranges: each sender once, with the member's new positions and
    the aggregate; in a group over ``detail_max_group`` members, only when the aggregate
    moves (`pigeon.store.receipts`)."""
    detailed = await _member_count_at_most(conn, conv_id, detail_max_group)
    if not detailed:
        # As in pigeon_ack: the aggregate's before and after are read under this lock, so
        # two concurrent transactions cannot both miss its move. Taken before the row lock.
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", AGGREGATE_LOCK_CLASS, conv_id % 2**31
        )
    row = await conn.fetchrow(
        "SELECT delivered_seq, read_seq FROM members WHERE conv_id = $1 AND user_id = $2"
        " FOR NO KEY UPDATE",
        conv_id,
        user_id,
    )
    if row is None:  # left the conversation since: nothing to record
        return
    old = (int(row[0]), int(row[1]))
    new = receipts.advance(old, delivered_to, read_to)
    if new is None:
        return
    before = None if detailed else await _aggregate(conn, conv_id)
    await conn.execute(
        "UPDATE members SET delivered_seq = $1, read_seq = $2 WHERE conv_id = $3 AND user_id = $4",
        *new,
        conv_id,
        user_id,
    )
    if detailed:
        senders = await _senders(conn, conv_id, user_id, receipts.moved_ranges(old, new))
        if not senders:
            return
        state = ReceiptState(conv_id, user_id, *new, *await _aggregate(conn, conv_id), now)
    else:
        assert before is not None
        if not receipts.could_move_aggregate(old, before):
            return
        after = await _aggregate(conn, conv_id)
        senders = await _senders(conn, conv_id, user_id, receipts.moved_ranges(before, after))
        state = ReceiptState(conv_id, receipts.AGGREGATE_USER, *after, *after, now)
    for sender in senders:
        inbox.append(sender, conv_id, now, receipt=state)


async def _member_count_at_most(conn: Conn, conv_id: int, limit: int) -> bool:
    # Counts at most limit + 1 rows: cheap whatever the group's size.
    count = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM members WHERE conv_id = $1 LIMIT $2) m",
        conv_id,
        limit + 1,
    )
    return int(count) <= limit


async def _aggregate(conn: Conn, conv_id: int) -> tuple[int, int]:
    """(min delivered, min read) over the members: index lookups (0003 migration)."""
    row = await conn.fetchrow(
        "SELECT (SELECT min(delivered_seq) FROM members WHERE conv_id = $1),"
        " (SELECT min(read_seq) FROM members WHERE conv_id = $1)",
        conv_id,
    )
    return int(row[0] or 0), int(row[1] or 0)


async def _senders(
    conn: Conn, conv_id: int, except_user: int, ranges: list[tuple[int, int]]
) -> list[int]:
    """Current members other than ``except_user`` who sent a user message in the ranges."""
    found: set[int] = set()
    for after, up_to in ranges:
        rows = await conn.fetch(
            "SELECT DISTINCT m.sender_id FROM messages m"
            " WHERE m.conv_id = $1 AND m.seq > $2 AND m.seq <= $3 AND m.sender_id <> $4"
            " AND m.kind <> 'system' AND EXISTS (SELECT 1 FROM members mm"
            " WHERE mm.conv_id = m.conv_id AND mm.user_id = m.sender_id)",
            conv_id,
            after,
            up_to,
            except_user,
        )
        found.update(int(r[0]) for r in rows)
    return sorted(found)
