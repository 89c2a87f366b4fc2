"""`PostgresStore`: the pool, transactions and retries, users and devices, conversations,
and every method of `pigeon.store.base.Store`, delegating sends and fan-out (`sending`), acks
and read marks (`acks`) and group changes (`groups`) to the modules of this package."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import asyncpg

from pigeon.store import receipts, records
from pigeon.store.errors import Conflict, NotFound, StoreError, Unavailable, only, settled
from pigeon.store.models import (
    Conversation,
    ConversationSummary,
    Device,
    FanoutBatch,
    InboxBounds,
    InboxEntry,
    Member,
    Message,
    SendRequest,
    SendResult,
    User,
)
from pigeon.store.postgres import acks, groups, sending
from pigeon.store.postgres.acks import MAX_BIGINT, PendingAck, ack_loop
from pigeon.store.postgres.queries import (
    DEVICE_COLS,
    M_MSG_COLS,
    MSG_COLS,
    USER_COLS,
    inbox_head,
    insert_members,
    list_conversations,
    load_conversation,
    member_ids,
    members,
    require_member,
    require_users,
    rowcount,
)
from pigeon.store.postgres.schema import (
    RETRY_ERRORS,
    UNAVAILABLE_ERRORS,
    Clock,
    Conn,
    Row,
    map_error,
    migrate,
)
from pigeon.store.postgres.sending import FanoutPosition, PendingSend, insert_lease, send_loop

T = TypeVar("T")
Txn = Callable[[Conn], Awaitable[T]]

#: How long a call waits for a free pooled connection before answering Unavailable.
ACQUIRE_TIMEOUT_S = 10.0
#: How long one statement may run before the call answers Unavailable.
COMMAND_TIMEOUT_S = 30.0
#: Attempts for a transaction that hit a deadlock or serialisation failure.
TXN_ATTEMPTS = 5


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
        self._send_queue: deque[PendingSend] = deque()
        self._send_task: asyncio.Task[None] | None = None
        self._ack_queue: deque[PendingAck] = deque()
        self._ack_task: asyncio.Task[None] | None = None
        # Round-robin position of fanout over conversations, per instance.
        self._fanout_position = FanoutPosition()

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
        except UNAVAILABLE_ERRORS as exc:
            raise Unavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                await migrate(conn, self._clock)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, UNAVAILABLE_ERRORS):
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
        except UNAVAILABLE_ERRORS as exc:
            raise Unavailable(f"PostgreSQL unavailable: {exc}") from exc

    async def _write(self, fn: Txn[T]) -> T:
        """Run ``fn`` in one read-committed transaction; database errors become StoreErrors."""
        try:
            return await self._transaction(fn)
        except asyncpg.PostgresError as exc:
            raise map_error(exc) from exc

    async def _call(self, query: str, *args: Any) -> list[Row]:
        """One statement in its own implicit transaction (no BEGIN and COMMIT round trips),
        retried on deadlock; database errors become StoreErrors."""
        try:
            return await self._statement(query, *args)
        except asyncpg.PostgresError as exc:
            raise map_error(exc) from exc

    async def _statement(self, query: str, *args: Any) -> list[Row]:
        """One statement in its own implicit transaction, retried on deadlock; other
        database errors are raised as they are."""
        for attempt in range(TXN_ATTEMPTS):
            try:
                async with self._connection() as conn:
                    return cast(list[Row], await conn.fetch(query, *args))
            except RETRY_ERRORS:
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
            except RETRY_ERRORS:
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
                    f" VALUES ($1, $2, $3, $4) RETURNING {USER_COLS}",
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
            row = await conn.fetchrow(f"SELECT {USER_COLS} FROM users WHERE id = $1", user_id)
        return records.maybe(records.user, row)

    async def find_user(self, username: str) -> User | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {USER_COLS} FROM users WHERE lower(username) = lower($1)", username
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
            if rowcount(status) == 0:
                raise NotFound(f"no user {user_id}")

        await self._write(txn)

    async def list_users(self) -> list[User]:
        async with self._connection() as conn:
            rows = await conn.fetch(f"SELECT {USER_COLS} FROM users ORDER BY id")
        return [records.user(r) for r in rows]

    async def create_device(self, user_id: int, name: str, token_hash: str) -> Device:
        async def txn(conn: Conn) -> Device:
            head = await inbox_head(conn, user_id)
            try:
                row = await conn.fetchrow(
                    "INSERT INTO devices (user_id, name, token_hash, created_at, cursor)"
                    f" VALUES ($1, $2, $3, $4, $5) RETURNING {DEVICE_COLS}",
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
                f"SELECT {DEVICE_COLS} FROM devices WHERE token_hash = $1 AND revoked_at IS NULL",
                token_hash,
            )
        return records.maybe(records.device, row)

    async def list_devices(self, user_id: int) -> list[Device]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {DEVICE_COLS} FROM devices WHERE user_id = $1 ORDER BY id", user_id
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
            return rowcount(status) > 0

        return await self._write(txn)

    # -- conversations -------------------------------------------------------------------

    async def direct_conversation(self, user_id: int, other_id: int) -> Conversation:
        low, high = sorted((user_id, other_id))
        key = f"{low}:{high}"

        async def find(conn: Conn) -> Conversation | None:
            found = await conn.fetchval("SELECT id FROM conversations WHERE direct_key = $1", key)
            return None if found is None else await load_conversation(conn, int(found))

        async def txn(conn: Conn) -> Conversation:
            await require_users(conn, [user_id, other_id])
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
            await insert_lease(conn, conv_id)
            # A direct chat has no admin: nobody can add, remove or rename.
            users = list(dict.fromkeys((low, high)))
            await insert_members(conn, conv_id, [(u, "member") for u in users], now, 0)
            return await load_conversation(conn, conv_id)

        existing = await self._read(find)  # mostly it exists: no write needed
        return existing if existing is not None else await self._write(txn)

    async def create_group(
        self, creator_id: int, title: str, member_ids: list[int], max_members: int
    ) -> Conversation:
        return await self._write(
            lambda conn: groups.create_group(
                conn, self._clock, creator_id, title, member_ids, max_members
            )
        )

    async def add_members(
        self, actor_id: int, conv_id: int, user_ids: list[int], max_members: int
    ) -> Conversation:
        return await self._write(
            lambda conn: groups.add_members(
                conn, self._clock, actor_id, conv_id, user_ids, max_members
            )
        )

    async def remove_member(self, actor_id: int, conv_id: int, user_id: int) -> Conversation:
        return await self._write(
            lambda conn: groups.remove_member(conn, self._clock, actor_id, conv_id, user_id)
        )

    async def leave(self, user_id: int, conv_id: int) -> None:
        await self._write(lambda conn: groups.leave(conn, self._clock, user_id, conv_id))

    async def rename(self, actor_id: int, conv_id: int, title: str) -> Conversation:
        return await self._write(
            lambda conn: groups.rename(conn, self._clock, actor_id, conv_id, title)
        )

    async def get_conversation(self, conv_id: int, user_id: int) -> Conversation:
        async def txn(conn: Conn) -> Conversation:
            await require_member(conn, conv_id, user_id)
            return await load_conversation(conn, conv_id)

        return await self._read(txn)

    async def member_ids(self, conv_id: int) -> list[int]:
        async with self._connection() as conn:
            return await member_ids(conn, conv_id)

    async def list_conversations(self, user_id: int) -> list[ConversationSummary]:
        return await self._read(lambda conn: list_conversations(conn, user_id))

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
            await require_member(conn, conv_id, user_id)
            if limit <= 0:
                return []
            upper = before if before is not None else 2**62
            if after is not None:  # the `limit` just above `after` (and below `before`)
                rows = await conn.fetch(
                    f"SELECT {MSG_COLS} FROM messages"
                    " WHERE conv_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq LIMIT $4",
                    conv_id,
                    after,
                    upper,
                    limit,
                )
            else:  # the `limit` just below `before`, or the newest
                rows = await conn.fetch(
                    f"SELECT {MSG_COLS} FROM messages"
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
        self._send_queue.append(PendingSend(request, max_body, future))
        if self._send_task is None or self._send_task.done():
            self._send_task = loop.create_task(
                send_loop(self._send_queue, self._statement, self._clock)
            )
        return future

    # -- fan-out -------------------------------------------------------------------------

    async def fanout(self, worker_id: str, max_messages: int, lease_s: float) -> FanoutBatch:
        return await self._write(
            lambda conn: sending.fanout(
                conn, self._clock, self._fanout_position, worker_id, max_messages, lease_s
            )
        )

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

    # -- inbox and receipts --------------------------------------------------------------

    async def inbox_after(self, user_id: int, after: int, limit: int) -> list[InboxEntry]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT i.user_id, i.inbox_seq, i.conv_id, i.ts, i.receipt,"
                f" {M_MSG_COLS} FROM inbox i"
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
        """Queued and applied in bulk with the other acks queued meanwhile (`ack_loop`)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[list[InboxEntry]]] = []
        for device_id, up_to in acks:
            future: asyncio.Future[list[InboxEntry]] = loop.create_future()
            futures.append(future)
            if not 0 < device_id <= MAX_BIGINT:  # could not be passed in the batch's array
                future.set_exception(NotFound(f"no device {device_id}"))
                continue
            up_to = max(0, min(up_to, MAX_BIGINT))  # the same answer: no head is beyond this
            self._ack_queue.append(PendingAck(device_id, up_to, future))
        if self._ack_queue and (self._ack_task is None or self._ack_task.done()):
            self._ack_task = loop.create_task(
                ack_loop(self._ack_queue, self._call, self._clock, self._detail_max)
            )
        return await settled(futures)

    async def mark_read(self, user_id: int, conv_id: int, up_to_seq: int) -> list[InboxEntry]:
        return await self._write(
            lambda conn: acks.mark_read(
                conn, self._clock, self._detail_max, user_id, conv_id, up_to_seq
            )
        )

    async def receipts(self, conv_id: int, user_id: int) -> list[Member]:
        async def txn(conn: Conn) -> list[Member]:
            await require_member(conn, conv_id, user_id)
            return await members(conn, conv_id)

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


async def _keep_session(conn: Conn) -> None:
    """Pool release hook, instead of asyncpg's default reset query (``RESET ALL``,
    ``UNLISTEN *``, ``CLOSE ALL``, unlocking session advisory locks): a round trip on every
    call, for session state this store never leaves behind (it sets nothing, listens to
    nothing, keeps no cursors, and `migrate` releases its own lock). asyncpg still rolls
    back a transaction left open before calling this."""
