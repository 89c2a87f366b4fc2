"""The scaled store: PostgreSQL through an asyncpg connection pool.

Same semantics as `pigeon.store.sqlite` (system messages, receipts as inbox entries, fan-out
leases, group commit), made safe for many processes on one database:

* Seqs: every transaction that allocates a conversation's seq first locks the conversation
  row (``FOR UPDATE``, several rows in id order), then reads what it depends on (membership,
  idempotency keys) and only then writes. Gateways in different processes are therefore
  serialised per conversation, and seqs stay gapless and unique.
* Inbox positions: users' rows are locked in id order, then ``inbox_head`` is moved by the
  batch's count with one ``UPDATE ... RETURNING``.
* Fan-out: each conversation has a ``fanout_leases`` row. A worker locks the rows it can own
  (free, expired, or already its own) with ``FOR UPDATE SKIP LOCKED``, writes the entries, and
  extends or frees the lease, all in one transaction: the lock is the fence, so a worker whose
  lease was taken over commits nothing for that conversation.
* Sends: a batch locks its conversations (id order), then its senders' member rows
  ((conv_id, user_id) order), inside one call of ``pigeon_send`` (0005 migration).
* Acks: queued acks are applied in bulk by one call of the ``pigeon_ack`` function (0004
  migration), one round trip and one short transaction per batch, with a transaction
  advisory lock per big group around its aggregate receipt.
* Lock order, everywhere: conversations (id order), devices (id order), aggregate advisory
  locks (key order), members ((conv_id, user_id) order), users (id order); fan-out leases
  come before users. Sends, acks and group changes never wait for a lock earlier in it.
* Deadlocks and serialisation failures (which the lock ordering makes rare) are retried.

Group commit: ``send_message`` calls queue up and one task commits everything queued (up to
``MAX_SEND_BATCH``) in one call of the ``pigeon_send`` function (0005 migration): one round
trip and one short transaction over arrays, so the conversation row locks are held only while
the function runs (research/limits.md, 3b: batches of 100-1000 reach 30-50k rows/s, against
2-5k for one row per transaction).

Connection trouble (refused, reset, server restarting, pool exhausted) raises `Unavailable`;
the pool replaces broken connections on later calls, so the store recovers by itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import asyncpg

from pigeon.store import receipts, records
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
Row = Sequence[Any]  # an asyncpg Record, or a slice of one
Conn = Any  # asyncpg.Connection (asyncpg ships no type information)
Txn = Callable[[Conn], Awaitable[T]]

#: Most sends committed in one transaction; bigger batches gain little and delay the first.
MAX_SEND_BATCH = 512
#: Most acks applied together by one call of the ``pigeon_ack`` function (0004 migration).
MAX_ACK_BATCH = 256
#: ``out_code`` of a ``pigeon_send`` row (0005 migration): sent, duplicate, not a member.
_SEND_DUPLICATE = 1
_SEND_NOT_MEMBER = 2
#: Inbox rows at or above this go in with COPY, below with one INSERT over arrays (3b).
COPY_THRESHOLD = 256
#: How long a call waits for a free pooled connection before answering Unavailable.
ACQUIRE_TIMEOUT_S = 10.0
#: How long one statement may run before the call answers Unavailable.
COMMAND_TIMEOUT_S = 30.0
#: Attempts for a transaction that hit a deadlock or serialisation failure.
TXN_ATTEMPTS = 5
MIGRATIONS_PACKAGE = "pigeon.store.migrations.postgresql"
#: First key of the transaction advisory lock on a big group's aggregate receipt ("ackc");
#: the second is the conversation id modulo 2**31. Also in the 0004 migration.
AGGREGATE_LOCK_CLASS = 0x61636B63
_MAX_BIGINT = 2**63 - 1
#: pg_advisory_lock key held while migrating ("pigeon" in ASCII).
MIGRATION_LOCK = 0x706967656F6E

_USER_COLS = "id, username, display_name, created_at"
_DEVICE_COLS = "id, user_id, name, created_at, revoked_at, cursor"
_CONV_COLS = "id, kind, title, created_at, last_seq"
_MEMBER_COLS = "user_id, role, joined_at, delivered_seq, read_seq"
_MSG_COLS = "conv_id, seq, sender_id, sender_device, client_id, kind, body, ts"
_M_MSG_COLS = ", ".join("m." + c for c in _MSG_COLS.split(", "))
_MEMBER_ORDER = "joined_at, joined_order"

#: Errors that mean "the database cannot be reached right now"; the call may succeed later.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08: connection failures
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutting down, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.InterfaceError,  # connection closed under us, pool closing
    asyncpg.InternalClientError,  # e.g. the server killed the session between our calls
    OSError,  # refused, reset, unreachable (ConnectionRefusedError is one)
    TimeoutError,  # pool acquire or command timeout
)
_RETRY_ERRORS = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


class PostgresStore:
    """`pigeon.store.base.Store` on a PostgreSQL database."""

    def __init__(
        self,
        dsn: str,
        *,
        clock: Clock = time.time,
        pool_size: int = 10,
        receipt_detail_max_group: int = receipts.DEFAULT_DETAIL_MAX_GROUP,
    ) -> None:
        self._dsn = dsn
        self._clock = clock
        self._detail_max = receipt_detail_max_group
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._send_queue: deque[_PendingSend] = deque()
        self._send_task: asyncio.Task[None] | None = None
        self._ack_queue: deque[_PendingAck] = deque()
        self._ack_task: asyncio.Task[None] | None = None
        # Round-robin position of fanout over conversations, per instance.
        self._fanout_after = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=COMMAND_TIMEOUT_S,
                reset=_keep_session,
            )
        except _UNAVAILABLE_ERRORS as exc:
            raise Unavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                await _migrate(conn, self._clock)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _UNAVAILABLE_ERRORS):
                raise Unavailable(f"cannot migrate: {exc}") from exc
            raise
        self._pool = pool

    async def close(self) -> None:
        for task in (self._send_task, self._ack_task):
            if task is not None and not task.done():
                # Let queued sends and acks commit (or fail) before the pool goes away.
                await asyncio.wait({task})
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- running work --------------------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        pool = self._pool
        if pool is None:
            raise Unavailable("the store is not open")
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                yield conn
        except _UNAVAILABLE_ERRORS as exc:
            raise Unavailable(f"PostgreSQL unavailable: {exc}") from exc

    async def _write(self, fn: Txn[T]) -> T:
        """Run ``fn`` in one read-committed transaction; database errors become StoreErrors."""
        try:
            return await self._transaction(fn)
        except asyncpg.PostgresError as exc:
            raise _map_error(exc) from exc

    async def _call(self, query: str, *args: Any) -> list[Row]:
        """One statement in its own implicit transaction (no BEGIN and COMMIT round trips),
        retried on deadlock; database errors become StoreErrors."""
        try:
            return await self._statement(query, *args)
        except asyncpg.PostgresError as exc:
            raise _map_error(exc) from exc

    async def _statement(self, query: str, *args: Any) -> list[Row]:
        """One statement in its own implicit transaction, retried on deadlock; other
        database errors are raised as they are."""
        for attempt in range(TXN_ATTEMPTS):
            try:
                async with self._connection() as conn:
                    return cast(list[Row], await conn.fetch(query, *args))
            except _RETRY_ERRORS:
                if attempt == TXN_ATTEMPTS - 1:
                    raise Unavailable("too much contention; try again") from None
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _transaction(self, fn: Txn[T]) -> T:
        """Run ``fn`` in one read-committed transaction, retried on deadlock."""
        for attempt in range(TXN_ATTEMPTS):
            try:
                async with self._connection() as conn, conn.transaction():
                    return await fn(conn)
            except _RETRY_ERRORS:
                if attempt == TXN_ATTEMPTS - 1:
                    raise Unavailable("too much contention; try again") from None
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _read(self, fn: Txn[T]) -> T:
        """Run ``fn`` in one read-only snapshot (several statements see one state)."""
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            return await fn(conn)

    # -- users and devices ---------------------------------------------------------------

    async def create_user(self, username: str, display_name: str, password_hash: str) -> User:
        async def txn(conn: Conn) -> User:
            try:
                row = await conn.fetchrow(
                    "INSERT INTO users (username, display_name, password_hash, created_at)"
                    f" VALUES ($1, $2, $3, $4) RETURNING {_USER_COLS}",
                    username,
                    display_name,
                    password_hash,
                    self._clock(),
                )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"username {username!r} is taken") from exc
            return records.user(row)

        return await self._write(txn)

    async def get_user(self, user_id: int) -> User | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(f"SELECT {_USER_COLS} FROM users WHERE id = $1", user_id)
        return records.maybe(records.user, row)

    async def find_user(self, username: str) -> User | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_USER_COLS} FROM users WHERE lower(username) = lower($1)", username
            )
        return records.maybe(records.user, row)

    async def password_hash(self, user_id: int) -> str:
        async with self._connection() as conn:
            found = await conn.fetchval("SELECT password_hash FROM users WHERE id = $1", user_id)
        if found is None:
            raise NotFound(f"no user {user_id}")
        return str(found)

    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        async def txn(conn: Conn) -> None:
            status = await conn.execute(
                "UPDATE users SET password_hash = $1 WHERE id = $2", password_hash, user_id
            )
            if _rowcount(status) == 0:
                raise NotFound(f"no user {user_id}")

        await self._write(txn)

    async def list_users(self) -> list[User]:
        async with self._connection() as conn:
            rows = await conn.fetch(f"SELECT {_USER_COLS} FROM users ORDER BY id")
        return [records.user(r) for r in rows]

    async def create_device(self, user_id: int, name: str, token_hash: str) -> Device:
        async def txn(conn: Conn) -> Device:
            head = await _inbox_head(conn, user_id)
            try:
                row = await conn.fetchrow(
                    "INSERT INTO devices (user_id, name, token_hash, created_at, cursor)"
                    f" VALUES ($1, $2, $3, $4, $5) RETURNING {_DEVICE_COLS}",
                    user_id,
                    name,
                    token_hash,
                    self._clock(),
                    head,
                )
            except asyncpg.UniqueViolationError as exc:
                raise Conflict("token hash already in use") from exc
            return records.device(row)

        return await self._write(txn)

    async def device_for_token(self, token_hash: str) -> Device | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_DEVICE_COLS} FROM devices WHERE token_hash = $1 AND revoked_at IS NULL",
                token_hash,
            )
        return records.maybe(records.device, row)

    async def list_devices(self, user_id: int) -> list[Device]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_DEVICE_COLS} FROM devices WHERE user_id = $1 ORDER BY id", user_id
            )
        return [records.device(r) for r in rows]

    async def revoke_device(self, user_id: int, device_id: int) -> bool:
        async def txn(conn: Conn) -> bool:
            status = await conn.execute(
                "UPDATE devices SET revoked_at = $1"
                " WHERE user_id = $2 AND id = $3 AND revoked_at IS NULL",
                self._clock(),
                user_id,
                device_id,
            )
            return _rowcount(status) > 0

        return await self._write(txn)

    # -- conversations -------------------------------------------------------------------

    async def direct_conversation(self, user_id: int, other_id: int) -> Conversation:
        low, high = sorted((user_id, other_id))
        key = f"{low}:{high}"

        async def find(conn: Conn) -> Conversation | None:
            found = await conn.fetchval("SELECT id FROM conversations WHERE direct_key = $1", key)
            return None if found is None else await _load_conversation(conn, int(found))

        async def txn(conn: Conn) -> Conversation:
            await _require_users(conn, [user_id, other_id])
            now = self._clock()
            # Another process may create the pair at the same time: the unique key decides.
            conv_id = await conn.fetchval(
                "INSERT INTO conversations (kind, title, direct_key, created_at, last_activity)"
                " VALUES ('direct', '', $1, $2, $2) ON CONFLICT (direct_key) DO NOTHING"
                " RETURNING id",
                key,
                now,
            )
            if conv_id is None:
                existing = await find(conn)
                assert existing is not None  # the conflicting row is committed
                return existing
            await _insert_lease(conn, conv_id)
            # A direct chat has no admin: nobody can add, remove or rename.
            users = list(dict.fromkeys((low, high)))
            await _insert_members(conn, conv_id, [(u, "member") for u in users], now, 0)
            return await _load_conversation(conn, conv_id)

        existing = await self._read(find)  # mostly it exists: no write needed
        return existing if existing is not None else await self._write(txn)

    async def create_group(
        self, creator_id: int, title: str, member_ids: list[int], max_members: int
    ) -> Conversation:
        async def txn(conn: Conn) -> Conversation:
            users = list(dict.fromkeys([creator_id, *member_ids]))  # dedup, keep order
            if len(users) > max_members:
                raise LimitExceeded(f"a group has at most {max_members} members")
            await _require_users(conn, users)
            now = self._clock()
            conv_id = await conn.fetchval(
                "INSERT INTO conversations (kind, title, created_at, last_activity)"
                " VALUES ('group', $1, $2, $2) RETURNING id",
                title,
                now,
            )
            await _insert_lease(conn, conv_id)
            roles: list[tuple[int, Role]] = [(creator_id, "admin")]
            roles += [(u, "member") for u in users[1:]]
            await _insert_members(conn, conv_id, roles, now, 0)
            event = {"event": "created", "title": title, "by": creator_id, "users": users}
            await _append_system(conn, conv_id, creator_id, event, now)
            return await _load_conversation(conn, conv_id)

        return await self._write(txn)

    async def add_members(
        self, actor_id: int, conv_id: int, user_ids: list[int], max_members: int
    ) -> Conversation:
        async def txn(conn: Conn) -> Conversation:
            last_seq = await _lock_conversation(conn, conv_id)
            await _require_group_admin(conn, conv_id, actor_id)
            current = set(await _member_ids(conn, conv_id))
            new = [u for u in dict.fromkeys(user_ids) if u not in current]
            if not new:
                return await _load_conversation(conn, conv_id)
            await _require_users(conn, new)
            if len(current) + len(new) > max_members:
                raise LimitExceeded(f"a group has at most {max_members} members")
            now = self._clock()
            # New members start at the current last seq: the "added" message is their first.
            # The conversation row is locked, so no send can slip in between.
            await _insert_members(conn, conv_id, [(u, "member") for u in new], now, last_seq)
            event = {"event": "added", "users": new, "by": actor_id}
            await _append_system(conn, conv_id, actor_id, event, now)
            return await _load_conversation(conn, conv_id)

        return await self._write(txn)

    async def remove_member(self, actor_id: int, conv_id: int, user_id: int) -> Conversation:
        async def txn(conn: Conn) -> Conversation:
            await _lock_conversation(conn, conv_id)
            if user_id == actor_id:
                await self._leave(conn, actor_id, conv_id)
                return await _load_conversation(conn, conv_id)
            await _require_group_admin(conn, conv_id, actor_id)
            if await _role(conn, conv_id, user_id) is None:
                raise NotFound(f"user {user_id} is not a member of conversation {conv_id}")
            await _lock_members(conn, conv_id, [user_id, actor_id])  # removed, then "by"
            await conn.execute(
                "DELETE FROM members WHERE conv_id = $1 AND user_id = $2", conv_id, user_id
            )
            event = {"event": "removed", "user": user_id, "by": actor_id}
            await _append_system(conn, conv_id, actor_id, event, self._clock())
            return await _load_conversation(conn, conv_id)

        return await self._write(txn)

    async def leave(self, user_id: int, conv_id: int) -> None:
        async def txn(conn: Conn) -> None:
            await _lock_conversation(conn, conv_id)
            await self._leave(conn, user_id, conv_id)

        await self._write(txn)

    async def _leave(self, conn: Conn, user_id: int, conv_id: int) -> None:
        """Leave a group; the caller holds the conversation's row lock."""
        role = await _role(conn, conv_id, user_id)
        if role is None:
            raise NotMember(f"not a member of conversation {conv_id}")
        if await _kind(conn, conv_id) != "group":
            # The pair's one direct conversation must keep both members to stay findable.
            raise Forbidden("cannot leave a direct conversation")
        # The rows this may write: the leaver's, and the heir's if it must be promoted.
        heir = await conn.fetchval(
            f"SELECT user_id FROM members WHERE conv_id = $1 AND user_id <> $2"
            f" ORDER BY {_MEMBER_ORDER} LIMIT 1",
            conv_id,
            user_id,
        )
        await _lock_members(conn, conv_id, [user_id] if heir is None else [user_id, int(heir)])
        await conn.execute(
            "DELETE FROM members WHERE conv_id = $1 AND user_id = $2", conv_id, user_id
        )
        event: dict[str, Any] = {"event": "left", "user": user_id}
        if role == "admin":
            heir = await _promote_if_no_admin(conn, conv_id)
            if heir is not None:
                event["admin"] = heir
        await _append_system(conn, conv_id, user_id, event, self._clock())

    async def rename(self, actor_id: int, conv_id: int, title: str) -> Conversation:
        async def txn(conn: Conn) -> Conversation:
            await _lock_conversation(conn, conv_id)
            if await _role(conn, conv_id, actor_id) is None:
                raise NotMember(f"not a member of conversation {conv_id}")
            if await _kind(conn, conv_id) != "group":
                raise Forbidden("only groups have a title")
            await conn.execute("UPDATE conversations SET title = $1 WHERE id = $2", title, conv_id)
            event = {"event": "renamed", "title": title, "by": actor_id}
            await _append_system(conn, conv_id, actor_id, event, self._clock())
            return await _load_conversation(conn, conv_id)

        return await self._write(txn)

    async def get_conversation(self, conv_id: int, user_id: int) -> Conversation:
        async def txn(conn: Conn) -> Conversation:
            await _require_member(conn, conv_id, user_id)
            return await _load_conversation(conn, conv_id)

        return await self._read(txn)

    async def member_ids(self, conv_id: int) -> list[int]:
        async with self._connection() as conn:
            return await _member_ids(conn, conv_id)

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
        async def txn(conn: Conn) -> list[Message]:
            await _require_member(conn, conv_id, user_id)
            if limit <= 0:
                return []
            upper = before if before is not None else 2**62
            if after is not None:  # the `limit` just above `after` (and below `before`)
                rows = await conn.fetch(
                    f"SELECT {_MSG_COLS} FROM messages"
                    " WHERE conv_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq LIMIT $4",
                    conv_id,
                    after,
                    upper,
                    limit,
                )
            else:  # the `limit` just below `before`, or the newest
                rows = await conn.fetch(
                    f"SELECT {_MSG_COLS} FROM messages"
                    " WHERE conv_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
                    conv_id,
                    upper,
                    limit,
                )
                rows.reverse()
            return [records.message(r) for r in rows]

        return await self._read(txn)

    async def contacts(self, user_id: int, max_group_size: int) -> list[int]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT other.user_id FROM members me"
                " JOIN conversations c ON c.id = me.conv_id"
                " JOIN members other ON other.conv_id = me.conv_id"
                " WHERE me.user_id = $1 AND other.user_id <> me.user_id AND (c.kind = 'direct'"
                "  OR (SELECT count(*) FROM members n WHERE n.conv_id = c.id) <= $2)"
                " ORDER BY other.user_id",
                user_id,
                max_group_size,
            )
        return [int(r[0]) for r in rows]

    async def shared_with(self, user_id: int, others: list[int]) -> list[int]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT other.user_id FROM members me"
                " JOIN members other ON other.conv_id = me.conv_id"
                " WHERE me.user_id = $1 AND other.user_id = ANY($2::bigint[])",
                user_id,
                others,
            )
        shared = {int(r[0]) for r in rows}
        return [u for u in dict.fromkeys(others) if u in shared]

    # -- sending (group commit) ----------------------------------------------------------

    def send_message(self, request: SendRequest, max_body: int) -> asyncio.Future[SendResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SendResult] = loop.create_future()
        self._send_queue.append(_PendingSend(request, max_body, future))
        if self._send_task is None or self._send_task.done():
            self._send_task = loop.create_task(self._send_loop())
        return future

    async def _send_loop(self) -> None:
        """Commit queued sends, many per transaction, until the queue is empty.

        While one batch is being committed, new sends pile up and become the next batch:
        the busier the store, the bigger the batches.
        """
        while self._send_queue:
            count = min(len(self._send_queue), MAX_SEND_BATCH)
            batch = [self._send_queue.popleft() for _ in range(count)]
            work = [(p.request, p.max_body) for p in batch]
            outcomes: Sequence[SendResult | BaseException]
            try:
                outcomes = await self._commit_sends(work)
            except Exception as exc:  # whole batch failed; never leave a caller hanging
                outcomes = [exc] * len(batch)
            except asyncio.CancelledError:
                for pending in [*batch, *self._send_queue]:
                    pending.future.cancel()
                self._send_queue.clear()
                raise
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():  # the caller was cancelled
                    continue
                if isinstance(outcome, StoreError):
                    # A fresh instance per caller: a shared one would share its traceback.
                    pending.future.set_exception(type(outcome)(*outcome.args))
                elif isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)

    async def _commit_sends(
        self, work: list[tuple[SendRequest, int]]
    ) -> list[SendResult | StoreError]:
        try:
            return await self._send_batch(work)
        except asyncpg.UniqueViolationError:
            # Another instance stored one of these keys meanwhile (a device reusing a
            # client_id in two conversations at once: the conversation locks do not order
            # those). Sent again, alone, each finds its original and repeats its result.
            pass
        except asyncpg.PostgresError as exc:
            if len(work) == 1:
                return [_map_error(exc)]
        # Checks before writing make a failure unexpected; still, one bad request must not
        # fail the others.
        outcomes: list[SendResult | StoreError] = []
        for item in work:
            try:
                outcomes += await self._send_batch([item])
            except asyncpg.PostgresError as exc:
                outcomes.append(_map_error(exc))
        return outcomes

    async def _send_batch(
        self, work: list[tuple[SendRequest, int]]
    ) -> list[SendResult | StoreError]:
        """Validate and write a batch of sends in one call of the ``pigeon_send`` function
        (0005 migration): one round trip and one short transaction, whose conversation row
        locks last only while the function runs. A failing request yields its error, writes
        nothing, and does not affect the others."""
        now = self._clock()
        refusals = [refused_send(req.body, req.client_id, max_body) for req, max_body in work]
        requests = [req for (req, _), no in zip(work, refusals, strict=True) if no is None]
        rows: list[Row] = []
        if requests:
            rows = await self._statement(
                "SELECT * FROM pigeon_send($1::bigint[], $2::bigint[], $3::bigint[],"
                " $4::text[], $5::text[], $6::text[], $7::float8)",
                [r.conv_id for r in requests],
                [r.sender_id for r in requests],
                [r.sender_device for r in requests],
                [r.client_id for r in requests],
                [r.kind for r in requests],
                [r.body for r in requests],
                float(now),
            )
        answers = iter(rows)
        outcomes: list[SendResult | StoreError] = []
        for (req, _), refused in zip(work, refusals, strict=True):
            if refused is not None:
                outcomes.append(refused)
                continue
            code, conv_id, seq, ts = next(answers)
            if code == _SEND_NOT_MEMBER:
                outcomes.append(NotMember(f"not a member of conversation {req.conv_id}"))
            else:
                # A duplicate returns the original result, even if membership changed since.
                duplicate = code == _SEND_DUPLICATE
                outcomes.append(
                    SendResult(int(conv_id), int(seq), float(ts), req.client_id, duplicate)
                )
        return outcomes

    # -- fan-out -------------------------------------------------------------------------

    async def fanout(self, worker_id: str, max_messages: int, lease_s: float) -> FanoutBatch:
        return await self._write(lambda conn: self._fanout(conn, worker_id, max_messages, lease_s))

    async def _fanout(
        self, conn: Conn, worker_id: str, max_messages: int, lease_s: float
    ) -> FanoutBatch:
        now = self._clock()
        convs = await self._claim(conn, worker_id, now, max(max_messages, 0) + 1)
        inbox = _InboxAppender()
        batch = FanoutBatch()
        leases: list[tuple[int, str, float]] = []
        budget = max_messages
        batch.nudge_users = await _take_unpushed(conn, worker_id, now)
        for conv_id in convs:
            if budget <= 0:
                batch.more = True  # conversations not served in this call
                break
            done = await _fanout_conversation(conn, inbox, conv_id, budget, now)
            budget -= done.messages
            self._fanout_after = conv_id
            # Held (and marked unpushed) until `fanout_pushed`, even when no job is left.
            leases.append((conv_id, worker_id, now + lease_s))
            batch.convs.append(conv_id)
            batch.more = batch.more or done.remaining
        # `more` stays False when the only work left is leased to other workers: their
        # holders will do it, and calling again at once would only spin.
        await conn.execute(
            "UPDATE fanout_leases l SET owner = n.owner, expires_at = n.expires_at,"
            " unpushed = true"
            " FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS n(conv_id, owner, expires_at)"
            " WHERE l.conv_id = n.conv_id",
            *_columns(leases, 3),
        )
        batch.entries = await inbox.flush(conn)
        return batch

    async def fanout_pushed(self, worker_id: str, conv_ids: list[int]) -> None:
        if not conv_ids:
            return
        await self._write(
            lambda conn: conn.execute(
                "UPDATE fanout_leases SET owner = '', expires_at = 0, unpushed = false"
                " WHERE conv_id = ANY($2::bigint[]) AND owner = $1",
                worker_id,
                sorted(conv_ids),
            )
        )

    async def _claim(self, conn: Conn, worker_id: str, now: float, limit: int) -> list[int]:
        """Lock the lease rows of up to ``limit`` conversations with pending jobs that this
        worker may serve: its own unexpired leases, then free or expired ones.

        The row locks last until commit, so verifying, writing and extending a lease are one
        atomic step (fencing). Free rows another worker has locked are skipped, not waited
        for. Its own leases are waited for instead: another worker's claim can hold one for
        a moment (PostgreSQL keeps the lock of a row that failed the recheck after a
        concurrent update), and skipping it would strand the conversation until expiry.
        Round robin: conversations after the one served last come first, so one long
        backlog does not starve the others.
        """
        pending = "l.conv_id IN (SELECT DISTINCT conv_id FROM fanout_jobs)"
        order = "ORDER BY l.conv_id <= $3, l.conv_id LIMIT $4"
        own = await conn.fetch(
            f"SELECT l.conv_id FROM fanout_leases l WHERE {pending}"
            f" AND l.owner = $1 AND l.expires_at > $2 {order} FOR UPDATE",
            worker_id,
            now,
            self._fanout_after,
            limit,
        )
        free = await conn.fetch(
            f"SELECT l.conv_id FROM fanout_leases l WHERE {pending}"
            # ($1 <> '': an empty worker id would look like a free lease.)
            f" AND (l.owner = '' OR l.expires_at <= $2) AND $1 <> '' {order}"
            " FOR UPDATE SKIP LOCKED",
            worker_id,
            now,
            self._fanout_after,
            limit,
        )
        convs = {int(r[0]) for r in [*own, *free]}
        after = self._fanout_after
        return sorted(convs, key=lambda c: (c <= after, c))[:limit]

    # -- inbox and receipts --------------------------------------------------------------

    async def inbox_after(self, user_id: int, after: int, limit: int) -> list[InboxEntry]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT i.user_id, i.inbox_seq, i.conv_id, i.ts, i.receipt,"
                f" {_M_MSG_COLS} FROM inbox i"
                " LEFT JOIN messages m ON m.conv_id = i.conv_id AND m.seq = i.msg_seq"
                " WHERE i.user_id = $1 AND i.inbox_seq > $2 ORDER BY i.inbox_seq LIMIT $3",
                user_id,
                after,
                max(limit, 0),
            )
        return [records.inbox_entry(r) for r in rows]

    async def inbox_bounds(self, user_id: int) -> InboxBounds:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT inbox_floor, inbox_head FROM users WHERE id = $1", user_id
            )
        if row is None:
            raise NotFound(f"no user {user_id}")
        return InboxBounds(floor=int(row[0]), head=int(row[1]))

    async def ack(self, device_id: int, up_to: int) -> list[InboxEntry]:
        return only(await self.ack_many([(device_id, up_to)]))

    async def ack_many(
        self, acks: Sequence[tuple[int, int]]
    ) -> list[list[InboxEntry] | StoreError]:
        """Queued and applied in bulk with the other acks queued meanwhile (`_ack_loop`)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[list[InboxEntry]]] = []
        for device_id, up_to in acks:
            future: asyncio.Future[list[InboxEntry]] = loop.create_future()
            futures.append(future)
            if not 0 < device_id <= _MAX_BIGINT:  # could not be passed in the batch's array
                future.set_exception(NotFound(f"no device {device_id}"))
                continue
            up_to = max(0, min(up_to, _MAX_BIGINT))  # the same answer: no head is beyond this
            self._ack_queue.append(_PendingAck(device_id, up_to, future))
        if self._ack_queue and (self._ack_task is None or self._ack_task.done()):
            self._ack_task = loop.create_task(self._ack_loop())
        return await settled(futures)

    async def _ack_loop(self) -> None:
        """Apply queued acks, many per call, until the queue is empty.

        A batch is one call of the ``pigeon_ack`` function (0004 migration): one round trip
        and one short transaction, whose row locks last only while the function runs. While
        it runs, new acks pile up and become the next batch. A revoked or unknown device
        fails its own ack only. The receipt entries of the batch go to the first waiting
        caller whose cursor moved (it pushes them); the others get an empty list.
        """
        while self._ack_queue:
            count = min(len(self._ack_queue), MAX_ACK_BATCH)
            batch = [self._ack_queue.popleft() for _ in range(count)]
            try:
                moved, entries = await self._apply_acks(batch)
            except Exception as exc:  # whole batch failed; never leave a caller hanging
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(_fresh(exc))
                continue
            except asyncio.CancelledError:
                for pending in [*batch, *self._ack_queue]:
                    pending.future.cancel()
                self._ack_queue.clear()
                raise
            waiting = [p for p in batch if not p.future.done() and p.device_id in moved]
            takers = [p for p in waiting if moved[p.device_id]] or waiting
            taker = takers[0] if takers else None
            for pending in batch:
                if pending.future.done():  # the caller was cancelled
                    continue
                if pending.device_id not in moved:
                    pending.future.set_exception(NotFound(f"no device {pending.device_id}"))
                else:
                    pending.future.set_result(entries if pending is taker else [])

    async def _apply_acks(
        self, batch: Sequence[_PendingAck]
    ) -> tuple[dict[int, bool], list[InboxEntry]]:
        """Apply a batch of acks; return whether each device found moved its cursor, and
        the receipt entries written."""
        now = self._clock()
        rows = await self._call(
            "SELECT * FROM pigeon_ack($1::bigint[], $2::bigint[], $3::integer, $4::float8,"
            " $5::text)",
            [p.device_id for p in batch],
            [p.up_to for p in batch],
            self._detail_max,
            float(now),
            json.dumps(now),  # stored receipts read back exactly as written by Python
        )
        moved: dict[int, bool] = {}
        entries: list[InboxEntry] = []
        for row in rows:
            if row[0] is not None:
                moved[int(row[0])] = bool(row[1])
                continue
            user_id, inbox_seq, conv_id, member, delivered, read, all_delivered, all_read = row[2:]
            state = ReceiptState(
                int(conv_id),
                int(member),
                int(delivered),
                int(read),
                int(all_delivered),
                int(all_read),
                now,
            )
            entries.append(
                InboxEntry(int(user_id), int(inbox_seq), int(conv_id), now, receipt=state)
            )
        return moved, entries

    async def mark_read(self, user_id: int, conv_id: int, up_to_seq: int) -> list[InboxEntry]:
        async def txn(conn: Conn) -> list[InboxEntry]:
            await _require_member(conn, conv_id, user_id)
            last = await _last_seq(conn, conv_id)
            if not 0 <= up_to_seq <= last:
                raise BadPosition(f"seq {up_to_seq} is beyond the last message ({last})")
            inbox = _InboxAppender()
            # Read implies delivered: both move.
            await _advance(
                conn, inbox, conv_id, user_id, up_to_seq, up_to_seq, self._clock(), self._detail_max
            )
            return await inbox.flush(conn)

        return await self._write(txn)

    async def receipts(self, conv_id: int, user_id: int) -> list[Member]:
        async def txn(conn: Conn) -> list[Member]:
            await _require_member(conn, conv_id, user_id)
            return await _members(conn, conv_id)

        return await self._read(txn)

    async def prune_inbox(self, older_than: float) -> int:
        async def txn(conn: Conn) -> int:
            # Prune a prefix per user (up to its newest old entry), so that the remaining
            # inbox stays gapless above the floor even if the clock ever stepped back.
            deleted = await conn.fetchval(
                "WITH floors AS (SELECT user_id, max(inbox_seq) AS floor FROM inbox"
                "  WHERE ts < $1 GROUP BY user_id),"
                # Users' rows locked in id order, as fan-out and acks lock them.
                " locked AS (SELECT u.id FROM users u JOIN floors f ON f.user_id = u.id"
                "  ORDER BY u.id FOR NO KEY UPDATE OF u),"
                " raised AS (UPDATE users u SET inbox_floor = greatest(u.inbox_floor, f.floor)"
                "  FROM floors f JOIN locked l ON l.id = f.user_id WHERE u.id = f.user_id),"
                " gone AS (DELETE FROM inbox i USING floors f"
                "  WHERE i.user_id = f.user_id AND i.inbox_seq <= f.floor RETURNING 1)"
                " SELECT count(*) FROM gone",
                older_than,
            )
            return int(deleted)

        return await self._write(txn)


# -- helpers: plain functions over a connection, inside the caller's transaction -----------


@dataclasses.dataclass(slots=True)
class _PendingSend:
    request: SendRequest
    max_body: int
    future: asyncio.Future[SendResult]


async def _keep_session(conn: Conn) -> None:
    """Pool release hook, instead of asyncpg's default reset query (``RESET ALL``,
    ``UNLISTEN *``, ``CLOSE ALL``, unlocking session advisory locks): a round trip on every
    call, for session state this store never leaves behind (it sets nothing, listens to
    nothing, keeps no cursors, and `_migrate` releases its own lock). asyncpg still rolls
    back a transaction left open before calling this."""


@dataclasses.dataclass(slots=True)
class _PendingAck:
    device_id: int
    up_to: int
    future: asyncio.Future[list[InboxEntry]]


def _fresh(exc: Exception) -> Exception:
    """A fresh instance per caller of a shared failure: one would share its traceback."""
    return type(exc)(*exc.args) if isinstance(exc, StoreError) else exc


@dataclasses.dataclass(slots=True)
class _ConversationFanout:
    messages: int  # how many messages were fanned out
    remaining: bool  # jobs left in the conversation


class _InboxAppender:
    """Collects inbox entries within one transaction and writes them in bulk at the end.

    Positions are allocated at ``flush``: the users' rows are locked in id order (so two
    transactions appending to overlapping users cannot deadlock), each head moves once by
    its user's count, and the entries take the positions in the order they were appended.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, int, float, Message | None, ReceiptState | None]] = []

    def append(
        self,
        user_id: int,
        conv_id: int,
        ts: float,
        message: Message | None = None,
        receipt: ReceiptState | None = None,
    ) -> None:
        self._pending.append((user_id, conv_id, ts, message, receipt))

    async def flush(self, conn: Conn) -> list[InboxEntry]:
        """Write what was appended; return the entries in the order they were appended."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        counts: dict[int, int] = {}
        for user_id, *_ in pending:
            counts[user_id] = counts.get(user_id, 0) + 1
        users = sorted(counts)
        await conn.execute(
            "SELECT 1 FROM users WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE",
            users,
        )
        rows = await conn.fetch(
            "UPDATE users u SET inbox_head = u.inbox_head + n.count"
            " FROM unnest($1::bigint[], $2::bigint[]) AS n(id, count) WHERE u.id = n.id"
            " RETURNING u.id, u.inbox_head",
            users,
            [counts[u] for u in users],
        )
        # The first new position of each user is just above its old head.
        position = {int(r[0]): int(r[1]) - counts[int(r[0])] for r in rows}
        entries: list[InboxEntry] = []
        for user_id, conv_id, ts, message, receipt in pending:
            position[user_id] += 1
            entry = InboxEntry(
                user_id, position[user_id], conv_id, ts, message=message, receipt=receipt
            )
            entries.append(entry)
        await _insert_inbox(conn, entries)
        return entries


async def _insert_inbox(conn: Conn, entries: list[InboxEntry]) -> None:
    rows = [
        (
            e.user_id,
            e.inbox_seq,
            e.conv_id,
            e.message.seq if e.message is not None else None,
            records.receipt_json(e.receipt) if e.receipt is not None else None,
            e.ts,
        )
        for e in entries
    ]
    columns = ["user_id", "inbox_seq", "conv_id", "msg_seq", "receipt", "ts"]
    if len(rows) >= COPY_THRESHOLD:  # COPY wins for big fan-outs (3b), costs more for few
        await conn.copy_records_to_table("inbox", records=rows, columns=columns)
        return
    await conn.execute(
        f"INSERT INTO inbox ({', '.join(columns)}) SELECT * FROM unnest($1::bigint[],"
        " $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::float8[])",
        *_columns(rows, len(columns)),
    )


async def _take_unpushed(conn: Conn, worker_id: str, now: float) -> list[int]:
    """Leases whose worker committed entries but never confirmed the push (it died):
    release them and return the members to nudge."""
    rows = await conn.fetch(
        "SELECT conv_id FROM fanout_leases WHERE unpushed AND expires_at <= $1"
        " AND owner <> $2 ORDER BY conv_id FOR UPDATE SKIP LOCKED",
        now,
        worker_id,
    )
    if not rows:
        return []
    conv_ids = [int(r[0]) for r in rows]
    await conn.execute(
        "UPDATE fanout_leases SET owner = '', expires_at = 0, unpushed = false"
        " WHERE conv_id = ANY($1::bigint[])",
        conv_ids,
    )
    members = await conn.fetch(
        "SELECT DISTINCT user_id FROM members WHERE conv_id = ANY($1::bigint[])", conv_ids
    )
    return sorted(int(r[0]) for r in members)


async def _fanout_conversation(
    conn: Conn, inbox: _InboxAppender, conv_id: int, budget: int, now: float
) -> _ConversationFanout:
    """Fan out up to ``budget`` pending messages of one conversation, in seq order.

    Each message goes to the users who were members when it was sent: current members
    who joined before it, plus those who left (or were removed) after it but before this
    fan-out ran, including the departure message itself. (Members are read before the
    departures, so a change committed in between shows up in the departures.)
    """
    rows = await conn.fetch(
        f"SELECT {_M_MSG_COLS} FROM fanout_jobs j"
        " JOIN messages m ON m.conv_id = j.conv_id AND m.seq = j.seq"
        " WHERE j.conv_id = $1 ORDER BY j.seq LIMIT $2",
        conv_id,
        budget,
    )
    members = await conn.fetch(
        "SELECT user_id, joined_seq FROM members WHERE conv_id = $1 ORDER BY user_id", conv_id
    )
    departed = await _pending_departures(conn, conv_id)
    last = 0
    for row in rows:
        message = records.message(row)
        last = message.seq
        targets = [int(u) for u, joined_seq in members if joined_seq < message.seq]
        for user, after, until in departed:
            if after < message.seq <= until and user not in targets:
                targets.append(user)
        for user in targets:
            inbox.append(user, conv_id, now, message=message)
    remaining = await conn.fetchval(
        "WITH gone AS (DELETE FROM fanout_jobs WHERE conv_id = $1 AND seq <= $2)"
        " SELECT EXISTS (SELECT 1 FROM fanout_jobs WHERE conv_id = $1 AND seq > $2)",
        conv_id,
        last,
    )
    return _ConversationFanout(len(rows), bool(remaining))


async def _pending_departures(conn: Conn, conv_id: int) -> list[tuple[int, int, int]]:
    """``(user, after, until)``: a user no longer in the members table was a member for
    the messages ``after < seq <= until``, according to the system messages not yet fanned
    out (a membership change is committed with its system message, so these are exactly
    the changes fan-out has not caught up with)."""
    events = await conn.fetch(
        "SELECT m.seq, m.body FROM fanout_jobs j"
        " JOIN messages m ON m.conv_id = j.conv_id AND m.seq = j.seq"
        " WHERE j.conv_id = $1 AND m.kind = 'system' ORDER BY j.seq",
        conv_id,
    )
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


async def _advance(
    conn: Conn,
    inbox: _InboxAppender,
    conv_id: int,
    user_id: int,
    delivered_to: int,
    read_to: int,
    now: float,
    detail_max_group: int,
) -> None:
    """Move a member's receipt positions forward (never back) and tell the senders of the
    messages in the moved ranges: each sender once, with the member's new positions and
    the aggregate; in a group over ``detail_max_group`` members, only when the aggregate
    moves (`pigeon.store.receipts`)."""
    detailed = await _member_count_at_most(conn, conv_id, detail_max_group)
    if not detailed:
        # As in pigeon_ack: the aggregate's before and after are read under this lock, so
        # two concurrent transactions cannot both miss its move. Taken before the row lock.
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", AGGREGATE_LOCK_CLASS, conv_id % 2**31
        )
    row = await conn.fetchrow(
        "SELECT delivered_seq, read_seq FROM members WHERE conv_id = $1 AND user_id = $2"
        " FOR NO KEY UPDATE",
        conv_id,
        user_id,
    )
    if row is None:  # left the conversation since: nothing to record
        return
    old = (int(row[0]), int(row[1]))
    new = receipts.advance(old, delivered_to, read_to)
    if new is None:
        return
    before = None if detailed else await _aggregate(conn, conv_id)
    await conn.execute(
        "UPDATE members SET delivered_seq = $1, read_seq = $2 WHERE conv_id = $3 AND user_id = $4",
        *new,
        conv_id,
        user_id,
    )
    if detailed:
        senders = await _senders(conn, conv_id, user_id, receipts.moved_ranges(old, new))
        if not senders:
            return
        state = ReceiptState(conv_id, user_id, *new, *await _aggregate(conn, conv_id), now)
    else:
        assert before is not None
        if not receipts.could_move_aggregate(old, before):
            return
        after = await _aggregate(conn, conv_id)
        senders = await _senders(conn, conv_id, user_id, receipts.moved_ranges(before, after))
        state = ReceiptState(conv_id, receipts.AGGREGATE_USER, *after, *after, now)
    for sender in senders:
        inbox.append(sender, conv_id, now, receipt=state)


async def _member_count_at_most(conn: Conn, conv_id: int, limit: int) -> bool:
    # Counts at most limit + 1 rows: cheap whatever the group's size.
    count = await conn.fetchval(
        "SELECT count(*) FROM (SELECT 1 FROM members WHERE conv_id = $1 LIMIT $2) m",
        conv_id,
        limit + 1,
    )
    return int(count) <= limit


async def _aggregate(conn: Conn, conv_id: int) -> tuple[int, int]:
    """(min delivered, min read) over the members: index lookups (0003 migration)."""
    row = await conn.fetchrow(
        "SELECT (SELECT min(delivered_seq) FROM members WHERE conv_id = $1),"
        " (SELECT min(read_seq) FROM members WHERE conv_id = $1)",
        conv_id,
    )
    return int(row[0] or 0), int(row[1] or 0)


async def _senders(
    conn: Conn, conv_id: int, except_user: int, ranges: list[tuple[int, int]]
) -> list[int]:
    """Current members other than ``except_user`` who sent a user message in the ranges."""
    found: set[int] = set()
    for after, up_to in ranges:
        rows = await conn.fetch(
            "SELECT DISTINCT m.sender_id FROM messages m"
            " WHERE m.conv_id = $1 AND m.seq > $2 AND m.seq <= $3 AND m.sender_id <> $4"
            " AND m.kind <> 'system' AND EXISTS (SELECT 1 FROM members mm"
            " WHERE mm.conv_id = m.conv_id AND mm.user_id = m.sender_id)",
            conv_id,
            after,
            up_to,
            except_user,
        )
        found.update(int(r[0]) for r in rows)
    return sorted(found)


async def _lock_conversation(conn: Conn, conv_id: int) -> int:
    """Lock one conversation row (serialising its seq allocation); return its last seq."""
    last = await conn.fetchval(
        "SELECT last_seq FROM conversations WHERE id = $1 FOR UPDATE", conv_id
    )
    if last is None:
        raise NotMember(f"no conversation {conv_id}")
    return int(last)


async def _lock_members(conn: Conn, conv_id: int, user_ids: Sequence[int]) -> None:
    """Lock member rows a group change will write, in user order (the order acks and sends
    lock members in), so that it cannot deadlock with them."""
    await conn.execute(
        "SELECT 1 FROM members WHERE conv_id = $1 AND user_id = ANY($2::bigint[])"
        " ORDER BY user_id FOR NO KEY UPDATE",
        conv_id,
        sorted(set(user_ids)),
    )


async def _store_messages(conn: Conn, messages: list[Message]) -> None:
    """Insert messages with their fan-out jobs; move each sender's own positions past them.

    The caller has already allocated the seqs and updated ``conversations.last_seq``.
    """
    if not messages:
        return
    await conn.execute(
        f"WITH added AS (INSERT INTO messages ({_MSG_COLS})"
        "  SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],"
        "  $5::text[], $6::text[], $7::text[], $8::float8[]) RETURNING conv_id, seq)"
        " INSERT INTO fanout_jobs (conv_id, seq) SELECT conv_id, seq FROM added",
        [m.conv_id for m in messages],
        [m.seq for m in messages],
        [m.sender_id for m in messages],
        [m.sender_device for m in messages],
        [m.client_id for m in messages],
        [m.kind for m in messages],
        [m.body for m in messages],
        [m.ts for m in messages],
    )
    # One update per (conversation, sender): messages are in seq order, so the last wins.
    # The rows are locked in (conv_id, user_id) order first, as acks lock them (pigeon_ack):
    # a batch of sends and a batch of acks touching the same members cannot deadlock.
    own = {(m.conv_id, m.sender_id): m.seq for m in messages}
    await conn.execute(
        "UPDATE members m SET delivered_seq = greatest(m.delivered_seq, o.seq),"
        " read_seq = greatest(m.read_seq, o.seq)"
        " FROM (SELECT l.conv_id, l.user_id, n.seq FROM members l"
        "  JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS n(conv_id, user_id, seq)"
        "  ON l.conv_id = n.conv_id AND l.user_id = n.user_id"
        "  ORDER BY l.conv_id, l.user_id FOR NO KEY UPDATE OF l) o"
        " WHERE m.conv_id = o.conv_id AND m.user_id = o.user_id",
        *_columns([(conv, user, seq) for (conv, user), seq in own.items()], 3),
    )


async def _append_system(
    conn: Conn, conv_id: int, actor_id: int, event: dict[str, Any], now: float
) -> Message:
    """Record a group change as a system message, through the same path as user messages."""
    seq = await conn.fetchval(
        "UPDATE conversations SET last_seq = last_seq + 1, last_activity = $1"
        " WHERE id = $2 RETURNING last_seq",
        now,
        conv_id,
    )
    body = json.dumps(event, separators=(",", ":"))
    message = Message(conv_id, int(seq), actor_id, 0, "", "system", body, now)
    await _store_messages(conn, [message])
    return message


async def _insert_lease(conn: Conn, conv_id: int) -> None:
    await conn.execute("INSERT INTO fanout_leases (conv_id) VALUES ($1)", conv_id)


async def _insert_members(
    conn: Conn, conv_id: int, roles: Iterable[tuple[int, Role]], now: float, last_seq: int
) -> None:
    users, kinds = _columns(list(roles), 2)
    # WITH ORDINALITY + ORDER BY: joined_order follows the given order (creator first).
    await conn.execute(
        "INSERT INTO members (conv_id, user_id, role, joined_at, joined_seq, delivered_seq,"
        " read_seq) SELECT $1, r.user_id, r.role, $4, $5, $5, $5"
        " FROM unnest($2::bigint[], $3::text[]) WITH ORDINALITY AS r(user_id, role, n)"
        " ORDER BY r.n",
        conv_id,
        users,
        kinds,
        now,
        last_seq,
    )


async def _promote_if_no_admin(conn: Conn, conv_id: int) -> int | None:
    """If no admin is left, make the longest-standing member admin; return who."""
    has_admin = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM members WHERE conv_id = $1 AND role = 'admin')", conv_id
    )
    if has_admin:
        return None
    heir = await conn.fetchval(
        f"SELECT user_id FROM members WHERE conv_id = $1 ORDER BY {_MEMBER_ORDER} LIMIT 1",
        conv_id,
    )
    if heir is None:
        return None
    await conn.execute(
        "UPDATE members SET role = 'admin' WHERE conv_id = $1 AND user_id = $2", conv_id, heir
    )
    return int(heir)


async def _require_users(conn: Conn, user_ids: Sequence[int]) -> None:
    unique = sorted(set(user_ids))
    found = await conn.fetchval("SELECT count(*) FROM users WHERE id = ANY($1::bigint[])", unique)
    if found != len(unique):
        raise NotFound("unknown user")


async def _require_member(conn: Conn, conv_id: int, user_id: int) -> Role:
    role = await _role(conn, conv_id, user_id)
    if role is None:
        raise NotMember(f"not a member of conversation {conv_id}")
    return role


async def _require_group_admin(conn: Conn, conv_id: int, user_id: int) -> None:
    role = await _require_member(conn, conv_id, user_id)
    if await _kind(conn, conv_id) != "group":
        raise Forbidden("a direct conversation has fixed members")
    if role != "admin":
        raise Forbidden("only an admin can do this")


async def _role(conn: Conn, conv_id: int, user_id: int) -> Role | None:
    role = await conn.fetchval(
        "SELECT role FROM members WHERE conv_id = $1 AND user_id = $2", conv_id, user_id
    )
    return None if role is None else cast(Role, role)


async def _kind(conn: Conn, conv_id: int) -> str:
    kind = await conn.fetchval("SELECT kind FROM conversations WHERE id = $1", conv_id)
    return "" if kind is None else str(kind)


async def _last_seq(conn: Conn, conv_id: int) -> int:
    last = await conn.fetchval("SELECT last_seq FROM conversations WHERE id = $1", conv_id)
    if last is None:
        raise NotMember(f"no conversation {conv_id}")
    return int(last)


async def _inbox_head(conn: Conn, user_id: int) -> int:
    head = await conn.fetchval("SELECT inbox_head FROM users WHERE id = $1", user_id)
    if head is None:
        raise NotFound(f"no user {user_id}")
    return int(head)


async def _member_ids(conn: Conn, conv_id: int) -> list[int]:
    rows = await conn.fetch(
        f"SELECT user_id FROM members WHERE conv_id = $1 ORDER BY {_MEMBER_ORDER}", conv_id
    )
    return [int(r[0]) for r in rows]


async def _members(conn: Conn, conv_id: int) -> list[Member]:
    rows = await conn.fetch(
        f"SELECT {_MEMBER_COLS} FROM members WHERE conv_id = $1 ORDER BY {_MEMBER_ORDER}",
        conv_id,
    )
    return [records.member(r) for r in rows]


async def _load_conversation(conn: Conn, conv_id: int) -> Conversation:
    row = await conn.fetchrow(f"SELECT {_CONV_COLS} FROM conversations WHERE id = $1", conv_id)
    if row is None:
        raise NotMember(f"no conversation {conv_id}")
    return records.conversation(row, tuple(await _members(conn, conv_id)))


async def _list_conversations(conn: Conn, user_id: int) -> list[ConversationSummary]:
    convs = await conn.fetch(
        f"SELECT {', '.join('c.' + c for c in _CONV_COLS.split(', '))},"
        " (SELECT count(*) FROM messages u"
        "  WHERE u.conv_id = c.id AND u.seq > me.read_seq AND u.sender_id <> me.user_id),"
        f" {_M_MSG_COLS}"
        " FROM members me JOIN conversations c ON c.id = me.conv_id"
        " LEFT JOIN messages m ON m.conv_id = c.id AND m.seq = c.last_seq"
        " WHERE me.user_id = $1 ORDER BY c.last_activity DESC, c.id DESC",
        user_id,
    )
    members: dict[int, list[Member]] = {}
    for row in await conn.fetch(
        f"SELECT conv_id, {_MEMBER_COLS} FROM members"
        " WHERE conv_id IN (SELECT conv_id FROM members WHERE user_id = $1)"
        f" ORDER BY conv_id, {_MEMBER_ORDER}",
        user_id,
    ):
        members.setdefault(int(row[0]), []).append(records.member(row[1:]))
    summaries = []
    for row in convs:
        conv = records.conversation(row[:5], tuple(members.get(int(row[0]), ())))
        last = None if row[6] is None else records.message(row[6:])
        summaries.append(ConversationSummary(conv, last, int(row[5])))
    return summaries


# -- rows to records -------------------------------------------------------------------------


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows to columns, for ``unnest($1::type[], $2::type[], ...)``."""
    return [[row[i] for row in rows] for i in range(width)]


def _rowcount(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


def _map_error(exc: BaseException) -> StoreError:
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return Conflict(str(exc))
    # Connection trouble, timeouts, contention...: the same call may succeed later.
    return Unavailable(str(exc))


# -- migrations ------------------------------------------------------------------------------


async def _migrate(conn: Conn, clock: Clock) -> None:
    """Apply each migration above the current schema version, each in its own transaction.

    Under a session advisory lock: processes starting at once take turns, and each sees
    the versions the previous one applied (CREATE TABLE IF NOT EXISTS alone can race).
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at double precision NOT NULL)"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        for number, name, script in records.packaged_migrations(MIGRATIONS_PACKAGE):
            if number <= current:
                continue
            async with conn.transaction():
                await conn.execute(script)  # no arguments: may hold several statements
                await conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)",
                    number,
                    name,
                    clock(),
                )
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
