"""Error codes (in `error` frames and HTTP problem bodies) and WebSocket close codes."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"  # the frame is not valid JSON
    BAD_FRAME = "bad_frame"  # unknown type, missing field or wrong field type
    FRAME_TOO_LARGE = "frame_too_large"
    BODY_TOO_LARGE = "body_too_large"
    NOT_AUTHENTICATED = "not_authenticated"  # a frame other than hello before welcome
    ALREADY_AUTHENTICATED = "already_authenticated"
    AUTH_FAILED = "auth_failed"  # bad or revoked token, or device mismatch
    NOT_MEMBER = "not_member"  # the conversation does not exist or you are not in it
    BAD_ACK = "bad_ack"  # ack beyond what this connection was sent
    BAD_SEQ = "bad_seq"  # read position beyond the conversation's last message
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # a backend is down; retry the same frame later
    INTERNAL = "internal"
    # HTTP-only codes
    CONFLICT = "conflict"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    LIMIT_EXCEEDED = "limit_exceeded"
    BAD_REQUEST = "bad_request"


#: Errors after which the client may send the very same frame again.
RETRYABLE = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL})


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect (to another gateway) and resume
    TOO_BIG = 1009  # a frame above the hard ceiling
    AUTH_FAILED = 4001
    HELLO_TIMEOUT = 4002
    PROTOCOL_VIOLATION = 4003  # too many bad frames in a row
    DEVICE_REVOKED = 4004
    SLOW_CONSUMER = 4008  # send buffer overflowed; pushes stay in the inbox: resume
    HEARTBEAT_TIMEOUT = 4009
    REPLACED = 4010  # the same device connected again elsewhere
