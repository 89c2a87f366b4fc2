"""The writer thread: the one write connection, and the rounds of group commit it runs.

Every write of the embedded store goes through here. Sends, acks and other writes queue
up on the event loop; one task hands everything queued to the thread as one transaction
per round (sends first), so a burst costs one commit and one fsync instead of one each
(research/limits.md, 3a: 1 row per commit caps at a few thousand rows/s). Each part of a
round runs in its own SAVEPOINT: a failing one is rolled back alone and the others commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from pigeon.store.checkpoint import WalCheckpointer
from pigeon.store.errors import StoreError, Unavailable
from pigeon.store.models import InboxEntry, SendRequest, SendResult
from pigeon.store.sqlite.schema import map_error
from pigeon.store.sqlite.sending import SentBatch

T = TypeVar("T")

#: Most sends committed in one transaction; bigger batches gain little and delay the first.
MAX_SEND_BATCH = 512
#: Most urgent writes (fan-out batches) and other writes (acks, read marks, accounts...) in
#: one round. The second is small so that a burst of acks (a big group acking a message)
#: never holds the next message's fan-out back for long.
MAX_URGENT_BATCH = 64
MAX_WRITE_BATCH = 64
#: Most acks applied together (one write of the round, in bulk).
MAX_ACK_BATCH = 256

Write = Callable[[sqlite3.Connection], Any]


class SendBatch(Protocol):
    """Writes a batch of sends ``(request, max body)`` (`pigeon.store.sqlite.sending`)."""

    def __call__(
        self, conn: sqlite3.Connection, work: list[tuple[SendRequest, int]]
    ) -> SentBatch: ...


class AckBatch(Protocol):
    """Applies a batch of acks ``(device, up to)`` (`pigeon.store.sqlite.acks`)."""

    def __call__(
        self, conn: sqlite3.Connection, acks: list[tuple[int, int]]
    ) -> list[list[InboxEntry] | StoreError]: ...


class Writer:
    """The writer thread and its write connection, created, used and closed on it.

    ``fanned_out`` holds the entries of messages fanned out with their sends, committed and
    waiting for a worker to push them: one list per message, touched on the event loop.
    """

    def __init__(
        self, checkpointer: WalCheckpointer, send_batch: SendBatch, apply_acks: AckBatch
    ) -> None:
        self._checkpointer = checkpointer
        self._send_batch = send_batch
        self._apply_acks = apply_acks
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._send_queue: deque[PendingSend] = deque()
        self._write_queue: deque[tuple[Write, asyncio.Future[Any]]] = deque()
        self._urgent_queue: deque[tuple[Write, asyncio.Future[Any]]] = deque()
        self._ack_queue: deque[tuple[int, int, asyncio.Future[list[InboxEntry]]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.fanned_out: deque[list[InboxEntry]] = deque()

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        """Start the thread, and open the connection on it with ``connect``."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-sqlite-w")
        try:
            await asyncio.get_running_loop().run_in_executor(pool, self._open, connect)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        self._pool = pool

    async def close(self) -> None:
        """Let queued writes commit (or fail), then close the connection and the thread."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task})
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

    def send(self, request: SendRequest, max_body: int) -> asyncio.Future[SendResult]:
        """Queue a send for the next round; its future gets the result or the error."""
        future: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self._send_queue.append(PendingSend(request, max_body, future))
        self._kick()
        return future

    def ack(self, device_id: int, up_to: int) -> asyncio.Future[list[InboxEntry]]:
        """Queue an ack, applied in bulk with every other ack of the round."""
        future: asyncio.Future[list[InboxEntry]] = asyncio.get_running_loop().create_future()
        self._ack_queue.append((device_id, up_to, future))
        self._kick()
        return future

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, urgent: bool = False) -> T:
        """Run ``fn`` atomically on the writer thread, group-committed with other writes.

        Concurrent calls (acks from many sockets, fan-out batches, read marks...) share one
        transaction, and one fsync, with the pending sends; each runs inside its own
        SAVEPOINT, so a failing one is rolled back alone and the others commit.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        (self._urgent_queue if urgent else self._write_queue).append((fn, future))
        self._kick()
        result: T = await future
        return result

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._rounds())

    async def _rounds(self) -> None:
        """Commit everything queued, sends first, in one transaction per round, until the
        queues are empty. While a round commits, new work piles up and becomes the next
        round: the busier the store, the bigger the batches."""
        while self._send_queue or self._urgent_queue or self._write_queue or self._ack_queue:
            count = min(len(self._send_queue), MAX_SEND_BATCH)
            sends = [self._send_queue.popleft() for _ in range(count)]
            count = min(len(self._urgent_queue), MAX_URGENT_BATCH)
            writes = [self._urgent_queue.popleft() for _ in range(count)]
            count = min(len(self._write_queue), MAX_WRITE_BATCH)
            writes += [self._write_queue.popleft() for _ in range(count)]
            if self._ack_queue:
                writes.append(self._ack_batch())
            work = [(p.request, p.max_body) for p in sends]
            call = functools.partial(self._commit_round, work, [fn for fn, _ in writes])
            send_outcomes: Sequence[object]
            write_outcomes: Sequence[object]
            try:
                send_outcomes, write_outcomes, fanned_out = await run_on(self._pool, call)
            except Exception as exc:  # the commit itself failed: nothing was written
                send_outcomes, write_outcomes = [exc] * len(sends), [exc] * len(writes)
                fanned_out = []
            except asyncio.CancelledError:
                for pending in [*sends, *self._send_queue]:
                    pending.future.cancel()
                for _, future in [*writes, *self._urgent_queue, *self._write_queue]:
                    future.cancel()
                for _, _, ack_future in self._ack_queue:
                    ack_future.cancel()
                self._ack_queue.clear()
                self._send_queue.clear()
                self._urgent_queue.clear()
                self._write_queue.clear()
                raise
            # Ready before any sender hears `sent` and wakes the workers.
            self.fanned_out.extend(fanned_out)
            self._checkpointer.committed()
            futures = [p.future for p in sends] + [future for _, future in writes]
            for future, outcome in zip(futures, [*send_outcomes, *write_outcomes], strict=True):
                if future.done():  # the caller was cancelled
                    continue
                if isinstance(outcome, StoreError):
                    # A fresh instance per caller: a shared one would share its traceback.
                    future.set_exception(type(outcome)(*outcome.args))
                elif isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _ack_batch(self) -> tuple[Callable[[sqlite3.Connection], object], asyncio.Future[Any]]:
        """All queued acks as one write of the round; its outcome is shared out on the loop."""
        count = min(len(self._ack_queue), MAX_ACK_BATCH)
        acks = [self._ack_queue.popleft() for _ in range(count)]
        batch: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def share_out(done: asyncio.Future[Any]) -> None:
            failure = None if done.cancelled() else done.exception()
            results = None if failure is not None or done.cancelled() else done.result()
            for index, (_, _, future) in enumerate(acks):
                if future.done():
                    continue
                outcome = failure if results is None else results[index]
                if outcome is None:
                    future.cancel()
                elif isinstance(outcome, BaseException):
                    future.set_exception(type(outcome)(*outcome.args))
                else:
                    future.set_result(outcome)

        batch.add_done_callback(share_out)
        fn = functools.partial(self._apply_acks, acks=[(d, u) for d, u, _ in acks])
        return fn, batch

    def _commit_round(
        self,
        sends: list[tuple[SendRequest, int]],
        fns: list[Callable[[sqlite3.Connection], object]],
    ) -> tuple[list[SendResult | StoreError], list[object], list[list[InboxEntry]]]:
        def run(
            conn: sqlite3.Connection,
        ) -> tuple[list[SendResult | StoreError], list[object], list[list[InboxEntry]]]:
            # Sends first: the fan-out they do reads the membership before this round's
            # other writes (group changes among them) apply.
            sent = self._sends_in_savepoint(conn, sends) if sends else SentBatch([], [])
            write_outcomes: list[object] = []
            for fn in fns:
                write_outcomes.append(in_savepoint(conn, fn))
            return sent.outcomes, write_outcomes, sent.fanned_out

        return self._in_write_txn(run)

    def _sends_in_savepoint(
        self, conn: sqlite3.Connection, work: list[tuple[SendRequest, int]]
    ) -> SentBatch:
        outcome = in_savepoint(conn, lambda c: self._send_batch(c, work))
        if not isinstance(outcome, Exception):
            return outcome
        if len(work) == 1:
            error = outcome if isinstance(outcome, StoreError) else Unavailable(str(outcome))
            return SentBatch([error], [])
        # Checks before writing make this unexpected; still, one bad request must not fail
        # the others, so retry each on its own.
        batch = SentBatch([], [])
        for item in work:
            one = in_savepoint(conn, functools.partial(self._send_batch, work=[item]))
            if isinstance(one, StoreError):
                batch.outcomes.append(one)
            elif isinstance(one, Exception):
                batch.outcomes.append(Unavailable(str(one)))
            else:
                batch.outcomes += one.outcomes
                batch.fanned_out += one.fanned_out
        return batch

    def _in_write_txn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise Unavailable("the store is closed")
        self._checkpointer.top_up(conn)
        conn.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result


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


@dataclasses.dataclass(slots=True)
class PendingSend:
    request: SendRequest
    max_body: int
    future: asyncio.Future[SendResult]


def in_savepoint(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T | Exception:
    """Run ``fn`` inside a savepoint: on failure only its own writes are undone, and the
    failure is returned (database errors as StoreErrors) rather than raised."""
    conn.execute("SAVEPOINT one")
    try:
        result: T | Exception = fn(conn)
    except Exception as exc:
        conn.execute("ROLLBACK TO one")
        result = map_error(exc) if isinstance(exc, sqlite3.Error) else exc
    conn.execute("RELEASE one")
    return result
