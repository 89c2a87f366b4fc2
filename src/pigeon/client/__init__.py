"""Pigeon's Python SDK: :class:`Client` for the realtime session, :class:`HttpApi` for the rest.

async with await Client.login(url, "ana", "secret", "laptop") as client:
    sent = await client.send(conv_id, "hello")
    async for event in client:
        ...
"""

from pigeon.client.client import Client, ws_url
from pigeon.client.events import (
    ClientClosed,
    ClientError,
    ConnectionEvent,
    ErrorEvent,
    Event,
    FatalError,
    MessageEvent,
    PresenceEvent,
    ReceiptEvent,
    ResyncEvent,
    SendError,
    TypingEvent,
)
from pigeon.client.http import ApiError, HttpApi
from pigeon.client.models import (
    Conversation,
    ConversationSummary,
    Device,
    Member,
    MemberReceipt,
    Message,
    Session,
    User,
)
from pigeon.client.ordering import ConversationOrdering, Gap, InboxPositions
from pigeon.protocol.frames import Sent

__all__ = [
    "ApiError",
    "Client",
    "ClientClosed",
    "ClientError",
    "ConnectionEvent",
    "Conversation",
    "ConversationOrdering",
    "ConversationSummary",
    "Device",
    "ErrorEvent",
    "Event",
    "FatalError",
    "Gap",
    "HttpApi",
    "InboxPositions",
    "Member",
    "MemberReceipt",
    "Message",
    "MessageEvent",
    "PresenceEvent",
    "ReceiptEvent",
    "ResyncEvent",
    "SendError",
    "Sent",
    "Session",
    "TypingEvent",
    "User",
    "ws_url",
]
