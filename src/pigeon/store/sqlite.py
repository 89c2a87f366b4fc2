"""The embedded store: SQLite in WAL mode, through the stdlib ``sqlite3`` module.

Threads: sqlite3 calls block, so none runs on the event loop. One writer thread owns the only
write connection (every write is a ``BEGIN IMMEDIATE`` transaction on it) and one reader thread
owns a read-only connection; WAL lets the reader see the last commit without waiting for the
writer. Because every write in this process goes through the one writer thread, they are
serialised without lock contention; other processes on the same file are still safe because
each transaction takes SQLite's write lock before reading what it will change.

Group commit: ``send_message`` calls are queued, and one task hands everything queued (up to
``MAX_SEND_BATCH``) to the writer as a single transaction, so a burst of sends costs one fsync
instead of one each (research/limits.md, 3a: 1 row per commit caps at a few thousand rows/s).

Fan-out with the send: the messages of a round are written to their members' inboxes in the
same transaction (the writer is the only one changing membership, so the members it reads are
exactly those at send time), and `fanout` hands the committed entries to a worker to push
without another round. Only what cannot take that path goes through ``fanout_jobs`` and the
leased `fanout` rounds: system messages of membership changes, and the messages of a
conversation that still has older jobs (so that its order holds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import pathlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import msgspec

from pigeon.store import receipts, records
from pigeon.store.checkpoint import BACKSTOP_PAGES, WalCheckpointer
from pigeon.store.errors import (
    BadPosition,
    Conflict,
    Forbidden,
    LimitExceeded,
    NotFound,
    NotMember,
    StoreError,
    Unavailable,
    only,
    refused_send,
    settled,
)
from pigeon.store.models import (
    Conversation,
    ConversationKind,
    ConversationSummary,
    Device,
    FanoutBatch,
    InboxBounds,
    InboxEntry,
    Member,
    Message,
    ReceiptState,
    Role,
    SendRequest,
    SendResult,
    User,
)

T = TypeVar("T")
Clock = Callable[[], float]
Row = tuple[Any, ...]

#: Most sends committed in one transaction; bigger batches gain little and delay the first.
MAX_SEND_BATCH = 512
#: Most urgent writes (fan-out batches) and other writes (acks, read marks, accounts...) in
#: one round. The second is small so that a burst of acks (a big group acking a message)
#: never holds the next message's fan-out back for long.
MAX_URGENT_BATCH = 64
MAX_WRITE_BATCH = 64
#: Most acks applied together (one write of the round, in bulk).
MAX_ACK_BATCH = 256
BUSY_TIMEOUT_MS = 5000
MIGRATIONS_PACKAGE = "pigeon.store.migrations.sqlite"

_USER_COLS = "id, username, display_name, created_at"
_DEVICE_COLS = "id, user_id, name, created_at, revoked_at, cursor"
_CONV_COLS = "id, kind, title, created_at, last_seq"
_MEMBER_COLS = "user_id, role, joined_at, delivered_seq, read_seq"
_MSG_COLS = "conv_id, seq, sender_id, sender_device, client_id, kind, body, ts"


class SqliteStore:
    """`pigeon.store.base.Store` on one SQLite file.

    ``fanout_with_send=False`` queues every message for the leased fan-out rounds, as the
    server stores do; tests use it to exercise that path on SQLite.
    """

    def __init__(
        self,
        path: str | pathlib.Path,
        *,
        clock: Clock = time.time,
        receipt_detail_max_group: int = receipts.DEFAULT_DETAIL_MAX_GROUP,
        fsync: bool = True,
        fanout_with_send: bool = True,
        checkpoint_interval_s: float = 0.5,
    ) -> None:
        self._path = str(path)
        self._fanout_with_send = fanout_with_send
        self._checkpointer = WalCheckpointer(self._connect, checkpoint_interval_s)
        self._fsync = fsync
        self._clock = clock
        self._detail_max = receipt_detail_max_group
        # conv -> (valid until, detailed receipts?); touched by the writer thread only
        self._detail_cache: dict[int, tuple[float, bool]] = {}
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        # Each connection is created, used and closed only in its own thread.
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        # Work for the writer thread, committed in rounds by `_writer_loop`.
        self._send_queue: deque[_PendingSend] = deque()
        self._write_queue: deque[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
        self._write_queue = deque()
        self._urgent_queue: deque[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]]
        self._urgent_queue = deque()
        self._ack_queue: deque[tuple[int, int, asyncio.Future[list[InboxEntry]]]] = deque()
        self._writer_task: asyncio.Task[None] | None = None
        # Entries fanned out with their sends, committed, waiting for a worker to push them:
        # one list per message. Touched on the event loop only.
        self._fanned_out: deque[list[InboxEntry]] = deque()
        # Round-robin position of fanout over conversations (touched by the writer thread only).
        self._fanout_after = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-sqlite-w")
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-sqlite-r")
        try:
            # The writer connects and migrates first: the reader must see the final schema.
            await loop.run_in_executor(writer, self._open_writer)
            await loop.run_in_executor(reader, self._open_reader)
        except sqlite3.Error as exc:
            writer.shutdown(wait=False)
            reader.shutdown(wait=False)
            raise Unavailable(f"cannot open {self._path}: {exc}") from exc
        self._writer, self._reader = writer, reader
        await self._checkpointer.start()

    async def close(self) -> None:
        if self._writer_task is not None and not self._writer_task.done():
            # Let queued writes commit (or fail) before their writer goes away.
            await asyncio.wait({self._writer_task})
        await self._checkpointer.stop()
        loop = asyncio.get_running_loop()
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        if writer is not None:
            await loop.run_in_executor(writer, self._close_writer)
            writer.shutdown(wait=False)
        if reader is not None:
            await loop.run_in_executor(reader, self._close_reader)
            reader.shutdown(wait=False)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; we issue BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(self._path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        # FULL: fsync the WAL at each commit, power-loss durable. NORMAL: fsync at checkpoints
        # only; a commit survives a crash of the process, not of the machine.
        conn.execute(f"PRAGMA synchronous = {'FULL' if self._fsync else 'NORMAL'}")
        conn.execute("PRAGMA cache_size = -65536")  # 64 MiB; helps batched commits (3a)
        # The send round's MATERIALIZED CTE, DISTINCT and GROUP BY build temporary b-trees;
        # kept on disk (the default), each opened, unlinked and closed a file in /var/tmp,
        # five system calls per round. They hold a round's keys: a few KiB.
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def _open_writer(self) -> None:
        conn = self._connect()
        _require_features(conn)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")  # see WalCheckpointer
        _migrate(conn, self._clock)
        self._wconn = conn

    def _open_reader(self) -> None:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        self._rconn = conn

    def _close_writer(self) -> None:
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    # -- running work on the threads -----------------------------------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, urgent: bool = False) -> T:
        """Run ``fn`` atomically on the writer thread, group-committed with other writes.

        Concurrent calls (acks from many sockets, fan-out batches, read marks...) share one
        transaction, and one fsync, with the pending sends; each runs inside its own
        SAVEPOINT, so a failing one is rolled back alone and the others commit.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        (self._urgent_queue if urgent else self._write_queue).append((fn, future))
        self._kick_writer()
        result: T = await future
        return result

    def _kick_writer(self) -> None:
        if self._writer_task is None or self._writer_task.done():
            self._writer_task = asyncio.get_running_loop().create_task(self._writer_loop())

    async def _writer_loop(self) -> None:
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
                send_outcomes, write_outcomes, fanned_out = await self._run(self._writer, call)
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
            self._fanned_out.extend(fanned_out)
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
            sent = self._sends_in_savepoint(conn, sends) if sends else _SentBatch([], [])
            write_outcomes: list[object] = []
            for fn in fns:
                write_outcomes.append(_in_savepoint(conn, fn))
            return sent.outcomes, write_outcomes, sent.fanned_out

        return self._in_write_txn(run)

    def _sends_in_savepoint(
        self, conn: sqlite3.Connection, work: list[tuple[SendRequest, int]]
    ) -> _SentBatch:
        outcome = _in_savepoint(conn, lambda c: self._send_batch(c, work))
        if not isinstance(outcome, Exception):
            return outcome
        if len(work) == 1:
            error = outcome if isinstance(outcome, StoreError) else Unavailable(str(outcome))
            return _SentBatch([error], [])
        # Checks before writing make this unexpected; still, one bad request must not fail
        # the others, so retry each on its own.
        batch = _SentBatch([], [])
        for item in work:
            one = _in_savepoint(conn, functools.partial(self._send_batch, work=[item]))
            if isinstance(one, StoreError):
                batch.outcomes.append(one)
            elif isinstance(one, Exception):
                batch.outcomes.append(Unavailable(str(one)))
            else:
                batch.outcomes += one.outcomes
                batch.fanned_out += one.fanned_out
        return batch

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one read transaction (a consistent snapshot) on the reader thread."""
        return await self._run(self._reader, functools.partial(self._in_read_txn, fn))

    @staticmethod
    async def _run(pool: ThreadPoolExecutor | None, call: Callable[[], T]) -> T:
        if pool is None:
            raise Unavailable("the store is not open")
        try:
            future = asyncio.get_running_loop().run_in_executor(pool, call)
        except RuntimeError as exc:  # the executor is shutting down (close() ran meanwhile)
            raise Unavailable(str(exc)) from exc
        try:
            return await future
        except sqlite3.Error as exc:
            raise _map_error(exc) from exc

    def _in_write_txn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._wconn
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

    def _in_read_txn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._rconn
        if conn is None:
            raise Unavailable("the store is closed")
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    # -- users and devices ---------------------------------------------------------------

    async def create_user(self, username: str, display_name: str, password_hash: str) -> User:
        def txn(conn: sqlite3.Connection) -> User:
            now = self._clock()
            try:
                row = conn.execute(
                    "INSERT INTO users (username, display_name, password_hash, created_at)"
                    f" VALUES (?, ?, ?, ?) RETURNING {_USER_COLS}",
                    (username, display_name, password_hash, now),
                ).fetchone()
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"username {username!r} is taken") from exc
            return records.user(row)

        return await self._write(txn)

    async def get_user(self, user_id: int) -> User | None:
        def txn(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(f"SELECT {_USER_COLS} FROM users WHERE id = ?", (user_id,))
            return records.maybe(records.user, row.fetchone())

        return await self._read(txn)

    async def find_user(self, username: str) -> User | None:
        def txn(conn: sqlite3.Connection) -> User | None:
            # The column is COLLATE NOCASE, so '=' is case-insensitive and uses the index.
            row = conn.execute(f"SELECT {_USER_COLS} FROM users WHERE username = ?", (username,))
            return records.maybe(records.user, row.fetchone())

        return await self._read(txn)

    async def password_hash(self, user_id: int) -> str:
        def txn(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT password_hash FROM users WHERE id = ?", (user_id,))
            found = row.fetchone()
            if found is None:
                raise NotFound(f"no user {user_id}")
            return str(found[0])

        return await self._read(txn)

    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"no user {user_id}")

        await self._write(txn)

    async def list_users(self) -> list[User]:
        def txn(conn: sqlite3.Connection) -> list[User]:
            rows = conn.execute(f"SELECT {_USER_COLS} FROM users ORDER BY id")
            return [records.user(r) for r in rows]

        return await self._read(txn)

    async def create_device(self, user_id: int, name: str, token_hash: str) -> Device:
        def txn(conn: sqlite3.Connection) -> Device:
            head = _inbox_head(conn, user_id)
            try:
                row = conn.execute(
                    "INSERT INTO devices (user_id, name, token_hash, created_at, cursor)"
                    f" VALUES (?, ?, ?, ?, ?) RETURNING {_DEVICE_COLS}",
                    (user_id, name, token_hash, self._clock(), head),
                ).fetchone()
            except sqlite3.IntegrityError as exc:
                raise Conflict("token hash already in use") from exc
            return records.device(row)

        return await self._write(txn)

    async def device_for_token(self, token_hash: str) -> Device | None:
        def txn(conn: sqlite3.Connection) -> Device | None:
            row = conn.execute(
                f"SELECT {_DEVICE_COLS} FROM devices WHERE token_hash = ? AND revoked_at IS NULL",
                (token_hash,),
            )
            return records.maybe(records.device, row.fetchone())

        return await self._read(txn)

    async def list_devices(self, user_id: int) -> list[Device]:
        def txn(conn: sqlite3.Connection) -> list[Device]:
            rows = conn.execute(
                f"SELECT {_DEVICE_COLS} FROM devices WHERE user_id = ? ORDER BY id", (user_id,)
            )
            return [records.device(r) for r in rows]

        return await self._read(txn)

    async def revoke_device(self, user_id: int, device_id: int) -> bool:
        def txn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE devices SET revoked_at = ?"
                " WHERE id = ? AND user_id = ? AND revoked_at IS NULL",
                (self._clock(), device_id, user_id),
            )
            return cur.rowcount > 0

        return await self._write(txn)

    # -- conversations -------------------------------------------------------------------

    async def direct_conversation(self, user_id: int, other_id: int) -> Conversation:
        low, high = sorted((user_id, other_id))
        key = f"{low}:{high}"

        def find(conn: sqlite3.Connection) -> Conversation | None:
            row = conn.execute("SELECT id FROM conversations WHERE direct_key = ?", (key,))
            found = row.fetchone()
            return None if found is None else _load_conversation(conn, int(found[0]))

        def txn(conn: sqlite3.Connection) -> Conversation:
            existing = find(conn)  # again, under the write lock: it may have been created
            if existing is not None:
                return existing
            _require_users(conn, [user_id, other_id])
            now = self._clock()
            conv_id = _insert_conversation(conn, "direct", "", key, now)
            # A direct chat has no admin: nobody can add, remove or rename.
            _insert_members(
                conn, conv_id, [(u, "member") for u in dict.fromkeys((low, high))], now, 0
            )
            return _load_conversation(conn, conv_id)

        # Mostly the conversation exists: look on the reader first, keeping the writer free.
        existing = await self._read(find)
        return existing if existing is not None else await self._write(txn)

    async def create_group(
        self, creator_id: int, title: str, member_ids: list[int], max_members: int
    ) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            users = list(dict.fromkeys([creator_id, *member_ids]))  # dedup, keep order
            if len(users) > max_members:
                raise LimitExceeded(f"a group has at most {max_members} members")
            _require_users(conn, users)
            now = self._clock()
            conv_id = _insert_conversation(conn, "group", title, None, now)
            roles: list[tuple[int, Role]] = [(creator_id, "admin")]
            roles += [(u, "member") for u in users[1:]]
            _insert_members(conn, conv_id, roles, now, 0)
            event = {"event": "created", "title": title, "by": creator_id, "users": users}
            self._append_system(conn, conv_id, creator_id, event, now)
            return _load_conversation(conn, conv_id)

        return await self._write(txn)

    async def add_members(
        self, actor_id: int, conv_id: int, user_ids: list[int], max_members: int
    ) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            _require_group_admin(conn, conv_id, actor_id)
            current = set(_member_ids(conn, conv_id))
            new = [u for u in dict.fromkeys(user_ids) if u not in current]
            if not new:
                return _load_conversation(conn, conv_id)
            _require_users(conn, new)
            if len(current) + len(new) > max_members:
                raise LimitExceeded(f"a group has at most {max_members} members")
            now = self._clock()
            # New members start at the current last seq: the "added" message is their first.
            _insert_members(
                conn, conv_id, [(u, "member") for u in new], now, _last_seq(conn, conv_id)
            )
            event = {"event": "added", "users": new, "by": actor_id}
            self._append_system(conn, conv_id, actor_id, event, now)
            return _load_conversation(conn, conv_id)

        return await self._write(txn)

    async def remove_member(self, actor_id: int, conv_id: int, user_id: int) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            if user_id == actor_id:
                self._leave(conn, actor_id, conv_id)
                return _load_conversation(conn, conv_id)
            _require_group_admin(conn, conv_id, actor_id)
            if _role(conn, conv_id, user_id) is None:
                raise NotFound(f"user {user_id} is not a member of conversation {conv_id}")
            conn.execute(
                "DELETE FROM members WHERE conv_id = ? AND user_id = ?", (conv_id, user_id)
            )
            event = {"event": "removed", "user": user_id, "by": actor_id}
            self._append_system(conn, conv_id, actor_id, event, self._clock())
            return _load_conversation(conn, conv_id)

        return await self._write(txn)

    async def leave(self, user_id: int, conv_id: int) -> None:
        await self._write(lambda conn: self._leave(conn, user_id, conv_id))

    def _leave(self, conn: sqlite3.Connection, user_id: int, conv_id: int) -> None:
        role = _role(conn, conv_id, user_id)
        if role is None:
            raise NotMember(f"not a member of conversation {conv_id}")
        if _kind(conn, conv_id) != "group":
            # The pair's one direct conversation must keep both members to stay findable.
            raise Forbidden("cannot leave a direct conversation")
        conn.execute("DELETE FROM members WHERE conv_id = ? AND user_id = ?", (conv_id, user_id))
        event: dict[str, Any] = {"event": "left", "user": user_id}
        if role == "admin":
            heir = _promote_if_no_admin(conn, conv_id)
            if heir is not None:
                event["admin"] = heir
        self._append_system(conn, conv_id, user_id, event, self._clock())

    async def rename(self, actor_id: int, conv_id: int, title: str) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            if _role(conn, conv_id, actor_id) is None:
                raise NotMember(f"not a member of conversation {conv_id}")
            if _kind(conn, conv_id) != "group":
                raise Forbidden("only groups have a title")
            conn.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv_id))
            event = {"event": "renamed", "title": title, "by": actor_id}
            self._append_system(conn, conv_id, actor_id, event, self._clock())
            return _load_conversation(conn, conv_id)

        return await self._write(txn)

    async def get_conversation(self, conv_id: int, user_id: int) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            _require_member(conn, conv_id, user_id)
            return _load_conversation(conn, conv_id)

        return await self._read(txn)

    async def member_ids(self, conv_id: int) -> list[int]:
        return await self._read(lambda conn: _member_ids(conn, conv_id))

    async def list_conversations(self, user_id: int) -> list[ConversationSummary]:
        return await self._read(lambda conn: _list_conversations(conn, user_id))

    async def history(
        self,
        conv_id: int,
        user_id: int,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> list[Message]:
        def txn(conn: sqlite3.Connection) -> list[Message]:
            _require_member(conn, conv_id, user_id)
            if limit <= 0:
                return []
            upper = before if before is not None else 2**62
            if after is not None:  # the `limit` just above `after` (and below `before`)
                rows = conn.execute(
                    f"SELECT {_MSG_COLS} FROM messages WHERE conv_id = ? AND seq > ? AND seq < ?"
                    " ORDER BY seq LIMIT ?",
                    (conv_id, after, upper, limit),
                ).fetchall()
            else:  # the `limit` just below `before`, or the newest
                rows = conn.execute(
                    f"SELECT {_MSG_COLS} FROM messages WHERE conv_id = ? AND seq < ?"
                    " ORDER BY seq DESC LIMIT ?",
                    (conv_id, upper, limit),
                ).fetchall()
                rows.reverse()
            return [records.message(r) for r in rows]

        return await self._read(txn)

    async def contacts(self, user_id: int, max_group_size: int) -> list[int]:
        def txn(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "SELECT DISTINCT other.user_id FROM members me"
                " JOIN conversations c ON c.id = me.conv_id"
                " JOIN members other ON other.conv_id = me.conv_id"
                " WHERE me.user_id = ? AND other.user_id <> me.user_id AND (c.kind = 'direct'"
                "  OR (SELECT COUNT(*) FROM members n WHERE n.conv_id = c.id) <= ?)"
                " ORDER BY other.user_id",
                (user_id, max_group_size),
            )
            return [int(r[0]) for r in rows]

        return await self._read(txn)

    async def shared_with(self, user_id: int, others: list[int]) -> list[int]:
        def txn(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "SELECT DISTINCT other.user_id FROM members me"
                " JOIN members other ON other.conv_id = me.conv_id"
                " WHERE me.user_id = ? AND other.user_id IN (SELECT value FROM json_each(?))",
                (user_id, json.dumps(others)),
            )
            shared = {int(r[0]) for r in rows}
            return [u for u in dict.fromkeys(others) if u in shared]

        return await self._read(txn)

    # -- sending (group commit) ----------------------------------------------------------

    def send_message(self, request: SendRequest, max_body: int) -> asyncio.Future[SendResult]:
        future: asyncio.Future[SendResult] = asyncio.get_running_loop().create_future()
        self._send_queue.append(_PendingSend(request, max_body, future))
        self._kick_writer()
        return future

    def _send_batch(
        self, conn: sqlite3.Connection, work: list[tuple[SendRequest, int]]
    ) -> _SentBatch:
        """Validate and write a batch of sends, and fan them out; a failing request yields
        its error, writes nothing, and does not affect the others."""
        now = self._clock()
        # Last seqs (allocated here: we hold the lock), members, once per batch.
        convs_now = _conversations_for_send(conn, sorted({r.conv_id for r, _ in work}))
        last_seqs, members = convs_now.last_seq, convs_now.members
        sent: dict[tuple[int, str], SendResult] = {}  # idempotency within this batch
        committed = _find_sent(conn, [(r.sender_device, r.client_id) for r, _ in work])
        messages: list[Message] = []
        outcomes: list[SendResult | StoreError] = []
        for req, max_body in work:
            refused = refused_send(req.body, req.client_id, max_body)
            if refused is not None:
                outcomes.append(refused)
                continue
            key = (req.sender_device, req.client_id)
            # A retry returns the original result, even if membership changed since.
            prior = sent.get(key) or committed.get(key)
            if prior is not None:
                outcomes.append(msgspec.structs.replace(prior, duplicate=True))
                continue
            if req.sender_id not in members.get(req.conv_id, ()):
                outcomes.append(NotMember(f"not a member of conversation {req.conv_id}"))
                continue
            seq = last_seqs[req.conv_id] = last_seqs[req.conv_id] + 1
            fields = (req.sender_id, req.sender_device, req.client_id, req.kind, req.body)
            messages.append(Message(req.conv_id, seq, *fields, ts=now))
            result = SendResult(req.conv_id, seq, now, req.client_id, duplicate=False)
            if req.sender_device != 0:
                sent[key] = result
            outcomes.append(result)
        convs = sorted({m.conv_id for m in messages})
        conn.execute(
            f"UPDATE conversations SET last_seq = k.c2, last_activity = ? FROM {_KEYS}"
            " WHERE conversations.id = k.c1",
            (now, _json([(conv, last_seqs[conv]) for conv in convs])),
        )
        _store_messages(conn, messages)
        queued = convs_now.with_jobs if self._fanout_with_send else set(convs)
        _queue_fanout(conn, [m for m in messages if m.conv_id in queued])
        ready = [m for m in messages if m.conv_id not in queued]
        return _SentBatch(outcomes, _fan_out_now(conn, ready, now, convs_now))

    def _append_system(
        self,
        conn: sqlite3.Connection,
        conv_id: int,
        actor_id: int,
        event: dict[str, Any],
        now: float,
    ) -> Message:
        """Record a group change as a system message, through the same path as user messages."""
        row = conn.execute(
            "UPDATE conversations SET last_seq = last_seq + 1, last_activity = ?"
            " WHERE id = ? RETURNING last_seq",
            (now, conv_id),
        ).fetchone()
        body = json.dumps(event, separators=(",", ":"))
        message = Message(conv_id, int(row[0]), actor_id, 0, "", "system", body, now)
        _store_messages(conn, [message])
        _queue_fanout(conn, [message])
        return message

    # -- fan-out -------------------------------------------------------------------------

    async def fanout(self, worker_id: str, max_messages: int, lease_s: float) -> FanoutBatch:
        if self._fanned_out:  # committed with their sends: only the push is left
            count = min(len(self._fanned_out), max(max_messages, 1))
            entries = [e for _ in range(count) for e in self._fanned_out.popleft()]
            return FanoutBatch(entries=entries, more=bool(self._fanned_out))
        # Urgent: it rides in the next round ahead of queued acks (a message is late until
        # it is fanned out; an ack is only a receipt).
        return await self._write(
            lambda conn: self._fanout(conn, worker_id, max_messages, lease_s), urgent=True
        )

    def _fanout(
        self, conn: sqlite3.Connection, worker_id: str, max_messages: int, lease_s: float
    ) -> FanoutBatch:
        now = self._clock()
        # Leases are checked and written in this same transaction, which holds the write
        # lock: a worker whose lease was taken over cannot commit entries (fencing).
        convs = [
            int(r[0])
            for r in conn.execute(
                "SELECT j.conv_id FROM (SELECT DISTINCT conv_id FROM fanout_jobs) j"
                " LEFT JOIN fanout_leases l ON l.conv_id = j.conv_id"
                " WHERE l.conv_id IS NULL OR l.owner = ? OR l.expires_at <= ?"
                " ORDER BY j.conv_id",
                (worker_id, now),
            )
        ]
        # Round robin: start after the conversation served last, so a long backlog in one
        # conversation does not starve the others.
        order = [c for c in convs if c > self._fanout_after]
        order += [c for c in convs if c <= self._fanout_after]
        inbox = _InboxAppender(conn, now)
        batch = FanoutBatch()
        budget = max_messages
        for conv_id in order:
            if budget <= 0:
                batch.more = True  # conversations not served in this call
                break
            done = _fanout_conversation(conn, inbox, conv_id, budget, now)
            batch.entries += done.entries
            batch.convs.append(conv_id)
            budget -= done.messages
            self._fanout_after = conv_id
            if done.remaining:
                conn.execute(
                    "INSERT INTO fanout_leases (conv_id, owner, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (conv_id) DO UPDATE SET owner = excluded.owner,"
                    " expires_at = excluded.expires_at",
                    (conv_id, worker_id, now + lease_s),
                )
                batch.more = True
            else:
                conn.execute("DELETE FROM fanout_leases WHERE conv_id = ?", (conv_id,))
        # `more` stays False when the only work left is leased to other workers: their
        # holders will do it, and calling again at once would only spin.
        inbox.flush()
        return batch

    async def fanout_pushed(self, worker_id: str, conv_ids: list[int]) -> None:
        """Nothing to record: the embedded store's workers run in the gateway's process, so
        a crash between commit and push takes the sockets down too, and every client then
        replays from the inbox. (Not tracking it saves a write transaction per batch.)"""

    # -- inbox and receipts --------------------------------------------------------------

    async def inbox_after(self, user_id: int, after: int, limit: int) -> list[InboxEntry]:
        def txn(conn: sqlite3.Connection) -> list[InboxEntry]:
            rows = conn.execute(
                "SELECT i.user_id, i.inbox_seq, i.conv_id, i.ts, i.receipt,"
                " m.conv_id, m.seq, m.sender_id, m.sender_device, m.client_id, m.kind, m.body, m.ts"
                " FROM inbox i LEFT JOIN messages m ON m.conv_id = i.conv_id AND m.seq = i.msg_seq"
                " WHERE i.user_id = ? AND i.inbox_seq > ? ORDER BY i.inbox_seq LIMIT ?",
                (user_id, after, max(limit, 0)),
            )
            return [records.inbox_entry(r) for r in rows]

        return await self._read(txn)

    async def inbox_bounds(self, user_id: int) -> InboxBounds:
        def txn(conn: sqlite3.Connection) -> InboxBounds:
            row = conn.execute(
                "SELECT inbox_floor, inbox_head FROM users WHERE id = ?", (user_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no user {user_id}")
            return InboxBounds(floor=int(row[0]), head=int(row[1]))

        return await self._read(txn)

    async def ack(self, device_id: int, up_to: int) -> list[InboxEntry]:
        return only(await self.ack_many([(device_id, up_to)]))

    async def ack_many(
        self, acks: Sequence[tuple[int, int]]
    ) -> list[list[InboxEntry] | StoreError]:
        """Queued and applied with every other ack of the round at once (`_apply_acks`):
        a big group acks each message from every member's device."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[list[InboxEntry]]] = []
        for device_id, up_to in acks:
            future: asyncio.Future[list[InboxEntry]] = loop.create_future()
            self._ack_queue.append((device_id, up_to, future))
            futures.append(future)
        self._kick_writer()
        return await settled(futures)

    def _apply_acks(
        self, conn: sqlite3.Connection, acks: list[tuple[int, int]]
    ) -> list[list[InboxEntry] | StoreError]:
        """Move the devices' cursors and their users' delivered positions, in bulk.

        The receipt entries of the whole batch are returned to the first caller that moved
        anything (it pushes them); the others get an empty list.
        """
        devices = _devices_with_heads(conn, sorted({device for device, _ in acks}))
        outcomes: list[list[InboxEntry] | StoreError] = []
        cursor_updates: dict[int, int] = {}
        moved: list[tuple[int, int, int]] = []  # (user, after, up to): inbox ranges acked
        first_mover: int | None = None
        for device_id, up_to in acks:
            known = devices.get(device_id)
            if known is None:
                outcomes.append(NotFound(f"no device {device_id}"))
                continue
            outcomes.append([])
            user_id, cursor, head = known
            new_cursor = min(up_to, head)
            if new_cursor <= cursor:
                continue
            first_mover = len(outcomes) - 1 if first_mover is None else first_mover
            devices[device_id] = (user_id, new_cursor, head)  # a later ack starts from here
            cursor_updates[device_id] = new_cursor
            moved.append((user_id, cursor, new_cursor))
        delivered = _highest_acked(conn, moved)
        if cursor_updates:
            conn.execute(
                f"UPDATE devices SET cursor = k.c2 FROM {_KEYS} WHERE devices.id = k.c1",
                (_json(list(cursor_updates.items())),),
            )
        inbox = _InboxAppender(conn, self._clock())
        self._advance(
            conn,
            inbox,
            [
                (conv, user, seq, 0)
                for conv in sorted(delivered)
                for user, seq in sorted(delivered[conv].items())
            ],
        )
        entries = inbox.flush()
        if entries and first_mover is not None:
            outcomes[first_mover] = entries
        return outcomes

    def _advance(self, conn: sqlite3.Connection, inbox: _InboxAppender, moves: list[Move]) -> None:
        """Move members' receipt positions: the small conversations' moves together
        (`_advance_small`), each big group's on its own (`_advance_group`)."""
        small: list[Move] = []
        groups: dict[int, dict[int, receipts.Positions]] = {}
        for conv, user, delivered_to, read_to in moves:
            if self._detailed(conn, conv):
                small.append((conv, user, delivered_to, read_to))
            else:
                groups.setdefault(conv, {})[user] = (delivered_to, read_to)
        for conv, group_moves in groups.items():
            _advance_group(conn, inbox, conv, group_moves)
        _advance_small(conn, inbox, small)

    def _detailed(self, conn: sqlite3.Connection, conv_id: int) -> bool:
        """Whether members' receipts are told one by one (small conversations). Cached for
        a second per conversation: every ack asks, membership rarely changes, and a stale
        answer only changes how receipts are told, not what is recorded."""
        now = time.monotonic()
        cached = self._detail_cache.get(conv_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        detailed = _member_count_at_most(conn, conv_id, self._detail_max)
        if len(self._detail_cache) > 100_000:
            self._detail_cache.clear()
        self._detail_cache[conv_id] = (now + 1.0, detailed)
        return detailed

    async def mark_read(self, user_id: int, conv_id: int, up_to_seq: int) -> list[InboxEntry]:
        def txn(conn: sqlite3.Connection) -> list[InboxEntry]:
            _require_member(conn, conv_id, user_id)
            last = _last_seq(conn, conv_id)
            if not 0 <= up_to_seq <= last:
                raise BadPosition(f"seq {up_to_seq} is beyond the last message ({last})")
            inbox = _InboxAppender(conn, self._clock())
            # Read implies delivered: both move.
            self._advance(conn, inbox, [(conv_id, user_id, up_to_seq, up_to_seq)])
            return inbox.flush()

        return await self._write(txn)

    async def receipts(self, conv_id: int, user_id: int) -> list[Member]:
        def txn(conn: sqlite3.Connection) -> list[Member]:
            _require_member(conn, conv_id, user_id)
            return _members(conn, conv_id)

        return await self._read(txn)

    async def prune_inbox(self, older_than: float) -> int:
        def txn(conn: sqlite3.Connection) -> int:
            # Prune a prefix per user (up to its newest old entry), so that the remaining
            # inbox stays gapless above the floor even if the clock ever stepped back.
            floors = conn.execute(
                "SELECT user_id, MAX(inbox_seq) FROM inbox WHERE ts < ? GROUP BY user_id",
                (older_than,),
            ).fetchall()
            deleted = 0
            for user_id, floor in floors:
                cur = conn.execute(
                    "DELETE FROM inbox WHERE user_id = ? AND inbox_seq <= ?", (user_id, floor)
                )
                deleted += cur.rowcount
                conn.execute(
                    "UPDATE users SET inbox_floor = MAX(inbox_floor, ?) WHERE id = ?",
                    (floor, user_id),
                )
            return deleted

        return await self._write(txn)


# -- helpers: plain functions over a connection, run on the store's threads ----------------


@dataclasses.dataclass(slots=True)
class _PendingSend:
    request: SendRequest
    max_body: int
    future: asyncio.Future[SendResult]


@dataclasses.dataclass(slots=True)
class _SentBatch:
    outcomes: list[SendResult | StoreError]
    fanned_out: list[list[InboxEntry]]  # per message written to inboxes, its entries


@dataclasses.dataclass(slots=True)
class _ConversationFanout:
    entries: list[InboxEntry]
    messages: int  # how many messages were fanned out
    remaining: bool  # jobs left in the conversation


class _InboxAppender:
    """Allocates inbox positions within one transaction and writes the entries in bulk.

    Each user's head is read once and written back once per transaction, instead of one
    UPDATE per entry. Every entry of a transaction carries its time, ``now``.
    """

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self._conn = conn
        self.now = now
        self._heads: dict[int, int] = {}
        self._rows: list[Row] = []
        self._entries: list[InboxEntry] = []

    def seed(self, heads: dict[int, int]) -> None:
        """Known inbox heads, read along with other rows; positions already allocated in
        this transaction win (they are newer than the table until `flush`)."""
        for user_id, head in heads.items():
            self._heads.setdefault(user_id, head)

    def append(
        self,
        user_id: int,
        conv_id: int,
        message: Message | None = None,
        receipt: ReceiptState | None = None,
    ) -> InboxEntry:
        head = self._heads.get(user_id)
        if head is None:
            head = _inbox_head(self._conn, user_id)
        head += 1
        self._heads[user_id] = head
        msg_seq = message.seq if message is not None else None
        receipt_json = records.receipt_json(receipt) if receipt is not None else None
        self._rows.append((user_id, head, conv_id, msg_seq, receipt_json))
        entry = InboxEntry(user_id, head, conv_id, self.now, message=message, receipt=receipt)
        self._entries.append(entry)
        return entry

    def flush(self) -> list[InboxEntry]:
        """Write what was appended; return the entries in the order they were appended."""
        if not self._rows:
            return []
        self._conn.execute(
            "INSERT INTO inbox (user_id, inbox_seq, conv_id, msg_seq, receipt, ts)"
            f" SELECT {_fields(5)}, ?1 FROM json_each(?2)",
            (self.now, _json(self._rows)),
        )
        self._conn.execute(
            f"UPDATE users SET inbox_head = k.c2 FROM {_KEYS} WHERE users.id = k.c1",
            (_json(list(self._heads.items())),),
        )
        entries, self._rows, self._entries, self._heads = self._entries, [], [], {}
        return entries


def _fanout_conversation(
    conn: sqlite3.Connection, inbox: _InboxAppender, conv_id: int, budget: int, now: float
) -> _ConversationFanout:
    """Fan out up to ``budget`` pending messages of one conversation, in seq order.

    Each message goes to the users who were members when it was sent: current members
    who joined before it, plus those who left (or were removed) after it but before this
    fan-out ran, including the departure message itself.
    """
    rows = conn.execute(
        f"SELECT {', '.join('m.' + c for c in _MSG_COLS.split(', '))}"
        " FROM fanout_jobs j JOIN messages m ON m.conv_id = j.conv_id AND m.seq = j.seq"
        " WHERE j.conv_id = ? ORDER BY j.seq LIMIT ?",
        (conv_id, budget),
    ).fetchall()
    # The members' inbox heads come with them: one query, not one per member.
    members = conn.execute(
        "SELECT m.user_id, m.joined_seq, u.inbox_head FROM members m"
        " JOIN users u ON u.id = m.user_id WHERE m.conv_id = ? ORDER BY m.user_id",
        (conv_id,),
    ).fetchall()
    inbox.seed({int(user): int(head) for user, _, head in members})
    departed = _pending_departures(conn, conv_id)
    entries: list[InboxEntry] = []
    last = 0
    for row in rows:
        message = records.message(row)
        last = message.seq
        targets = [int(u) for u, joined_seq, _ in members if joined_seq < message.seq]
        for user, after, until in departed:
            if after < message.seq <= until and user not in targets:
                targets.append(user)
        entries += [inbox.append(u, conv_id, message=message) for u in targets]
    conn.execute("DELETE FROM fanout_jobs WHERE conv_id = ? AND seq <= ?", (conv_id, last))
    remaining = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM fanout_jobs WHERE conv_id = ?)", (conv_id,)
    ).fetchone()[0]
    return _ConversationFanout(entries, len(rows), bool(remaining))


