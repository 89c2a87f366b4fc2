"""Small lookups, guards and writes shared by the store and its helper modules (plain
functions over a connection, inside the caller's transaction), and the column lists that
`pigeon.store.records` reads rows in."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

from pigeon.store import records
from pigeon.store.errors import Forbidden, NotFound, NotMember
from pigeon.store.models import Conversation, ConversationSummary, Member, Role
from pigeon.store.postgres.schema import Conn

USER_COLS = "id, username, display_name, created_at"
DEVICE_COLS = "id, user_id, name, created_at, revoked_at, cursor"
_CONV_COLS = "id, kind, title, created_at, last_seq"
_MEMBER_COLS = "user_id, role, joined_at, delivered_seq, read_seq"
MSG_COLS = "conv_id, seq, sender_id, sender_device, client_id, kind, body, ts"
M_MSG_COLS = ", ".join("m." + c for c in MSG_COLS.split(", "))
MEMBER_ORDER = "joined_at, joined_order"


async def lock_conversation(conn: Conn, conv_id: int) -> int:
    """Lock one conversation row (serialising its seq allocation); return its last seq."""
    last = await conn.fetchval(
        "SELECT last_seq FROM conversations WHERE id = $1 FOR UPDATE", conv_id
    )
    if last is None:
        raise NotMember(f"no conversation {conv_id}")
    return int(last)


async def insert_members(
    conn: Conn, conv_id: int, roles: Iterable[tuple[int, Role]], now: float, last_seq: int
) -> None:
    users, kinds = to_columns(list(roles), 2)
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


async def require_users(conn: Conn, user_ids: Sequence[int]) -> None:
    unique = sorted(set(user_ids))
    found = await conn.fetchval("SELECT count(*) FROM users WHERE id = ANY($1::bigint[])", unique)
    if found != len(unique):
        raise NotFound("unknown user")


async def require_member(conn: Conn, conv_id: int, user_id: int) -> Role:
    role = await member_role(conn, conv_id, user_id)
    if role is None:
        raise NotMember(f"not a member of conversation {conv_id}")
    return role


async def require_group_admin(conn: Conn, conv_id: int, user_id: int) -> None:
    role = await require_member(conn, conv_id, user_id)
    if await conversation_kind(conn, conv_id) != "group":
        raise Forbidden("a direct conversation has fixed members")
    if role != "admin":
        raise Forbidden("only an admin can do this")


async def member_role(conn: Conn, conv_id: int, user_id: int) -> Role | None:
    role = await conn.fetchval(
        "SELECT role FROM members WHERE conv_id = $1 AND user_id = $2", conv_id, user_id
    )
    return None if role is None else cast(Role, role)


async def conversation_kind(conn: Conn, conv_id: int) -> str:
    kind = await conn.fetchval("SELECT kind FROM conversations WHERE id = $1", conv_id)
    return "" if kind is None else str(kind)


async def last_seq(conn: Conn, conv_id: int) -> int:
    last = await conn.fetchval("SELECT last_seq FROM conversations WHERE id = $1", conv_id)
    if last is None:
        raise NotMember(f"no conversation {conv_id}")
    return int(last)


async def inbox_head(conn: Conn, user_id: int) -> int:
    head = await conn.fetchval("SELECT inbox_head FROM users WHERE id = $1", user_id)
    if head is None:
        raise NotFound(f"no user {user_id}")
    return int(head)


async def member_ids(conn: Conn, conv_id: int) -> list[int]:
    rows = await conn.fetch(
        f"SELECT user_id FROM members WHERE conv_id = $1 ORDER BY {MEMBER_ORDER}", conv_id
    )
    return [int(r[0]) for r in rows]


async def members(conn: Conn, conv_id: int) -> list[Member]:
    rows = await conn.fetch(
        f"SELECT {_MEMBER_COLS} FROM members WHERE conv_id = $1 ORDER BY {MEMBER_ORDER}",
        conv_id,
    )
    return [records.member(r) for r in rows]


async def load_conversation(conn: Conn, conv_id: int) -> Conversation:
    row = await conn.fetchrow(f"SELECT {_CONV_COLS} FROM conversations WHERE id = $1", conv_id)
    if row is None:
        raise NotMember(f"no conversation {conv_id}")
    return records.conversation(row, tuple(await members(conn, conv_id)))


async def list_conversations(conn: Conn, user_id: int) -> list[ConversationSummary]:
    convs = await conn.fetch(
        f"SELECT {', '.join('c.' + c for c in _CONV_COLS.split(', '))},"
        " (SELECT count(*) FROM messages u"
        "  WHERE u.conv_id = c.id AND u.seq > me.read_seq AND u.sender_id <> me.user_id),"
        f" {M_MSG_COLS}"
        " FROM members me JOIN conversations c ON c.id = me.conv_id"
        " LEFT JOIN messages m ON m.conv_id = c.id AND m.seq = c.last_seq"
        " WHERE me.user_id = $1 ORDER BY c.last_activity DESC, c.id DESC",
        user_id,
    )
    members: dict[int, list[Member]] = {}
    for row in await conn.fetch(
        f"SELECT conv_id, {_MEMBER_COLS} FROM members"
        " WHERE conv_id IN (SELECT conv_id FROM members WHERE user_id = $1)"
        f" ORDER BY conv_id, {MEMBER_ORDER}",
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


def to_columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows to columns, for ``unnest($1::type[], $2::type[], ...)``."""
    return [[row[i] for row in rows] for i in range(width)]


def rowcount(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])
