"""The writers: every write of the embedded store, committed in rounds (group commit).

Writes queue up on the event loop, and one task commits everything queued in rounds of one
transaction each, so a burst costs one commit and one fsync instead of one each
(research/limits.md, 3a: 1 row per commit caps at a few thousand rows/s). Each part of a
round runs in its own SAVEPOINT: a failing one is rolled back alone and the others commit.

Two writers, one at a time:

* sends and acks, the hot path, go to the send writer, a child process of its own
  (`pigeon.store.sqlite.writer_process`), up to ``PIPELINE`` rounds in flight;
* every other write (accounts, group changes, fan-out rounds, read marks, pruning) runs on
  the writer thread here, with its own connection, which also migrates the schema.

When other writes are queued, no new send round goes out: the rounds in flight finish,
the thread commits its round, then sends resume. So the two never wait for each other's
SQLite lock, and changes apply in the order their rounds ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
import sqlite3
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec

from pigeon.store.checkpoint import WalCheckpointer
from pigeon.store.errors import StoreError, Unavailable
from pigeon.store.models import InboxEntry, SendRequest, SendResult
from pigeon.store.sqlite.schema import in_savepoint, map_error
from pigeon.store.sqlite.writer_process import (
    HEADER,
    Failure,
    Round,
    RoundResult,
    Settings,
    store_error,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Most sends committed in one transaction; bigger batches gain little and delay the first.
MAX_SEND_BATCH = 512
#: Most acks applied together (in bulk, in the send writer's round).
MAX_ACK_BATCH = 256
#: Most urgent writes (fan-out rounds) and other writes (read marks, accounts...) in one
#: round of the thread.
MAX_URGENT_BATCH = 64
MAX_WRITE_BATCH = 64
#: Send rounds in flight to the send writer: it commits one while the next is on its way.
PIPELINE = 2

Write = Callable[[sqlite3.Connection], Any]


@dataclasses.dataclass(slots=True)
class PendingSend:
    request: SendRequest
    max_body: int
    future: asyncio.Future[SendResult]


@dataclasses.dataclass(slots=True)
class _InFlight:
    """A send round posted to the send writer, waiting for its answer."""

    sends: list[PendingSend]
    acks: list[tuple[int, int, asyncio.Future[list[InboxEntry]]]]
    posted: bool = False  # False: it never reached the send writer, and has failed

    def fail(self, error: StoreError) -> None:
        for future in [p.future for p in self.sends] + [f for _, _, f in self.acks]:
            _settle_future(future, error)


class Writer:
    """The writer thread and its connection, and the send writer's process.

    ``fanned_out`` holds the entries of messages fanned out with their sends, committed and
    waiting for a worker to push them: one list per message, touched on the event loop.
    """

    def __init__(
        self, checkpointer: WalCheckpointer, settings: Settings, clock: Callable[[], float]
    ) -> None:
        self._checkpointer = checkpointer
        self._settings = settings
        self._clock = clock
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._send_queue: deque[PendingSend] = deque()
        self._ack_queue: deque[tuple[int, int, asyncio.Future[list[InboxEntry]]]] = deque()
        self._write_queue: deque[tuple[Write, asyncio.Future[Any]]] = deque()
        self._urgent_queue: deque[tuple[Write, asyncio.Future[Any]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(RoundResult).decode
        self.fanned_out: deque[list[InboxEntry]] = deque()

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        """Start the thread and open its connection with ``connect`` (which migrates), then
        start the send writer."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-sqlite-w")
        try:
            await asyncio.get_running_loop().run_in_executor(pool, self._open, connect)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        self._pool = pool
        try:
            await self._start_child()
        except StoreError:
            await self.close()
            raise

    async def close(self) -> None:
        """Let queued writes commit (or fail), then stop the send writer, the connection
        and the thread."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task})
        await self._stop_child()
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(pool, self._close)
            pool.shutdown(wait=False)

    def _open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._conn = connect()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _start_child(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pigeon.store.sqlite",
                str(theirs.fileno()),
                msgspec.json.encode(self._settings).decode(),
                pass_fds=[theirs.fileno()],
                start_new_session=True,  # a terminal's Ctrl-C is for the server to handle
            )
        self._stream = await asyncio.open_unix_connection(sock=ours)
        try:  # an empty round: fail now, not at the first send, if it cannot work
            self._post(Round(self._clock(), [], [], False))
            result = await self._answer()
        except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
            self._drop_stream()
            raise Unavailable(f"the send writer did not start: {exc}") from exc
        if result.failure is not None:
            self._drop_stream()
            raise store_error(result.failure)

    async def _stop_child(self) -> None:
        """Close our end: the child finishes its round, sees the end and exits."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream[1].close()
            with contextlib.suppress(ConnectionError):
                await stream[1].wait_closed()
        child, self._child = self._child, None
        if child is not None:
            await child.wait()

    # -- queueing ------------------------------------------------------------------------

    def send(self, request: SendRequest, max_body: int) -> asyncio.Future[SendResult]:
        """Queue a send for the next round; its future gets the result or the error."""
        future: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self._send_queue.append(PendingSend(request, max_body, future))
        self._kick()
        return future

    def ack(self, device_id: int, up_to: int) -> asyncio.Future[list[InboxEntry]]:
        """Queue an ack, applied in bulk with every other ack of the round. The receipt
        entries of the batch go to the first ack that moved anything."""
        future: asyncio.Future[list[InboxEntry]] = asyncio.get_running_loop().create_future()
        self._ack_queue.append((device_id, up_to, future))
        self._kick()
        return future

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, urgent: bool = False) -> T:
        """Run ``fn`` atomically on the writer thread, group-committed with other writes.

        Concurrent calls (fan-out batches, read marks, group changes...) share one
        transaction, and one fsync; each runs inside its own SAVEPOINT, so a failing one
        is rolled back alone and the others commit. Urgent ones (fan-out) go first.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        (self._urgent_queue if urgent else self._write_queue).append((fn, future))
        self._kick()
        result: T = await future
        return result

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._rounds())

    # -- rounds --------------------------------------------------------------------------

    async def _rounds(self) -> None:
        """Commit everything queued, until the queues are empty. While rounds commit, new
        work piles up and becomes the next rounds: the busier, the bigger the batches."""
        in_flight: deque[_InFlight] = deque()
        try:
            while self._queued() or in_flight:
                others = bool(self._urgent_queue or self._write_queue)
                if others and not in_flight:
                    await self._thread_round()
                    continue
                while not others and (self._send_queue or self._ack_queue):
                    if len(in_flight) >= PIPELINE:
                        break
                    in_flight.append(await self._post_round())
                if in_flight:
                    await self._settle(in_flight)
        except asyncio.CancelledError:
            error = Unavailable("the store is closing")
            for round_ in in_flight:
                round_.fail(error)
            _InFlight(list(self._send_queue), list(self._ack_queue)).fail(error)
            self._send_queue.clear()
            self._ack_queue.clear()
            for _, future in [*self._urgent_queue, *self._write_queue]:
                future.cancel()
            self._urgent_queue.clear()
            self._write_queue.clear()
            raise

    def _queued(self) -> bool:
        return bool(self._send_queue or self._ack_queue or self._urgent_queue or self._write_queue)

    async def _post_round(self) -> _InFlight:
        """Send the next round of sends and acks to the send writer (restarted first if it
        stopped)."""
        count = min(len(self._send_queue), MAX_SEND_BATCH)
        round_ = _InFlight([self._send_queue.popleft() for _ in range(count)], [])
        count = min(len(self._ack_queue), MAX_ACK_BATCH)
        round_.acks = [self._ack_queue.popleft() for _ in range(count)]
        work = Round(
            self._clock(),
            [(p.request, p.max_body) for p in round_.sends],
            [(device, up_to) for device, up_to, _ in round_.acks],
            self._checkpointer.take_top_up(),
        )
        try:
            if self._stream is None or (
                self._child is not None and self._child.returncode is not None
            ):
                await self._restart_child()
            self._post(work)
            round_.posted = True
        except (OSError, RuntimeError, StoreError) as exc:
            log.error("the send writer cannot be reached: %s", exc)
            round_.fail(Unavailable("the send writer is restarting"))
            self._drop_stream()
        return round_

    def _post(self, work: Round) -> None:
        if self._stream is None:
            raise ConnectionResetError("no send writer")
        payload = self._encode(work)
        self._stream[1].write(HEADER.pack(len(payload)) + payload)

    async def _answer(self) -> RoundResult:
        if self._stream is None:
            raise ConnectionResetError("no send writer")
        (size,) = HEADER.unpack(await self._stream[0].readexactly(HEADER.size))
        return self._decode(await self._stream[0].readexactly(size))

    def _drop_stream(self) -> None:
        """Close our end of a broken socket pair: a send writer still reading it exits."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream[1].close()

    async def _settle(self, in_flight: deque[_InFlight]) -> None:
        """Wait for the oldest round's answer and hand its outcomes out."""
        round_ = in_flight.popleft()
        if not round_.posted or self._stream is None:  # its error is out already
            return
        try:
            result = await self._answer()
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.error("the send writer stopped: %s", exc)
            error = Unavailable("the send writer stopped; retry")
            for lost in [round_, *in_flight]:
                lost.fail(error)
            in_flight.clear()
            self._drop_stream()
            return
        if result.top_up_busy:
            self._checkpointer.top_up_again()
        if result.failure is not None:
            round_.fail(store_error(result.failure))
            return
        self._checkpointer.committed()
        _hand_out([p.future for p in round_.sends], result.sent, result.send_failures)
        _hand_out([f for _, _, f in round_.acks], result.acked, result.ack_failures)
        # The entries are the workers' once the senders have heard `sent` (the futures'
        # callbacks, just scheduled, run first), so that a `sent` can take its sender's
        # own entry's place (`Hub._sent`); and before any worker the senders woke runs.
        entries = [fanned.entries() for fanned in result.fanned_out]
        asyncio.get_running_loop().call_soon(self.fanned_out.extend, entries)

    async def _restart_child(self) -> None:
        log.warning("starting the send writer again")
        with contextlib.suppress(Exception):
            await self._stop_child()
        await self._start_child()

    async def _thread_round(self) -> None:
        count = min(len(self._urgent_queue), MAX_URGENT_BATCH)
        writes = [self._urgent_queue.popleft() for _ in range(count)]
        count = min(len(self._write_queue), MAX_WRITE_BATCH)
        writes += [self._write_queue.popleft() for _ in range(count)]
        call = functools.partial(self._commit_writes, [fn for fn, _ in writes])
        outcomes: Sequence[object]
        try:
            outcomes = await run_on(self._pool, call)
        except Exception as exc:  # the commit itself failed: nothing was written
            outcomes = [exc] * len(writes)
        self._checkpointer.committed()
        for (_, future), outcome in zip(writes, outcomes, strict=True):
            _settle_future(future, outcome)

    def _commit_writes(self, fns: list[Write]) -> list[object]:
        conn = self._conn
        if conn is None:
            raise Unavailable("the store is closed")
        self._checkpointer.top_up(conn)
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
        try:
            outcomes = [in_savepoint(conn, fn) for fn in fns]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes


def _hand_out(
    futures: list[asyncio.Future[Any]], values: Sequence[object], failures: dict[int, Failure]
) -> None:
    for index, (future, value) in enumerate(zip(futures, values, strict=True)):
        failed = failures.get(index)
        _settle_future(future, value if failed is None else store_error(failed))


def _settle_future(future: asyncio.Future[Any], outcome: object) -> None:
    """Give a caller its outcome: a value, or an exception to raise."""
    if future.done():  # the caller was cancelled
        return
    if isinstance(outcome, StoreError):
        # A fresh instance per caller: a shared one would share its traceback.
        future.set_exception(type(outcome)(*outcome.args))
    elif isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


async def run_on(pool: ThreadPoolExecutor | None, call: Callable[[], T]) -> T:
    """Run ``call`` on a store thread; SQLite's errors come back as StoreErrors."""
    if pool is None:
        raise Unavailable("the store is not open")
    try:
        future = asyncio.get_running_loop().run_in_executor(pool, call)
    except RuntimeError as exc:  # the executor is shutting down (close() ran meanwhile)
        raise Unavailable(str(exc)) from exc
    try:
        return await future
    except sqlite3.Error as exc:
        raise map_error(exc) from exc