def _pending_departures(conn: sqlite3.Connection, conv_id: int) -> list[tuple[int, int, int]]:
    """``(user, after, until)``: a user no longer in the members table was a member for
    the messages ``after < seq <= until``, according to the system messages not yet fanned
    out (a membership change is committed with its system message, so these are exactly
    the changes fan-out has not caught up with)."""
    events = conn.execute(
        "SELECT m.seq, m.body FROM fanout_jobs j"
        " JOIN messages m ON m.conv_id = j.conv_id AND m.seq = j.seq"
        " WHERE j.conv_id = ? AND m.kind = 'system' ORDER BY j.seq",
        (conv_id,),
    ).fetchall()
    joined_after: dict[int, int] = {}  # user -> seq before the pending "added" message
    spans: list[tuple[int, int, int]] = []
    for seq, body in events:
        event = json.loads(body)
        if event.get("event") == "added":
            for user in event.get("users", []):
                joined_after[int(user)] = int(seq) - 1
        elif event.get("event") in ("removed", "left"):
            user = int(event["user"])
            # Joined before every pending message, unless a pending "added" says otherwise.
            spans.append((user, joined_after.pop(user, 0), int(seq)))
    return spans


def _highest_acked(
    conn: sqlite3.Connection, ranges: list[tuple[int, int, int]]
) -> dict[int, dict[int, int]]:
    """conv -> user -> the highest message seq in the users' acked inbox ranges
    ``(user, after, up_to)``: delivered is cumulative, in indexed joins."""
    delivered: dict[int, dict[int, int]] = {}
    rows = _json_rows(
        conn,
        "SELECT json_group_array(json_array(user_id, conv_id, seq)) FROM"
        f" (SELECT k.c1 AS user_id, i.conv_id, MAX(i.msg_seq) AS seq FROM {_KEYS}"
        " JOIN inbox i ON i.user_id = k.c1 AND i.inbox_seq > k.c2 AND i.inbox_seq <= k.c3"
        " WHERE i.msg_seq IS NOT NULL GROUP BY k.c1, i.conv_id)",
        ranges,
    )
    for user_id, conv_id, seq in rows:  # one row per (user, conv): grouped
        delivered.setdefault(int(conv_id), {})[int(user_id)] = int(seq)
    return delivered


