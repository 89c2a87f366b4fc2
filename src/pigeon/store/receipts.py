"""Receipt arithmetic shared by every store: pure, no I/O.

A member's receipt is two cumulative positions in a conversation, ``delivered`` and
``read``, which only move forward, with ``read <= delivered``. When they move, the
senders of the messages in the moved ranges are told with a receipt inbox entry.

In a big group, telling every sender about every member's every ack would cost one inbox
entry and one push per member per message: the work grows with the square of the group.
So beyond ``detail_max_group`` members a sender is told only when the aggregate moves
(the minimum over all members: "everyone has it up to here"), in an entry whose ``user``
is `AGGREGATE_USER`; each member's own positions stay readable over HTTP (`receipts`).
"""

from __future__ import annotations

#: ``ReceiptState.user_id`` of an entry that carries only the group's aggregate.
AGGREGATE_USER = 0
#: Groups up to this size get a receipt entry per member; bigger ones, aggregates only.
DEFAULT_DETAIL_MAX_GROUP = 100

Positions = tuple[int, int]  # (delivered, read)


def advance(old: Positions, delivered_to: int, read_to: int) -> Positions | None:
    """The new positions, or None if nothing moves. Read implies delivered."""
    old_delivered, old_read = old
    new_read = max(old_read, read_to)
    new_delivered = max(old_delivered, delivered_to, new_read)
    if (new_delivered, new_read) == old:
        return None
    return new_delivered, new_read


def moved_ranges(old: Positions, new: Positions) -> list[tuple[int, int]]:
    """The seq ranges ``(after, up_to]`` whose messages changed state."""
    return [(o, n) for o, n in zip(old, new, strict=True) if n > o]


def could_move_aggregate(old: Positions, aggregate: Positions) -> bool:
    """Only a member at the minimum can move the minimum."""
    return old[0] <= aggregate[0] or old[1] <= aggregate[1]
