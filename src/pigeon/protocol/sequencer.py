"""Puts inbox entries in order for one connection: no gap, no duplicate.

Entries reach a connection from two sources (replay from the store, live pushes from the
bus) and live pushes from different writers can arrive out of order. The client acks
cumulatively, so it must never see position N+2 before N+1: the sequencer releases entries
only contiguously and reports a gap for the gateway to fill from the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class HasInboxSeq(Protocol):
    @property
    def inbox_seq(self) -> int: ...


E = TypeVar("E", bound=HasInboxSeq)


class InboxSequencer(Generic[E]):
    __slots__ = ("_held", "gap_since", "position")

    def __init__(self, position: int) -> None:
        self.position = position  # the last position released to the client
        self._held: dict[int, E] = {}
        self.gap_since: float | None = None  # when the current gap was first seen

    def offer(self, entries: Iterable[E], now: float) -> list[E]:
        """Take entries from any source; return those now releasable, in order."""
        held = self._held
        for entry in entries:
            # The first offer of a position wins: a `sent` standing for an entry must
            # not be replaced by that entry's `msg`, pushed later.
            if entry.inbox_seq > self.position and entry.inbox_seq not in held:
                held[entry.inbox_seq] = entry
        ready: list[E] = []
        while (following := self._held.pop(self.position + 1, None)) is not None:
            ready.append(following)
            self.position += 1
        if self._held:
            if self.gap_since is None or ready:
                self.gap_since = now
        else:
            self.gap_since = None
        return ready

    def is_open(self, position: int) -> bool:
        """Neither released nor held: an entry offered for ``position`` would be taken."""
        return position > self.position and position not in self._held

    @property
    def missing(self) -> tuple[int, int] | None:
        """(after, before): the positions strictly between are held up, or None if no gap."""
        if not self._held:
            return None
        return self.position, min(self._held)