Move = tuple[int, int, int, int]  # (conv, user, delivered to, read to)


def _advance_small(conn: sqlite3.Connection, inbox: _InboxAppender, moves: list[Move]) -> None:
    """Move members' receipt positions in small conversations forward (never back) and
    tell the senders of the messages in the moved ranges: each sender once per member,
    with that member's new positions and the conversation's aggregate. All the moves of
    a batch (an ack per device, from many conversations) in a few statements."""
    pairs = [(conv, user) for conv, user, _, _ in moves]
    old = {(c, u): (d, r) for c, u, d, r in _member_positions(conn, pairs)}
    new: dict[tuple[int, int], receipts.Positions] = {}
    ranges: list[tuple[int, int, int, int]] = []  # (conv, user, after, up to)
    for conv, user, delivered_to, read_to in moves:
        before = old.get((conv, user))
        if before is None:  # left the conversation since: nothing to record
            continue
        moved = receipts.advance(before, delivered_to, read_to)
        if moved is not None:
            new[conv, user] = moved
            ranges += [(conv, user, *r) for r in receipts.moved_ranges(before, moved)]
    _set_positions(conn, [(conv, user, *positions) for (conv, user), positions in new.items()])
    senders = _senders(conn, ranges)
    aggregates = _aggregates(conn, sorted({conv for conv, _ in senders}))
    for (conv, user), told in sorted(senders.items()):
        state = ReceiptState(conv, user, *new[conv, user], *aggregates[conv], inbox.now)
        for sender in sorted(told):
            inbox.append(sender, conv, receipt=state)


