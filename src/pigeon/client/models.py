"""Typed records of the HTTP API, decoded straight from JSON by msgspec.

Unknown fields are ignored and later-added fields have defaults, so a newer server does
not break an older SDK. Times are Unix seconds.
"""

from __future__ import annotations

import msgspec


class User(msgspec.Struct, frozen=True):
    id: int
    username: str
    display_name: str = ""
    created_at: float = 0.0


class Device(msgspec.Struct, frozen=True):
    id: int
    name: str = ""
    created_at: float = 0.0
    revoked: bool = False
    cursor: int = 0  # highest inbox position this device acked


class Session(msgspec.Struct, frozen=True):
    """The answer to a login: the bearer token, the new device, and who logged in."""

    token: str
    device: Device
    user: User


class Member(msgspec.Struct, frozen=True):
    user_id: int
    role: str = "member"  # "admin" or "member"
    joined_at: float = 0.0
    delivered_seq: int = 0
    read_seq: int = 0


class Message(msgspec.Struct, frozen=True):
    conv: int
    seq: int
    sender: int
    body: str
    ts: float
    kind: str = "text"
    sender_device: int = 0
    client_id: str = ""


class Conversation(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    kind: str  # "direct" or "group"
    title: str = ""
    created_at: float = 0.0
    last_seq: int = 0
    members: list[Member] = msgspec.field(default_factory=list)


class ConversationSummary(Conversation, frozen=True, kw_only=True):
    """A conversation as listed for its member: with the newest message and unread count."""

    last_message: Message | None = None
    unread: int = 0


class MemberReceipt(msgspec.Struct, frozen=True):
    """How far one member has received and read a conversation."""

    user_id: int
    delivered_seq: int = 0
    read_seq: int = 0


class Problem(msgspec.Struct, frozen=True):
    """An ``application/problem+json`` error body."""

    title: str = ""
    status: int = 0
    code: str = ""
    detail: str = ""
