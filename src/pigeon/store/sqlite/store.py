"""`SqliteStore`: the embedded store's operations, over the writer and reader threads."""

from __future__ import annotations

import asyncio
import functools
import json
import pathlib
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pigeon.store import receipts, records
from pigeon.store.checkpoint import WalCheckpointer
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
    Role,
    SendRequest,
    SendResult,
    User,
)
from pigeon.store.sqlite import queries
from pigeon.store.sqlite.acks import DetailedReceipts, advance
from pigeon.store.sqlite.queries import DEVICE_COLS, MSG_COLS, USER_COLS
from pigeon.store.sqlite.schema import connect, migrate, require_features
from pigeon.store.sqlite.sending import (
    InboxAppender,
    append_system,
    fanout_round,
)
from pigeon.store.sqlite.writer import Writer, run_on
from pigeon.store.sqlite.writer_process import Settings

T = TypeVar("T")
Clock = Callable[[], float]


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
        self._settings = Settings(str(path), fsync, fanout_with_send, receipt_detail_max_group)
        self._checkpointer = WalCheckpointer(self._connect, checkpoint_interval_s)
        self._clock = clock
        self._detailed = DetailedReceipts(receipt_detail_max_group)
        self._writer = Writer(self._checkpointer, self._settings, clock)
        self._reader: ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None  # created, used, closed on its thread
        # Round-robin position of fanout over conversations (touched by the writer thread only).
        self._fanout_after = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pigeon-sqlite-r")
        try:
            # The writer connects and migrates first: the reader must see the final schema.
            await self._writer.open(self._open_writer)
            try:
                await asyncio.get_running_loop().run_in_executor(reader, self._open_reader)
            except BaseException:
                await self._writer.close()
                raise
        except sqlite3.Error as exc:
            reader.shutdown(wait=False)
            raise Unavailable(f"cannot open {self._settings.path}: {exc}") from exc
        self._reader = reader
        await self._checkpointer.start()

    async def close(self) -> None:
        await self._writer.close()
        await self._checkpointer.stop()
        reader, self._reader = self._reader, None
        if reader is not None:
            await asyncio.get_running_loop().run_in_executor(reader, self._close_reader)
            reader.shutdown(wait=False)

    def _connect(self) -> sqlite3.Connection:
        return connect(self._settings.path, self._settings.fsync)

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        require_features(conn)
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn, self._clock)
        return conn

    def _open_reader(self) -> None:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        self._rconn = conn

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    # -- reads ---------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one read transaction (a consistent snapshot) on the reader thread."""
        return await run_on(self._reader, functools.partial(self._in_read_txn, fn))

    async def _query(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn``, which runs ONE statement, on the reader thread. A statement outside
        a transaction reads one snapshot by itself; BEGIN and COMMIT around it were two
        more statements, and two more waits for the GIL, on every hello's lookups."""
        return await run_on(self._reader, functools.partial(self._in_autocommit, fn))

    def _reader_conn(self) -> sqlite3.Connection:
        if self._rconn is None:
            raise Unavailable("the store is closed")
        return self._rconn

    def _in_autocommit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return fn(self._reader_conn())

    def _in_read_txn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._reader_conn()
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
                    f" VALUES (?, ?, ?, ?) RETURNING {USER_COLS}",
                    (username, display_name, password_hash, now),
                ).fetchone()
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"username {username!r} is taken") from exc
            return records.user(row)

        return await self._writer.write(txn)

    async def get_user(self, user_id: int) -> User | None:
        def txn(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(f"SELECT {USER_COLS} FROM users WHERE id = ?", (user_id,))
            return records.maybe(records.user, row.fetchone())

        return await self._query(txn)

    async def find_user(self, username: str) -> User | None:
        def txn(conn: sqlite3.Connection) -> User | None:
            # The column is COLLATE NOCASE, so '=' is case-insensitive and uses the index.
            row = conn.execute(f"SELECT {USER_COLS} FROM users WHERE username = ?", (username,))
            return records.maybe(records.user, row.fetchone())

        return await self._query(txn)

    async def password_hash(self, user_id: int) -> str:
        def txn(conn: sqlite3.Connection) -> str:
            row = conn.execute("SELECT password_hash FROM users WHERE id = ?", (user_id,))
            found = row.fetchone()
            if found is None:
                raise NotFound(f"no user {user_id}")
            return str(found[0])

        return await self._query(txn)

    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user_id)
            )
            if cur.rowcount == 0:
                raise NotFound(f"no user {user_id}")

        await self._writer.write(txn)

    async def list_users(self) -> list[User]:
        def txn(conn: sqlite3.Connection) -> list[User]:
            rows = conn.execute(f"SELECT {USER_COLS} FROM users ORDER BY id")
            return [records.user(r) for r in rows]

        return await self._query(txn)

    async def create_device(self, user_id: int, name: str, token_hash: str) -> Device:
        def txn(conn: sqlite3.Connection) -> Device:
            head = queries.inbox_head(conn, user_id)
            try:
                row = conn.execute(
                    "INSERT INTO devices (user_id, name, token_hash, created_at, cursor)"
                    f" VALUES (?, ?, ?, ?, ?) RETURNING {DEVICE_COLS}",
                    (user_id, name, token_hash, self._clock(), head),
                ).fetchone()
            except sqlite3.IntegrityError as exc:
                raise Conflict("token hash already in use") from exc
            return records.device(row)

        return await self._writer.write(txn)

    async def device_for_token(self, token_hash: str) -> Device | None:
        def txn(conn: sqlite3.Connection) -> Device | None:
            row = conn.execute(
                f"SELECT {DEVICE_COLS} FROM devices WHERE token_hash = ? AND revoked_at IS NULL",
                (token_hash,),
            )
            return records.maybe(records.device, row.fetchone())

        return await self._query(txn)

    async def list_devices(self, user_id: int) -> list[Device]:
        def txn(conn: sqlite3.Connection) -> list[Device]:
            rows = conn.execute(
                f"SELECT {DEVICE_COLS} FROM devices WHERE user_id = ? ORDER BY id", (user_id,)
            )
            return [records.device(r) for r in rows]

        return await self._query(txn)

    async def revoke_device(self, user_id: int, device_id: int) -> bool:
        def txn(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE devices SET revoked_at = ?"
                " WHERE id = ? AND user_id = ? AND revoked_at IS NULL",
                (self._clock(), device_id, user_id),
            )
            return cur.rowcount > 0

        return await self._writer.write(txn)

    # -- conversations -------------------------------------------------------------------

    async def direct_conversation(self, user_id: int, other_id: int) -> Conversation:
        low, high = sorted((user_id, other_id))
        key = f"{low}:{high}"

        def find(conn: sqlite3.Connection) -> Conversation | None:
            row = conn.execute("SELECT id FROM conversations WHERE direct_key = ?", (key,))
            found = row.fetchone()
            return None if found is None else queries.load_conversation(conn, int(found[0]))

        def txn(conn: sqlite3.Connection) -> Conversation:
            existing = find(conn)  # again, under the write lock: it may have been created
            if existing is not None:
                return existing
            queries.require_users(conn, [user_id, other_id])
            now = self._clock()
            conv_id = queries.insert_conversation(conn, "direct", "", key, now)
            # A direct chat has no admin: nobody can add, remove or rename.
            queries.insert_members(
                conn, conv_id, [(u, "member") for u in dict.fromkeys((low, high))], now, 0
            )
            return queries.load_conversation(conn, conv_id)

        # Mostly the conversation exists: look on the reader first, keeping the writer free.
        existing = await self._read(find)
        return existing if existing is not None else await self._writer.write(txn)

    async def create_group(
        self, creator_id: int, title: str, member_ids: list[int], max_members: int
    ) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            users = list(dict.fromkeys([creator_id, *member_ids]))  # dedup, keep order
            if len(users) > max_members:
                raise LimitExceeded(f"a group has at most {max_members} members")
            queries.require_users(conn, users)
            now = self._clock()
            conv_id = queries.insert_conversation(conn, "group", title, None, now)
            roles: list[tuple[int, Role]] = [(creator_id, "admin")]
            roles += [(u, "member") for u in users[1:]]
            queries.insert_members(conn, conv_id, roles, now, 0)
            event = {"event": "created", "title": title, "by": creator_id, "users": users}
            append_system(conn, conv_id, creator_id, event, now)
            return queries.load_conversation(conn, conv_id)

        return await self._writer.write(txn)

    async def add_members(
        self, actor_id: int, conv_id: int, user_ids: list[int], max_members: int
    ) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            queries.require_group_admin(conn, conv_id, actor_id)
            current = set(queries.member_ids(conn, conv_id))
            new = [u for u in dict.fromkeys(user_ids) if u not in current]
            if not new:
                return queries.load_conversation(conn, conv_id)
            queries.require_users(conn, new)
            if len(current) + len(new) > max_members:
                raise LimitExceeded(f"a group has at most {max_members} members")
            now = self._clock()
            # New members start at the current last seq: the "added" message is their first.
            queries.insert_members(
                conn, conv_id, [(u, "member") for u in new], now, queries.last_seq(conn, conv_id)
            )
            event = {"event": "added", "users": new, "by": actor_id}
            append_system(conn, conv_id, actor_id, event, now)
            return queries.load_conversation(conn, conv_id)

        return await self._writer.write(txn)

    async def remove_member(self, actor_id: int, conv_id: int, user_id: int) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            if user_id == actor_id:
                self._leave(conn, actor_id, conv_id)
                return queries.load_conversation(conn, conv_id)
            queries.require_group_admin(conn, conv_id, actor_id)
            if queries.member_role(conn, conv_id, user_id) is None:
                raise NotFound(f"user {user_id} is not a member of conversation {conv_id}")
            conn.execute(
                "DELETE FROM members WHERE conv_id = ? AND user_id = ?", (conv_id, user_id)
            )
            event = {"event": "removed", "user": user_id, "by": actor_id}
            append_system(conn, conv_id, actor_id, event, self._clock())
            return queries.load_conversation(conn, conv_id)

        return await self._writer.write(txn)

    async def leave(self, user_id: int, conv_id: int) -> None:
        await self._writer.write(lambda conn: self._leave(conn, user_id, conv_id))

    def _leave(self, conn: sqlite3.Connection, user_id: int, conv_id: int) -> None:
        role = queries.member_role(conn, conv_id, user_id)
        if role is None:
            raise NotMember(f"not a member of conversation {conv_id}")
        if queries.conversation_kind(conn, conv_id) != "group":
            # The pair's one direct conversation must keep both members to stay findable.
            raise Forbidden("cannot leave a direct conversation")
        conn.execute("DELETE FROM members WHERE conv_id = ? AND user_id = ?", (conv_id, user_id))
        event: dict[str, Any] = {"event": "left", "user": user_id}
        if role == "admin":
            heir = queries.promote_if_no_admin(conn, conv_id)
            if heir is not None:
                event["admin"] = heir
        append_system(conn, conv_id, user_id, event, self._clock())

    async def rename(self, actor_id: int, conv_id: int, title: str) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            if queries.member_role(conn, conv_id, actor_id) is None:
                raise NotMember(f"not a member of conversation {conv_id}")
            if queries.conversation_kind(conn, conv_id) != "group":
                raise Forbidden("only groups have a title")
            conn.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conv_id))
            event = {"event": "renamed", "title": title, "by": actor_id}
            append_system(conn, conv_id, actor_id, event, self._clock())
            return queries.load_conversation(conn, conv_id)

        return await self._writer.write(txn)

    async def get_conversation(self, conv_id: int, user_id: int) -> Conversation:
        def txn(conn: sqlite3.Connection) -> Conversation:
            queries.require_member(conn, conv_id, user_id)
            return queries.load_conversation(conn, conv_id)

        return await self._read(txn)

    async def member_ids(self, conv_id: int) -> list[int]:
        return await self._query(lambda conn: queries.member_ids(conn, conv_id))

    async def list_conversations(self, user_id: int) -> list[ConversationSummary]:
        return await self._read(lambda conn: queries.list_conversations(conn, user_id))

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
            queries.require_member(conn, conv_id, user_id)
            if limit <= 0:
                return []
            upper = before if before is not None else 2**62
            if after is not None:  # the `limit` just above `after` (and below `before`)
                rows = conn.execute(
                    f"SELECT {MSG_COLS} FROM messages WHERE conv_id = ? AND seq > ? AND seq < ?"
                    " ORDER BY seq LIMIT ?",
                    (conv_id, after, upper, limit),
                ).fetchall()
            else:  # the `limit` just below `before`, or the newest
                rows = conn.execute(
                    f"SELECT {MSG_COLS} FROM messages WHERE conv_id = ? AND seq < ?"
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

        return await self._query(txn)

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

        return await self._query(txn)

    # -- sending (group commit) ----------------------------------------------------------

    def send_message(self, request: SendRequest, max_body: int) -> asyncio.Future[SendResult]:
        return self._writer.send(request, max_body)

    # -- fan-out -------------------------------------------------------------------------

    async def fanout(self, worker_id: str, max_messages: int, lease_s: float) -> FanoutBatch:
        fanned_out = self._writer.fanned_out
        if fanned_out:  # committed with their sends: only the push is left
            count = min(len(fanned_out), max(max_messages, 1))
            entries = [e for _ in range(count) for e in fanned_out.popleft()]
            return FanoutBatch(entries=entries, more=bool(fanned_out))

        def txn(conn: sqlite3.Connection) -> FanoutBatch:
            now, after = self._clock(), self._fanout_after
            batch, self._fanout_after = fanout_round(
                conn, worker_id, max_messages, lease_s, now, after
            )
            return batch

        # Urgent: it rides in the next round ahead of queued acks (a message is late until
        # it is fanned out; an ack is only a receipt).
        return await self._writer.write(txn, urgent=True)

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

        return await self._query(txn)

    async def inbox_bounds(self, user_id: int) -> InboxBounds:
        def txn(conn: sqlite3.Connection) -> InboxBounds:
            row = conn.execute(
                "SELECT inbox_floor, inbox_head FROM users WHERE id = ?", (user_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no user {user_id}")
            return InboxBounds(floor=int(row[0]), head=int(row[1]))

        return await self._query(txn)

    async def ack(self, device_id: int, up_to: int) -> list[InboxEntry]:
        return only(await self.ack_many([(device_id, up_to)]))

    async def ack_many(
        self, acks: Sequence[tuple[int, int]]
    ) -> list[list[InboxEntry] | StoreError]:
        """Queued and applied with every other ack of the round at once (`apply_acks`):
        a big group acks each message from every member's device."""
        return await settled([self._writer.ack(device_id, up_to) for device_id, up_to in acks])

    async def mark_read(self, user_id: int, conv_id: int, up_to_seq: int) -> list[InboxEntry]:
        def txn(conn: sqlite3.Connection) -> list[InboxEntry]:
            queries.require_member(conn, conv_id, user_id)
            last = queries.last_seq(conn, conv_id)
            if not 0 <= up_to_seq <= last:
                raise BadPosition(f"seq {up_to_seq} is beyond the last message ({last})")
            inbox = InboxAppender(conn, self._clock())
            # Read implies delivered: both move.
            advance(conn, inbox, [(conv_id, user_id, up_to_seq, up_to_seq)], self._detailed)
            return inbox.flush()

        return await self._writer.write(txn)

    async def receipts(self, conv_id: int, user_id: int) -> list[Member]:
        def txn(conn: sqlite3.Connection) -> list[Member]:
            queries.require_member(conn, conv_id, user_id)
            return queries.members(conn, conv_id)

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

        return await self._writer.write(txn)