def _devices_with_heads(
    conn: sqlite3.Connection, device_ids: list[int]
) -> dict[int, tuple[int, int, int]]:
    """device -> (user, cursor, user's inbox head), for devices not revoked."""
    rows = _json_rows(
        conn,
        "SELECT json_group_array(json_array(d.id, d.user_id, d.cursor, u.inbox_head))"
        f" FROM {_KEYS} JOIN devices d ON d.id = k.c1 JOIN users u ON u.id = d.user_id"
        " WHERE d.revoked_at IS NULL",
        [(device,) for device in device_ids],
    )
    return {int(d): (int(user), int(cursor), int(head)) for d, user, cursor, head in rows}


def _advance_group(
    conn: sqlite3.Connection,
    inbox: _InboxAppender,
    conv_id: int,
    moves: dict[int, receipts.Positions],
) -> None:
    """`_advance_small` for members of a big group: their positions move (user -> the
    delivered and read positions to move to), and the senders hear of it only if the
    aggregate moved, in an entry of the aggregate alone (`pigeon.store.receipts`)."""
    (before,) = _aggregates(conn, [conv_id]).values()
    updates: list[tuple[int, int, int, int]] = []  # (conv, user, delivered, read)
    for _, user, delivered, read in _member_positions(conn, [(conv_id, u) for u in moves]):
        new = receipts.advance((delivered, read), *moves[user])
        if new is not None:
            updates.append((conv_id, user, *new))
    if not updates:
        return
    _set_positions(conn, updates)
    (after,) = _aggregates(conn, [conv_id]).values()
    if after == before:
        return
    state = ReceiptState(conv_id, receipts.AGGREGATE_USER, *after, *after, inbox.now)
    ranges = [(conv_id, receipts.AGGREGATE_USER, *r) for r in receipts.moved_ranges(before, after)]
    for sender in sorted(set().union(*_senders(conn, ranges).values())):
        inbox.append(sender, conv_id, receipt=state)


