"""One connection's protocol state machine, with no I/O.

`Session.receive` turns the bytes of one WebSocket message into either a request for the
gateway to carry out (a validated client frame) or an immediate answer (an error, a pong,
or a close). The gateway does the I/O and reports back (`authenticated`, `inbox`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

import msgspec

from pigeon.config import Limits
from pigeon.protocol import frames as f
from pigeon.protocol.codes import RETRYABLE, CloseCode, ErrorCode
from pigeon.protocol.ratelimit import TokenBucket
from pigeon.protocol.sequencer import InboxSequencer


class State(Enum):
    AWAIT_HELLO = auto()
    AUTHENTICATING = auto()
    OPEN = auto()
    CLOSED = auto()


@dataclass(frozen=True, slots=True)
class Reply:
    frame: f.Error | f.Pong


@dataclass(frozen=True, slots=True)
class Close:
    code: CloseCode
    reason: str


@dataclass(frozen=True, slots=True)
class Ignore:
    pass


#: What `receive` asks of the gateway: carry out a frame, answer, or close.
Outcome = (
    f.Hello | f.Send | f.Ack | f.Read | f.TypingStart | f.PresenceQuery | Reply | Close | Ignore
)


def error(code: ErrorCode, message: str, ref: str | None = None) -> Reply:
    return Reply(f.Error(code=code, message=message, ref=ref, retryable=code in RETRYABLE))


class Session:
    # One per socket, and idle sockets are the gateway's main cost: no per-instance dict.
    __slots__ = (
        "_acked",
        "_bad_in_a_row",
        "_frames",
        "_sends",
        "device_id",
        "echo",
        "inbox",
        "last_received",
        "limits",
        "opened_at",
        "state",
        "user_id",
    )

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.state = State.AWAIT_HELLO
        self.opened_at = now
        self.last_received = now
        self.user_id = 0
        self.device_id = 0
        self.echo = True  # the hello's choice: own messages pushed back as `msg`
        self.inbox: InboxSequencer[f.InboxFrame | f.Sent] = InboxSequencer(0)
        self._acked = 0
        self._bad_in_a_row = 0
        self._frames = TokenBucket(limits.frames_per_second, limits.frame_burst, now)
        self._sends = TokenBucket(limits.sends_per_second, limits.send_burst, now)

    # -- input -------------------------------------------------------------------------

    def receive(self, data: bytes | str, now: float) -> Outcome:
        self.last_received = now
        outcome = self._decide(data, now)
        if isinstance(outcome, Reply) and isinstance(outcome.frame, f.Error):
            self._bad_in_a_row += 1
            if self._bad_in_a_row > self.limits.max_bad_frames:
                return Close(CloseCode.PROTOCOL_VIOLATION, "too many bad frames")
        else:
            self._bad_in_a_row = 0
        return outcome

    def _decide(self, data: bytes | str, now: float) -> Outcome:
        if self.state is State.CLOSED:
            return Close(CloseCode.NORMAL, "closed")
        if len(data) > self.limits.max_frame_bytes:
            return error(
                ErrorCode.FRAME_TOO_LARGE, f"frame over {self.limits.max_frame_bytes} bytes"
            )
        if not self._frames.take(now):
            return error(ErrorCode.RATE_LIMITED, "too many frames; slow down")
        try:
            frame = f.client_decoder.decode(data)
        except msgspec.ValidationError as exc:
            return error(ErrorCode.BAD_FRAME, str(exc))
        except msgspec.DecodeError as exc:
            return error(ErrorCode.BAD_JSON, str(exc))
        if isinstance(frame, f.Ping):
            return Reply(f.Pong(ts=frame.ts))
        if isinstance(frame, f.Hello):
            if self.state is not State.AWAIT_HELLO:
                return error(ErrorCode.ALREADY_AUTHENTICATED, "hello was already sent", frame.ref)
            self.state = State.AUTHENTICATING
            return frame
        if self.state is not State.OPEN:
            return error(ErrorCode.NOT_AUTHENTICATED, "send hello and wait for welcome", frame.ref)
        if isinstance(frame, f.Send):
            return self._check_send(frame, now)
        if isinstance(frame, f.Ack):
            return self._check_ack(frame)
        return frame

    def _check_send(self, frame: f.Send, now: float) -> Outcome:
        if len(frame.body) > self.limits.max_body_chars:
            return error(
                ErrorCode.BODY_TOO_LARGE,
                f"body over {self.limits.max_body_chars} characters",
                frame.client_id,
            )
        if not frame.body.strip():
            return error(ErrorCode.BAD_FRAME, "body is empty", frame.client_id)
        if "\0" in frame.body or "\0" in frame.client_id:
            return error(ErrorCode.BAD_FRAME, "NUL characters are not allowed", frame.client_id)
        if not self._sends.take(now):
            return error(ErrorCode.RATE_LIMITED, "too many messages; retry later", frame.client_id)
        return frame

    def _check_ack(self, frame: f.Ack) -> Outcome:
        if frame.up_to > self.inbox.position:
            return error(
                ErrorCode.BAD_ACK,
                f"ack {frame.up_to} beyond the last entry sent ({self.inbox.position})",
                frame.ref,
            )
        if frame.up_to <= self._acked:
            return Ignore()  # an old cumulative ack: already covered
        self._acked = frame.up_to
        return frame

    # -- reports from the gateway ------------------------------------------------------

    def authenticated(
        self, user_id: int, device_id: int, resume_from: int, *, echo: bool = True
    ) -> None:
        self.state = State.OPEN
        self.user_id = user_id
        self.device_id = device_id
        self.echo = echo
        self.inbox = InboxSequencer(resume_from)
        self._acked = resume_from

    def auth_failed(self) -> Close:
        self.state = State.CLOSED
        return Close(CloseCode.AUTH_FAILED, "bad or revoked token")

    def closed(self) -> None:
        self.state = State.CLOSED
