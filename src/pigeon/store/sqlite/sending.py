"""The send path and fan-out: messages stored, written to their members' inboxes, and
the leased fan-out rounds for what could not go with its send."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any

import msgspec

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
from pigeon.store.sqlite import queries
from pigeon.store.sqlite.batches import KEYS, as_json, fields, json_rows
from pigeon.store.sqlite.queries import MSG_COLS

Row = tuple[Any, ...]


def send_batch(
    conn: sqlite3.Connection,
    work: list[tuple[SendRequest, int]],
    now: float,
    fanout_with_send: bool,
) -> SentBatch:
    """Validate and write a batch of sends ``(request, max body)``, and fan them out; a
    failing request yields its error, writes nothing, and does not affect the others.

    A message is fanned out in the same transaction unless its conversation has older
    jobs queued (or ``fanout_with_send`` is off): then it is queued behind them.
    """
    # Last seqs (allocated here: we hold the lock), members, once per batch.
    convs_now = _conversations_for_send(conn, sorted({r.conv_id for r, _ in work}))
    last_seqs, members = convs_now.last_seq, convs_now.members
    sent: dict[tuple[int, str], SendResult] = {}  # idempotency within this batch
    committed = _find_sent(conn, [(r.sender_device, r.client_id) for r, _ in work])
    messages: list[Message] = []
    outcomes: list[SendResult | StoreError] = []
    # (conv, seq) -> its result and the result's index in outcomes
    placed: dict[tuple[int, int], tuple[SendResult, int]] = {}
    for req, max_body in work:
        refused = refused_send(req.body, req.client_id, max_body)
        if refused is not None:
            outcomes.append(refused)
            continue
        key = (req.sender_device, req.client_id)
        # A retry returns the original result, even if membership changed since.
        prior = sent.get(key) or committed.get(key)
        if prior is not None:
            outcomes.append(msgspec.structs.replace(prior, duplicate=True))
            continue
        if req.sender_id not in members.get(req.conv_id, ()):
            outcomes.append(NotMember(f"not a member of conversation {req.conv_id}"))
            continue
        seq = last_seqs[req.conv_id] = last_seqs[req.conv_id] + 1
        values = (req.sender_id, req.sender_device, req.client_id, req.kind, req.body)
        messages.append(Message(req.conv_id, seq, *values, ts=now))
        result = SendResult(req.conv_id, seq, now, req.client_id, duplicate=False)
        if req.sender_device != 0:
            sent[key] = result
        placed[(req.conv_id, seq)] = (result, len(outcomes))
        outcomes.append(result)
    convs = sorted({m.conv_id for m in messages})
    conn.execute(
        f"UPDATE conversations SET last_seq = k.c2, last_activity = ? FROM {KEYS}"
        " WHERE conversations.id = k.c1",
        (now, as_json([(conv, last_seqs[conv]) for conv in convs])),
    )
    store_messages(conn, messages)
    queued = convs_now.with_jobs if fanout_with_send else set(convs)
    queue_fanout(conn, [m for m in messages if m.conv_id in queued])
    ready = [m for m in messages if m.conv_id not in queued]
    fanned_out, own_positions = _fan_out_now(conn, ready, now, convs_now)
    for message, position in zip(ready, own_positions, strict=True):
        result, slot = placed[(message.conv_id, message.seq)]
        outcomes[slot] = msgspec.structs.replace(result, inbox_seq=position)
    return SentBatch(outcomes, fanned_out)


def append_system(
    conn: sqlite3.Connection,
    conv_id: int,
    actor_id: int,
    event: dict[str, Any],
    now: float,
) -> Message:
    """Record a group change as a system message, through the same path as user messages."""
    row = conn.execute(
        "UPDATE conversations SET last_seq = last_seq + 1, last_activity = ?"
        " WHERE id = ? RETURNING last_seq",
        (now, conv_id),
    ).fetchone()
    body = json.dumps(event, separators=(",", ":"))
    message = Message(conv_id, int(row[0]), actor_id, 0, "", "system", body, now)
    store_messages(conn, [message])
    queue_fanout(conn, [message])
    return message


def fanout_round(
    conn: sqlite3.Connection,
    worker_id: str,
    max_messages: int,
    lease_s: float,
    now: float,
    served_last: int,
) -> tuple[FanoutBatch, int]:
    """Fan out up to ``max_messages`` queued messages, conversation by conversation,
    starting after ``served_last``; return the batch and the conversation served last."""
    # Leases are checked and written in this same transaction, which holds the write
    # lock: a worker whose lease was taken over cannot commit entries (fencing).
    convs = [
        int(r[0])
        for r in conn.execute(
            "SELECT j.conv_id FROM (SELECT DISTINCT conv_id FROM fanout_jobs) j"
            " LEFT JOIN fanout_leases l ON l.conv_id = j.conv_id"
            " WHERE l.conv_id IS NULL OR l.owner = ? OR l.expires_at <= ?"
            " ORDER BY j.conv_id",
            (worker_id, now),
        )
    ]
    # Round robin: start after the conversation served last, so a long backlog in one
    # conversation does not starve the others.
    order = [c for c in convs if c > served_last]
    order += [c for c in convs if c <= served_last]
    inbox = InboxAppender(conn, now)
    batch = FanoutBatch()
    budget = max_messages
    for conv_id in order:
        if budget <= 0:
            batch.more = True  # conversations not served in this call
            break
        done = _fanout_conversation(conn, inbox, conv_id, budget, now)
        batch.entries += done.entries
        batch.convs.append(conv_id)
        budget -= done.messages
        served_last = conv_id
        if done.remaining:
            conn.execute(
                "INSERT INTO fanout_leases (conv_id, owner, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (conv_id) DO UPDATE SET owner = excluded.owner,"
                " expires_at = excluded.expires_at",
                (conv_id, worker_id, now + lease_s),
            )
            batch.more = True
        else:
            conn.execute("DELETE FROM fanout_leases WHERE conv_id = ?", (conv_id,))
    # `more` stays False when the only work left is leased to other workers: their
    # holders will do it, and calling again at once would only spin.
    inbox.flush()
    return batch, served_last


@dataclasses.dataclass(slots=True)
class SentBatch:
    outcomes: list[SendResult | StoreError]
    fanned_out: list[list[InboxEntry]]  # per message written to inboxes, its entries


@dataclasses.dataclass(slots=True)
class _SendContext:
    """What a send batch needs of its conversations, read in one query."""

    last_seq: dict[int, int]  # conv -> its last seq, for the conversations that exist
    with_jobs: set[int]  # conversations with messages still queued for fan-out
    members: dict[int, set[int]]  # conv -> its members
    heads: dict[int, int]  # member -> inbox head


def _conversations_for_send(conn: sqlite3.Connection, conv_ids: list[int]) -> _SendContext:
    """One query rather than four: a round of a few sends spends more on statements than
    on rows, and each statement hands the GIL to the event loop and back."""
    context = _SendContext({}, set(), {}, {})
    rows = json_rows(
        conn,
        "WITH cs AS MATERIALIZED (SELECT c.id, c.last_seq,"
        " EXISTS (SELECT 1 FROM fanout_jobs j WHERE j.conv_id = c.id) AS jobs"
        f" FROM {KEYS} JOIN conversations c ON c.id = k.c1)"
        " SELECT json_group_array(json_array(cs.id, cs.last_seq, cs.jobs, m.user_id,"
        " u.inbox_head)) FROM cs"
        " LEFT JOIN members m ON m.conv_id = cs.id LEFT JOIN users u ON u.id = m.user_id",
        [(conv,) for conv in conv_ids],
    )
    for conv, last_seq, jobs, user, head in rows:
        context.last_seq[conv] = last_seq
        if jobs:
            context.with_jobs.add(conv)
        if user is not None:
            context.members.setdefault(conv, set()).add(user)
            context.heads[user] = head
    return context


def _find_sent(
    conn: sqlite3.Connection, keys: list[tuple[int, str]]
) -> dict[tuple[int, str], SendResult]:
    """Sends already committed under these idempotency keys."""
    found: dict[tuple[int, str], SendResult] = {}
    # "sender_device <> 0" lets SQLite use the partial unique index.
    # Rows fetched one by one (there are none but for retries): `ts` is a REAL, which
    # SQLite would round to 15 digits in JSON.
    rows = conn.execute(
        f"SELECT m.sender_device, m.client_id, m.conv_id, m.seq, m.ts FROM {KEYS}"
        " JOIN messages m ON m.sender_device = k.c1 AND m.client_id = k.c2"
        " AND m.sender_device <> 0",
        (as_json([k for k in keys if k[0] != 0]),),  # system messages have no key
    )
    for device, client_id, conv_id, seq, ts in rows:
        key = (int(device), str(client_id))
        found[key] = SendResult(int(conv_id), int(seq), float(ts), key[1], duplicate=False)
    return found


def store_messages(conn: sqlite3.Connection, messages: list[Message]) -> None:
    """Insert messages; move each sender's own positions past them.

    The caller has already allocated the seqs and updated ``conversations.last_seq``, and
    fans the messages out (`_fan_out_now`) or queues them (`queue_fanout`).
    """
    rows = [
        (m.conv_id, m.seq, m.sender_id, m.sender_device, m.client_id, m.kind, m.body, m.ts)
        for m in messages
    ]
    conn.execute(
        f"INSERT INTO messages ({MSG_COLS}) SELECT {fields(8)} FROM json_each(?)",
        (as_json(rows),),
    )
    # One update per (conversation, sender): messages are in seq order, so the last wins.
    own = {(m.conv_id, m.sender_id): m.seq for m in messages}
    conn.execute(
        "UPDATE members SET delivered_seq = MAX(delivered_seq, k.c3),"
        f" read_seq = MAX(read_seq, k.c3) FROM {KEYS}"
        " WHERE members.conv_id = k.c1 AND members.user_id = k.c2",
        (as_json([(conv, user, seq) for (conv, user), seq in own.items()]),),
    )


def queue_fanout(conn: sqlite3.Connection, messages: list[Message]) -> None:
    """Leave the messages to the leased fan-out rounds (`_fanout_conversation`)."""
    conn.execute(
        f"INSERT INTO fanout_jobs (conv_id, seq) SELECT {fields(2)} FROM json_each(?)",
        (as_json([(m.conv_id, m.seq) for m in messages]),),
    )


def _fan_out_now(
    conn: sqlite3.Connection, messages: list[Message], now: float, context: _SendContext
) -> tuple[list[list[InboxEntry]], list[int]]:
    """Write just-stored messages to their conversations' members' inboxes; return each
    message's entries, and its position in its sender's inbox.

    Only for conversations with no queued jobs: then the current members are exactly the
    members at send time (membership changes go through this same writer).
    """
    if not messages:
        return [], []
    inbox = InboxAppender(conn, now)
    inbox.seed(context.heads)
    members = context.members
    fanned_out: list[list[InboxEntry]] = []
    own_positions: list[int] = []
    for m in messages:
        fanned_out.append([inbox.append(u, m.conv_id, message=m) for u in members[m.conv_id]])
        own_positions.append(inbox.head(m.sender_id))  # the sender is a member: checked
    inbox.flush()
    return fanned_out, own_positions


@dataclasses.dataclass(slots=True)
class _ConversationFanout:
    entries: list[InboxEntry]
    messages: int  # how many messages were fanned out
    remaining: bool  # jobs left in the conversation


def _fanout_conversation(
    conn: sqlite3.Connection, inbox: InboxAppender, conv_id: int, budget: int, now: float
) -> _ConversationFanout:
    """Fan out up to ``budget`` pending messages of one conversation, in seq order.

    Each message goes to the users who were members when it was sent: current members
    who joined before it, plus those who left (or were removed) after it but before this
    fan-out ran, including the departure message itself.
    """
    rows = conn.execute(
        f"SELECT {', '.join('m.' + c for c in MSG_COLS.split(', '))}"
        " FROM fanout_jobs j JOIN messages m ON m.conv_id = j.conv_id AND m.seq = j.seq"
        " WHERE j.conv_id = ? ORDER BY j.seq LIMIT ?",
        (conv_id, budget),
    ).fetchall()
    # The members' inbox heads come with them: one query, not one per member.
    members = conn.execute(
        "SELECT m.user_id, m.joined_seq, u.inbox_head FROM members m"
        " JOIN users u ON u.id = m.user_id WHERE m.conv_id = ? ORDER BY m.user_id",
        (conv_id,),
    ).fetchall()
    inbox.seed({int(user): int(head) for user, _, head in members})
    joined = [(int(user), int(joined_seq)) for user, joined_seq, _ in members]
    departed = _pending_departures(conn, conv_id)
    entries: list[InboxEntry] = []
    last = 0
    for row in rows:
        message = records.message(row)
        last = message.seq
        targets = recipients(joined, departed, message.seq)
        entries += [inbox.append(u, conv_id, message=message) for u in targets]
    conn.execute("DELETE FROM fanout_jobs WHERE conv_id = ? AND seq <= ?", (conv_id, last))
    remaining = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM fanout_jobs WHERE conv_id = ?)", (conv_id,)
    ).fetchone()[0]
    return _ConversationFanout(entries, len(rows), bool(remaining))


def _pending_departures(conn: sqlite3.Connection, conv_id: int) -> list[Departure]:
    events = conn.execute(
        "SELECT m.seq, m.body FROM fanout_jobs j"
        " JOIN messages m ON m.conv_id = j.conv_id AND m.seq = j.seq"
        " WHERE j.conv_id = ? AND m.kind = 'system' ORDER BY j.seq",
        (conv_id,),
    ).fetchall()
    return departures((int(seq), str(body)) for seq, body in events)


class InboxAppender:
    """Allocates inbox positions within one transaction and writes the entries in bulk.

    Each user's head is read once and written back once per transaction, instead of one
    UPDATE per entry. Every entry of a transaction carries its time, ``now``.
    """

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self._conn = conn
        self.now = now
        self._heads: dict[int, int] = {}
        self._rows: list[Row] = []
        self._entries: list[InboxEntry] = []

    def seed(self, heads: dict[int, int]) -> None:
        """Known inbox heads, read along with other rows; positions already allocated in
        this transaction win (they are newer than the table until `flush`)."""
        for user_id, head in heads.items():
            self._heads.setdefault(user_id, head)

    def head(self, user_id: int) -> int:
        """The last position allocated to ``user_id`` in this transaction (or seeded)."""
        return self._heads[user_id]

    def append(
        self,
        user_id: int,
        conv_id: int,
        message: Message | None = None,
        receipt: ReceiptState | None = None,
    ) -> InboxEntry:
        head = self._heads.get(user_id)
        if head is None:
            head = queries.inbox_head(self._conn, user_id)
        head += 1
        self._heads[user_id] = head
        msg_seq = message.seq if message is not None else None
        receipt_json = records.receipt_json(receipt) if receipt is not None else None
        self._rows.append((user_id, head, conv_id, msg_seq, receipt_json))
        entry = InboxEntry(user_id, head, conv_id, self.now, message=message, receipt=receipt)
        self._entries.append(entry)
        return entry

    def flush(self) -> list[InboxEntry]:
        """Write what was appended; return the entries in the order they were appended."""
        if not self._rows:
            return []
        self._conn.execute(
            "INSERT INTO inbox (user_id, inbox_seq, conv_id, msg_seq, receipt, ts)"
            f" SELECT {fields(5)}, ?1 FROM json_each(?2)",
            (self.now, as_json(self._rows)),
        )
        self._conn.execute(
            f"UPDATE users SET inbox_head = k.c2 FROM {KEYS} WHERE users.id = k.c1",
            (as_json(list(self._heads.items())),),
        )
        entries, self._rows, self._entries, self._heads = self._entries, [], [], {}
        return entries