def _member_positions(
    conn: sqlite3.Connection, pairs: list[tuple[int, int]]
) -> list[tuple[int, int, int, int]]:
    """(conv, user, delivered, read) of the ``(conv, user)`` pairs that are members."""
    rows = _json_rows(
        conn,
        "SELECT json_group_array(json_array(m.conv_id, m.user_id, m.delivered_seq,"
        f" m.read_seq)) FROM {_KEYS} JOIN members m ON m.conv_id = k.c1 AND m.user_id = k.c2",
        pairs,
    )
    return [(int(c), int(u), int(d), int(r)) for c, u, d, r in rows]


def _set_positions(conn: sqlite3.Connection, updates: list[tuple[int, int, int, int]]) -> None:
    """Write members' positions: ``(conv, user, delivered, read)``."""
    if updates:
        conn.execute(
            f"UPDATE members SET delivered_seq = k.c3, read_seq = k.c4 FROM {_KEYS}"
            " WHERE members.conv_id = k.c1 AND members.user_id = k.c2",
            (_json(updates),),
        )


def _member_count_at_most(conn: sqlite3.Connection, conv_id: int, limit: int) -> bool:
    # Counts at most limit + 1 rows: cheap whatever the group's size.
    row = conn.execute(
        "SELECT COUNT(*) FROM (SELECT 1 FROM members WHERE conv_id = ? LIMIT ?)",
        (conv_id, limit + 1),
    ).fetchone()
    return int(row[0]) <= limit


