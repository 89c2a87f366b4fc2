"""Who a queued message goes to when membership changed after it was sent (pure logic;
the stores' contract tests cover it end to end)."""

from __future__ import annotations

import json

from pigeon.store.membership import departures, recipients


def system(event: dict[str, object]) -> str:
    return json.dumps(event)


def test_a_member_removed_later_still_gets_what_was_sent_before() -> None:
    # Carol (3) was removed by message 7; messages up to 7 were hers.
    departed = departures([(7, system({"event": "removed", "user": 3, "by": 1}))])
    assert departed == [(3, 0, 7)]
    members = [(1, 0), (2, 0)]
    assert recipients(members, departed, 5) == [1, 2, 3]
    assert recipients(members, departed, 7) == [1, 2, 3]  # her own "removed" message
    assert recipients(members, departed, 8) == [1, 2]


def test_a_member_added_and_gone_while_queued_gets_only_the_messages_between() -> None:
    # Dave (4) was added by message 5 and left with message 9.
    departed = departures(
        [
            (5, system({"event": "added", "users": [4], "by": 1})),
            (9, system({"event": "left", "user": 4})),
        ]
    )
    assert departed == [(4, 4, 9)]
    members = [(1, 0)]
    assert recipients(members, departed, 4) == [1]
    assert recipients(members, departed, 5) == [1, 4]
    assert recipients(members, departed, 10) == [1]


def test_current_members_get_only_what_was_sent_after_they_joined() -> None:
    members = [(1, 0), (5, 6)]  # Erin (5) joined at seq 6
    assert recipients(members, [], 6) == [1]
    assert recipients(members, [], 7) == [1, 5]


def test_a_departed_user_who_is_a_member_again_is_not_told_twice() -> None:
    departed = departures([(3, system({"event": "removed", "user": 2, "by": 1}))])
    assert recipients([(1, 0), (2, 0)], departed, 2) == [1, 2]
