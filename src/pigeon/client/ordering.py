"""Exactly-once, in-order delivery bookkeeping for the SDK. Pure logic: no I/O, no clock.

The server delivers at least once: a reconnect replays inbox entries the client may already
have processed, a gap fill from history overlaps with live pushes, and a pruned inbox
(``resync``) can leave holes in a conversation. Two small trackers turn that into the
"exactly once, in per-conversation order" the application sees:

* :class:`ConversationOrdering` dedups by ``(conv, seq)`` and releases messages in ``seq``
  order, holding any that arrive past a hole and reporting the hole as a :class:`Gap` to
  fill from history.
* :class:`InboxPositions` dedups by ``inbox_seq`` and computes the ack position: the
  highest inbox position such that every entry up to it has been handed to the
  application (or dropped as a duplicate). Held messages keep it back, so an ack never
  tells the server to forget an entry the application has not seen yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages with ``after_seq < seq < before_seq`` are missing in ``conv``.

    Both bounds are exclusive, matching the history API's ``after`` / ``before`` query.
    """

    conv: int
    after_seq: int
    before_seq: int


@dataclass(slots=True)
class Offered(Generic[T]):
    """Outcome of offering one message: what is now ready, and whether it was new."""

    ready: list[T] = field(default_factory=list)
    duplicate: bool = False
    held: bool = False
    gap: Gap | None = None


@dataclass(slots=True)
class _Conv(Generic[T]):
    position: int  # highest seq released (everything up to it has been released)
    held: dict[int, T] = field(default_factory=dict)


class ConversationOrdering(Generic[T]):
    """Per-conversation dedup and ordering of messages identified by ``(conv, seq)``.

    ``known`` gives the positions the application already has (highest seq seen per
    conversation). Without it, the first message seen for a conversation sets its baseline
    (a fresh device has no history and should not fetch all of it just to show the next
    message). When ``known`` is given, a conversation missing from it is new to the
    application and starts at 0, so its whole history is filled in before any message is
    released.
    """

    def __init__(self, known: Mapping[int, int] | None = None) -> None:
        self._convs: dict[int, _Conv[T]] = {}
        self._baseline_on_first = known is None
        for conv, position in (known or {}).items():
            self._convs[conv] = _Conv(position)

    def position(self, conv: int) -> int | None:
        """Highest seq released for ``conv``, or None if the conversation is unknown."""
        state = self._convs.get(conv)
        return None if state is None else state.position

    def positions(self) -> dict[int, int]:
        """The released position of every known conversation (to persist or to refill)."""
        return {conv: state.position for conv, state in self._convs.items()}

    def held_count(self, conv: int | None = None) -> int:
        if conv is not None:
            state = self._convs.get(conv)
            return 0 if state is None else len(state.held)
        return sum(len(state.held) for state in self._convs.values())

    def gap(self, conv: int) -> Gap | None:
        """The range still missing before the newest held message, if any.

        One range covers every hole up to the newest held message: a single history query
        fills it, and the overlap with held messages is dropped as duplicates.
        """
        state = self._convs.get(conv)
        if state is None or not state.held:
            return None
        return Gap(conv, state.position, max(state.held))

    def offer(self, conv: int, seq: int, item: T) -> Offered[T]:
        """Take one message; return the messages now releasable, in seq order."""
        state = self._convs.get(conv)
        if state is None:
            start = seq - 1 if self._baseline_on_first else 0
            state = self._convs[conv] = _Conv(start)
        if seq <= state.position or seq in state.held:
            return Offered(duplicate=True)
        if seq != state.position + 1:
            state.held[seq] = item
            return Offered(held=True, gap=Gap(conv, state.position, max(state.held)))
        ready = [item]
        state.position = seq
        self._release(state, ready)
        return Offered(ready=ready)

    def fill(self, conv: int, items: Iterable[tuple[int, T]]) -> list[T]:
        """Offer messages fetched from history; return everything they release, in order."""
        ready: list[T] = []
        for seq, item in items:
            ready.extend(self.offer(conv, seq, item).ready)
        return ready

    def skip_gap(self, conv: int) -> list[T]:
        """Give up on the current holes of ``conv`` and release everything held.

        For when history answers that the missing messages cannot be had (the user left
        the conversation): better to show what arrived than to hold it forever.
        """
        state = self._convs.get(conv)
        if state is None:
            return []
        ready: list[T] = []
        while state.held:
            state.position = min(state.held) - 1
            self._release(state, ready)
        return ready

    @staticmethod
    def _release(state: _Conv[T], ready: list[T]) -> None:
        while (nxt := state.held.pop(state.position + 1, None)) is not None:
            ready.append(nxt)
            state.position += 1


class InboxPositions:
    """Dedup of inbox entries by ``inbox_seq``, and the cumulative ack position.

    An entry is *accepted* once (a replayed copy of an accepted entry is rejected). An
    accepted entry is *pending* until the application has it; entries of messages held
    behind a gap stay pending. The ack position is the highest accepted position below
    the oldest pending entry.
    """

    def __init__(self, position: int = 0) -> None:
        self._received = position  # highest inbox_seq accepted
        self._pending: set[int] = set()

    @property
    def received(self) -> int:
        return self._received

    @property
    def ack_position(self) -> int:
        if self._pending:
            return min(self._pending) - 1
        return self._received

    def accept(self, inbox_seq: int) -> bool:
        """True if the entry is new; it is then pending until :meth:`done`."""
        if inbox_seq <= self._received:
            return False
        self._received = inbox_seq
        self._pending.add(inbox_seq)
        return True

    def done(self, inbox_seq: int) -> None:
        """The entry reached the application (or was a duplicate): it may be acked."""
        self._pending.discard(inbox_seq)
