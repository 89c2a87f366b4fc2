"""Plain records the store returns. Times are Unix seconds (float)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ConversationKind = Literal["direct", "group"]
Role = Literal["admin", "member"]
#: kinds of message: user content ("text" now; room for image, file, audio...) and "system"
#: (membership and title changes, body is a JSON object describing the change).
MessageKind = str


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    display_name: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Device:
    id: int
    user_id: int
    name: str
    created_at: float
    revoked: bool
    cursor: int  # highest inbox_seq this device acked


@dataclass(frozen=True, slots=True)
class Member:
    user_id: int
    role: Role
    joined_at: float
    delivered_seq: int
    read_seq: int


@dataclass(frozen=True, slots=True)
class Conversation:
    id: int
    kind: ConversationKind
    title: str
    created_at: float
    last_seq: int
    members: tuple[Member, ...] = ()


@dataclass(frozen=True, slots=True)
class Message:
    conv_id: int
    seq: int
    sender_id: int
    sender_device: int  # 0 for system messages
    client_id: str
    kind: MessageKind
    body: str
    ts: float


@dataclass(frozen=True, slots=True)
class ReceiptState:
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


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """One position in a user's inbox: a message, or a receipt addressed to that user."""

    user_id: int
    inbox_seq: int
    conv_id: int
    ts: float
    message: Message | None = None
    receipt: ReceiptState | None = None


@dataclass(frozen=True, slots=True)
class SendRequest:
    conv_id: int
    sender_id: int
    sender_device: int
    client_id: str
    kind: MessageKind
    body: str


@dataclass(frozen=True, slots=True)
class SendResult:
    conv_id: int
    seq: int
    ts: float
    client_id: str
    duplicate: bool  # True when (sender_device, client_id) was already committed


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    conversation: Conversation  # with members
    last_message: Message | None
    unread: int  # messages after my read_seq that others sent


@dataclass(frozen=True, slots=True)
class InboxBounds:
    floor: int  # entries at or below this position were pruned (retention)
    head: int  # newest position


@dataclass(slots=True)
class FanoutBatch:
    entries: list[InboxEntry] = field(default_factory=list)
    more: bool = False  # more pending work was seen; call again without waiting
    #: conversations this batch wrote entries for; confirm with `Store.fanout_pushed`
    convs: list[int] = field(default_factory=list)
    #: users whose entries another worker committed but (it died) never pushed: tell their
    #: gateways to read the inbox
    nudge_users: list[int] = field(default_factory=list)