def _aggregates(conn: sqlite3.Connection, conv_ids: list[int]) -> dict[int, receipts.Positions]:
    """conv -> (min delivered, min read) over its members: two index lookups each (0002
    migration)."""
    rows = _json_rows(
        conn,
        "SELECT json_group_array(json_array(k.c1,"
        " (SELECT MIN(delivered_seq) FROM members WHERE conv_id = k.c1),"
        f" (SELECT MIN(read_seq) FROM members WHERE conv_id = k.c1))) FROM {_KEYS}",
        [(conv,) for conv in conv_ids],
    )
    return {int(conv): (int(d or 0), int(r or 0)) for conv, d, r in rows}


def _senders(
    conn: sqlite3.Connection, ranges: list[tuple[int, int, int, int]]
) -> dict[tuple[int, int], set[int]]:
    """For ranges ``(conv, user, after, up to]`` of seqs: (conv, user) -> the current
    members other than ``user`` who sent a user message in them (pairs with none are
    left out)."""
    rows = _json_rows(
        conn,
        "SELECT json_group_array(json_array(conv, user, sender)) FROM"
        " (SELECT DISTINCT k.c1 AS conv, k.c2 AS user, m.sender_id AS sender"
        f" FROM {_KEYS} JOIN messages m ON m.conv_id = k.c1 AND m.seq > k.c3"
        " AND m.seq <= k.c4 WHERE m.sender_id <> k.c2 AND m.kind <> 'system'"
        " AND EXISTS (SELECT 1 FROM members mm"
        " WHERE mm.conv_id = m.conv_id AND mm.user_id = m.sender_id))",
        ranges,
    )
    found: dict[tuple[int, int], set[int]] = {}
    for conv, user, sender in rows:
        found.setdefault((int(conv), int(user)), set()).add(int(sender))
    return found


