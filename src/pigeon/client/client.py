"""The realtime half of the SDK: one resumable WebSocket session, seen as a stream of events.

The server delivers at least once and connections come and go; :class:`Client` makes that
look like a single, ordered, exactly-once stream to the application:

* a reader task decodes frames, dedups inbox entries (:class:`InboxPositions`) and orders
  messages per conversation (:class:`ConversationOrdering`), filling any gap from the
  history API;
* acks are cumulative and batched, and never pass a message the application has not been
  given, so the server's cursor is always a safe place to resume from;
* on any drop it reconnects (jittered exponential backoff, rotating through the URLs) and
  resumes from that position; sends waiting for ``sent`` are sent again with the same
  ``client_id``, which the server turns into the original ``seq``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
import msgspec

from pigeon.client.events import (
    ClientClosed,
    ConnectionEvent,
    ErrorEvent,
    Event,
    EventQueue,
    FatalError,
    MessageEvent,
    PresenceEvent,
    ReceiptEvent,
    ResyncEvent,
    SendError,
    TypingEvent,
)
from pigeon.client.http import ApiError, HttpApi, http_base
from pigeon.client.models import Message
from pigeon.client.ordering import ConversationOrdering, InboxPositions
from pigeon.protocol import frames
from pigeon.protocol.codes import RETRYABLE, CloseCode, ErrorCode

#: Close codes after which reconnecting cannot help (or would fight another connection).
_FATAL_CLOSE: dict[int, str] = {
    CloseCode.AUTH_FAILED: ErrorCode.AUTH_FAILED.value,
    CloseCode.DEVICE_REVOKED: "device_revoked",
    CloseCode.REPLACED: "replaced",
}
_ENDS = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
_PRESENCE_CHUNK = 256  # PresenceQuery.users max_length
_TRANSIENT = (aiohttp.ClientError, OSError, asyncio.TimeoutError)


def ws_url(url: str) -> str:
    """The WebSocket endpoint of a server given by its base URL (http, https, ws or wss)."""
    base = http_base(url)
    scheme, sep, rest = base.partition("://")
    return {"https": "wss", "http": "ws"}.get(scheme, scheme) + sep + rest + "/v1/ws"


@dataclass(eq=False)
class _Connection:
    """State that lives and dies with one WebSocket."""

    ws: aiohttp.ClientWebSocketResponse
    acked: int  # last ack sent (starts at resume_from: the server already has it)
    max_inbox: int  # highest position this connection has covered: acks may not pass it
    last_rx: float
    heartbeat_s: float = 30.0
    welcomed: bool = False
    ack_wanted: asyncio.Event = field(default_factory=asyncio.Event)
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)

    async def write(self, frame: frames.ClientFrame) -> bool:
        """Send one frame; False if the socket is going away (the reconnect resends)."""
        if self.ws.closed:
            return False
        try:
            await self.ws.send_str(frames.encode(frame).decode())
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return False
        return True


@dataclass(eq=False)
class _PendingSend:
    frame: frames.Send
    future: asyncio.Future[frames.Sent]
    attempts: int = 0


class Client:
    """A resumable realtime session of one device. See the module docstring.

    ``resume_from`` is the device's last acked inbox position (0 for a new device), and
    ``known_positions`` the highest seq the application already has per conversation, if
    it keeps any: with it, messages are released only once everything before them in
    their conversation has been (filled from history if need be).

    The event queue holds at most ``max_events``; past that the reader stops taking frames
    off the socket until the application consumes (typing and presence events are dropped
    instead), so a stalled consumer costs bounded memory and the server keeps the rest in
    the inbox for the next resume.
    """

    def __init__(
        self,
        urls: str | list[str],
        token: str,
        device_id: int,
        *,
        resume_from: int = 0,
        session: aiohttp.ClientSession | None = None,
        known_positions: dict[int, int] | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        ack_interval: float = 0.02,
        ack_batch: int = 64,
        max_events: int = 10_000,
        history_page: int = 200,
        connect_timeout: float = 10.0,
    ) -> None:
        self._urls = [urls] if isinstance(urls, str) else list(urls)
        if not self._urls:
            raise ValueError("at least one server URL is needed")
        self._token = token
        self._device = device_id
        self._session = session
        self._owns_session = session is None
        self._http: HttpApi | None = None
        self._http_index = 0  # which URL the HTTP API uses; moves on after a failure
        self._backoff = (backoff_initial, backoff_max)
        self._ack_interval = ack_interval
        self._ack_batch = ack_batch
        self._history_page = history_page
        self._connect_timeout = connect_timeout
        self._rng = random.Random()

        self._order: ConversationOrdering[MessageEvent] = ConversationOrdering(known_positions)
        self._inbox = InboxPositions(resume_from)
        self._events = EventQueue(max_events)
        self._pending: dict[str, _PendingSend] = {}
        self._reads: dict[int, int] = {}  # read marks not yet written to a live socket
        self._presence_queries: list[list[int]] = []
        self._refill: set[int] = set()  # conversations to refetch after a resync
        self._fills: dict[int, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

        self._conn: _Connection | None = None  # the welcomed connection, if any
        self._run_task: asyncio.Task[None] | None = None
        self._welcomed: asyncio.Future[None] | None = None
        self._caught_up = asyncio.Event()
        self._closing = False  # no reconnects, no new work
        self._closed = False  # close() ran
        self._fatal: FatalError | None = None

        #: the logged-in user (known after the first welcome, or from :meth:`login`)
        self.user_id: int | None = None
        #: the latest presence seen per user
        self.presence: dict[int, PresenceEvent] = {}

    # -- lifecycle --------------------------------------------------------------------

    @classmethod
    async def login(
        cls,
        url: str | list[str],
        username: str,
        password: str,
        device_name: str,
        *,
        session: aiohttp.ClientSession | None = None,
        **options: Any,
    ) -> Client:
        """Log in over HTTP as a new device and return a Client for it (not yet connected).

        ``async with await Client.login(...) as client`` connects it; so does
        :meth:`connect`.
        """
        owns = session is None
        session = session or aiohttp.ClientSession()
        first = url if isinstance(url, str) else url[0]
        try:
            login = await HttpApi(first, session=session).login(username, password, device_name)
        except BaseException:
            if owns:
                await session.close()
            raise
        client = cls(
            url,
            login.token,
            login.device.id,
            resume_from=login.device.cursor,
            session=session,
            **options,
        )
        client._owns_session = owns
        client.user_id = login.user.id
        return client

    @property
    def resume_position(self) -> int:
        """The inbox position to resume from after a restart (everything up to it has been
        handed to the application): persist it with the application's own state."""
        return self._inbox.ack_position

    @property
    def http(self) -> HttpApi:
        """The HTTP API with this device's token, sharing the client's connection pool."""
        if self._http is None:
            self._http = HttpApi(self._urls[0], self._token, session=self._client_session())
        return self._http

    async def connect(self) -> None:
        """Start the session and wait for the first ``welcome``.

        Raises :class:`FatalError` if the server refuses the token or device. Until the
        first welcome it keeps retrying; bound the wait with ``asyncio.timeout``: if
        ``connect`` is cancelled, the client is closed. Calling it again is harmless.
        """
        self._raise_if_done()
        if self._run_task is None:
            self._welcomed = asyncio.get_running_loop().create_future()
            self._run_task = asyncio.create_task(self._run(), name="pigeon-client")
        assert self._welcomed is not None
        try:
            await asyncio.shield(self._welcomed)
        except asyncio.CancelledError:
            await self.close()
            raise

    async def close(self) -> None:
        """Flush the ack, stop every task, fail waiting sends, end the event stream."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_ack(conn), 1.0)
        self._closing = True
        tasks = [*self._tasks, *self._fills.values()]
        if self._run_task is not None:
            tasks.append(self._run_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._finish(ClientClosed("client is closed"))
        if self._owns_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Event:
        event = await self._events.get()
        if event is None:
            if self._fatal is not None:
                raise self._fatal
            raise StopAsyncIteration
        return event

    async def wait_caught_up(self) -> None:
        """Wait for the ``caught_up`` of the current (or next) connection, and for the
        gap fills it started, so every message replayed so far is in the event queue."""
        while True:
            self._raise_if_done()
            await self._caught_up.wait()
            self._raise_if_done()
            fills = [task for task in self._fills.values() if not task.done()]
            if not fills:
                return
            await asyncio.wait(fills)

    # -- outgoing ---------------------------------------------------------------------

    async def send(self, conv: int, body: str, client_id: str | None = None) -> frames.Sent:
        """Send a text message; return the server's ``sent`` (its seq and ts).

        Retries with the same ``client_id`` across reconnects and retryable errors, so the
        message exists once however often it is resent. Raises :class:`SendError` when
        the server refuses it for good. Cancel (or ``asyncio.wait_for``) to give up.
        """
        self._raise_if_done()
        cid = client_id or uuid.uuid4().hex
        future: asyncio.Future[frames.Sent] = asyncio.get_running_loop().create_future()
        pending = _PendingSend(frames.Send(conv=conv, client_id=cid, body=body), future)
        self._pending[cid] = pending
        if self._conn is not None:
            await self._conn.write(pending.frame)
        try:
            return await future
        finally:
            if self._pending.get(cid) is pending:
                del self._pending[cid]

    async def mark_read(self, conv: int, up_to_seq: int) -> None:
        """Mark ``conv`` read up to ``up_to_seq`` (sent now, or on the next connection)."""
        self._reads[conv] = max(up_to_seq, self._reads.get(conv, 0))
        if self._conn is not None:
            await self._write_reads(self._conn)

    async def typing(self, conv: int) -> None:
        """Tell the other members you are typing; dropped when disconnected (stale soon)."""
        if self._conn is not None:
            await self._conn.write(frames.TypingStart(conv=conv))

    async def query_presence(self, users: list[int]) -> None:
        """Ask for the presence of ``users``; answers arrive as :class:`PresenceEvent`
        (only for users sharing a conversation with you) and update :attr:`presence`."""
        for start in range(0, len(users), _PRESENCE_CHUNK):
            self._presence_queries.append(users[start : start + _PRESENCE_CHUNK])
        if self._conn is not None:
            await self._write_presence_queries(self._conn)

    # -- connection loop --------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        index = 0
        while not self._closing:
            url = ws_url(self._urls[index % len(self._urls)])
            index += 1
            going_away = False
            try:
                welcomed, reason, going_away = await self._connection(url)
            except FatalError as err:
                self._finish(err)
                return
            except _TRANSIENT as err:
                welcomed, reason = False, f"{type(err).__name__}: {err}"
            if welcomed:
                attempt = 0
                self._events.put(ConnectionEvent("disconnected", reason))
            initial, cap = self._backoff
            ceiling = initial if going_away else min(cap, initial * 2**attempt)
            attempt += 1
            await asyncio.sleep(self._rng.uniform(0, ceiling))  # backoff, not a sync point

    async def _connection(self, url: str) -> tuple[bool, str, bool]:
        """Run one WebSocket to its end: (was it welcomed, why it ended, going away?)."""
        async with asyncio.timeout(self._connect_timeout):
            ws = await self._client_session().ws_connect(
                url, autoping=True, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=2.0)
            )
        loop = asyncio.get_running_loop()
        resume_from = self._inbox.ack_position
        conn = _Connection(ws, acked=resume_from, max_inbox=resume_from, last_rx=loop.time())
        helpers: list[asyncio.Task[None]] = []
        try:
            await conn.write(
                frames.Hello(
                    token=self._token, device=self._device, resume_from=resume_from, echo=False
                )
            )
            while True:
                msg = await ws.receive()
                if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    conn.last_rx = loop.time()
                    for frame in self._decode(msg.data):
                        await self._handle(conn, frame, helpers)
                    await self._ack_soon(conn)
                    await self._events.room()
                elif msg.type in _ENDS:
                    break
        finally:
            for task in helpers:
                task.cancel()
            if self._conn is conn:
                self._conn = None
                self._caught_up.clear()
            await ws.close()
        code = ws.close_code
        reason = f"closed {code}" if code is not None else "connection lost"
        if code in _FATAL_CLOSE:
            raise FatalError(_FATAL_CLOSE[code], reason)
        return conn.welcomed, reason, code == CloseCode.GOING_AWAY

    def _decode(self, data: str | bytes) -> list[frames.ServerFrame]:
        """Decode one WS message (a frame or a batch), skipping frames this SDK cannot read
        rather than dropping the whole batch with them."""
        try:
            decoded = frames.server_decoder.decode(data)
        except msgspec.DecodeError:
            pass
        else:
            return decoded if isinstance(decoded, list) else [decoded]
        try:
            raws = msgspec.json.decode(data, type=list[msgspec.Raw] | msgspec.Raw)
        except msgspec.DecodeError:
            raws = []
        out: list[frames.ServerFrame] = []
        for raw in raws if isinstance(raws, list) else [raws]:
            try:
                frame = frames.server_decoder.decode(raw)
            except msgspec.DecodeError as err:
                self._events.put(ErrorEvent(ErrorCode.BAD_FRAME.value, str(err), None))
                continue
            out.extend(frame if isinstance(frame, list) else [frame])
        return out

    async def _handle(
        self, conn: _Connection, frame: frames.ServerFrame, helpers: list[asyncio.Task[None]]
    ) -> None:
        match frame:
            case frames.Msg():
                self._on_msg(conn, frame)
            case frames.Receipt():
                conn.max_inbox = max(conn.max_inbox, frame.inbox_seq)
                if self._inbox.accept(frame.inbox_seq):
                    self._events.put(_receipt_event(frame))
                    self._inbox.done(frame.inbox_seq)
            case frames.Sent():
                pending = self._pending.get(frame.client_id)
                if frame.inbox_seq:
                    self._on_own_entry(conn, frame, pending)
                if pending is not None and not pending.future.done():
                    pending.future.set_result(frame)
            case frames.Error():
                self._on_error(conn, frame)
            case frames.Typing():
                self._events.put(TypingEvent(frame.conv, frame.user, frame.ttl_ms))
            case frames.Presence():
                event = PresenceEvent(frame.user, frame.online, frame.last_seen)
                self.presence[frame.user] = event
                self._events.put(event)
            case frames.CaughtUp():
                conn.caught_up.set()
                if self._conn is conn:
                    self._caught_up.set()
            case frames.Resync():
                self._events.put(ResyncEvent(frame.reason, frame.oldest))
                for conv in self._order.positions():
                    self._want_fill(conv, from_position=True)
            case frames.Welcome():
                await self._on_welcome(conn, frame, helpers)
            case frames.Pong():
                pass

    async def _on_welcome(
        self, conn: _Connection, welcome: frames.Welcome, helpers: list[asyncio.Task[None]]
    ) -> None:
        conn.welcomed = True
        conn.heartbeat_s = welcome.heartbeat_s
        self._conn = conn
        self.user_id = welcome.user
        helpers.append(asyncio.create_task(self._heartbeat(conn)))
        helpers.append(asyncio.create_task(self._acker(conn)))
        self._events.put(ConnectionEvent("connected"))
        if self._welcomed is not None and not self._welcomed.done():
            self._welcomed.set_result(None)
        for pending in list(self._pending.values()):
            await conn.write(pending.frame)
        await self._write_reads(conn)
        await self._write_presence_queries(conn)

    def _on_msg(self, conn: _Connection, frame: frames.Msg) -> None:
        conn.max_inbox = max(conn.max_inbox, frame.inbox_seq)
        if self._inbox.accept(frame.inbox_seq):
            self._place(_message_event(frame), frame.inbox_seq)

    def _on_own_entry(
        self, conn: _Connection, sent: frames.Sent, pending: _PendingSend | None
    ) -> None:
        """A ``sent`` standing for this device's own message in the inbox (the hello said
        ``echo: false``): the message is the one we sent."""
        conn.max_inbox = max(conn.max_inbox, sent.inbox_seq)
        if not self._inbox.accept(sent.inbox_seq):
            return
        assert self.user_id is not None, "a sent comes after the welcome"
        if pending is None:  # the send was given up on: its text is in history
            self._inbox.done(sent.inbox_seq)
            self._want_fill(sent.conv, from_position=True)
            return
        event = MessageEvent(
            conv=sent.conv,
            seq=sent.seq,
            sender=self.user_id,
            sender_device=self._device,
            client_id=sent.client_id,
            kind=pending.frame.kind,
            body=pending.frame.body,
            ts=sent.ts,
            inbox_seq=sent.inbox_seq,
        )
        self._place(event, sent.inbox_seq)

    def _place(self, event: MessageEvent, inbox_seq: int) -> None:
        """Hand a new inbox entry's message to the conversation ordering."""
        offered = self._order.offer(event.conv, event.seq, event)
        if offered.duplicate:
            self._inbox.done(inbox_seq)
        self._emit(offered.ready)
        if offered.gap is not None:
            self._want_fill(event.conv)

    def _on_error(self, conn: _Connection, error: frames.Error) -> None:
        if error.code == ErrorCode.AUTH_FAILED and not conn.welcomed:
            raise FatalError(error.code, error.message)
        pending = self._pending.get(error.ref or "")
        if pending is None or pending.future.done():
            self._events.put(ErrorEvent(error.code, error.message, error.ref))
            return
        if error.retryable or error.code in RETRYABLE:
            pending.attempts += 1
            initial, cap = self._backoff
            delay = self._rng.uniform(0, min(cap, initial * 2**pending.attempts))
            self._spawn(self._resend_later(conn, pending, delay))
        else:
            pending.future.set_exception(
                SendError(error.code, error.message, pending.frame.client_id)
            )

    async def _resend_later(self, conn: _Connection, pending: _PendingSend, delay: float) -> None:
        await asyncio.sleep(delay)  # retry backoff
        # if the connection changed meanwhile, its welcome already resent everything
        if self._conn is conn and not pending.future.done():
            await conn.write(pending.frame)

    async def _heartbeat(self, conn: _Connection) -> None:
        """Ping every heartbeat/2 so the server keeps us; drop a server that went silent."""
        loop = asyncio.get_running_loop()
        interval = max(conn.heartbeat_s / 2, 0.01)
        while not conn.ws.closed:
            await asyncio.sleep(interval)  # a timer, not a sync point
            if loop.time() - conn.last_rx > 2 * conn.heartbeat_s:
                await conn.ws.close(code=CloseCode.NORMAL, message=b"heartbeat timeout")
                return
            await conn.write(frames.Ping(ts=time.time()))

    # -- acks -------------------------------------------------------------------------

    async def _ack_soon(self, conn: _Connection) -> None:
        """Ack now if many entries wait, else within ``ack_interval`` (one ack per burst)."""
        if self._inbox.ack_position - conn.acked >= self._ack_batch:
            await self._flush_ack(conn)
        elif self._inbox.ack_position > conn.acked:
            conn.ack_wanted.set()

    async def _acker(self, conn: _Connection) -> None:
        while True:
            await conn.ack_wanted.wait()
            await asyncio.sleep(self._ack_interval)  # the batching window
            conn.ack_wanted.clear()
            await self._flush_ack(conn)

    async def _flush_ack(self, conn: _Connection) -> None:
        up_to = min(self._inbox.ack_position, conn.max_inbox)
        if up_to > conn.acked:
            conn.acked = up_to
            await conn.write(frames.Ack(up_to=up_to))

    # -- gap fills --------------------------------------------------------------------

    def _want_fill(self, conv: int, *, from_position: bool = False) -> None:
        if from_position:
            self._refill.add(conv)
        task = self._fills.get(conv)
        if task is None or task.done():
            self._fills[conv] = asyncio.create_task(self._fill(conv))

    async def _fill(self, conv: int) -> None:
        """Fetch history until ``conv`` has no gap (and, after a resync, no missing tail).

        Transport and 5xx errors are retried with backoff; a refusal (e.g. the user left
        the conversation) or history lacking the missing seqs releases what is held
        rather than holding it forever.
        """
        attempt = 0
        while not self._closing:
            position = self._order.position(conv) or 0
            open_ended = conv in self._refill
            gap = self._order.gap(conv)
            if not open_ended and gap is None:
                return
            try:
                # `after` only: the server takes one bound, not both; what the page holds
                # past the gap is already held and dropped as a duplicate.
                page = await self.http.messages(conv, after=position, limit=self._history_page)
            except ApiError as err:
                if err.retryable:
                    self._next_http_url()
                    attempt = await self._fill_backoff(attempt)
                    continue
                self._refill.discard(conv)
                self._emit(self._order.skip_gap(conv))
                self._events.put(ErrorEvent(err.code, err.detail, None))
                return
            except _TRANSIENT:
                self._next_http_url()
                attempt = await self._fill_backoff(attempt)
                continue
            attempt = 0
            self._emit(self._order.fill(conv, [(m.seq, _history_event(m)) for m in page]))
            if open_ended and len(page) < self._history_page:
                self._refill.discard(conv)
            elif not open_ended and self._order.position(conv) == position:
                self._emit(self._order.skip_gap(conv))  # history cannot fill it
            if self._conn is not None:
                await self._ack_soon(self._conn)

    def _next_http_url(self) -> None:
        """After a failed request, history is asked of the next server, as connections are:
        a dead first server must not stall gap fills."""
        if self._http is not None and len(self._urls) > 1:
            self._http_index = (self._http_index + 1) % len(self._urls)
            self._http.base_url = http_base(self._urls[self._http_index])

    async def _fill_backoff(self, attempt: int) -> int:
        initial, cap = self._backoff
        await asyncio.sleep(self._rng.uniform(0, min(cap, initial * 2**attempt)))
        return attempt + 1

    # -- helpers ----------------------------------------------------------------------

    def _emit(self, ready: list[MessageEvent]) -> None:
        for event in ready:
            self._events.put(event)
            if event.inbox_seq is not None:
                self._inbox.done(event.inbox_seq)

    async def _write_reads(self, conn: _Connection) -> None:
        while self._reads:
            conv, seq = next(iter(self._reads.items()))
            if not await conn.write(frames.Read(conv=conv, up_to_seq=seq)):
                return
            if self._reads.get(conv) == seq:
                del self._reads[conv]

    async def _write_presence_queries(self, conn: _Connection) -> None:
        while self._presence_queries:
            if not await conn.write(frames.PresenceQuery(users=self._presence_queries[0])):
                return
            self._presence_queries.pop(0)

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _raise_if_done(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closing:
            raise ClientClosed("client is closed")

    def _finish(self, err: FatalError | ClientClosed) -> None:
        """End for good: fail waiters, close the event stream (after what is queued)."""
        if isinstance(err, FatalError):
            self._fatal = err
            self._events.put(ConnectionEvent("disconnected", str(err)))
        self._closing = True
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(err)
        if self._welcomed is not None and not self._welcomed.done():
            self._welcomed.set_exception(err)
        self._caught_up.set()
        self._events.close()


def _message_event(frame: frames.Msg) -> MessageEvent:
    return MessageEvent(
        conv=frame.conv,
        seq=frame.seq,
        sender=frame.sender,
        sender_device=frame.sender_device,
        client_id=frame.client_id,
        kind=frame.kind,
        body=frame.body,
        ts=frame.ts,
        inbox_seq=frame.inbox_seq,
    )


def _history_event(message: Message) -> MessageEvent:
    return MessageEvent(
        conv=message.conv,
        seq=message.seq,
        sender=message.sender,
        sender_device=message.sender_device,
        client_id=message.client_id,
        kind=message.kind,
        body=message.body,
        ts=message.ts,
        inbox_seq=None,
    )


def _receipt_event(frame: frames.Receipt) -> ReceiptEvent:
    return ReceiptEvent(
        conv=frame.conv,
        user=frame.user,
        delivered_seq=frame.delivered_seq,
        read_seq=frame.read_seq,
        all_delivered_seq=frame.all_delivered_seq,
        all_read_seq=frame.all_read_seq,
        ts=frame.ts,
        inbox_seq=frame.inbox_seq,
    )
