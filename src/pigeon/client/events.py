"""What the SDK hands to the application: typed events, errors, and the event queue."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """A message, seen exactly once and in seq order within its conversation.

    ``inbox_seq`` is None when the message was fetched from history to fill a gap.
    """

    conv: int
    seq: int
    sender: int
    sender_device: int
    client_id: str
    kind: str
    body: str
    ts: float
    inbox_seq: int | None


@dataclass(frozen=True, slots=True)
class ReceiptEvent:
    """Cumulative receipt state of ``user`` in ``conv``, plus the all-members aggregate."""

    conv: int
    user: int
    delivered_seq: int
    read_seq: int
    all_delivered_seq: int
    all_read_seq: int
    ts: float
    inbox_seq: int


@dataclass(frozen=True, slots=True)
class TypingEvent:
    """``user`` is typing in ``conv``; consider it stopped after ``ttl_ms``."""

    conv: int
    user: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    user: int
    online: bool
    last_seen: float | None


@dataclass(frozen=True, slots=True)
class ResyncEvent:
    """The inbox was pruned past our position: older entries are gone from the inbox.

    The SDK refills the conversations it knows from history; conversations it never saw
    are the application's to fetch (``client.http.conversations()``).
    """

    reason: str
    oldest: int


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    state: Literal["connected", "disconnected"]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """An ``error`` frame that answers no pending send (e.g. a rejected ``read``)."""

    code: str
    message: str
    ref: str | None


Event = (
    MessageEvent
    | ReceiptEvent
    | TypingEvent
    | PresenceEvent
    | ResyncEvent
    | ConnectionEvent
    | ErrorEvent
)

#: Events worth nothing once late: dropped rather than queued past the bound.
_EPHEMERAL = (TypingEvent, PresenceEvent)


class ClientError(Exception):
    """Base of the SDK's WebSocket-side errors."""


class SendError(ClientError):
    """The server refused a message for good (the code is not retryable)."""

    def __init__(self, code: str, message: str, client_id: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.client_id = client_id


class FatalError(ClientError):
    """The connection cannot be resumed (bad token, revoked device, device replaced)."""

    def __init__(self, code: str, reason: str = "") -> None:
        super().__init__(f"{code}: {reason}" if reason else code)
        self.code = code
        self.reason = reason


class ClientClosed(ClientError):
    """The client was closed while the call was waiting."""


class EventQueue:
    """A FIFO of events that pushes back on the socket reader instead of growing forever.

    :meth:`put` never blocks, so related events (a run of released messages) go in
    together and in order; the reader awaits :meth:`room` before taking the next frame
    off the socket. A consumer that stops reading therefore stops the reader, the server
    sees a slow consumer and keeps the rest in the inbox for a later resume. Typing and
    presence events are dropped rather than queued past the bound.
    """

    def __init__(self, maxsize: int) -> None:
        self._items: deque[Event] = deque()
        self._maxsize = maxsize
        self._nonempty = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: Event) -> None:
        full = len(self._items) >= self._maxsize
        if full and isinstance(event, _EPHEMERAL):
            return
        self._items.append(event)
        self._nonempty.set()
        if len(self._items) >= self._maxsize:
            self._has_room.clear()

    async def room(self) -> None:
        await self._has_room.wait()

    def close(self) -> None:
        """No more events: getters drain what is left, then get None."""
        self._closed = True
        self._nonempty.set()
        self._has_room.set()

    async def get(self) -> Event | None:
        while not self._items:
            if self._closed:
                return None
            self._nonempty.clear()
            await self._nonempty.wait()
        event = self._items.popleft()
        if len(self._items) < self._maxsize:
            self._has_room.set()
        return event
