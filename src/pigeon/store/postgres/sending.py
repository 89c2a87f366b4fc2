"""Messages in, inbox entries out: the group-commit send path and fan-out.

Sends: ``PostgresStore.send_message`` queues a `PendingSend`; `send_loop` commits what is
queued (up to ``MAX_SEND_BATCH``) in one call of the ``pigeon_send`` function (0005
migration). Fan-out (`fanout`) turns committed messages into inbox entries under a lease per
conversation; `InboxAppender` allocates inbox positions and writes entries in bulk (receipts
use it too, `pigeon.store.postgres.acks`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Sequence

import asyncpg

from pigeon.store import records
from pigeon.store.errors import NotMember, StoreError, refused_send
from pigeon.store.membership import Departure, departures, recipients
from pigeon.store.models import (
    FanoutBatch,
    InboxEntry,
    Message,
    ReceiptState,
    SendRequest,
    SendResult,
)
from pigeon.store.postgres.queries import M_MSG_COLS, to_columns
from pigeon.store.postgres.schema import Clock, Conn, Row, Statement, map_error

#: Most sends committed in one transaction; bigger batches gain little and delay the first.
MAX_SEND_BATCH = 512
#: ``out_code`` of a ``pigeon_send`` row (0005 migration): sent, duplicate, not a member.
_SEND_DUPLICATE = 1
_SEND_NOT_MEMBER = 2
#: Inbox rows at or above this go in with COPY, below with one INSERT over arrays (3b).
COPY_THRESHOLD = 256
#: Most conversations one fan-out round claims: the leases of a round are locked until it
#: commits, so a round that claimed every conversation with work kept the other workers
#: idle (bench direct --cluster 2,2 max: 3 797-4 349 msg/s against 6 504-8 026).
MAX_ROUND_CONVERSATIONS = 16


@dataclasses.dataclass(slots=True)
class PendingSend:
    request: SendRequest
    max_body: int
    future: asyncio.Future[SendResult]


# -- group commit ----------------------------------------------------------------------------


async def send_loop(queue: deque[PendingSend], statement: Statement, clock: Clock) -> None:
    """Commit queued sends, many per transaction, until the queue is empty.

    While one batch is being committed, new sends pile up and become the next batch:
    the busier the store, the bigger the batches.
    """
    while queue:
        count = min(len(queue), MAX_SEND_BATCH)
        batch = [queue.popleft() for _ in range(count)]
        work = [(p.request, p.max_body) for p in batch]
        outcomes: Sequence[SendResult | BaseException]
        try:
            outcomes = await _commit_sends(statement, clock, work)
        except Exception as exc:  # whole batch failed; never leave a caller hanging
            outcomes = [exc] * len(batch)
        except asyncio.CancelledError:
            for pending in [*batch, *queue]:
                pending.future.cancel()
            queue.clear()
            raise
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():  # the caller was cancelled
                continue
            if isinstance(outcome, StoreError):
                # A fresh instance per caller: a shared one would share its traceback.
                pending.future.set_exception(type(outcome)(*outcome.args))
            elif isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)


async def _commit_sends(
    statement: Statement, clock: Clock, work: list[tuple[SendRequest, int]]
) -> list[SendResult | StoreError]:
    try:
        return await _send_batch(statement, clock, work)
    except asyncpg.UniqueViolationError:
        # Another instance stored one of these keys meanwhile (a device reusing a
        # client_id in two conversations at once: the conversation locks do not order
        # those). Sent again, alone, each finds its original and repeats its result.
        pass
    except asyncpg.PostgresError as exc:
        if len(work) == 1:
            return [map_error(exc)]
    # Checks before writing make a failure unexpected; still, one bad request must not
    # fail the others.
    outcomes: list[SendResult | StoreError] = []
    for item in work:
        try:
            outcomes += await _send_batch(statement, clock, [item])
        except asyncpg.PostgresError as exc:
            outcomes.append(map_error(exc))
    return outcomes


async def _send_batch(
    statement: Statement, clock: Clock, work: list[tuple[SendRequest, int]]
) -> list[SendResult | StoreError]:
    """Validate and write a batch of sends in one call of the ``pigeon_send`` function
    (0005 migration): one round trip and one short transaction, whose conversation row
    locks last only while the function runs. A failing request yields its error, writes
    nothing, and does not affect the others."""
    now = clock()
    refusals = [refused_send(req.body, req.client_id, max_body) for req, max_body in work]
    requests = [req for (req, _), no in zip(work, refusals, strict=True) if no is None]
    rows: list[Row] = []
    if requests:
        rows = await statement(
            "SELECT * FROM pigeon_send($1::bigint[], $2::bigint[], $3::bigint[],"
            " $4::text[], $5::text[], $6::text[], $7::float8)",
            [r.conv_id for r in requests],
            [r.sender_id for r in requests],
            [r.sender_device for r in requests],
            [r.client_id for r in requests],
            [r.kind for r in requests],
            [r.body for r in requests],
            float(now),
        )
    answers = iter(rows)
    outcomes: list[SendResult | StoreError] = []
    for (req, _), refused in zip(work, refusals, strict=True):
        if refused is not None:
            outcomes.append(refused)
            continue
        code, conv_id, seq, ts = next(answers)
        if code == _SEND_NOT_MEMBER:
            outcomes.append(NotMember(f"not a member of conversation {req.conv_id}"))
        else:
            # A duplicate returns the original result, even if membership changed since.
            duplicate = code == _SEND_DUPLICATE
            outcomes.append(SendResult(int(conv_id), int(seq), float(ts), req.client_id, duplicate))
    return outcomes


# -- fan-out ---------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class FanoutPosition:
    """Round-robin position of fanout over conversations (one per store instance)."""

    after: int = 0  # the conversation served last


async def fanout(
    conn: Conn,
    clock: Clock,
    position: FanoutPosition,
    worker_id: str,
    max_messages: int,
    lease_s: float,
) -> FanoutBatch:
    """Fan out up to ``max_messages`` pending messages, each conversation's in seq order,
    conversations in round-robin order.

    Each message goes to the users who were members when it was sent: current members
    who joined before it, plus those who left (or were removed) after it but before this
    fan-out ran, including the departure message itself. (Members are read before the
    departures, so a change committed in between shows up in the departures.)

    A round claims up to `MAX_ROUND_CONVERSATIONS` conversations, each with an equal
    share of the budget. A fixed handful of statements for the whole round, whatever the number of
    conversations: with one per conversation and step, a round over the 100
    conversations of `pigeon bench direct --cluster` took ~400 round trips, and messages
    waited for it.
    """
    now = clock()
    budget = max(max_messages, 0)
    limit = min(budget, MAX_ROUND_CONVERSATIONS)
    claimed = await _claim(conn, position, worker_id, now, limit + 1)
    served = claimed[:limit]
    batch = FanoutBatch(more=len(claimed) > len(served))  # conversations left for later
    batch.nudge_users = await _take_unpushed(conn, worker_id, now)
    # Each claimed conversation gets an equal share of the budget, read through its own
    # index range: a round reads at most ~`budget` jobs however long the backlogs are.
    share = budget // len(served) if served else 0
    rows = await conn.fetch(
        f"SELECT {M_MSG_COLS} FROM unnest($1::bigint[]) WITH ORDINALITY AS c(conv_id, ord)"
        " CROSS JOIN LATERAL (SELECT j.seq FROM fanout_jobs j WHERE j.conv_id = c.conv_id"
        "  ORDER BY j.seq LIMIT $2) j"
        " JOIN messages m ON m.conv_id = c.conv_id AND m.seq = j.seq"
        " ORDER BY c.ord, j.seq",
        served,
        share,
    )
    pending: dict[int, list[Message]] = {}
    for row in rows:
        message = records.message(row)
        pending.setdefault(message.conv_id, []).append(message)
    if served:
        position.after = served[-1]
    inbox = InboxAppender()
    joined = await _members_by_conversation(conn, served)
    departed = await _pending_departures(conn, served)
    for conv_id in served:
        for message in pending.get(conv_id, ()):
            for user in recipients(joined.get(conv_id, []), departed.get(conv_id, []), message.seq):
                inbox.append(user, conv_id, now, message=message)
    last = [pending[c][-1].seq if c in pending else 0 for c in served]
    remaining = await conn.fetch(
        "WITH gone AS (DELETE FROM fanout_jobs j USING unnest($1::bigint[], $2::bigint[])"
        " AS d(conv_id, last) WHERE j.conv_id = d.conv_id AND j.seq <= d.last)"
        " SELECT d.conv_id FROM unnest($1::bigint[], $2::bigint[]) AS d(conv_id, last)"
        " WHERE EXISTS (SELECT 1 FROM fanout_jobs j WHERE j.conv_id = d.conv_id"
        " AND j.seq > d.last)",
        served,
        last,
    )
    batch.more = batch.more or bool(remaining)  # or jobs left in a served conversation
    # Held (and marked unpushed) until `fanout_pushed`, even when no job is left.
    await conn.execute(
        "UPDATE fanout_leases l SET owner = $2, expires_at = $3, unpushed = true"
        " WHERE l.conv_id = ANY($1::bigint[])",
        served,
        worker_id,
        now + lease_s,
    )
    batch.convs = served
    # `more` stays False when the only work left is leased to other workers: their
    # holders will do it, and calling again at once would only spin.
    batch.entries = await inbox.flush(conn)
    return batch


async def _claim(
    conn: Conn, position: FanoutPosition, worker_id: str, now: float, limit: int
) -> list[int]:
    """Lock the lease rows of up to ``limit`` conversations with pending jobs that this
    worker may serve: its own unexpired leases, then free or expired ones.

    The row locks last until commit, so verifying, writing and extending a lease are one
    atomic step (fencing). Free rows another worker has locked are skipped, not waited
    for. Its own leases are waited for instead: another worker's claim can hold one for
    a moment (PostgreSQL keeps the lock of a row that failed the recheck after a
    concurrent update), and skipping it would strand the conversation until expiry.
    Round robin: conversations after the one served last come first, so one long
    backlog does not starve the others.
    """
    pending = "l.conv_id IN (SELECT DISTINCT conv_id FROM fanout_jobs)"
    order = "ORDER BY l.conv_id <= $3, l.conv_id LIMIT $4"
    own = await conn.fetch(
        f"SELECT l.conv_id FROM fanout_leases l WHERE {pending}"
        f" AND l.owner = $1 AND l.expires_at > $2 {order} FOR UPDATE",
        worker_id,
        now,
        position.after,
        limit,
    )
    free = await conn.fetch(
        f"SELECT l.conv_id FROM fanout_leases l WHERE {pending}"
        # ($1 <> '': an empty worker id would look like a free lease.)
        f" AND (l.owner = '' OR l.expires_at <= $2) AND $1 <> '' {order}"
        " FOR UPDATE SKIP LOCKED",
        worker_id,
        now,
        position.after,
        limit,
    )
    convs = {int(r[0]) for r in [*own, *free]}
    after = position.after
    return sorted(convs, key=lambda c: (c <= after, c))[:limit]


class InboxAppender:
    """Collects inbox entries within one transaction and writes them in bulk at the end.

    Positions are allocated at ``flush``: the users' rows are locked in id order (so two
    transactions appending to overlapping users cannot deadlock), each head moves once by
    its user's count, and the entries take the positions in the order they were appended.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, int, float, Message | None, ReceiptState | None]] = []

    def append(
        self,
        user_id: int,
        conv_id: int,
        ts: float,
        message: Message | None = None,
        receipt: ReceiptState | None = None,
    ) -> None:
        self._pending.append((user_id, conv_id, ts, message, receipt))

    async def flush(self, conn: Conn) -> list[InboxEntry]:
        """Write what was appended; return the entries in the order they were appended."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        counts: dict[int, int] = {}
        for user_id, *_ in pending:
            counts[user_id] = counts.get(user_id, 0) + 1
        users = sorted(counts)
        await conn.execute(
            "SELECT 1 FROM users WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
            users,
        )
        rows = await conn.fetch(
            "UPDATE users u SET inbox_head = u.inbox_head + n.count"
            " FROM unnest($1::bigint[], $2::bigint[]) AS n(id, count) WHERE u.id = n.id"
            " RETURNING u.id, u.inbox_head",
            users,
            [counts[u] for u in users],
        )
        # The first new position of each user is just above its old head.
        position = {int(r[0]): int(r[1]) - counts[int(r[0])] for r in rows}
        entries: list[InboxEntry] = []
        for user_id, conv_id, ts, message, receipt in pending:
            position[user_id] += 1
            entry = InboxEntry(
                user_id, position[user_id], conv_id, ts, message=message, receipt=receipt
            )
            entries.append(entry)
        await _insert_inbox(conn, entries)
        return entries


async def _insert_inbox(conn: Conn, entries: list[InboxEntry]) -> None:
    rows = [
        (
            e.user_id,
            e.inbox_seq,
            e.conv_id,
            e.message.seq if e.message is not None else None,
            records.receipt_json(e.receipt) if e.receipt is not None else None,
            e.ts,
        )
        for e in entries
    ]
    columns = ["user_id", "inbox_seq", "conv_id", "msg_seq", "receipt", "ts"]
    if len(rows) >= COPY_THRESHOLD:  # COPY wins for big fan-outs (3b), costs more for few
        await conn.copy_records_to_table("inbox", records=rows, columns=columns)
        return
    await conn.execute(
        f"INSERT INTO inbox ({', '.join(columns)}) SELECT * FROM unnest($1::bigint[],"
        " $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::float8[])",
        *to_columns(rows, len(columns)),
    )


async def _take_unpushed(conn: Conn, worker_id: str, now: float) -> list[int]:
    """Leases whose worker committed entries but never confirmed the push (it died):
    release them and return the members to nudge."""
    rows = await conn.fetch(
        "SELECT conv_id FROM fanout_leases WHERE unpushed AND expires_at <= $1"
        " AND owner <> $2 ORDER BY conv_id FOR UPDATE SKIP LOCKED",
        now,
        worker_id,
    )
    if not rows:
        return []
    conv_ids = [int(r[0]) for r in rows]
    await conn.execute(
        "UPDATE fanout_leases SET owner = '', expires_at = 0, unpushed = false"
        " WHERE conv_id = ANY($1::bigint[])",
        conv_ids,
    )
    members = await conn.fetch(
        "SELECT DISTINCT user_id FROM members WHERE conv_id = ANY($1::bigint[])", conv_ids
    )
    return sorted(int(r[0]) for r in members)


async def _members_by_conversation(
    conn: Conn, conv_ids: list[int]
) -> dict[int, list[tuple[int, int]]]:
    """Each conversation's (user, joined_seq), by user."""
    rows = await conn.fetch(
        "SELECT conv_id, user_id, joined_seq FROM members WHERE conv_id = ANY($1::bigint[])"
        " ORDER BY conv_id, user_id",
        conv_ids,
    )
    joined: dict[int, list[tuple[int, int]]] = {}
    for conv_id, user_id, joined_seq in rows:
        joined.setdefault(int(conv_id), []).append((int(user_id), int(joined_seq)))
    return joined


async def _pending_departures(conn: Conn, conv_ids: list[int]) -> dict[int, list[Departure]]:
    """Each conversation's departures among its pending jobs."""
    rows = await conn.fetch(
        "SELECT j.conv_id, m.seq, m.body FROM fanout_jobs j"
        " JOIN messages m ON m.conv_id = j.conv_id AND m.seq = j.seq"
        " WHERE j.conv_id = ANY($1::bigint[]) AND m.kind = 'system' ORDER BY j.conv_id, j.seq",
        conv_ids,
    )
    events: dict[int, list[tuple[int, str]]] = {}
    for conv_id, seq, body in rows:
        events.setdefault(int(conv_id), []).append((int(seq), str(body)))
    return {conv_id: departures(found) for conv_id, found in events.items()}


async def insert_lease(conn: Conn, conv_id: int) -> None:
    await conn.execute("INSERT INTO fanout_leases (conv_id) VALUES ($1)", conv_id)
