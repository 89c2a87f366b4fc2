"""Protocol v1 frames as msgspec Structs: decoding validates types in one pass.

Every WebSocket text message carries one JSON object with a ``type`` field. The server may
also send a JSON array of such objects in one message (a batch, used for replay and
bursts); clients must accept both. ``docs/protocol.md`` documents each frame.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PROTOCOL_VERSION = 1

Id = Annotated[int, msgspec.Meta(ge=1, le=2**62)]
Position = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Ref = Annotated[str, msgspec.Meta(max_length=64)]
Kind = Literal["text"]


# -- client -> server ----------------------------------------------------------------------


class Hello(msgspec.Struct, tag="hello", tag_field="type", frozen=True):
    token: str
    device: Id
    resume_from: Position | None = None
    #: False: this device's own messages are not pushed back to it as ``msg`` when their
    #: ``sent`` can take their inbox position instead (see `Sent`)
    echo: bool = True
    ref: Ref | None = None


class Send(msgspec.Struct, tag="send", tag_field="type", frozen=True):
    conv: Id
    client_id: ClientId
    body: str
    kind: Kind = "text"
    ref: Ref | None = None


class Ack(msgspec.Struct, tag="ack", tag_field="type", frozen=True):
    up_to: Position
    ref: Ref | None = None


class Read(msgspec.Struct, tag="read", tag_field="type", frozen=True):
    conv: Id
    up_to_seq: Position
    ref: Ref | None = None


class TypingStart(msgspec.Struct, tag="typing", tag_field="type", frozen=True):
    conv: Id
    ref: Ref | None = None


class PresenceQuery(msgspec.Struct, tag="presence_query", tag_field="type", frozen=True):
    users: Annotated[list[Id], msgspec.Meta(max_length=256)]
    ref: Ref | None = None


class Ping(msgspec.Struct, tag="ping", tag_field="type", frozen=True):
    ts: float | None = None
    ref: Ref | None = None


ClientFrame = Hello | Send | Ack | Read | TypingStart | PresenceQuery | Ping


# -- server -> client ----------------------------------------------------------------------


class Welcome(msgspec.Struct, tag="welcome", tag_field="type", omit_defaults=True):
    user: int
    device: int
    resume_from: int  # the inbox position replay starts after
    inbox_head: int  # the newest inbox position at connect time
    heartbeat_s: float
    max_body: int
    max_frame: int
    version: int = PROTOCOL_VERSION


class Resync(msgspec.Struct, tag="resync", tag_field="type"):
    """The requested position was pruned (retention): entries up to ``oldest - 1`` are gone.

    Replay continues from ``oldest``; the client must refresh its conversations from history.
    """

    reason: str
    oldest: int


class CaughtUp(msgspec.Struct, tag="caught_up", tag_field="type"):
    """Replay finished; what follows is live. ``up_to`` is the last inbox position replayed."""

    up_to: int


class Msg(msgspec.Struct, tag="msg", tag_field="type", omit_defaults=True):
    inbox_seq: int
    conv: int
    seq: int
    sender: int
    kind: str
    body: str
    ts: float
    sender_device: int = 0
    client_id: str = ""


class Receipt(msgspec.Struct, tag="receipt", tag_field="type"):
    """Cumulative receipt state of one member in one conversation, plus the aggregate.

    ``all_delivered_seq`` / ``all_read_seq``: every member other than the sender has the
    messages up to that seq delivered / read.
    """

    inbox_seq: int
    conv: int
    user: int
    delivered_seq: int
    read_seq: int
    all_delivered_seq: int
    all_read_seq: int
    ts: float


class Sent(msgspec.Struct, tag="sent", tag_field="type", omit_defaults=True):
    """The send is durable. With ``inbox_seq`` (only to a device that said ``echo: false``)
    it is also the message's entry in the sender's inbox: it comes in inbox order like a
    ``msg``, and no ``msg`` of that position follows on this connection."""

    client_id: str
    conv: int
    seq: int
    ts: float
    inbox_seq: int = 0


class Typing(msgspec.Struct, tag="typing", tag_field="type"):
    conv: int
    user: int
    ttl_ms: int


class Presence(msgspec.Struct, tag="presence", tag_field="type"):
    user: int
    online: bool
    last_seen: float | None


class Pong(msgspec.Struct, tag="pong", tag_field="type"):
    ts: float | None


class Error(msgspec.Struct, tag="error", tag_field="type"):
    code: str
    message: str
    ref: str | None = None
    retryable: bool = False


InboxFrame = Msg | Receipt
ServerFrame = Welcome | Resync | CaughtUp | Msg | Receipt | Sent | Typing | Presence | Pong | Error

client_decoder = msgspec.json.Decoder(ClientFrame)
server_decoder = msgspec.json.Decoder(ServerFrame | list[ServerFrame])
encoder = msgspec.json.Encoder()


def encode(frame: msgspec.Struct | list[ServerFrame] | list[ClientFrame]) -> bytes:
    return encoder.encode(frame)