def _in_savepoint(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T | Exception:
    """Run ``fn`` inside a savepoint: on failure only its own writes are undone, and the
    failure is returned (database errors as StoreErrors) rather than raised."""
    conn.execute("SAVEPOINT one")
    try:
        result: T | Exception = fn(conn)
    except Exception as exc:
        conn.execute("ROLLBACK TO one")
        result = _map_error(exc) if isinstance(exc, sqlite3.Error) else exc
    conn.execute("RELEASE one")
    return result


def _store_messages(conn: sqlite3.Connection, messages: list[Message]) -> None:
    """Insert messages; move each sender's own positions past them.

    The caller has already allocated the seqs and updated ``conversations.last_seq``, and
    fans the messages out (`_fan_out_now`) or queues them (`_queue_fanout`).
    """
    rows = [
        (m.conv_id, m.seq, m.sender_id, m.sender_device, m.client_id, m.kind, m.body, m.ts)
        for m in messages
    ]
    conn.execute(
        f"INSERT INTO messages ({_MSG_COLS}) SELECT {_fields(8)} FROM json_each(?)",
        (_json(rows),),
    )
    # One update per (conversation, sender): messages are in seq order, so the last wins.
    own = {(m.conv_id, m.sender_id): m.seq for m in messages}
    conn.execute(
        "UPDATE members SET delivered_seq = MAX(delivered_seq, k.c3),"
        f" read_seq = MAX(read_seq, k.c3) FROM {_KEYS}"
        " WHERE members.conv_id = k.c1 AND members.user_id = k.c2",
        (_json([(conv, user, seq) for (conv, user), seq in own.items()]),),
    )


def _queue_fanout(conn: sqlite3.Connection, messages: list[Message]) -> None:
    """Leave the messages to the leased fan-out rounds (`_fanout_conversation`)."""
    conn.execute(
        f"INSERT INTO fanout_jobs (conv_id, seq) SELECT {_fields(2)} FROM json_each(?)",
        (_json([(m.conv_id, m.seq) for m in messages]),),
    )


@dataclasses.dataclass(slots=True)
class _SendContext:
    """What a send batch needs of its conversations, read in one query."""

    last_seq: dict[int, int]  # conv -> its last seq, for the conversations that exist
    with_jobs: set[int]  # conversations with messages still queued for fan-out
    members: dict[int, set[int]]  # conv -> its members
    heads: dict[int, int]  # member -> inbox head


def _conversations_for_send(conn: sqlite3.Connection, conv_ids: list[int]) -> _SendContext:
    """One query rather than four: a round of a few sends spends more on statements than
    on rows, and each statement hands the GIL to the event loop and back."""
    context = _SendContext({}, set(), {}, {})
    rows = _json_rows(
        conn,
        "WITH cs AS MATERIALIZED (SELECT c.id, c.last_seq,"
        " EXISTS (SELECT 1 FROM fanout_jobs j WHERE j.conv_id = c.id) AS jobs"
        f" FROM {_KEYS} JOIN conversations c ON c.id = k.c1)"
        " SELECT json_group_array(json_array(cs.id, cs.last_seq, cs.jobs, m.user_id,"
        " u.inbox_head)) FROM cs"
        " LEFT JOIN members m ON m.conv_id = cs.id LEFT JOIN users u ON u.id = m.user_id",
        [(conv,) for conv in conv_ids],
    )
    for conv, last_seq, jobs, user, head in rows:
        context.last_seq[conv] = last_seq
        if jobs:
            context.with_jobs.add(conv)
        if user is not None:
            context.members.setdefault(conv, set()).add(user)
            context.heads[user] = head
    return context


def _fan_out_now(
    conn: sqlite3.Connection, messages: list[Message], now: float, context: _SendContext
) -> list[list[InboxEntry]]:
    """Write just-stored messages to their conversations' members' inboxes.

    Only for conversations with no queued jobs: then the current members are exactly the
    members at send time (membership changes go through this same writer).
    """
    if not messages:
        return []
    inbox = _InboxAppender(conn, now)
    inbox.seed(context.heads)
    members = context.members
    fanned_out = [
        [inbox.append(user, m.conv_id, message=m) for user in members.get(m.conv_id, ())]
        for m in messages
    ]
    inbox.flush()
    return fanned_out


def _require_features(conn: sqlite3.Connection) -> None:
    """Fail at start, not at the first send, on an SQLite without what the writer uses:
    ``UPDATE ... FROM`` (3.33) and the JSON functions."""
    if sqlite3.sqlite_version_info < (3, 33, 0):
        raise sqlite3.NotSupportedError(f"SQLite {sqlite3.sqlite_version}: 3.33 or newer needed")
    conn.execute("SELECT json_extract('[1]', '$[0]') FROM json_each('[1]')").fetchall()


def _field(index: int) -> str:
    """Item ``index`` of the JSON row in `json_each`'s ``value``, as an SQL value.
    (``json_extract`` rather than ``->>``: the operator needs SQLite 3.38, and Ubuntu
    22.04's Python 3.11 builds link 3.37.)"""
    return f"json_extract(value, '$[{index}]')"


def _fields(count: int) -> str:
    return ", ".join(_field(i) for i in range(count))


#: A batch of keys or rows passed as one JSON array of arrays (`_json`), as a table whose
#: columns are ``k.c1`` to ``k.c4`` (a join on it is an index search per key).
_KEYS = f"(SELECT {', '.join(f'{_field(i)} AS c{i + 1}' for i in range(4))} FROM json_each(?)) AS k"

_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder(list[list[Any]]).decode


def _json(rows: Sequence[Sequence[object]]) -> str:
    """Rows as one JSON text, for one statement to read with `json_each` (`_KEYS`).

    The sqlite3 module lets go of the GIL for each step of a statement: each row of an
    executemany, each row fetched. Taking it back waits for the event loop thread to yield
    it, so at direct max the writer spent ~40 % of its time waiting (docs/benchmarks.md,
    fourth round). A statement over a JSON batch is one step however many rows it has.
    Exact for integers and text without NUL (`SqliteStore._send_batch` refuses NUL).
    """
    return _encode_json(rows).decode()


def _json_rows(
    conn: sqlite3.Connection, query: str, keys: Sequence[Sequence[object]]
) -> list[list[Any]]:
    """The rows of ``query`` over ``keys`` (it joins `_KEYS`), a query whose one value is
    ``json_group_array(json_array(...))``: every row in one step. Integers and text only:
    SQLite writes a REAL to JSON with 15 significant digits."""
    if not keys:
        return []
    (text,) = conn.execute(query, (_json(keys),)).fetchone()
    return _decode_json(text)


def _find_sent(
    conn: sqlite3.Connection, keys: list[tuple[int, str]]
) -> dict[tuple[int, str], SendResult]:
    """Sends already committed under these idempotency keys."""
    found: dict[tuple[int, str], SendResult] = {}
    # "sender_device <> 0" lets SQLite use the partial unique index.
    # Rows fetched one by one (there are none but for retries): `ts` is a REAL, which
    # SQLite would round to 15 digits in JSON.
    rows = conn.execute(
        f"SELECT m.sender_device, m.client_id, m.conv_id, m.seq, m.ts FROM {_KEYS}"
        " JOIN messages m ON m.sender_device = k.c1 AND m.client_id = k.c2"
        " AND m.sender_device <> 0",
        (_json([k for k in keys if k[0] != 0]),),  # system messages have no key
    )
    for device, client_id, conv_id, seq, ts in rows:
        key = (int(device), str(client_id))
        found[key] = SendResult(int(conv_id), int(seq), float(ts), key[1], duplicate=False)
    return found


def _insert_conversation(
    conn: sqlite3.Connection, kind: ConversationKind, title: str, key: str | None, now: float
) -> int:
    row = conn.execute(
        "INSERT INTO conversations (kind, title, direct_key, created_at, last_activity)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id",
        (kind, title, key, now, now),
    ).fetchone()
    return int(row[0])


def _insert_members(
    conn: sqlite3.Connection,
    conv_id: int,
    roles: Iterable[tuple[int, Role]],
    now: float,
    last_seq: int,
) -> None:
    conn.execute(
        "INSERT INTO members (conv_id, user_id, role, joined_at, joined_seq, delivered_seq,"
        f" read_seq) SELECT ?1, {_fields(2)}, ?2, ?3, ?3, ?3 FROM json_each(?4)",
        (conv_id, now, last_seq, _json(list(roles))),
    )


def _promote_if_no_admin(conn: sqlite3.Connection, conv_id: int) -> int | None:
    """If no admin is left, make the longest-standing member admin; return who."""
    has_admin = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM members WHERE conv_id = ? AND role = 'admin')", (conv_id,)
    ).fetchone()[0]
    if has_admin:
        return None
    heir = conn.execute(
        "SELECT user_id FROM members WHERE conv_id = ? ORDER BY joined_at, rowid LIMIT 1",
        (conv_id,),
    ).fetchone()
    if heir is None:
        return None
    conn.execute(
        "UPDATE members SET role = 'admin' WHERE conv_id = ? AND user_id = ?", (conv_id, heir[0])
    )
    return int(heir[0])


