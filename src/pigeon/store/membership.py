"""Who a queued message goes to, when membership changed after it was sent: pure logic
shared by both stores' leased fan-out rounds.

A membership change is committed with its system message, so the system messages still
queued for fan-out are exactly the changes fan-out has not caught up with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

#: ``(user, after, until)``: a user no longer a member was one for ``after < seq <= until``.
Departure = tuple[int, int, int]


def departures(system_messages: Iterable[tuple[int, str]]) -> list[Departure]:
    """The departures told by a conversation's queued system messages ``(seq, body)``,
    in seq order."""
    joined_after: dict[int, int] = {}  # user -> seq before the pending "added" message
    spans: list[Departure] = []
    for seq, body in system_messages:
        event = json.loads(body)
        if event.get("event") == "added":
            for user in event.get("users", []):
                joined_after[int(user)] = int(seq) - 1
        elif event.get("event") in ("removed", "left"):
            user = int(event["user"])
            # Joined before every pending message, unless a pending "added" says otherwise.
            spans.append((user, joined_after.pop(user, 0), int(seq)))
    return spans


def recipients(
    members: Iterable[tuple[int, int]], departed: Sequence[Departure], seq: int
) -> list[int]:
    """The users message ``seq`` goes to: current members ``(user, joined_seq)`` who joined
    before it, then those who left after it was sent."""
    targets = [user for user, joined_seq in members if joined_seq < seq]
    for user, after, until in departed:
        if after < seq <= until and user not in targets:
            targets.append(user)
    return targets
