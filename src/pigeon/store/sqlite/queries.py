"""Small reads and writes shared by the store's operations: lookups, membership guards,
conversation rows. Plain functions over a connection, run on the store's threads."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import cast

from pigeon.store import records
from pigeon.store.errors import Forbidden, NotFound, NotMember
from pigeon.store.models import Conversation, ConversationKind, ConversationSummary, Member, Role
from pigeon.store.sqlite.batches import as_json, fields

USER_COLS = "id, username, display_name, created_at"


DEVICE_COLS = "id, user_id, name, created_at, revoked_at, cursor"


CONV_COLS = "id, kind, title, created_at, last_seq"


MEMBER_COLS = "user_id, role, joined_at, delivered_seq, read_seq"


MSG_COLS = "conv_id, seq, sender_id, sender_device, client_id, kind, body, ts"


def insert_conversation(
    conn: sqlite3.Connection, kind: ConversationKind, title: str, key: str | None, now: float
) -> int:
    row = conn.execute(
        "INSERT INTO conversations (kind, title, direct_key, created_at, last_activity)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id",
        (kind, title, key, now, now),
    ).fetchone()
    return int(row[0])


def insert_members(
    conn: sqlite3.Connection,
    conv_id: int,
    roles: Iterable[tuple[int, Role]],
    now: float,
    last_seq: int,
) -> None:
    conn.execute(
        "INSERT INTO members (conv_id, user_id, role, joined_at, joined_seq, delivered_seq,"
        f" read_seq) SELECT ?1, {fields(2)}, ?2, ?3, ?3, ?3 FROM json_each(?4)",
        (conv_id, now, last_seq, as_json(list(roles))),
    )


def promote_if_no_admin(conn: sqlite3.Connection, conv_id: int) -> int | None:
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


def require_users(conn: sqlite3.Connection, user_ids: Sequence[int]) -> None:
    unique = set(user_ids)
    found = conn.execute(
        "SELECT COUNT(*) FROM users WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(sorted(unique)),),
    ).fetchone()[0]
    if found != len(unique):
        raise NotFound("unknown user")


def require_member(conn: sqlite3.Connection, conv_id: int, user_id: int) -> Role:
    role = member_role(conn, conv_id, user_id)
    if role is None:
        raise NotMember(f"not a member of conversation {conv_id}")
    return role


def require_group_admin(conn: sqlite3.Connection, conv_id: int, user_id: int) -> None:
    role = require_member(conn, conv_id, user_id)
    if conversation_kind(conn, conv_id) != "group":
        raise Forbidden("a direct conversation has fixed members")
    if role != "admin":
        raise Forbidden("only an admin can do this")


def member_role(conn: sqlite3.Connection, conv_id: int, user_id: int) -> Role | None:
    row = conn.execute(
        "SELECT role FROM members WHERE conv_id = ? AND user_id = ?", (conv_id, user_id)
    ).fetchone()
    return None if row is None else cast(Role, row[0])


def conversation_kind(conn: sqlite3.Connection, conv_id: int) -> str:
    row = conn.execute("SELECT kind FROM conversations WHERE id = ?", (conv_id,)).fetchone()
    return "" if row is None else str(row[0])


def last_seq(conn: sqlite3.Connection, conv_id: int) -> int:
    row = conn.execute("SELECT last_seq FROM conversations WHERE id = ?", (conv_id,)).fetchone()
    if row is None:
        raise NotMember(f"no conversation {conv_id}")
    return int(row[0])


def inbox_head(conn: sqlite3.Connection, user_id: int) -> int:
    row = conn.execute("SELECT inbox_head FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None:
        raise NotFound(f"no user {user_id}")
    return int(row[0])


def member_ids(conn: sqlite3.Connection, conv_id: int) -> list[int]:
    rows = conn.execute(
        "SELECT user_id FROM members WHERE conv_id = ? ORDER BY joined_at, rowid", (conv_id,)
    )
    return [int(r[0]) for r in rows]


def members(conn: sqlite3.Connection, conv_id: int) -> list[Member]:
    rows = conn.execute(
        f"SELECT {MEMBER_COLS} FROM members WHERE conv_id = ? ORDER BY joined_at, rowid",
        (conv_id,),
    )
    return [records.member(r) for r in rows]


def load_conversation(conn: sqlite3.Connection, conv_id: int) -> Conversation:
    row = conn.execute(f"SELECT {CONV_COLS} FROM conversations WHERE id = ?", (conv_id,))
    found = row.fetchone()
    if found is None:
        raise NotMember(f"no conversation {conv_id}")
    return records.conversation(found, tuple(members(conn, conv_id)))


def list_conversations(conn: sqlite3.Connection, user_id: int) -> list[ConversationSummary]:
    convs = conn.execute(
        f"SELECT {', '.join('c.' + c for c in CONV_COLS.split(', '))}, me.read_seq"
        " FROM members me JOIN conversations c ON c.id = me.conv_id"
        " WHERE me.user_id = ? ORDER BY c.last_activity DESC, c.id DESC",
        (user_id,),
    ).fetchall()
    members: dict[int, list[Member]] = {}
    for row in conn.execute(
        f"SELECT conv_id, {MEMBER_COLS} FROM members"
        " WHERE conv_id IN (SELECT conv_id FROM members WHERE user_id = ?)"
        " ORDER BY conv_id, joined_at, rowid",
        (user_id,),
    ):
        members.setdefault(int(row[0]), []).append(records.member(row[1:]))
    summaries = []
    for row in convs:
        conv = records.conversation(row[:5], tuple(members.get(int(row[0]), ())))
        last = conn.execute(
            f"SELECT {MSG_COLS} FROM messages WHERE conv_id = ? AND seq = ?",
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
