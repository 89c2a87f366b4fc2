"""Acks, read marks and receipts: devices' cursors, members' delivered and read
positions, and the receipt entries that tell the senders."""

from __future__ import annotations

import sqlite3
import time

from pigeon.store import receipts
from pigeon.store.errors import NotFound, StoreError
from pigeon.store.models import InboxEntry, ReceiptState
from pigeon.store.sqlite.batches import KEYS, as_json, json_rows
from pigeon.store.sqlite.sending import InboxAppender

Move = tuple[int, int, int, int]  # (conv, user, delivered to, read to)


class DetailedReceipts:
    """Whether a conversation's receipts are told member by member (small conversations)
    or as the aggregate alone (big groups: `pigeon.store.receipts`).

    Cached for a second per conversation: every ack asks, membership rarely changes, and a
    stale answer only changes how receipts are told, not what is recorded. Used by the
    writer thread only.
    """

    def __init__(self, max_group: int) -> None:
        self._max_group = max_group
        self._cache: dict[int, tuple[float, bool]] = {}  # conv -> (valid until, detailed?)

    def __call__(self, conn: sqlite3.Connection, conv_id: int) -> bool:
        now = time.monotonic()
        cached = self._cache.get(conv_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        detailed = _member_count_at_most(conn, conv_id, self._max_group)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[conv_id] = (now + 1.0, detailed)
        return detailed


def apply_acks(
    conn: sqlite3.Connection,
    acks: list[tuple[int, int]],
    now: float,
    detailed: DetailedReceipts,
) -> list[list[InboxEntry] | StoreError]:
    """Move the devices' cursors and their users' delivered positions, in bulk: acks are
    ``(device, up to)``.

    The receipt entries of the whole batch are returned to the first caller that moved
    anything (it pushes them); the others get an empty list.
    """
    devices = _devices_with_heads(conn, sorted({device for device, _ in acks}))
    outcomes: list[list[InboxEntry] | StoreError] = []
    cursor_updates: dict[int, int] = {}
    moved: list[tuple[int, int, int]] = []  # (user, after, up to): inbox ranges acked
    first_mover: int | None = None
    for device_id, up_to in acks:
        known = devices.get(device_id)
        if known is None:
            outcomes.append(NotFound(f"no device {device_id}"))
            continue
        outcomes.append([])
        user_id, cursor, head = known
        new_cursor = min(up_to, head)
        if new_cursor <= cursor:
            continue
        first_mover = len(outcomes) - 1 if first_mover is None else first_mover
        devices[device_id] = (user_id, new_cursor, head)  # a later ack starts from here
        cursor_updates[device_id] = new_cursor
        moved.append((user_id, cursor, new_cursor))
    delivered = _highest_acked(conn, moved)
    if cursor_updates:
        conn.execute(
            f"UPDATE devices SET cursor = k.c2 FROM {KEYS} WHERE devices.id = k.c1",
            (as_json(list(cursor_updates.items())),),
        )
    inbox = InboxAppender(conn, now)
    moves = [
        (conv, user, seq, 0)
        for conv in sorted(delivered)
        for user, seq in sorted(delivered[conv].items())
    ]
    advance(conn, inbox, moves, detailed)
    entries = inbox.flush()
    if entries and first_mover is not None:
        outcomes[first_mover] = entries
    return outcomes


def advance(
    conn: sqlite3.Connection, inbox: InboxAppender, moves: list[Move], detailed: DetailedReceipts
) -> None:
    """Move members' receipt positions: the small conversations' moves together
    (`_advance_small`), each big group's on its own (`_advance_group`)."""
    small: list[Move] = []
    groups: dict[int, dict[int, receipts.Positions]] = {}
    for conv, user, delivered_to, read_to in moves:
        if detailed(conn, conv):
            small.append((conv, user, delivered_to, read_to))
        else:
            groups.setdefault(conv, {})[user] = (delivered_to, read_to)
    for conv, group_moves in groups.items():
        _advance_group(conn, inbox, conv, group_moves)
    _advance_small(conn, inbox, small)


def _highest_acked(
    conn: sqlite3.Connection, ranges: list[tuple[int, int, int]]
) -> dict[int, dict[int, int]]:
    """conv -> user -> the highest message seq in the users' acked inbox ranges
    ``(user, after, up_to)``: delivered is cumulative, in indexed joins."""
    delivered: dict[int, dict[int, int]] = {}
    rows = json_rows(
        conn,
        "SELECT json_group_array(json_array(user_id, conv_id, seq)) FROM"
        f" (SELECT k.c1 AS user_id, i.conv_id, MAX(i.msg_seq) AS seq FROM {KEYS}"
        " JOIN inbox i ON i.user_id = k.c1 AND i.inbox_seq > k.c2 AND i.inbox_seq <= k.c3"
        " WHERE i.msg_seq IS NOT NULL GROUP BY k.c1, i.conv_id)",
        ranges,
    )
    for user_id, conv_id, seq in rows:  # one row per (user, conv): grouped
        delivered.setdefault(int(conv_id), {})[int(user_id)] = int(seq)
    return delivered


def _devices_with_heads(
    conn: sqlite3.Connection, device_ids: list[int]
) -> dict[int, tuple[int, int, int]]:
    """device -> (user, cursor, user's inbox head), for devices not revoked."""
    rows = json_rows(
        conn,
        "SELECT json_group_array(json_array(d.id, d.user_id, d.cursor, u.inbox_head))"
        f" FROM {KEYS} JOIN devices d ON d.id = k.c1 JOIN users u ON u.id = d.user_id"
        " WHERE d.revoked_at IS NULL",
        [(device,) for device in device_ids],
    )
    return {int(d): (int(user), int(cursor), int(head)) for d, user, cursor, head in rows}


def _advance_small(conn: sqlite3.Connection, inbox: InboxAppender, moves: list[Move]) -> None:
    """Move members' receipt positions in small conversations forward (never back) and
    tell the senders of the messages in the moved ranges: each sender once per member,
    with that member's new positions and the conversation's aggregate. All the moves of
    a batch (an ack per device, from many conversations) in a few statements."""
    pairs = [(conv, user) for conv, user, _, _ in moves]
    old = {(c, u): (d, r) for c, u, d, r in _member_positions(conn, pairs)}
    new: dict[tuple[int, int], receipts.Positions] = {}
    ranges: list[tuple[int, int, int, int]] = []  # (conv, user, after, up to)
    for conv, user, delivered_to, read_to in moves:
        before = old.get((conv, user))
        if before is None:  # left the conversation since: nothing to record
            continue
        moved = receipts.advance(before, delivered_to, read_to)
        if moved is not None:
            new[conv, user] = moved
            ranges += [(conv, user, *r) for r in receipts.moved_ranges(before, moved)]
    _set_positions(conn, [(conv, user, *positions) for (conv, user), positions in new.items()])
    senders = _senders(conn, ranges)
    aggregates = _aggregates(conn, sorted({conv for conv, _ in senders}))
    for (conv, user), told in sorted(senders.items()):
        state = ReceiptState(conv, user, *new[conv, user], *aggregates[conv], inbox.now)
        for sender in sorted(told):
            inbox.append(sender, conv, receipt=state)


def _advance_group(
    conn: sqlite3.Connection,
    inbox: InboxAppender,
    conv_id: int,
    moves: dict[int, receipts.Positions],
) -> None:
    """`_advance_small` for members of a big group: their positions move (user -> the
    delivered and read positions to move to), and the senders hear of it only if the
    aggregate moved, in an entry of the aggregate alone (`pigeon.store.receipts`)."""
    (before,) = _aggregates(conn, [conv_id]).values()
    updates: list[tuple[int, int, int, int]] = []  # (conv, user, delivered, read)
    for _, user, delivered, read in _member_positions(conn, [(conv_id, u) for u in moves]):
        new = receipts.advance((delivered, read), *moves[user])
        if new is not None:
            updates.append((conv_id, user, *new))
    if not updates:
        return
    _set_positions(conn, updates)
    (after,) = _aggregates(conn, [conv_id]).values()
    if after == before:
        return
    state = ReceiptState(conv_id, receipts.AGGREGATE_USER, *after, *after, inbox.now)
    ranges = [(conv_id, receipts.AGGREGATE_USER, *r) for r in receipts.moved_ranges(before, after)]
    for sender in sorted(set().union(*_senders(conn, ranges).values())):
        inbox.append(sender, conv_id, receipt=state)


def _member_positions(
    conn: sqlite3.Connection, pairs: list[tuple[int, int]]
) -> list[tuple[int, int, int, int]]:
    """(conv, user, delivered, read) of the ``(conv, user)`` pairs that are members."""
    rows = json_rows(
        conn,
        "SELECT json_group_array(json_array(m.conv_id, m.user_id, m.delivered_seq,"
        f" m.read_seq)) FROM {KEYS} JOIN members m ON m.conv_id = k.c1 AND m.user_id = k.c2",
        pairs,
    )
    return [(int(c), int(u), int(d), int(r)) for c, u, d, r in rows]


def _set_positions(conn: sqlite3.Connection, updates: list[tuple[int, int, int, int]]) -> None:
    """Write members' positions: ``(conv, user, delivered, read)``."""
    if updates:
        conn.execute(
            f"UPDATE members SET delivered_seq = k.c3, read_seq = k.c4 FROM {KEYS}"
            " WHERE members.conv_id = k.c1 AND members.user_id = k.c2",
            (as_json(updates),),
        )


def _member_count_at_most(conn: sqlite3.Connection, conv_id: int, limit: int) -> bool:
    # Counts at most limit + 1 rows: cheap whatever the group's size.
    row = conn.execute(
        "SELECT COUNT(*) FROM (SELECT 1 FROM members WHERE conv_id = ? LIMIT ?)",
        (conv_id, limit + 1),
    ).fetchone()
    return int(row[0]) <= limit


def _aggregates(conn: sqlite3.Connection, conv_ids: list[int]) -> dict[int, receipts.Positions]:
    """conv -> (min delivered, min read) over its members: two index lookups each (0002
    migration)."""
    rows = json_rows(
        conn,
        "SELECT json_group_array(json_array(k.c1,"
        " (SELECT MIN(delivered_seq) FROM members WHERE conv_id = k.c1),"
        f" (SELECT MIN(read_seq) FROM members WHERE conv_id = k.c1))) FROM {KEYS}",
        [(conv,) for conv in conv_ids],
    )
    return {int(conv): (int(d or 0), int(r or 0)) for conv, d, r in rows}


def _senders(
    conn: sqlite3.Connection, ranges: list[tuple[int, int, int, int]]
) -> dict[tuple[int, int], set[int]]:
    """For ranges ``(conv, user, after, up to]`` of seqs: (conv, user) -> the current
    members other than ``user`` who sent a user message in them (pairs with none are
    left out)."""
    rows = json_rows(
        conn,
        "SELECT json_group_array(json_array(conv, user, sender)) FROM"
        " (SELECT DISTINCT k.c1 AS conv, k.c2 AS user, m.sender_id AS sender"
        f" FROM {KEYS} JOIN messages m ON m.conv_id = k.c1 AND m.seq > k.c3"
        " AND m.seq <= k.c4 WHERE m.sender_id <> k.c2 AND m.kind <> 'system'"
        " AND EXISTS (SELECT 1 FROM members mm"
        " WHERE mm.conv_id = m.conv_id AND mm.user_id = m.sender_id))",
        ranges,
    )
    found: dict[tuple[int, int], set[int]] = {}
    for conv, user, sender in rows:
        found.setdefault((int(conv), int(user)), set()).add(int(sender))
    return found
