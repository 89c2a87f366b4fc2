"""Plain records the store returns. Times are Unix seconds (float).

Immutable msgspec Structs, not frozen dataclasses: a writer round creates several per
message (the message, its result, an inbox entry per recipient) and a frozen dataclass
sets each field through ``object.__setattr__``. A direct message's four records took
~4.5 us as frozen dataclasses on the benchmark machine, ~0.7 us as Structs. ``gc=False``:
they hold only numbers, text and other records, never a cycle.
"""

from __future__ import annotations

from typing import Literal

import msgspec

ConversationKind = Literal["direct", "group"]
Role = Literal["admin", "member"]
#: kinds of message: user content ("text" now; room for image, file, audio...) and "system"
#: (membership and title changes, body is a JSON object describing the change).
MessageKind = str


class User(msgspec.Struct, frozen=True, gc=False):
    id: int
    username: str
    display_name: str
    created_at: float


class Device(msgspec.Struct, frozen=True, gc=False):
    id: int
    user_id: int
    name: str
    created_at: float
    revoked: bool
    cursor: int  # highest inbox_seq this device acked


class Member(msgspec.Struct, frozen=True, gc=False):
    user_id: int
    role: Role
    joined_at: float
    delivered_seq: int
    read_seq: int


class Conversation(msgspec.Struct, frozen=True, gc=False):
    id: int
    kind: ConversationKind
    title: str
    created_at: float
    last_seq: int
    members: tuple[Member, ...] = ()


class Message(msgspec.Struct, frozen=True, gc=False):
    conv_id: int
    seq: int
    sender_id: int
    sender_device: int  # 0 for system messages
    client_id: str
    kind: MessageKind
    body: str
    ts: float


class ReceiptState(msgspec.Struct, frozen=True, gc=False):
    """One member's cumulative receipt in a conversation, and the conversation's aggregate.

    The aggregate is the minimum over all current members. A sender's own positions move
    past each message it sends, so "all members have seq X delivered" is exactly
    ``all_delivered_seq >= X``.
    """

    conv_id: int
    user_id: int
    delivered_seq: int
    read_seq: int
    all_delivered_seq: int
    all_read_seq: int
    ts: float


class InboxEntry(msgspec.Struct, frozen=True, gc=False):
    """One position in a user's inbox: a message, or a receipt addressed to that user."""

    user_id: int
    inbox_seq: int
    conv_id: int
    ts: float
    message: Message | None = None
    receipt: ReceiptState | None = None


class SendRequest(msgspec.Struct, frozen=True, gc=False):
    conv_id: int
    sender_id: int
    sender_device: int
    client_id: str
    kind: MessageKind
    body: str


class SendResult(msgspec.Struct, frozen=True, gc=False):
    conv_id: int
    seq: int
    ts: float
    client_id: str
    duplicate: bool  # True when (sender_device, client_id) was already committed
    #: the message's position in the sender's inbox, when the send wrote it there (a
    #: store that fans out with the send); 0 when fan-out comes later, and on duplicates
    inbox_seq: int = 0


class ConversationSummary(msgspec.Struct, frozen=True, gc=False):
    conversation: Conversation  # with members
    last_message: Message | None
    unread: int  # messages after my read_seq that others sent


class InboxBounds(msgspec.Struct, frozen=True, gc=False):
    floor: int  # entries at or below this position were pruned (retention)
    head: int  # newest position


class FanoutBatch(msgspec.Struct):
    entries: list[InboxEntry] = msgspec.field(default_factory=list)
    more: bool = False  # more pending work was seen; call again without waiting
    #: conversations this batch wrote entries for; confirm with `Store.fanout_pushed`
    convs: list[int] = msgspec.field(default_factory=list)
    #: users whose entries another worker committed but (it died) never pushed: tell their
    #: gateways to read the inbox
    nudge_users: list[int] = msgspec.field(default_factory=list)
