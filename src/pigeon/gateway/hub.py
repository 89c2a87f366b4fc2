"""The gateway's core: live connections, what each client frame does, and routed pushes.

The protocol session decides what a frame means; the hub does the I/O it asks for (store,
bus) and writes the answers. Per-connection work that waits on the store runs in tasks so
a slow commit never stalls the socket's reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar, get_args

from pigeon.auth import token_hash
from pigeon.bus.base import Bus
from pigeon.bus.envelope import Envelope
from pigeon.bus.routing import Router, entry_frame
from pigeon.config import Config
from pigeon.gateway.connection import Connection
from pigeon.protocol import frames as f
from pigeon.protocol.codes import CloseCode, ErrorCode
from pigeon.protocol.session import Close, Ignore, Reply, Session, error
from pigeon.store import errors as se
from pigeon.store.base import Store
from pigeon.store.models import InboxEntry, SendRequest, SendResult

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a gap in a connection's inbox may stay open before it is filled from the store.
GAP_WAIT_S = 0.2
#: Acks due within 1/N of `ack_flush_s` are written together (fewer, bigger batches).
ACK_FLUSH_SLICES = 10
#: Frames that hold an inbox position (`frames.InboxFrame`) as a tuple: `isinstance` with
#: a tuple is quicker than with a union, and this runs per pushed frame.
INBOX_FRAMES: tuple[type[f.Msg], type[f.Receipt]] = get_args(f.InboxFrame)


def store_error_reply(exc: Exception, ref: str | None) -> Reply:
    codes: dict[type[Exception], ErrorCode] = {
        se.NotMember: ErrorCode.NOT_MEMBER,
        se.BadPosition: ErrorCode.BAD_SEQ,
        se.LimitExceeded: ErrorCode.LIMIT_EXCEEDED,
        se.Forbidden: ErrorCode.FORBIDDEN,
        se.NotFound: ErrorCode.NOT_FOUND,
        se.Unavailable: ErrorCode.UNAVAILABLE,
        se.Conflict: ErrorCode.CONFLICT,
        se.Invalid: ErrorCode.BAD_FRAME,
    }
    code = codes.get(type(exc))
    if code is None:
        log.exception("unexpected failure", exc_info=exc)
        return error(ErrorCode.INTERNAL, "internal error; retry later", ref)
    return error(code, str(exc) or code.value, ref)


class Hub:
    def __init__(
        self,
        config: Config,
        gateway_id: str,
        store: Store,
        bus: Bus,
        router: Router,
        on_committed: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.gateway_id = gateway_id
        self.store = store
        self.bus = bus
        self.router = router
        self._on_committed = on_committed
        self._clock = clock
        self.connections: set[Connection] = set()
        self._by_user: dict[int, list[Connection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gapped: set[Connection] = set()  # sockets whose sequencer held entries back
        self._gap_watch: asyncio.Task[None] | None = None
        self._gap_fills: dict[Connection, asyncio.Task[None]] = {}
        self._sending: set[asyncio.Future[SendResult]] = set()  # sends not yet committed
        self._ack_pending: dict[Connection, int] = {}  # socket -> highest ack not written
        self._ack_due: deque[tuple[float, Connection]] = deque()  # (loop time, socket)
        self._ack_flusher: asyncio.Task[None] | None = None
        self.accepting = True
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.bus.subscribe(self.gateway_id, self.on_envelope)
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def shutdown(self, grace_s: float) -> None:
        """Stop taking work, tell clients to reconnect elsewhere, finish in-flight commits."""
        self.accepting = False
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down: reconnect and resume")
        if self._sweeper is not None:
            self._sweeper.cancel()
        pending: list[asyncio.Future[Any]] = [t for t in self._tasks if not t.done()]
        pending += self._sending
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        await self.bus.unsubscribe(self.gateway_id)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def committed(self) -> None:
        """A message was committed here: wake the in-process fan-out worker, if any."""
        self._on_committed()

    def new_session(self) -> Session:
        return Session(self.config.limits, self._clock())

    # -- input from a client -----------------------------------------------------------

    def on_frame(self, conn: Connection, data: bytes | str) -> None:
        outcome = conn.session.receive(data, self._clock())
        match outcome:
            case Reply(frame=frame):
                conn.send(frame)
            case Close(code=code, reason=reason):
                self._spawn(conn.close_after_flush(code, reason))
            case Ignore():
                pass
            case f.Hello():
                self._spawn(self._guard(conn, outcome.ref, self._hello(conn, outcome)))
            case f.Send():
                self._send(conn, outcome)
            case f.Ack():
                self._queue_ack(conn, outcome.up_to)
            case f.Read():
                self._spawn(self._guard(conn, outcome.ref, self._read(conn, outcome)))
            case f.TypingStart():
                self._spawn(self._guard(conn, outcome.ref, self._typing(conn, outcome)))
            case f.PresenceQuery():
                self._spawn(self._guard(conn, outcome.ref, self._presence_query(conn, outcome)))

    async def _guard(
        self, conn: Connection, ref: str | None, work: Coroutine[Any, Any, None]
    ) -> None:
        """Turn any failure of one frame's work into an error frame for that frame alone."""
        try:
            await work
        except Exception as exc:  # typed store errors, and anything unexpected (logged)
            conn.send(store_error_reply(exc, ref).frame)

    async def _hello(self, conn: Connection, hello: f.Hello) -> None:
        if not self.accepting:  # shutting down: not the client's fault, it should move on
            await conn.close_after_flush(CloseCode.GOING_AWAY, "server shutting down")
            return
        device = await self.store.device_for_token(token_hash(hello.token))
        if device is None or device.id != hello.device:
            close = conn.session.auth_failed()
            conn.send(f.Error(ErrorCode.AUTH_FAILED, "bad or revoked token", hello.ref))
            await conn.close_after_flush(close.code, close.reason)
            return
        for other in self._by_user.get(device.user_id, []):
            if other.device_id == device.id:
                other.close(CloseCode.REPLACED, "this device connected again")
        bounds = await self.store.inbox_bounds(device.user_id)
        resume_from = device.cursor if hello.resume_from is None else hello.resume_from
        resume_from = min(resume_from, bounds.head)
        start = max(resume_from, bounds.floor)
        conn.session.authenticated(device.user_id, device.id, start, echo=hello.echo)
        self._by_user.setdefault(device.user_id, []).append(conn)
        conn.send(
            f.Welcome(
                user=device.user_id,
                device=device.id,
                resume_from=start,
                inbox_head=bounds.head,
                heartbeat_s=self.config.heartbeat_s,
                max_body=self.config.limits.max_body_chars,
                max_frame=self.config.limits.max_frame_bytes,
            )
        )
        if resume_from < bounds.floor:
            conn.send(f.Resync(reason="retention", oldest=bounds.floor + 1))
        await self.bus.register(
            self.gateway_id, device.user_id, device.id, self.config.presence_ttl_s
        )
        await self._replay(conn, start)
        conn.send(f.CaughtUp(up_to=conn.session.inbox.position))
        await self._announce_presence(device.user_id, online=True)

    async def _replay(self, conn: Connection, after: int) -> None:
        """Send the inbox after ``after`` (the store is the truth), through the sequencer."""
        page = self.config.replay_page
        # A backlog must not trip the slow-consumer bound: hand it over a page at a time
        # (one WebSocket message while the socket keeps up), waiting for what is queued
        # to reach the socket once it passes a quarter of the bound.
        slice_bytes = conn.buffer_limit // 4
        while not conn.closing:
            entries = await self.store.inbox_after(conn.user_id, after, page)
            self._offer(conn, [entry_frame(entry) for entry in entries])
            if conn.buffered > slice_bytes:
                await conn.wait_drained()
            if len(entries) < page:
                break
            after = entries[-1].inbox_seq

    def _send(self, conn: Connection, frame: f.Send) -> None:
        """Queue the send; `_sent` answers when it is committed. A callback, not a task per
        send: at tens of thousands of sends a second, task creation alone was ~12 % of the
        event loop's time."""
        request = SendRequest(
            conv_id=frame.conv,
            sender_id=conn.user_id,
            sender_device=conn.device_id,
            client_id=frame.client_id,
            kind=frame.kind,
            body=frame.body,
        )
        future = self.store.send_message(request, self.config.limits.max_body_chars)
        self._sending.add(future)
        future.add_done_callback(functools.partial(self._sent, conn, frame.client_id))

    def _sent(self, conn: Connection, client_id: str, future: asyncio.Future[SendResult]) -> None:
        self._sending.discard(future)
        if future.cancelled():  # the store closed under it
            conn.send(store_error_reply(se.Unavailable("store closed"), client_id).frame)
            return
        exc = future.exception()
        if exc is None:
            result = future.result()
            # Its own message's entry: a device that said `echo: false` gets the `sent` in
            # the entry's place, unless the entry's `msg` got there first.
            own = result.inbox_seq
            in_inbox = not conn.session.echo and conn.session.inbox.is_open(own)
            sent = f.Sent(client_id, result.conv_id, result.seq, result.ts, own if in_inbox else 0)
            if in_inbox:
                self._offer(conn, [sent])
            else:
                conn.send(sent)
            if not result.duplicate:
                self.committed()
        elif isinstance(exc, se.LimitExceeded):
            conn.send(f.Error(ErrorCode.BODY_TOO_LARGE, str(exc), client_id))
        elif isinstance(exc, Exception):  # typed store errors, and anything unexpected (logged)
            conn.send(store_error_reply(exc, client_id).frame)

    def _queue_ack(self, conn: Connection, up_to: int) -> None:
        """Acks are cumulative: keep only each socket's highest, and write it `ack_flush_s`
        after the first one not yet written. Each write costs a transaction and moves
        receipts; a client acking every message would otherwise cost one of each per
        message it receives. One flusher writes for every socket, in batches taken from a
        queue in due order, so sockets' writes stay spread over time as their acks came
        (not one burst for all sockets per period, which stalled the sends behind it)."""
        pending = self._ack_pending.get(conn)
        if pending is not None:
            self._ack_pending[conn] = max(pending, up_to)
            return
        self._ack_pending[conn] = up_to
        due = asyncio.get_running_loop().time() + self.config.ack_flush_s
        self._ack_due.append((due, conn))
        if self._ack_flusher is None:
            self._ack_flusher = self._spawn(self._flush_acks())

    async def _flush_acks(self) -> None:
        """Write the acks as they fall due, those due within a slice of the period with
        them, until none are left."""
        loop = asyncio.get_running_loop()
        slack = self.config.ack_flush_s / ACK_FLUSH_SLICES
        try:
            while self._ack_due:
                await asyncio.sleep(max(0.0, self._ack_due[0][0] - loop.time()))
                horizon = loop.time() + slack
                acks: dict[Connection, int] = {}
                while self._ack_due and self._ack_due[0][0] <= horizon:
                    conn = self._ack_due.popleft()[1]
                    acks[conn] = self._ack_pending.pop(conn)
                outcomes: list[list[InboxEntry] | se.StoreError]
                try:
                    pairs = [(conn.device_id, up_to) for conn, up_to in acks.items()]
                    outcomes = await self.store.ack_many(pairs)
                except se.StoreError as exc:  # the whole write failed (store unreachable...)
                    outcomes = [exc] * len(acks)
                receipts: list[InboxEntry] = []
                for conn, outcome in zip(acks, outcomes, strict=True):
                    if isinstance(outcome, se.StoreError):
                        conn.send(store_error_reply(outcome, None).frame)
                    else:
                        receipts += outcome
                try:
                    await self.router.deliver_entries(receipts)
                except Exception:  # they are in the inboxes; a resume or the next push has them
                    log.exception("pushing %d receipts failed", len(receipts))
        finally:
            self._ack_flusher = None

    async def _read(self, conn: Connection, frame: f.Read) -> None:
        receipts = await self.store.mark_read(conn.user_id, frame.conv, frame.up_to_seq)
        await self.router.deliver_entries(receipts)

    async def _typing(self, conn: Connection, frame: f.TypingStart) -> None:
        members = await self.store.member_ids(frame.conv)
        if conn.user_id not in members:
            raise se.NotMember(f"not a member of conversation {frame.conv}")
        event = f.Typing(conv=frame.conv, user=conn.user_id, ttl_ms=self.config.typing_ttl_ms)
        others = [m for m in members if m != conn.user_id]
        await self.router.broadcast(others, event)

    async def _presence_query(self, conn: Connection, frame: f.PresenceQuery) -> None:
        visible = await self.store.shared_with(conn.user_id, list(frame.users))
        states = await self.bus.presence(visible)
        conn.send_many(f.Presence(s.user_id, s.online, s.last_seen) for s in states)

    async def _announce_presence(self, user_id: int, *, online: bool) -> None:
        if not online:
            (state,) = await self.bus.presence([user_id])
            if state.online:  # another device is still connected
                return
            last_seen: float | None = state.last_seen or time.time()
        else:
            last_seen = None
        contacts = await self.store.contacts(user_id, self.config.limits.presence_max_group)
        await self.router.broadcast(contacts, f.Presence(user_id, online, last_seen))

    # -- pushes from the bus -----------------------------------------------------------

    def on_envelope(self, envelope: Envelope) -> None:
        for target in envelope.targets:
            conns = self._by_user.get(target.user)
            if not conns:
                continue
            # Split once per user, not per socket: a big group's push is a target per member.
            inbox = [fr for fr in target.frames if isinstance(fr, INBOX_FRAMES)]
            others = [fr for fr in target.frames if not isinstance(fr, INBOX_FRAMES)]
            for conn in conns:
                if conn.closing or conn.device_id == target.skip_device:
                    continue
                if target.revoke_device:
                    self._close_device(target.user, target.revoke_device)
                    continue
                if target.nudge:
                    self._spawn(
                        self._guard(conn, None, self._replay(conn, conn.session.inbox.position))
                    )
                if inbox:
                    self._offer(conn, inbox)
                if others:
                    conn.send_many(others)

    def _offer(self, conn: Connection, entries: Iterable[f.InboxFrame | f.Sent]) -> None:
        sequencer = conn.session.inbox
        conn.send_many(sequencer.offer(entries, self._clock()))
        if sequencer.gap_since is not None:
            self._gapped.add(conn)
            if self._gap_watch is None:
                self._gap_watch = self._spawn(self._watch_gaps())

    async def _watch_gaps(self) -> None:
        """Fill from the store the gaps that stay open for `GAP_WAIT_S`. One task for all
        sockets, awake while any has a gap: most gaps close in the same turn of the loop
        (a `sent` waiting for its round's other entries), and a task per gap cost more
        than the rest of the push."""
        try:
            while self._gapped:
                await asyncio.sleep(GAP_WAIT_S / 2)
                now = self._clock()
                for conn in list(self._gapped):
                    since = conn.session.inbox.gap_since
                    if since is None or conn.closing:
                        self._gapped.discard(conn)
                    elif now - since >= GAP_WAIT_S and conn not in self._gap_fills:
                        self._gap_fills[conn] = self._spawn(self._fill_gap(conn))
        finally:
            self._gap_watch = None

    async def _fill_gap(self, conn: Connection) -> None:
        """Read the entries held up behind a missing position."""
        try:
            missing = conn.session.inbox.missing
            if missing is not None:
                after, before = missing
                entries = await self.store.inbox_after(conn.user_id, after, before - after - 1)
                self._offer(conn, map(entry_frame, entries))
        except se.StoreError as exc:
            log.warning("gap fill failed for user %s: %s", conn.user_id, exc)
        finally:
            self._gap_fills.pop(conn, None)

    # -- connection bookkeeping --------------------------------------------------------

    def attach(self, conn: Connection) -> None:
        self.connections.add(conn)

    async def detach(self, conn: Connection) -> None:
        self.connections.discard(conn)
        conn.closing = True
        conn.session.closed()
        self._gapped.discard(conn)
        user_conns = self._by_user.get(conn.user_id)
        if user_conns is None or conn not in user_conns:
            return
        user_conns.remove(conn)
        if not user_conns:
            del self._by_user[conn.user_id]
        gap = self._gap_fills.pop(conn, None)
        if gap is not None:
            gap.cancel()
        if any(c.device_id == conn.device_id for c in self._by_user.get(conn.user_id, ())):
            return  # replaced by a newer socket of the same device
        with contextlib.suppress(Exception):
            await self.bus.unregister(self.gateway_id, conn.user_id, conn.device_id)
            await self._announce_presence(conn.user_id, online=False)

    async def revoke_device(self, user_id: int, device_id: int) -> None:
        """Close the device's sockets here and on every other gateway."""
        self._close_device(user_id, device_id)
        await self.router.revoke(user_id, device_id)

    def _close_device(self, user_id: int, device_id: int) -> None:
        for conn in list(self._by_user.get(user_id, ())):
            if conn.device_id == device_id:
                conn.close(CloseCode.DEVICE_REVOKED, "device revoked")

    async def _sweep_forever(self) -> None:
        interval = min(self.config.heartbeat_s / 2, 5.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("heartbeat sweep failed")

    async def sweep(self) -> None:
        """Close silent and never-authenticated sockets; renew presence in one batch."""
        now = self._clock()
        live: list[tuple[int, int]] = []
        for conn in list(self.connections):
            session = conn.session
            if session.user_id == 0:
                if now - session.opened_at > self.config.hello_timeout_s:
                    conn.close(CloseCode.HELLO_TIMEOUT, "no hello")
            elif now - session.last_received > 2 * self.config.heartbeat_s:
                conn.close(CloseCode.HEARTBEAT_TIMEOUT, "no ping")
            else:
                live.append((session.user_id, session.device_id))
        if live:
            await self.bus.refresh(self.gateway_id, live, self.config.presence_ttl_s)
