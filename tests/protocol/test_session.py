"""The sans-I/O protocol core: feed bytes, check what the session asks for. No sockets."""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from pigeon.config import Limits
from pigeon.protocol import frames as f
from pigeon.protocol.codes import CloseCode
from pigeon.protocol.ratelimit import TokenBucket
from pigeon.protocol.sequencer import InboxSequencer
from pigeon.protocol.session import Close, Ignore, Reply, Session, State


def raw(frame: dict[str, object]) -> bytes:
    return json.dumps(frame).encode()


def open_session(limits: Limits | None = None) -> Session:
    session = Session(limits or Limits(), now=0.0)
    assert isinstance(
        session.receive(raw({"type": "hello", "token": "t", "device": 1}), 0.0), f.Hello
    )
    session.authenticated(user_id=7, device_id=1, resume_from=10)
    return session


def error_code(outcome: object) -> str:
    assert isinstance(outcome, Reply) and isinstance(outcome.frame, f.Error), outcome
    return outcome.frame.code


def test_only_hello_and_ping_before_welcome() -> None:
    session = Session(Limits(), now=0.0)
    assert error_code(session.receive(raw({"type": "ack", "up_to": 1}), 0.0)) == "not_authenticated"
    pong = session.receive(raw({"type": "ping", "ts": 1.5}), 0.0)
    assert isinstance(pong, Reply) and pong.frame == f.Pong(ts=1.5)
    assert isinstance(
        session.receive(raw({"type": "hello", "token": "t", "device": 3}), 0.0), f.Hello
    )
    assert session.state is State.AUTHENTICATING
    second = session.receive(raw({"type": "hello", "token": "t", "device": 3}), 0.0)
    assert error_code(second) == "already_authenticated"


def test_bad_input_is_typed() -> None:
    session = open_session(replace(Limits(), max_frame_bytes=200, max_body_chars=10))
    assert error_code(session.receive(b"{oops", 0.0)) == "bad_json"
    assert error_code(session.receive(raw({"type": "nope"}), 0.0)) == "bad_frame"
    assert (
        error_code(
            session.receive(raw({"type": "send", "conv": 0, "client_id": "c", "body": "x"}), 0.0)
        )
        == "bad_frame"
    )
    too_long = session.receive(
        raw({"type": "send", "conv": 1, "client_id": "c", "body": "x" * 11}), 0.0
    )
    assert error_code(too_long) == "body_too_large"
    assert isinstance(too_long, Reply) and too_long.frame.ref == "c"  # type: ignore[union-attr]
    assert (
        error_code(
            session.receive(raw({"type": "send", "conv": 1, "client_id": "c", "body": "  "}), 0.0)
        )
        == "bad_frame"
    )
    for nul in ({"client_id": "c", "body": "a\0b"}, {"client_id": "c\0", "body": "hi"}):
        assert error_code(session.receive(raw({"type": "send", "conv": 1, **nul}), 0.0)) == (
            "bad_frame"
        )
    assert error_code(session.receive(b"x" * 201, 0.0)) == "frame_too_large"
    ok = session.receive(raw({"type": "send", "conv": 1, "client_id": "c", "body": "hi"}), 0.0)
    assert ok == f.Send(conv=1, client_id="c", body="hi")


def test_acks_are_bounded_by_what_was_sent_and_old_ones_ignored() -> None:
    session = open_session()  # resumed from 10: positions up to 10 are known to the client
    assert error_code(session.receive(raw({"type": "ack", "up_to": 11}), 0.0)) == "bad_ack"
    session.inbox.offer([f.Msg(11, 1, 1, 2, "text", "m", 0.0)], now=0.0)
    assert session.receive(raw({"type": "ack", "up_to": 11}), 0.0) == f.Ack(up_to=11)
    assert isinstance(session.receive(raw({"type": "ack", "up_to": 9}), 0.0), Ignore)


def test_floods_are_limited_then_closed() -> None:
    limits = replace(Limits(), send_burst=2, sends_per_second=1.0, max_bad_frames=3)
    session = open_session(limits)
    send = raw({"type": "send", "conv": 1, "client_id": "c", "body": "hi"})
    assert isinstance(session.receive(send, 0.0), f.Send)
    assert isinstance(session.receive(send, 0.0), f.Send)
    limited = session.receive(send, 0.0)
    assert error_code(limited) == "rate_limited"
    assert isinstance(limited, Reply) and limited.frame.retryable  # type: ignore[union-attr]
    assert isinstance(session.receive(send, 1.0), f.Send)  # a token came back after 1 s
    for _ in range(3):
        assert isinstance(session.receive(b"{", 1.0), Reply)
    closed = session.receive(b"{", 1.0)
    assert isinstance(closed, Close) and closed.code is CloseCode.PROTOCOL_VIOLATION


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert bucket.take(0.0) and bucket.take(0.0) and not bucket.take(0.0)
    assert bucket.take(0.1) and not bucket.take(0.1)


def test_sequencer_releases_in_order_and_reports_gaps() -> None:
    seq: InboxSequencer[f.Msg] = InboxSequencer(position=5)
    entry = lambda n: f.Msg(n, 1, n, 2, "text", "m", 0.0)  # noqa: E731
    assert seq.offer([entry(8), entry(7)], now=1.0) == []
    assert seq.missing == (5, 7) and seq.gap_since == 1.0
    assert [e.inbox_seq for e in seq.offer([entry(6), entry(5)], now=2.0)] == [6, 7, 8]
    assert seq.missing is None and seq.position == 8


@given(st.lists(st.integers(min_value=1, max_value=40)))
def test_sequencer_never_releases_twice_or_out_of_order(arrivals: list[int]) -> None:
    seq: InboxSequencer[f.Msg] = InboxSequencer(position=0)
    released: list[int] = []
    for n in arrivals:
        released += [e.inbox_seq for e in seq.offer([f.Msg(n, 1, n, 2, "text", "m", 0.0)], 0.0)]
    assert released == list(range(1, len(released) + 1))
    assert released == list(range(1, seq.position + 1))


def test_sequencer_keeps_the_first_offer_of_a_position() -> None:
    """A `sent` standing for an own message is not replaced by that message's `msg`."""
    seq: InboxSequencer[f.Msg | f.Sent] = InboxSequencer(position=0)
    sent = f.Sent("c1", conv=1, seq=1, ts=0.0, inbox_seq=2)
    echo = f.Msg(2, 1, 1, 7, "text", "mine", 0.0)
    assert seq.is_open(2) and not seq.is_open(0)
    assert seq.offer([sent], now=0.0) == [] and not seq.is_open(2)
    assert seq.offer([echo], now=0.0) == []
    released = seq.offer([f.Msg(1, 1, 9, 8, "text", "yours", 0.0)], now=0.0)
    assert [type(e).__name__ for e in released] == ["Msg", "Sent"]
    assert seq.offer([echo], now=0.0) == [] and not seq.is_open(2)  # already released


def test_echo_is_the_hellos_choice() -> None:
    session = Session(Limits(), now=0.0)
    assert session.echo  # until a hello says otherwise
    session.authenticated(user_id=7, device_id=1, resume_from=0, echo=False)
    assert not session.echo
    hello = Session(Limits(), now=0.0).receive(b'{"type":"hello","token":"t","device":1}', 0.0)
    assert isinstance(hello, f.Hello) and hello.echo