def _require_users(conn: sqlite3.Connection, user_ids: Sequence[int]) -> None:
    unique = set(user_ids)
    found = conn.execute(
        "SELECT COUNT(*) FROM users WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(sorted(unique)),),
    ).fetchone()[0]
    if found != len(unique):
        raise NotFound("unknown user")


def _require_member(conn: sqlite3.Connection, conv_id: int, user_id: int) -> Role:
    role = _role(conn, conv_id, user_id)
    if role is None:
        raise NotMember(f"not a member of conversation {conv_id}")
    return role


def _require_group_admin(conn: sqlite3.Connection, conv_id: int, user_id: int) -> None:
    role = _require_member(conn, conv_id, user_id)
    if _kind(conn, conv_id) != "group":
        raise Forbidden("a direct conversation has fixed members")
    if role != "admin":
        raise Forbidden("only an admin can do this")


def _role(conn: sqlite3.Connection, conv_id: int, user_id: int) -> Role | None:
    row = conn.execute(
        "SELECT role FROM members WHERE conv_id = ? AND user_id = ?", (conv_id, user_id)
    ).fetchone()
    return None if row is None else cast(Role, row[0])


def _kind(conn: sqlite3.Connection, conv_id: int) -> str:
    row = conn.execute("SELECT kind FROM conversations WHERE id = ?", (conv_id,)).fetchone()
    return "" if row is None else str(row[0])


def _last_seq(conn: sqlite3.Connection, conv_id: int) -> int:
    row = conn.execute("SELECT last_seq FROM conversations WHERE id = ?", (conv_id,)).fetchone()
    if row is None:
        raise NotMember(f"no conversation {conv_id}")
    return int(row[0])


def _inbox_head(conn: sqlite3.Connection, user_id: int) -> int:
    row = conn.execute("SELECT inbox_head FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None:
        raise NotFound(f"no user {user_id}")
    return int(row[0])


def _member_ids(conn: sqlite3.Connection, conv_id: int) -> list[int]:
    rows = conn.execute(
        "SELECT user_id FROM members WHERE conv_id = ? ORDER BY joined_at, rowid", (conv_id,)
    )
    return [int(r[0]) for r in rows]


def _members(conn: sqlite3.Connection, conv_id: int) -> list[Member]:
    rows = conn.execute(
        f"SELECT {_MEMBER_COLS} FROM members WHERE conv_id = ? ORDER BY joined_at, rowid",
        (conv_id,),
    )
    return [records.member(r) for r in rows]


def _load_conversation(conn: sqlite3.Connection, conv_id: int) -> Conversation:
    row = conn.execute(f"SELECT {_CONV_COLS} FROM conversations WHERE id = ?", (conv_id,))
    found = row.fetchone()
    if found is None:
        raise NotMember(f"no conversation {conv_id}")
    return records.conversation(found, tuple(_members(conn, conv_id)))


def _list_conversations(conn: sqlite3.Connection, user_id: int) -> list[ConversationSummary]:
    convs = conn.execute(
        f"SELECT {', '.join('c.' + c for c in _CONV_COLS.split(', '))}, me.read_seq"
        " FROM members me JOIN conversations c ON c.id = me.conv_id"
        " WHERE me.user_id = ? ORDER BY c.last_activity DESC, c.id DESC",
        (user_id,),
    ).fetchall()
    members: dict[int, list[Member]] = {}
    for row in conn.execute(
        f"SELECT conv_id, {_MEMBER_COLS} FROM members"
        " WHERE conv_id IN (SELECT conv_id FROM members WHERE user_id = ?)"
        " ORDER BY conv_id, joined_at, rowid",
        (user_id,),
    ):
        members.setdefault(int(row[0]), []).append(records.member(row[1:]))
    summaries = []
    for row in convs:
        conv = records.conversation(row[:5], tuple(members.get(int(row[0]), ())))
        last = conn.execute(
            f"SELECT {_MSG_COLS} FROM messages WHERE conv_id = ? AND seq = ?",
            (conv.id, conv.last_seq),
        ).fetchone()
        unread = conn.execute(
            "SELECT COUNT(*) FROM messages WHERE conv_id = ? AND seq > ? AND sender_id <> ?",
            (conv.id, row[5], user_id),
        ).fetchone()[0]
        summaries.append(
            ConversationSummary(conv, records.maybe(records.message, last), int(unread))
        )
    return summaries


# -- rows to records -------------------------------------------------------------------------


def _map_error(exc: sqlite3.Error) -> StoreError:
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(str(exc))
    # Locked, busy, I/O, disk full...: the same call may succeed later.
    return Unavailable(str(exc))


# -- migrations ------------------------------------------------------------------------------


def _statements(script: str) -> list[str]:
    """Split a script into statements, so they can run inside our own transaction
    (``executescript`` would commit first)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


def _migrate(conn: sqlite3.Connection, clock: Clock) -> None:
    """Apply each migration above the current schema version, each in its own transaction."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    for number, name, script in records.packaged_migrations(MIGRATIONS_PACKAGE):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read the version under the write lock: another process may be migrating too.
            current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            if number > int(current.fetchone()[0]):
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (number, name, clock()),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
