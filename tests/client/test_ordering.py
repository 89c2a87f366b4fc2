"""Properties of the SDK's dedup and ordering: each message exactly once, in seq order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.client.ordering import ConversationOrdering, Gap, InboxPositions


def test_in_order_stream_is_released_immediately() -> None:
    order: ConversationOrdering[str] = ConversationOrdering({1: 0})
    assert order.offer(1, 1, "a").ready == ["a"]
    assert order.offer(1, 2, "b").ready == ["b"]
    assert order.position(1) == 2


def test_duplicates_are_dropped() -> None:
    order: ConversationOrdering[str] = ConversationOrdering({1: 0})
    order.offer(1, 1, "a")
    again = order.offer(1, 1, "a")
    assert again.duplicate and again.ready == []


def test_gap_holds_and_reports_range_then_fill_releases() -> None:
    order: ConversationOrdering[int] = ConversationOrdering({7: 3})
    first = order.offer(7, 6, 6)
    assert first.held and first.ready == []
    assert first.gap == Gap(7, after_seq=3, before_seq=6)
    # a later message widens the range to cover every hole up to the newest held one
    assert order.offer(7, 9, 9).gap == Gap(7, 3, 9)
    assert order.offer(7, 6, 6).duplicate  # held copies are duplicates too
    assert order.fill(7, [(4, 4), (5, 5)]) == [4, 5, 6]
    assert order.gap(7) == Gap(7, 6, 9)
    assert order.fill(7, [(7, 7), (8, 8), (9, 9)]) == [7, 8, 9]
    assert order.gap(7) is None and order.held_count() == 0


def test_first_message_sets_baseline_without_known_positions() -> None:
    order: ConversationOrdering[int] = ConversationOrdering()
    assert order.offer(5, 42, 42).ready == [42]
    assert order.offer(5, 41, 41).duplicate


def test_unknown_conversation_starts_at_zero_with_known_positions() -> None:
    order: ConversationOrdering[int] = ConversationOrdering({1: 10})
    result = order.offer(2, 3, 3)
    assert result.gap == Gap(2, 0, 3)


def test_skip_gap_releases_held_in_order() -> None:
    order: ConversationOrdering[int] = ConversationOrdering({1: 0})
    order.offer(1, 5, 5)
    order.offer(1, 3, 3)
    order.offer(1, 8, 8)
    assert order.skip_gap(1) == [3, 5, 8]
    assert order.position(1) == 8
    assert order.offer(1, 4, 4).duplicate


def test_inbox_positions_dedup_and_ack_waits_for_held_entries() -> None:
    inbox = InboxPositions(10)
    assert not inbox.accept(10)
    assert inbox.accept(11) and inbox.accept(12) and inbox.accept(13)
    inbox.done(11)
    inbox.done(13)
    assert inbox.ack_position == 11  # 12 is still held behind a gap
    inbox.done(12)
    assert inbox.ack_position == 13
    assert not inbox.accept(12)


# -- property: any permutation with duplicates, with gap fills, is exactly-once in order --

_streams = st.dictionaries(
    keys=st.integers(1, 4), values=st.integers(1, 25), min_size=1, max_size=4
)


@st.composite
def _deliveries(draw: st.DrawFn) -> tuple[dict[int, int], list[tuple[int, int]], list[bool]]:
    """Per-conversation message counts, a shuffled delivery order with duplicates and
    drops (a dropped message can only come back through a gap fill), and, per delivery,
    whether to serve the reported gap right away."""
    counts = draw(_streams)
    messages = [(conv, seq) for conv, n in counts.items() for seq in range(1, n + 1)]
    extra = draw(st.lists(st.sampled_from(messages), max_size=len(messages)))
    kept = [m for m in messages if draw(st.booleans()) or draw(st.booleans())]
    stream = draw(st.permutations(kept + extra))
    fill_now = draw(st.lists(st.booleans(), min_size=len(stream), max_size=len(stream)))
    return counts, stream, fill_now


def _fill(order: ConversationOrdering[tuple[int, int]], gap: Gap) -> list[tuple[int, int]]:
    history = [(seq, (gap.conv, seq)) for seq in range(gap.after_seq + 1, gap.before_seq)]
    return order.fill(gap.conv, history)


@settings(max_examples=300, deadline=None)
@given(_deliveries())
def test_any_permutation_with_duplicates_and_fills_is_exactly_once_in_order(
    case: tuple[dict[int, int], list[tuple[int, int]], list[bool]],
) -> None:
    counts, stream, fill_now = case
    order: ConversationOrdering[tuple[int, int]] = ConversationOrdering(dict.fromkeys(counts, 0))
    out: list[tuple[int, int]] = []
    pending_gaps: list[Gap] = []
    for (conv, seq), now in zip(stream, fill_now, strict=True):
        result = order.offer(conv, seq, (conv, seq))
        out.extend(result.ready)
        if result.gap is not None:
            if now:
                out.extend(_fill(order, result.gap))
            else:
                pending_gaps.append(result.gap)
    for gap in pending_gaps:  # late fills, possibly stale: overlaps must be harmless
        out.extend(_fill(order, gap))
    for conv, n in counts.items():  # the tail a reconnect would refill from history
        position = order.position(conv) or 0
        out.extend(_fill(order, Gap(conv, position, n + 1)))

    assert order.held_count() == 0
    for conv, n in counts.items():
        assert [seq for c, seq in out if c == conv] == list(range(1, n + 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 30), max_size=60), st.lists(st.integers(-3, 30), max_size=60))
def test_ack_position_never_passes_an_entry_not_yet_handed_over(
    arrivals: list[int], picks: list[int]
) -> None:
    inbox = InboxPositions()
    handed: set[int] = set()
    accepted: list[int] = []
    for inbox_seq, pick in zip(arrivals, picks + [-1] * len(arrivals), strict=False):
        if inbox.accept(inbox_seq):
            accepted.append(inbox_seq)
        if accepted and pick >= 0:  # a negative pick hands nothing over this round
            done = accepted[pick % len(accepted)]
            inbox.done(done)
            handed.add(done)
        ack = inbox.ack_position
        assert all(seq in handed for seq in accepted if seq <= ack)
    assert arrivals == [] or inbox.received == max(arrivals)
